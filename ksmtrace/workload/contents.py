"""Page contents, shared by the parent and the children (pure)."""

from __future__ import annotations

import os

from ksmtrace.kernel.procfs import PAGE_SIZE
from ksmtrace.workload.model import WorkloadSpec

# ---------------------------------------------------------------------------
# Page contents (shared by parent and child; pure)
# ---------------------------------------------------------------------------


def dup_content(nonce: bytes, k: int) -> bytes:
    """Content k: a 16-byte unit repeated. The per-run nonce (top bit set, so
    never zero and never a COW marker) keeps two workloads from merging."""
    return (nonce + k.to_bytes(8, "little")) * (PAGE_SIZE // 16)


def unique_content(nonce: bytes, proc: int, page: int) -> bytes:
    return (nonce + ((1 << 62) | (proc << 32) | page).to_bytes(8, "little")) * (PAGE_SIZE // 16)


def cow_marker(pid: int, page: int, generation: int) -> bytes:
    """Written over the first 32 bytes of a page: unique per pid, page and
    storm, so a written page never becomes identical to another again."""
    return b"ksmtrcow" + b"".join(x.to_bytes(8, "little") for x in (pid, page, generation))


def page_content(spec: WorkloadSpec, nonce: bytes, proc: int, page: int) -> bytes:
    if page < spec.pages:
        return dup_content(nonce, page % spec.distinct)
    if page < spec.zero_start:
        return unique_content(nonce, proc, page)
    return bytes(PAGE_SIZE)


def new_nonce() -> bytes:
    n = bytearray(os.urandom(8))
    n[0] |= 0x80
    return bytes(n)
