"""Which kernel functions exist, as the two attach mechanisms see them.

- kprobes need the function in /proc/kallsyms (and not inlined or notrace);
- fentry/fexit need a BTF FUNC record for it in /sys/kernel/btf/vmlinux.

A function inlined into its caller (ksm_do_scan into ksm_scan_thread on
nearly every distro kernel) is in neither. The BTF reader below walks the
type section just far enough to collect FUNC names; it needs no libbpf.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

BTF_MAGIC = 0xEB9F
BTF_KIND_FUNC = 12
# Bytes that follow `struct btf_type` (12 bytes) per kind: fixed + per-member.
_EXTRA_FIXED = {1: 4, 3: 12, 14: 4, 17: 4}
_EXTRA_PER_VLEN = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}


def kallsyms_names(root: str | os.PathLike = "/", wanted: set[str] | None = None) -> set[str]:
    """Function names in /proc/kallsyms (names are readable without root)."""
    found: set[str] = set()
    path = Path(root) / "proc/kallsyms"
    try:
        with open(path, "rb") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3 or parts[1] not in (b"t", b"T"):
                    continue
                name = parts[2].decode()
                # "foo.constprop.0" / "foo.isra.0" are compiler clones of foo
                base = name.split(".", 1)[0]
                if wanted is None or base in wanted:
                    found.add(base)
    except OSError:
        return set()
    return found


def btf_path(root: str | os.PathLike = "/") -> Path:
    return Path(root) / "sys/kernel/btf/vmlinux"


def btf_func_names(root: str | os.PathLike = "/") -> set[str] | None:
    """Names of every BTF FUNC in vmlinux BTF, or None when there is no BTF."""
    ids = read_btf(root).funcs
    return None if ids is None else set(ids)


def btf_func_ids(root: str | os.PathLike = "/", wanted: set[str] | None = None
                 ) -> dict[str, int]:
    """BTF FUNC name -> its type id in vmlinux BTF (what an fentry program
    is loaded for), of the `wanted` functions (None: all); empty without BTF."""
    return read_btf(root, wanted).funcs or {}


@dataclass(frozen=True)
class Btf:
    funcs: dict[str, int] | None  # FUNC name -> type id; None: no BTF
    layout: dict[str, int]  # see parse_btf


def read_btf(root: str | os.PathLike = "/", funcs: set[str] | None = None,
             fields: set[str] | frozenset[str] = frozenset(),
             enums: set[str] | frozenset[str] = frozenset(), cached: bool = False) -> Btf:
    """vmlinux BTF read and walked once: the `funcs` asked for (None: every
    one) and the layout of `fields` and `enums`. No BTF, or BTF that does not
    parse: funcs None, no layout. `cached`: the answer is remembered for this
    boot (the walk costs ~0.1-0.3 s of a warm start; vmlinux BTF cannot
    change while the kernel runs)."""
    def walk() -> Btf:
        return Btf(*parse_btf(btf_path(root).read_bytes(), funcs, fields, enums))

    try:
        if not cached or funcs is None or os.path.abspath(root) != "/":
            return walk()
        from ksmtrace import cache

        key = [str(btf_path(root).stat().st_size), *sorted(funcs), "", *sorted(fields), "",
               *sorted(enums)]
        return cache.per_boot("btf", key, Btf, walk)
    except (OSError, ValueError, struct.error):  # no BTF, or BTF that does not parse
        return Btf(None, {})


BTF_KIND_STRUCT = 4
BTF_KIND_UNION = 5
BTF_KIND_ENUM = 6
_MODIFIERS = (8, 9, 10, 11, 18)  # typedef, volatile, const, restrict, type_tag


def parse_btf(
    data: bytes, funcs: set[str] | None, fields: set[str] | frozenset[str] = frozenset(),
    enums: set[str] | frozenset[str] = frozenset(),
) -> tuple[dict[str, int], dict[str, int]]:
    """One walk of the type section: FUNC name -> type id (of `funcs`; None:
    all), and the layout: byte offsets of struct members ("vm_fault.vma",
    "page.mapping"), struct sizes ("page.@size") and enumerator values
    ("FAULT_FLAG_UNSHARE").

    BPF programs that read kernel structs get the layout as -D flags, so they
    never depend on the (possibly mismatched) headers bcc compiles against.
    Members inside anonymous structs/unions are found (struct page.mapping is
    one); bitfields are not.
    """
    magic, _v, _f, hdr_len = struct.unpack_from("<HBBI", data, 0)
    if magic != BTF_MAGIC:
        raise ValueError(f"not BTF (magic {magic:#x})")
    type_off, type_len, str_off, _ = struct.unpack_from("<IIII", data, 8)
    types_at, strings = hdr_len + type_off, hdr_len + str_off
    end = types_at + type_len

    def name(off: int) -> str:
        s = strings + off
        return data[s : data.index(b"\0", s)].decode()

    wanted_structs = {f.split(".", 1)[0] for f in fields}
    # type ids count from 1 (0 is void), in the order of the type section
    table: list[tuple[int, int, int, int, int]] = [(0, 0, 0, 0, 0)]
    ids: dict[str, int] = {}
    out: dict[str, int] = {}
    off = types_at
    unpack = struct.Struct("<III").unpack_from
    while off < end:
        name_off, info, size_or_type = unpack(data, off)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        body = off + 12
        if kind == BTF_KIND_FUNC and name_off:
            fn = name(name_off)
            if funcs is None or fn in funcs:
                ids.setdefault(fn, len(table))
        elif kind == BTF_KIND_ENUM and enums:
            for i in range(vlen):
                e_name, e_val = struct.unpack_from("<Ii", data, body + 8 * i)
                if name(e_name) in enums:
                    out[name(e_name)] = e_val
        table.append((kind, name_off, info, body, size_or_type))
        off = body + _EXTRA_FIXED.get(kind, 0) + _EXTRA_PER_VLEN.get(kind, 0) * vlen

    def members(tid: int, base: int, prefix: str) -> None:
        kind, _n, info, body, _s = table[tid]
        kflag, vlen = info >> 31, info & 0xFFFF
        for i in range(vlen):
            m_name, m_type, m_off = unpack(data, body + 12 * i)
            bit = m_off & 0xFFFFFF if kflag else m_off
            if bit % 8:
                continue
            if m_name:
                out.setdefault(f"{prefix}.{name(m_name)}", base + bit // 8)
                continue
            t = m_type
            while table[t][0] in _MODIFIERS:
                t = table[t][4]
            if table[t][0] in (BTF_KIND_STRUCT, BTF_KIND_UNION):
                members(t, base + bit // 8, prefix)

    if wanted_structs:
        for tid, (kind, name_off, _info, _body, size) in enumerate(table):
            if kind == BTF_KIND_STRUCT and name_off and name(name_off) in wanted_structs:
                members(tid, 0, name(name_off))
                out.setdefault(f"{name(name_off)}.@size", size)
    return ids, {k: v for k, v in out.items() if k in fields or k in enums}


# What the BPF programs read from kernel structs (bpf/ksmtrace.bpf.c OFF_*).
LAYOUT_FIELDS = {
    "task_struct.mm",
    "vm_area_struct.vm_mm",
    "vm_fault.vma",
    "vm_fault.flags",
    "vm_fault.page",
    "vm_fault.orig_pte",
    "page.mapping",
    "page.@size",
}
LAYOUT_ENUMS = {"FAULT_FLAG_UNSHARE"}
