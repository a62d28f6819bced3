"""Child Python processes that import only ksmtrace's own code.

`python -m ksmtrace.x` puts the working directory first on sys.path, so a
root command run in a directory holding a planted `ksmtrace/` (or `json.py`)
would execute it. Children start isolated instead (`-I`: no working
directory, no PYTHON* variables, no user site-packages), with the directory
this package was loaded from first on sys.path.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)

# argv after -c: PACKAGE_PARENT, the module, then the module's own arguments
_BOOT = (
    "import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); m = sys.argv.pop(1); "
    "runpy.run_module(m, run_name='__main__', alter_sys=True)"
)


def python_argv(module: str, *args: str) -> list[str]:
    """The argv that runs `module` as __main__ with `args`, isolated."""
    return [sys.executable, "-I", "-c", _BOOT, PACKAGE_PARENT, module, *args]


def reap(proc: subprocess.Popen, grace: float, sig: int | None = signal.SIGTERM) -> int:
    """End a child: send it `sig` if it still runs (None: it was already
    asked some other way), wait `grace` seconds, then SIGKILL. Its exit status."""
    if sig is not None and proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
