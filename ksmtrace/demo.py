"""The demo workload behind `stat --demo` (and later `top --demo`): four
processes whose pages merge, then copy-on-write storms break some of them,
then they merge again, in a loop, until the view exits. Every KSM knob is
restored and every child ended on every exit path (Ctrl-C and SIGTERM too).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from ksmtrace.workload import Workload, WorkloadSpec

DEMO_SPEC = WorkloadSpec(processes=4, pages=8000, distinct=200)


@contextlib.contextmanager
def demo(spec: WorkloadSpec = DEMO_SPEC) -> Iterator[list[int]]:
    """Start the workload (from the calling thread: children die with it) and
    run its merge/COW loop in a worker; yield the children's pids."""
    stop = threading.Event()
    errors: list[BaseException] = []
    with Workload(spec, drive_ksmd=True) as w:

        def loop() -> None:
            try:
                w.demo_loop(stop, cow_fraction=0.25, cow_rate=4000.0, pause=2.0)
            except BaseException as e:  # reported when the demo ends
                if not stop.is_set():
                    errors.append(e)

        t = threading.Thread(target=loop, name="ksmtrace-demo", daemon=True)
        t.start()
        try:
            yield w.pids
        finally:
            stop.set()
            t.join(timeout=30)
    if errors:
        raise errors[0]
