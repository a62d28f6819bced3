"""Opening the files ksmtrace writes (recordings, timelines) safely as root.

They hold kernel addresses (mm_struct pointers), so they are private (0600),
and root must not be steered into overwriting another file: outputs are
opened without following a symbolic link (a user's link in a sticky /tmp,
with fs.protected_symlinks=0, would otherwise redirect root's write), never
onto a file with other hard links, one owned by someone else, something
that is not a regular file, or one of the command's own inputs.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from typing import IO

from ksmtrace.errors import KsmtraceError, UsageError

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_output(path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (),
                text: bool = False) -> IO:
    """`path` opened for writing, emptied and made 0600, after the checks
    above (UsageError, exit 2, says which failed and what to do)."""
    p = os.fspath(path)
    try:
        fd = os.open(p, _FLAGS, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UsageError(
                f"{p} is a symbolic link: ksmtrace does not write through links (one planted "
                "in a shared directory would make root overwrite the file it points to)",
                "remove the link, or write to a path in a directory only you can write to",
            ) from e
        if e.errno == errno.ENXIO:  # a FIFO nobody reads
            raise UsageError(f"{p} is a FIFO, not a regular file", "give a file path") from e
        raise KsmtraceError(f"cannot write {p}: {e.strerror}",
                            "check the path and its directory's permissions") from e
    try:
        st = os.fstat(fd)
        why = None
        if not stat.S_ISREG(st.st_mode):
            why = "is not a regular file"
        elif st.st_nlink > 1:
            why = f"has {st.st_nlink} hard links (another name for it may be another user's file)"
        elif st.st_uid != os.geteuid():
            why = f"belongs to uid {st.st_uid}, not to you"
        else:
            for i in inputs:
                try:
                    si = os.stat(i)
                except OSError:
                    continue
                if (si.st_dev, si.st_ino) == (st.st_dev, st.st_ino):
                    why = f"is the input {os.fspath(i)}: writing it would destroy it"
        if why:
            raise UsageError(f"refusing to write {p}: it {why}",
                             "give another output path (or remove that file first)")
        os.ftruncate(fd, 0)
        os.fchmod(fd, 0o600)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "w" if text else "wb")
    except BaseException:
        os.close(fd)
        raise
