"""The compiled BPF programs, as the agent loads them without bcc.

bcc compiles bpf/ksmtrace.bpf.c with clang, and clang (LLVM) stays mapped
for the life of any process that imports bcc: ~90 MB. So the agent never
imports it. A short-lived child (`python -m ksmtrace.sources.bundle`) runs
bcc's compiler and writes out a `Bundle`: each program's instructions and
each map's definition. The agent then creates the maps, points the
programs' map references at them and loads the programs itself
(sources/bpfsys.py, sources/loader.py). The child loads and attaches
nothing.

Bundles are cached in <KSMTRACE_CACHE>/bpf (default /var/cache/ksmtrace/bpf),
keyed by everything the compiled result depends on: the kernel release and
build, the source and header text, the flags, bcc's version and the headers
directory. The cache is a root tool's input, so it is read only from a
directory chain owned by root and writable by nobody else, through
O_NOFOLLOW, from files owned by root with mode 0600, and every field is
validated (`check`) before anything reaches the kernel. The kernel's
verifier checks the programs again at load.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import msgspec

from ksmtrace import cache
from ksmtrace.errors import KsmtraceError, NoHeaders
from ksmtrace.sources import bpfsys

FORMAT = 1
MAX_INSNS = 1_000_000  # the kernel's own limit for privileged programs
MAX_BYTES = 64 << 20
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_BPF_LD_IMM64 = 0x18
_PSEUDO_MAP_FD = 1


class MapSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    fd: int  # in the compiling process: what the programs' instructions hold


class ProgSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    insns: bytes


class Bundle(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format: int
    key: str
    license: bytes
    kern_version: int
    maps: list[MapSpec]
    programs: list[ProgSpec]


class Request(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    source: str
    cflags: list[str]
    key: str
    headers: str | None  # BCC_KERNEL_SOURCE for the compiler, or None


class BadBundle(KsmtraceError):
    pass


def check(b: Bundle, key: str) -> Bundle:
    """`b` if it is well formed for `key`; BadBundle otherwise."""
    def bad(why: str) -> BadBundle:
        return BadBundle(f"compiled BPF bundle rejected: {why}",
                         "delete it (`ksmtrace doctor --clean`) and start again")

    if b.format != FORMAT or b.key != key:
        raise bad("it is for another build")
    if b.license not in (b"GPL", b"Dual BSD/GPL", b"GPL v2", b"Dual MIT/GPL"):
        raise bad(f"license {b.license!r}")
    fds = set()
    for m in b.maps:
        if not _NAME.fullmatch(m.name) or m.type not in bpfsys.MAP_TYPES:
            raise bad(f"map {m.name!r} of type {m.type}")
        if not (0 <= m.key_size <= 512 and 0 <= m.value_size <= 65536
                and 0 < m.max_entries <= 1 << 26 and 0 <= m.flags < 1 << 16 and 0 <= m.fd):
            raise bad(f"map {m.name} sizes")
        if m.fd in fds:
            raise bad(f"map {m.name} shares its fd")
        fds.add(m.fd)
    if len({m.name for m in b.maps}) != len(b.maps) or not b.programs:
        raise bad("map names repeat, or no programs")
    for p in b.programs:
        if not _NAME.fullmatch(p.name) or not p.insns or len(p.insns) % 8 \
                or len(p.insns) > 8 * MAX_INSNS:
            raise bad(f"program {p.name!r}")
        for fd in map_refs(p.insns):
            if fd not in fds:
                raise bad(f"program {p.name} refers to an unknown map (fd {fd})")
    return b


def map_refs(insns: bytes) -> list[int]:
    """The map fds the 64-bit immediate loads of `insns` refer to. Any other
    kind of pseudo load (map values, BTF ids, functions) is refused."""
    out = []
    i = 0
    while i < len(insns):
        if insns[i] == _BPF_LD_IMM64:
            src = insns[i + 1] >> 4
            if src == _PSEUDO_MAP_FD:
                out.append(int.from_bytes(insns[i + 4 : i + 8], "little", signed=True))
            elif src != 0:
                raise BadBundle(f"compiled BPF program uses pseudo load {src}",
                                "ksmtrace's loader does not support it: report a bug")
            i += 16  # the second half carries the upper 32 bits
        else:
            i += 8
    return out


def relocate(insns: bytes, fds: dict[int, int]) -> bytes:
    """`insns` with each map reference moved from the compiler's fd to ours."""
    out = bytearray(insns)
    i = 0
    while i < len(out):
        if out[i] == _BPF_LD_IMM64:
            if out[i + 1] >> 4 == _PSEUDO_MAP_FD:
                old = int.from_bytes(out[i + 4 : i + 8], "little", signed=True)
                out[i + 4 : i + 8] = fds[old].to_bytes(4, "little", signed=True)
            i += 16
        else:
            i += 8
    return bytes(out)


# ----------------------------------------------------------------- the key
def build_key(source: Path, cflags: tuple[str, ...], headers: str | None,
              bcc_version: str | None) -> str:
    h = hashlib.sha256()
    uname = os.uname()
    parts = [f"format {FORMAT}", uname.release, uname.version, uname.machine,
             f"bcc {bcc_version}", f"headers {headers}", *cflags]
    for p in parts:
        h.update(p.encode() + b"\0")
    for f in sorted(source.parent.glob("*.[ch]")):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------- the cache
def cache_dir() -> Path:
    return cache.base() / "bpf"


def read_cached(key: str) -> Bundle | None:
    data = cache.read(cache_dir() / f"{key}.bundle", MAX_BYTES)
    if data is None:
        return None
    try:
        return check(msgspec.msgpack.decode(data, type=Bundle), key)
    except (msgspec.ValidationError, msgspec.DecodeError, BadBundle):
        return None  # compiled again, and replaced


def write_cached(b: Bundle) -> None:
    cache.write(cache_dir() / f"{b.key}.bundle", msgspec.msgpack.encode(b))


# -------------------------------------------------------------- compiling
def compile_bundle(source: Path, cflags: tuple[str, ...], headers: str | None,
                   bcc_version: str | None, use_cache: bool = True) -> tuple[Bundle, bool]:
    """(the bundle, whether it came from the cache)."""
    key = build_key(source, cflags, headers, bcc_version)
    if use_cache and (b := read_cached(key)) is not None:
        return b, True
    from ksmtrace.spawn import python_argv

    req = Request(str(source), list(cflags), key, headers)
    p = subprocess.run(python_argv("ksmtrace.sources.bundle"), input=msgspec.json.encode(req),
                       capture_output=True, timeout=300)
    err = p.stderr.decode(errors="replace").strip()
    if p.returncode != 0:
        if "kernel headers" in err.lower() or "linux/kconfig.h" in err:
            raise NoHeaders(f"compiling the BPF programs failed: {err[-2000:]}",
                            "apt-get install linux-headers-amd64")
        raise KsmtraceError(f"compiling the BPF programs failed: {err[-2000:] or p.returncode}",
                            "run `ksmtrace doctor`; `--ebpf` prints the program and flags")
    try:
        b = check(msgspec.msgpack.decode(p.stdout, type=Bundle), key)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise KsmtraceError(f"the BPF compiler's output is unreadable: {e}",
                            "report a bug with `ksmtrace doctor --json`") from e
    if use_cache:
        write_cached(b)
    return b, False


def _compile_here(req: Request) -> Bundle:
    """In the child: bcc's compiler, nothing loaded (the maps it creates go
    with this process)."""
    import ctypes as ct

    if req.headers:
        os.environ["BCC_KERNEL_SOURCE"] = req.headers
    from bcc import lib  # the child's only reason to exist

    # declared here: bcc's Python wrapper does not declare all of them, and
    # an undeclared pointer argument is truncated to an int
    sized = ct.c_size_t
    for fn, restype, argtypes in (
            ("bpf_num_tables", sized, [ct.c_void_p]),
            ("bpf_table_name", ct.c_char_p, [ct.c_void_p, sized]),
            ("bpf_table_fd_id", ct.c_int, [ct.c_void_p, sized]),
            ("bpf_table_type_id", ct.c_int, [ct.c_void_p, sized]),
            ("bpf_table_max_entries_id", sized, [ct.c_void_p, sized]),
            ("bpf_table_flags_id", ct.c_int, [ct.c_void_p, sized]),
            ("bpf_table_key_size_id", sized, [ct.c_void_p, sized]),
            ("bpf_table_leaf_size_id", sized, [ct.c_void_p, sized]),
            ("bpf_num_functions", sized, [ct.c_void_p]),
            ("bpf_function_name", ct.c_char_p, [ct.c_void_p, sized]),
            ("bpf_function_start", ct.c_void_p, [ct.c_void_p, ct.c_char_p]),
            ("bpf_function_size", sized, [ct.c_void_p, ct.c_char_p]),
            ("bpf_module_license", ct.c_char_p, [ct.c_void_p]),
            ("bpf_module_kern_version", ct.c_uint, [ct.c_void_p])):
        f = getattr(lib, fn)
        f.restype, f.argtypes = restype, argtypes
    flags = (ct.c_char_p * len(req.cflags))(*[f.encode() for f in req.cflags])
    text = Path(req.source).read_bytes()
    mod = lib.bpf_module_create_c_from_string(text, 0, flags, len(req.cflags), True, None)
    if not mod:
        raise SystemExit("bcc could not compile the BPF programs (its errors are above)")
    maps = [MapSpec(lib.bpf_table_name(mod, i).decode(), lib.bpf_table_type_id(mod, i),
                    lib.bpf_table_key_size_id(mod, i), lib.bpf_table_leaf_size_id(mod, i),
                    lib.bpf_table_max_entries_id(mod, i), lib.bpf_table_flags_id(mod, i),
                    lib.bpf_table_fd_id(mod, i))
            for i in range(lib.bpf_num_tables(mod))]
    progs = []
    for i in range(lib.bpf_num_functions(mod)):
        name = lib.bpf_function_name(mod, i)
        size = lib.bpf_function_size(mod, name)
        progs.append(ProgSpec(name.decode(), ct.string_at(lib.bpf_function_start(mod, name),
                                                          size)))
    return Bundle(FORMAT, req.key, lib.bpf_module_license(mod),
                  lib.bpf_module_kern_version(mod), maps, progs)


def main() -> None:
    req = msgspec.json.decode(sys.stdin.buffer.read(), type=Request)
    b = _compile_here(req)
    sys.stdout.buffer.write(msgspec.msgpack.encode(b))
    sys.stdout.flush()
    os._exit(0)  # skip bcc's atexit work: nothing of ours is attached


if __name__ == "__main__":
    main()
