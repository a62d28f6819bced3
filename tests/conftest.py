"""Test tiers.

- unit tests (default): pure logic on fixtures recorded from a real kernel.
- `@pytest.mark.kernel`: runs against the real host kernel as root. These
  tests are serialised across processes by a lock file (KSM is global
  state), and every one is checked afterwards: a knob left changed fails the
  test and is put back. With CI=true a kernel test that would skip fails.
"""

from __future__ import annotations

import fcntl
import os

import pytest

from ksmtrace.kernel import sysfs

LOCK_PATH = "/run/lock/ksmtrace-kernel-tests.lock"
IN_CI = os.environ.get("CI", "").lower() == "true"


def kernel_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "kernel tier needs root"
    if not sysfs.ksm_present():
        return "kernel tier needs a KSM kernel (/sys/kernel/mm/ksm)"
    return None


@pytest.fixture(scope="session")
def _kernel_lock():
    os.makedirs(os.path.dirname(LOCK_PATH), exist_ok=True)
    with open(LOCK_PATH, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@pytest.fixture(autouse=True)
def _kernel_guard(request):
    if request.node.get_closest_marker("kernel") is None:
        yield
        return
    reason = kernel_unavailable()
    if reason:
        pytest.skip(reason)
    request.getfixturevalue("_kernel_lock")
    before = {k: sysfs.read_knob(k) for k in sysfs.KNOBS}
    yield
    after = {k: sysfs.read_knob(k) for k in sysfs.KNOBS}
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    if changed:
        with sysfs.KsmKnobs() as k:  # put them back, then fail loudly
            k.saved.update({name: old for name, (old, _) in changed.items()})
        pytest.fail(f"test left KSM knobs changed (before, after): {changed}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and item.get_closest_marker("kernel") is not None:
        # CI runs as root on a KSM kernel: a kernel test that skips there is a
        # missing install step or a broken probe, not an excuse.
        report.outcome = "failed"
        report.longrepr = f"kernel-tier test skipped under CI=true: {report.longrepr}"


@pytest.fixture
def as_nobody():
    """argv prefix, env and cwd to run `python -m ksmtrace` as user nobody.

    The package is copied to a world-readable temp dir under /tmp and run with
    Debian's python3, so the test does not depend on the checkout's
    permissions (CI may clone under a 0700 home)."""
    import shutil
    import sys
    import tempfile
    from pathlib import Path

    pkg = Path(__file__).resolve().parent.parent / "ksmtrace"
    dest = Path(tempfile.mkdtemp(prefix="ksmtrace-nobody-"))
    try:
        shutil.copytree(pkg, dest / "ksmtrace", ignore=shutil.ignore_patterns("__pycache__"))
        for p in [dest, *dest.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        py = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", py, "-m",
                "ksmtrace"]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(dest), "PYTHONPATH": str(dest)}
        yield argv, env, dest
    finally:
        shutil.rmtree(dest, ignore_errors=True)


@pytest.fixture
def loaded_by():
    """`loaded_by(statement, modules)`: which of `modules` a fresh interpreter
    has imported after running `statement` (start-up cost guards)."""
    import subprocess
    import sys

    def run(statement: str, modules: tuple[str, ...]) -> list[str]:
        code = (f"import sys\n{statement}\n"
                f"print(*sorted(m for m in {modules!r} if m in sys.modules))")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True).stdout.split()

    return run
