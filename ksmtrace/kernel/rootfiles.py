"""Positioned reads of files under a root: the live /proc and /sys files,
or a fixture tree recorded from them.

A fixture root cannot hold these files whole (their offsets reach terabytes),
so `RootFiles` also reads a recorded form: a directory `<file>.chunks/` next to
where the file would be, holding the bytes the kernel returned as files named
by their byte offset in hex. Bytes outside every chunk read as zero.
"""

from __future__ import annotations

import contextlib
import os
from bisect import bisect_right
from collections.abc import Iterator
from pathlib import Path

import numpy as np


class RootFiles:
    """Positioned reads of files under a root: the live files, or recorded
    `<name>.chunks/` directories in a fixture tree."""

    def __init__(self, root: str | os.PathLike = "/"):
        self.root = Path(root)
        self._chunks: dict[Path, tuple[list[int], list[bytes]]] = {}
        # rel -> the live file's path, or the Path of its .chunks directory:
        # found once, as a page map makes thousands of reads of a few files
        self._where: dict[str, str | Path] = {}
        # live path -> fd, inside held_open() only; each file is read by one
        # thread at a time, so no two threads open the same one
        self._fds: dict[str, int] | None = None

    @contextlib.contextmanager
    def held_open(self) -> Iterator[None]:
        """Within it, a live file stays open from its first pread until the
        end (an open costs as much as reading ~50 pfns' flags). Re-entrant."""
        if self._fds is not None:
            yield
            return
        self._fds = {}
        try:
            yield
        finally:
            fds, self._fds = self._fds, None
            for fd in fds.values():
                os.close(fd)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def exists(self, rel: str) -> bool:
        p = self.path(rel)
        return p.exists() or p.with_name(p.name + ".chunks").is_dir()

    def read_text(self, rel: str) -> str:
        return self.path(rel).read_text()

    def _locate(self, rel: str) -> str | Path:
        where = self._where.get(rel)
        if where is None:
            p = self.path(rel)
            chunks = p.with_name(p.name + ".chunks")
            where = self._where[rel] = chunks if not p.exists() and chunks.is_dir() else str(p)
        return where

    @contextlib.contextmanager
    def _fd(self, where: str) -> Iterator[int]:
        fds = self._fds
        fd = fds.get(where) if fds is not None else None
        if fd is None:
            fd = os.open(where, os.O_RDONLY | os.O_CLOEXEC)
            if fds is not None:
                fds[where] = fd
        try:
            yield fd
        finally:
            if fds is None:
                os.close(fd)

    def pread(self, rel: str, offset: int, size: int) -> bytes:
        where = self._locate(rel)
        if isinstance(where, Path):
            return self._pread_chunks(where, offset, size)
        with self._fd(where) as fd:
            parts = []
            while size > 0:
                data = os.pread(fd, size, offset)
                if not data:
                    break  # past the last pfn, or the process is exiting
                parts.append(data)
                offset += len(data)
                size -= len(data)
            return b"".join(parts)

    def pread_into(self, rel: str, offset: int, out: np.ndarray) -> int:
        """Reads at `offset` straight into the contiguous array `out` (no
        copy for a live file); returns the bytes read, short at the end."""
        where = self._locate(rel)
        buf = memoryview(out).cast("B")
        if isinstance(where, Path):
            data = self._pread_chunks(where, offset, len(buf))
            buf[:] = data
            return len(data)
        got = 0
        with self._fd(where) as fd:
            while got < len(buf):
                n = os.preadv(fd, [buf[got:]], offset + got)
                if not n:
                    break
                got += n
        return got

    def _pread_chunks(self, d: Path, offset: int, size: int) -> bytes:
        if d not in self._chunks:
            items = sorted((int(f.name, 16), f.read_bytes()) for f in d.iterdir())
            self._chunks[d] = ([o for o, _ in items], [b for _, b in items])
        offsets, blobs = self._chunks[d]
        out = bytearray(size)
        i = max(bisect_right(offsets, offset) - 1, 0)
        while i < len(offsets) and offsets[i] < offset + size:
            lo = max(offsets[i], offset)
            hi = min(offsets[i] + len(blobs[i]), offset + size)
            if lo < hi:
                out[lo - offset : hi - offset] = blobs[i][lo - offsets[i] : hi - offsets[i]]
            i += 1
        return bytes(out)
