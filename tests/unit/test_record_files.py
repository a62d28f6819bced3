"""What a recording reader does with lengths, sizes and files that are not
recordings: a length is checked against the limits and the file's size
before anything is allocated, a FIFO or device is refused before any read
(a FIFO never blocks), an I/O error is a corrupt recording (exit 9, one
line), and a file cut off inside its first tick is one error line."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import tracemalloc
import zlib
from pathlib import Path

import pytest
from recbytes import FIX, HEAD, records

from ksmtrace.cli import main
from ksmtrace.errors import BadRecording
from ksmtrace.record import (
    DATA_START,
    MAX_JSON,
    MAX_RECORD,
    TICK,
    Recording,
)

MiB = 2**20


@pytest.fixture(scope="module")
def data() -> bytes:
    return FIX.read_bytes()


def offsets(data: bytes) -> list[tuple[int, int]]:
    """(offset, kind) of each record."""
    return [(pos, kind) for pos, kind, _ in records(data)]


def head(kind: int, length: int, crc: int = 0) -> bytes:
    h = struct.pack("<BII", kind, length, crc)
    return h + struct.pack("<I", zlib.crc32(h))


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_9(rc: int, out: str, err: str, text: str) -> None:
    assert rc == 9 and out == "", err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ksmtrace: "), err
    assert text in lines[0], err


def peak_of(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ------------------------------------------------------------------ lengths
@pytest.mark.parametrize("length", [0xFFFFFFFF, MAX_RECORD + 1, 2**30])
def test_a_length_over_the_limit_is_refused_without_allocating(tmp_path, data, length):
    """A head with a valid checksum and a huge length: refused at once."""
    at = offsets(data)[5][0]
    p = tmp_path / "big.ksmrec"
    p.write_bytes(data[:at] + head(TICK, length) + data[at + HEAD.size:])

    def read():
        with pytest.raises(BadRecording) as e:
            with Recording(p, warn=None) as r:
                list(r.ticks())
        assert e.value.message.endswith(f"tick record of {length} bytes (the limit is 256 MiB) "
                                        f"at byte offset {at}")

    assert peak_of(read) < 2 * MiB


def test_a_json_record_over_its_limit_is_refused(tmp_path, data):
    p = tmp_path / "big.ksmrec"
    p.write_bytes(data[:DATA_START] + head(1, MAX_JSON + 1) + data[DATA_START + HEAD.size:])
    with pytest.raises(BadRecording, match="header record of 33554433 bytes .the limit is 32 MiB. "
                                           f"at byte offset {DATA_START}"):
        Recording(p, warn=None)


def test_a_length_beyond_the_end_of_the_file_is_a_cut_end_not_an_allocation(tmp_path, data):
    """Within the limit but past the file's end (the recorder was killed
    while writing a big tick): the ticks before it are read, nothing as big
    as the length is allocated."""
    last = [o for o, k in offsets(data) if k == TICK][-1]
    p = tmp_path / "cut.ksmrec"
    p.write_bytes(data[:last] + head(TICK, MAX_RECORD) + b"\0" * 1000)

    def read():
        with Recording(p, warn=None) as r:
            assert len(list(r.ticks())) == 24
            assert r.truncated and r.cut_at == last

    assert peak_of(read) < 4 * MiB


def test_a_sparse_gigabyte_tick_is_refused_without_reading_it(tmp_path, data):
    at = offsets(data)[1][0]
    p = tmp_path / "sparse.ksmrec"
    with open(p, "wb") as f:
        f.write(data[:at] + head(TICK, 2**30))
        f.truncate(at + HEAD.size + 2**30)  # a hole: no disk space, no page cache
    assert os.path.getsize(p) > 2**30
    e = None

    def read():
        nonlocal e
        with pytest.raises(BadRecording) as e:
            with Recording(p, warn=None) as r:
                list(r.ticks())

    assert peak_of(read) < 2 * MiB
    assert "tick record of 1073741824 bytes (the limit is 256 MiB)" in e.value.message


def test_a_big_tick_is_read_once_not_copied(tmp_path, data):
    """A 64 MiB tick record (a sparse one: zeros, so its checksum fails)
    is read as one record, not once whole and again in parts."""
    at = offsets(data)[1][0]
    p = tmp_path / "sparse.ksmrec"
    size = 64 * MiB
    with open(p, "wb") as f:
        f.write(data[:at] + head(TICK, size, crc=1))
        f.truncate(at + HEAD.size + size)

    def read():
        with pytest.raises(BadRecording, match="tick record checksum mismatch"):
            with Recording(p, warn=None) as r:
                list(r.ticks())

    assert peak_of(read) < size * 1.1


# -------------------------------------------------------------- not files
@pytest.mark.timeout(20)
def test_a_fifo_is_refused_before_blocking(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(BadRecording, match="is a FIFO, not a recording"):
        Recording(fifo)
    for argv in (["report", str(fifo)], ["timeline", str(fifo), "-o", str(tmp_path / "t")]):
        one_line_9(*cli(argv, capsys), "is a FIFO, not a recording")


@pytest.mark.timeout(20)
def test_a_fifo_swapped_in_after_the_check_is_refused_without_blocking(tmp_path, data,
                                                                       monkeypatch):
    """stat saw a regular file, open finds a FIFO: opened without blocking
    (O_NONBLOCK), refused by fstat."""
    regular = tmp_path / "r.ksmrec"
    regular.write_bytes(data)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda path, *a, **k: real_stat(
        regular if os.fspath(path) == os.fspath(fifo) else path, *a, **k))
    with pytest.raises(BadRecording, match="is a FIFO, not a recording"):
        Recording(fifo)


@pytest.mark.parametrize("path,what", [("/dev/null", "a character device"),
                                       ("/", "a directory")])
def test_devices_and_directories_are_refused(path, what, capsys):
    one_line_9(*cli(["report", path], capsys), f"{path} is {what}, not a recording")


def test_proc_self_mem_is_exit_9_not_an_oserror(capsys):
    """A regular file (to stat) whose read fails with EIO."""
    for argv in (["report", "/proc/self/mem"], ["report", "--json", "/proc/self/mem"]):
        one_line_9(*cli(argv, capsys), "cannot read it (Input/output error) at byte offset 0")


def test_an_io_error_while_reading_ticks_is_exit_9(tmp_path, data, monkeypatch, capsys):
    p = tmp_path / "eio.ksmrec"
    p.write_bytes(data)
    at = offsets(data)[3][0]
    real = os.pread

    def pread(fd, n, offset):
        if offset >= at:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread)
    with pytest.raises(BadRecording, match=f"cannot read it .Input/output error. at byte "
                                           f"offset {at}$"):
        with Recording(p, warn=None) as r:
            list(r.ticks())
    one_line_9(*cli(["report", str(p)], capsys), "Input/output error")


def test_an_unreadable_file_is_exit_9(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root reads everything")
    p = tmp_path / "secret.ksmrec"
    p.write_bytes(b"")
    p.chmod(0)
    one_line_9(*cli(["report", str(p)], capsys), "permission denied")


# ------------------------------------------------------------ cut-off files
def test_a_file_cut_inside_its_first_tick_is_one_error_line(tmp_path, data, capsys):
    first = offsets(data)[1][0]
    p = tmp_path / "cut.ksmrec"
    p.write_bytes(data[:first + 40])
    one_line_9(*cli(["report", str(p)], capsys),
               f"holds no complete tick (it ends inside one at byte offset {first})")


def test_a_file_cut_later_is_reported_with_one_warning(tmp_path, data, capsys):
    last = [o for o, k in offsets(data) if k == TICK][-1]
    p = tmp_path / "cut.ksmrec"
    p.write_bytes(data[:last + 40])
    rc, out, err = cli(["report", "--json", str(p)], capsys)
    assert rc == 0 and '"truncated": true' in out
    assert err.splitlines() == [
        f"ksmtrace: warning: {p} ends inside a record at byte offset {last} (the recorder "
        "was killed?): that record is dropped, the ticks before it are read"]


@pytest.mark.parametrize("cut", [DATA_START + 5, DATA_START + 20, DATA_START + 500])
def test_a_file_cut_inside_its_header_is_one_error_line(tmp_path, data, cut, capsys):
    p = tmp_path / "cut.ksmrec"
    p.write_bytes(data[:cut])
    one_line_9(*cli(["report", str(p)], capsys),
               f"file ends inside the header record at byte offset {DATA_START}")


def test_a_file_growing_meanwhile_is_read_as_far_as_it_goes(tmp_path, data):
    """A recorder still writing: ticks appended after the reader opened the
    file (and saw its size) are read too."""
    ticks = [o for o, k in offsets(data) if k == TICK]
    p = tmp_path / "growing.ksmrec"
    p.write_bytes(data[:ticks[3]])
    with Recording(p, warn=None) as r:
        assert len(list(r.ticks())) == 3
        with open(p, "ab") as f:
            f.write(data[ticks[3]:ticks[10]])
        assert len(list(r.ticks())) == 10
        assert not r.truncated and r.end is None


def test_without_msgspec_reading_says_what_is_missing(tmp_path):
    """Debian's bare python3 has no msgspec: the CLI starts, and reading a
    recording is one line saying what to install (as export does for
    prometheus-client)."""
    py = "/usr/bin/python3"
    if not Path(py).exists():
        pytest.skip("no /usr/bin/python3")
    if subprocess.run([py, "-c", "import msgspec"], capture_output=True).returncode == 0:
        pytest.skip("/usr/bin/python3 has msgspec")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(FIX.parents[3])}
    r = subprocess.run([py, "-m", "ksmtrace", "report", "--help"], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([py, "-m", "ksmtrace", "report", str(FIX)], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines()[0] == \
        "ksmtrace: reading a recording needs the Python package msgspec", r.stderr
    assert "Traceback" not in r.stderr
