"""Kernel headers for bcc's compiler.

bcc compiles every program with clang against kernel headers. Hosts often
have none for the running kernel (this project's CI host runs 6.18 with no
/lib/modules/$(uname -r)), while Debian installs its newest headers split in
two directories (`linux-headers-<v>-common` and `linux-headers-<v>-<arch>`)
that bcc cannot use separately. We merge the pair into a private symlink tree
in a cache directory and point bcc at it with BCC_KERNEL_SOURCE. We never
write under /lib/modules.

Headers that do not match the running kernel are good enough for tracepoint
programs (their argument layouts come from tracefs `format` files), but a
struct layout read from them must not be trusted: kprobe/fentry programs read
kernel structs only through BTF-checked helpers or not at all.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ksmtrace.errors import NoHeaders

DEFAULT_CACHE = Path(os.environ.get("KSMTRACE_CACHE", "/var/cache/ksmtrace"))


@dataclass(frozen=True)
class Headers:
    path: str | None  # what BCC_KERNEL_SOURCE points at (None: bcc's default lookup)
    origin: str  # "running-kernel", "merged-distro", "env", "none"
    version: str | None  # kernel release the headers are for
    matches_running: bool
    note: str

    def as_dict(self) -> dict:
        return asdict(self)


def _release() -> str:
    return platform.release()


def _debian_pairs(src: Path) -> list[tuple[str, Path, Path]]:
    """Installed Debian header pairs as (version, arch_dir, common_dir), newest first."""
    pairs = []
    if not src.is_dir():
        return pairs
    for d in src.iterdir():
        m = re.fullmatch(r"linux-headers-(\d+\.\d+\.\d+-\d+)-(?!common$)([\w-]+)", d.name)
        if not m:
            continue
        common = src / f"linux-headers-{m.group(1)}-common"
        if common.is_dir() and (d / "include").exists():
            pairs.append((f"{m.group(1)}-{m.group(2)}", d, common))

    def key(p: tuple[str, Path, Path]) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p[0]))

    return sorted(pairs, key=key, reverse=True)


def _merge_tree(version: str, arch_dir: Path, common_dir: Path, cache: Path) -> Path:
    """Symlink tree of common + arch (arch wins), built atomically once per version."""
    dest = cache / "headers" / version
    stamp = dest / ".ksmtrace-merged"
    wanted = f"{common_dir}\n{arch_dir}\n"
    if stamp.exists() and stamp.read_text() == wanted:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=dest.parent))
    try:
        # `cp -rs` makes the symlink tree far faster than a Python walk (16k files).
        subprocess.run(["cp", "-rs", f"{common_dir}/.", f"{tmp}/"], check=True)
        subprocess.run(["cp", "-rsf", f"{arch_dir}/.", f"{tmp}/"], check=True)
        (tmp / ".ksmtrace-merged").write_text(wanted)
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def find_headers(
    root: str | os.PathLike = "/",
    release: str | None = None,
    cache: Path | None = None,
    build: bool = True,
) -> Headers:
    """Decide which headers bcc will compile against (building the merged tree if needed)."""
    release = release or _release()
    root = Path(root)
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env:
        return Headers(env, "env", None, False, f"BCC_KERNEL_SOURCE={env} set by the user")
    build_dir = root / "lib/modules" / release / "build"
    if (build_dir / "include").exists() or (build_dir / "Makefile").exists():
        return Headers(
            str(build_dir), "running-kernel", release, True, "headers of the running kernel"
        )
    pairs = _debian_pairs(root / "usr/src")
    if not pairs:
        return Headers(
            None,
            "none",
            None,
            False,
            f"no headers for {release} and no Debian linux-headers-* installed",
        )
    version, arch_dir, common_dir = pairs[0]
    cache = cache or DEFAULT_CACHE
    note = (
        f"running kernel {release} has no headers; using Debian {version} merged "
        f"from {common_dir.name} + {arch_dir.name}; struct layouts from these headers "
        "are not trusted (tracepoint formats come from tracefs)"
    )
    if not build:
        return Headers(str(cache / "headers" / version), "merged-distro", version, False, note)
    path = _merge_tree(version, arch_dir, common_dir, cache)
    return Headers(str(path), "merged-distro", version, version == release, note)


def use_headers(headers: Headers) -> None:
    """Point bcc at `headers` (it reads BCC_KERNEL_SOURCE when it compiles)."""
    if headers.path is None:
        raise NoHeaders(
            "bcc needs kernel headers to compile its programs and none were found",
            "install Debian's headers: apt-get install linux-headers-amd64 "
            "(ksmtrace merges them into a private tree; nothing is written to /lib/modules)",
        )
    if headers.origin != "running-kernel":
        os.environ["BCC_KERNEL_SOURCE"] = headers.path
