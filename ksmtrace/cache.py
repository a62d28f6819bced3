"""ksmtrace's private cache (<KSMTRACE_CACHE>, default /var/cache/ksmtrace):
results that are dear to compute and stable for a kernel, kept between runs
by root and trusted only when no one else could have written them.

A file is read only from a directory chain owned by root and writable by no
one else (no symlinks), opened without following a link, owned by root with
mode 0600 and no larger than its reader allows; it is written to a private
temporary file and renamed into place. Anything else reads as absent, and
the caller computes the result again.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT = "/var/cache/ksmtrace"


def base() -> Path:
    return Path(os.environ.get("KSMTRACE_CACHE", DEFAULT))


def boot_id() -> str | None:
    """This boot's id: what holds for a running kernel is cached under it."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _trusted(st: os.stat_result, directory: bool) -> bool:
    kind = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    mask = 0o022 if directory else 0o077
    return kind and st.st_uid == os.geteuid() == 0 and not st.st_mode & mask


def secure_dir(path: Path, create: bool) -> bool:
    """Whether every directory from / to `path` is owned by root, writable
    by no one else and not a symlink (made 0700 where missing, if `create`).
    A world-writable sticky directory (/tmp) is not trusted either."""
    if os.geteuid() != 0:
        return False
    cur = Path("/")
    for part in Path(os.path.abspath(path)).parts[1:]:
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            if not create:
                return False
            try:
                os.mkdir(cur, 0o700)
                st = os.lstat(cur)
            except OSError:
                return False
        except OSError:
            return False
        if stat.S_ISLNK(st.st_mode) or not _trusted(st, True):
            return False
    return True


def read(path: Path, limit: int) -> bytes | None:
    """The bytes of a cache file that passes the rules above, else None."""
    if not secure_dir(path.parent, create=False):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not _trusted(st, False) or st.st_size > limit:
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)


def write(path: Path, data: bytes) -> None:
    """Writes `data` where `read` will trust it; silently nothing where the
    directory cannot be made trustworthy (the cache is an optimisation)."""
    if not secure_dir(path.parent, create=True):
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def per_boot(kind: str, key: Sequence[str], type_: Any, compute: Callable[[], T],
             limit: int = 1 << 20) -> T:
    """`compute()`, remembered for this boot of this kernel under
    <cache>/<kind>, keyed by `key`: for what cannot change while the kernel
    runs. The entry is JSON validated as `type_` (msgspec) on the way in;
    anything else reads as absent and is computed again and replaced. An
    exception from `compute` is the caller's, and nothing is written."""
    boot = boot_id()
    if boot is None or os.geteuid() != 0:  # the cache is root's
        return compute()
    import msgspec  # here: what runs without the cache does not need it

    digest = hashlib.sha256("\0".join([boot, os.uname().release, *key]).encode()).hexdigest()
    path = base() / kind / f"{digest}.json"
    data = read(path, limit)
    if data is not None:
        try:
            return msgspec.json.decode(data, type=type_)
        except msgspec.DecodeError:  # malformed or mistyped
            pass
    value = compute()
    write(path, msgspec.json.encode(value))
    return value
