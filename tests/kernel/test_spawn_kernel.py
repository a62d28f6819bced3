"""A root command never imports code planted in its working directory.

Every command that starts a Python child (doctor and every live command:
the capability trial; workload and the demo: the workload children) is run
as root from a directory holding a planted `ksmtrace/` package and modules
named like those a child imports first. The plants write a marker when
imported; none may appear. The control, a plain `python -m`, must import
them: that is what the test would catch.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ksmtrace.spawn import python_argv

pytestmark = [pytest.mark.kernel]

PLANTED = ("ksmtrace/__init__.py", "ksmtrace/sources/__init__.py",
           "ksmtrace/sources/trial.py", "ksmtrace/workload/__init__.py",
           "ksmtrace/workload/__main__.py", "json.py", "runpy.py", "bcc.py")


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
    for rel in PLANTED:
        f = tmp_path / "cwd" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(code)
    return tmp_path / "cwd", marker


def run(cwd: Path, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    # the console script of this interpreter's environment: it does not put
    # the working directory on sys.path itself
    exe = Path(sys.executable).parent / "ksmtrace"
    assert exe.exists(), f"no console script {exe} (scripts/setup.sh installs it)"
    return subprocess.run([str(exe), *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_control_plain_python_m_runs_the_plant(planted):
    cwd, marker = planted
    subprocess.run([sys.executable, "-m", "ksmtrace.sources.trial"], cwd=cwd,
                   capture_output=True, timeout=60)
    assert marker.exists(), "the plant was not imported by plain -m: the test proves nothing"


@pytest.mark.parametrize(
    "argv",
    [
        ("doctor", "--json"),  # the capability trial
        ("stat", "0.2", "1"),  # a live command: trial, then bcc
        ("trace", "--duration", "0.5"),
        ("record", "-o", "{tmp}/x.ksmrec", "--duration", "0.4", "0.2"),
        ("workload", "-n", "2", "-p", "20", "-d", "2"),  # the workload children
        ("stat", "--demo", "0.5", "2"),  # the demo's workload children
    ],
    ids=["doctor", "stat", "trace", "record", "workload", "demo"],
)
def test_children_never_import_from_the_working_directory(planted, quiet_ksm, argv, tmp_path):
    cwd, marker = planted
    r = run(cwd, *(a.format(tmp=tmp_path) for a in argv))
    assert r.returncode == 0, r.stderr[-2000:]
    assert not marker.exists(), f"planted code ran as root: {marker.read_text()}"


def test_python_argv_runs_the_module_with_its_arguments(planted):
    cwd, marker = planted
    r = subprocess.run(python_argv("ksmtrace.workload", "--help"), cwd=cwd,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "examples:" in r.stdout, r.stderr
    assert not marker.exists()
