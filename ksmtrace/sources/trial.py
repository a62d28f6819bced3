"""Prove a BPF attach mechanism works by loading and attaching a tiny program.

Run as a subprocess by the capability module (`python -m
ksmtrace.sources.trial kprobe:do_wp_page fentry:do_wp_page ...`), so that
bcc's C-level messages on fd 2 can be captured per trial, and nothing a trial
loads can outlive it. Prints one JSON object per trial:
{"trial": ..., "ok": bool, "error": str|null, "kernel_said": [lines]}.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable

# bcc's own messages are often misleading ("Need super-user privileges" for an
# EPERM from a tracing program as root); the kernel's words are in what libbpf
# prints on fd 2, which we keep.


def _capture_fd2(fn: Callable[[], str]) -> tuple[bool, str | None, list[str], str | None]:
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        ok, err, detail = False, None, None
        try:
            detail = fn()
            ok = True
        except Exception as e:  # bcc raises plain Exception for everything
            err = str(e)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        lines = [ln for ln in tmp.read().decode(errors="replace").splitlines() if ln.strip()]
    return ok, err, lines[-8:], detail


def _kprobe(fn: str) -> str:
    from bcc import BPF

    b = BPF(text="int probe(void *ctx) { return 0; }")
    try:
        b.attach_kprobe(event=fn.encode(), fn_name=b"probe")
        b.attach_kretprobe(event=fn.encode(), fn_name=b"probe")
    finally:
        b.cleanup()
    return f"kprobe+kretprobe attached to {fn}"


def _fentry(fn: str) -> str:
    from bcc import BPF

    # KFUNC_PROBE loads *and* attaches (bcc attaches kfuncs at load time).
    b = BPF(text=f"KFUNC_PROBE({fn}) {{ return 0; }}\nKRETFUNC_PROBE({fn}) {{ return 0; }}")
    b.cleanup()
    return f"fentry+fexit attached to {fn}"


def _tracepoint(tp: str) -> str:
    from bcc import BPF

    cat, ev = tp.split(":")
    b = BPF(text="int probe(void *ctx) { return 0; }")
    try:
        b.attach_tracepoint(tp=f"{cat}:{ev}", fn_name="probe")
    finally:
        b.cleanup()
    return f"attached to {tp}"


def _ringbuf(_: str) -> str:
    from bcc import BPF

    b = BPF(text="BPF_RINGBUF_OUTPUT(rb, 1);\nint probe(void *ctx) { return 0; }")
    b.cleanup()
    return "BPF_MAP_TYPE_RINGBUF created"


TRIALS: dict[str, Callable[[str], str]] = {
    "kprobe": _kprobe,
    "fentry": _fentry,
    "tracepoint": _tracepoint,
    "ringbuf": _ringbuf,
}


def main(argv: list[str]) -> int:
    for spec in argv:
        kind, _, target = spec.partition(":")
        fn = TRIALS.get(kind)
        if fn is None:
            print(json.dumps({"trial": spec, "ok": False, "error": f"unknown trial {kind}"}))
            continue
        try:
            import bcc  # noqa: F401
        except ImportError as e:
            print(
                json.dumps(
                    {
                        "trial": spec,
                        "ok": False,
                        "error": f"bcc not importable: {e}",
                        "kernel_said": [],
                    }
                )
            )
            continue
        ok, err, said, detail = _capture_fd2(lambda fn=fn, target=target: fn(target))
        print(
            json.dumps(
                {"trial": spec, "ok": ok, "error": err, "kernel_said": said, "detail": detail}
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
