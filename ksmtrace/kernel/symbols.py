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
    try:
        data = btf_path(root).read_bytes()
    except OSError:
        return None
    return parse_btf_funcs(data)


def parse_btf_funcs(data: bytes) -> set[str]:
    return set(parse_btf_func_ids(data))


def btf_func_ids(root: str | os.PathLike = "/") -> dict[str, int]:
    """BTF FUNC name -> its type id in vmlinux BTF (what an fentry program
    is loaded for); empty without BTF."""
    try:
        return parse_btf_func_ids(btf_path(root).read_bytes())
    except (OSError, ValueError):
        return {}


def parse_btf_func_ids(data: bytes) -> dict[str, int]:
    magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
    if magic != BTF_MAGIC:
        raise ValueError(f"not BTF (magic {magic:#x})")
    type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
    types = hdr_len + type_off
    strings = hdr_len + str_off
    end = types + type_len
    ids: dict[str, int] = {}
    off = types
    tid = 0  # type ids count from 1 (0 is void), in the order of the type section
    unpack = struct.Struct("<III").unpack_from
    while off < end:
        tid += 1
        name_off, info, _size = unpack(data, off)
        kind = (info >> 24) & 0x1F
        vlen = info & 0xFFFF
        off += 12 + _EXTRA_FIXED.get(kind, 0) + _EXTRA_PER_VLEN.get(kind, 0) * vlen
        if kind == BTF_KIND_FUNC and name_off:
            s = strings + name_off
            ids.setdefault(data[s : data.index(b"\0", s)].decode(), tid)
    return ids



BTF_KIND_STRUCT = 4
BTF_KIND_UNION = 5
BTF_KIND_ENUM = 6
_MODIFIERS = (8, 9, 10, 11, 18)  # typedef, volatile, const, restrict, type_tag


def parse_btf_layout(
    data: bytes, fields: set[str], enums: set[str] | frozenset[str] = frozenset()
) -> dict[str, int]:
    """Byte offsets of struct members ("vm_fault.vma", "page.mapping"), struct
    sizes ("page.@size") and enumerator values ("FAULT_FLAG_UNSHARE"), from BTF.

    BPF programs that read kernel structs get these as -D flags, so they never
    depend on the (possibly mismatched) headers bcc compiles against. Members
    inside anonymous structs/unions are found (struct page.mapping is one);
    bitfields are not.
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
    table: list[tuple[int, int, int, int, int]] = [(0, 0, 0, 0, 0)]  # id 0 is void
    out: dict[str, int] = {}
    off = types_at
    unpack = struct.Struct("<III").unpack_from
    while off < end:
        name_off, info, size_or_type = unpack(data, off)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        body = off + 12
        table.append((kind, name_off, info, body, size_or_type))
        if kind == BTF_KIND_ENUM and enums:
            for i in range(vlen):
                e_name, e_val = struct.unpack_from("<Ii", data, body + 8 * i)
                if name(e_name) in enums:
                    out[name(e_name)] = e_val
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

    for tid, (kind, name_off, _info, _body, size) in enumerate(table):
        if kind == BTF_KIND_STRUCT and name_off and name(name_off) in wanted_structs:
            members(tid, 0, name(name_off))
            out.setdefault(f"{name(name_off)}.@size", size)
    return {k: v for k, v in out.items() if k in fields or k in enums}


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


def btf_layout(root: str | os.PathLike = "/") -> dict[str, int]:
    """The struct layout facts the BPF programs need, from this kernel's BTF."""
    try:
        data = btf_path(root).read_bytes()
    except OSError:
        return {}
    return parse_btf_layout(data, LAYOUT_FIELDS, LAYOUT_ENUMS)
