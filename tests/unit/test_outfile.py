"""Outputs (recordings, timelines) never follow a planted link, never land
on someone else's file or on the input, and are private (0600)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ksmtrace.errors import UsageError
from ksmtrace.outfile import open_output

FIXTURE = Path(__file__).parent.parent / "fixtures" / "recordings" / "host-6.18-workload.ksmrec"


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_new_file_is_private_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with open_output(tmp_path / "out") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert mode(tmp_path / "out") == 0o600 and (tmp_path / "out").read_bytes() == b"x"


def test_existing_file_is_emptied_and_made_private(tmp_path):
    p = tmp_path / "out"
    p.write_bytes(b"old contents")
    p.chmod(0o644)
    with open_output(p, text=True) as f:
        f.write("new")
    assert p.read_text() == "new" and mode(p) == 0o600


def test_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"secret")
    victim.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(victim)
    with pytest.raises(UsageError, match="symbolic link"):
        open_output(link)
    assert victim.read_bytes() == b"secret"


def test_a_dangling_symlink_creates_nothing(tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "would-be-created")
    with pytest.raises(UsageError, match="symbolic link"):
        open_output(link)
    assert not (tmp_path / "would-be-created").exists()


def test_a_hard_link_is_refused(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"secret")
    os.link(victim, tmp_path / "alias")
    with pytest.raises(UsageError, match="hard links"):
        open_output(tmp_path / "alias")
    assert victim.read_bytes() == b"secret"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_another_users_file_is_refused(tmp_path):
    p = tmp_path / "theirs"
    p.write_bytes(b"theirs")
    os.chown(p, 65534, 65534)
    with pytest.raises(UsageError, match="belongs to uid 65534"):
        open_output(p)
    assert p.read_bytes() == b"theirs"


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="FIFO"):
        open_output(fifo)


def test_the_input_is_refused(tmp_path):
    rec = tmp_path / "x.ksmrec"
    shutil.copy(FIXTURE, rec)
    with pytest.raises(UsageError, match="is the input"):
        open_output(rec, inputs=[rec])
    assert rec.read_bytes() == FIXTURE.read_bytes()


def test_timeline_onto_its_own_recording_exits_2_and_keeps_it(tmp_path):
    rec = tmp_path / "x.ksmrec"
    shutil.copy(FIXTURE, rec)
    r = subprocess.run([sys.executable, "-m", "ksmtrace", "timeline", str(rec), "-o", str(rec)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.startswith("ksmtrace: refusing to write")
    assert rec.read_bytes() == FIXTURE.read_bytes()


def test_timeline_output_is_private(tmp_path):
    out = tmp_path / "trace.json"
    r = subprocess.run([sys.executable, "-m", "ksmtrace", "timeline", str(FIXTURE), "-o",
                        str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert mode(out) == 0o600
