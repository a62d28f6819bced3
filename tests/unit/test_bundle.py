"""The compiled-program bundle the agent loads without bcc: validation of
what the cache holds (hostile input: it is read by root and loaded into the
kernel), relocation of map references, and the cache's trust rules."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import msgspec
import pytest

from ksmtrace import cache as kcache
from ksmtrace.sources import bundle as bmod
from ksmtrace.sources.bundle import BadBundle, Bundle, MapSpec, ProgSpec

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "bundle"
REAL = msgspec.msgpack.decode((FIXTURE / "host-6.18-tracepoints.bundle").read_bytes(),
                              type=Bundle)


def replace(b: Bundle, **kw) -> Bundle:
    return msgspec.structs.replace(b, **kw)


def test_the_recorded_bundle_is_valid_and_refers_only_to_its_maps():
    assert bmod.check(REAL, REAL.key) is REAL
    fds = {m.fd for m in REAL.maps}
    refs = {fd for p in REAL.programs for fd in bmod.map_refs(p.insns)}
    assert refs and refs <= fds
    assert {p.name for p in REAL.programs} >= {"tracepoint__ksm__ksm_start_scan",
                                               "raw_tracepoint__ksm_merge_one_page"}


def test_relocation_moves_every_map_reference_and_nothing_else():
    new = {m.fd: 100 + i for i, m in enumerate(REAL.maps)}
    for p in REAL.programs:
        moved = bmod.relocate(p.insns, new)
        assert len(moved) == len(p.insns)
        assert bmod.map_refs(moved) == [new[fd] for fd in bmod.map_refs(p.insns)]
        changed = [i for i in range(0, len(moved), 8) if moved[i:i + 8] != p.insns[i:i + 8]]
        assert len(changed) <= len(bmod.map_refs(p.insns))  # only the ld_imm64 halves


def first_map_load(insns: bytes) -> int:
    for i in range(0, len(insns), 8):
        if insns[i] == 0x18 and insns[i + 1] >> 4 == 1:
            return i
    raise AssertionError("no map reference")


@pytest.mark.parametrize("tamper, why", [
    (lambda b: replace(b, key="0" * 64), "another build"),
    (lambda b: replace(b, format=bmod.FORMAT + 1), "another build"),
    (lambda b: replace(b, license=b"Proprietary"), "license"),
    (lambda b: replace(b, maps=[replace(b.maps[0], type=12), *b.maps[1:]]), "type"),
    (lambda b: replace(b, maps=[replace(b.maps[0], name="../x"), *b.maps[1:]]), "map"),
    (lambda b: replace(b, maps=[replace(b.maps[0], max_entries=0), *b.maps[1:]]), "sizes"),
    (lambda b: replace(b, maps=[replace(b.maps[0], fd=b.maps[1].fd), *b.maps[1:]]), "fd"),
    (lambda b: replace(b, maps=b.maps[1:]), "unknown map"),
    (lambda b: replace(b, programs=[]), "no programs"),
    (lambda b: replace(b, programs=[ProgSpec("x", b.programs[0].insns[:-3])]), "program"),
    (lambda b: replace(b, programs=[ProgSpec("bad name", b"\0" * 8)]), "program"),
])
def test_tampered_bundles_are_refused(tamper, why):
    with pytest.raises(BadBundle, match=why):
        bmod.check(tamper(REAL), REAL.key)


def test_a_pseudo_load_other_than_a_map_fd_is_refused():
    p = REAL.programs[0]
    at = first_map_load(p.insns)
    insns = bytearray(p.insns)
    insns[at + 1] = (2 << 4) | (insns[at + 1] & 0xF)  # BPF_PSEUDO_MAP_VALUE
    with pytest.raises(BadBundle, match="pseudo load 2"):
        bmod.check(replace(REAL, programs=[ProgSpec(p.name, bytes(insns))]), REAL.key)


def test_the_key_covers_the_flags_the_headers_bcc_and_the_source(tmp_path):
    src = tmp_path / "ksmtrace.bpf.c"
    src.write_text("int x;")
    (tmp_path / "ksmtrace.h").write_text("#define A 1")
    base = bmod.build_key(src, ("-DA",), None, "0.26")
    assert bmod.build_key(src, ("-DA",), None, "0.26") == base
    assert bmod.build_key(src, ("-DB",), None, "0.26") != base
    assert bmod.build_key(src, ("-DA",), "/h", "0.26") != base
    assert bmod.build_key(src, ("-DA",), None, "0.27") != base
    (tmp_path / "ksmtrace.h").write_text("#define A 2")
    assert bmod.build_key(src, ("-DA",), None, "0.26") != base


@pytest.fixture
def cache(monkeypatch):
    """A cache under /run (root-owned, 0755, not world-writable), as root."""
    if os.geteuid() != 0:
        pytest.skip("the cache is root's")
    base = Path(tempfile.mkdtemp(prefix="ksmtrace-test-cache.", dir="/run"))
    monkeypatch.setenv("KSMTRACE_CACHE", str(base))
    yield base / "bpf"
    shutil.rmtree(base)


def test_cache_round_trip(cache):
    bmod.write_cached(REAL)
    path = cache / f"{REAL.key}.bundle"
    assert path.stat().st_mode & 0o777 == 0o600 and cache.stat().st_mode & 0o777 == 0o700
    assert bmod.read_cached(REAL.key) == REAL
    assert bmod.read_cached("0" * 64) is None
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp file left


@pytest.mark.parametrize("spoil", ["mode", "owner", "symlink", "garbage", "truncated",
                                   "dir-mode", "other-key"])
def test_cache_entries_not_to_trust_are_ignored(cache, tmp_path, spoil):
    bmod.write_cached(REAL)
    path = cache / f"{REAL.key}.bundle"
    if spoil == "mode":
        path.chmod(0o644)
    elif spoil == "owner":
        os.chown(path, 65534, 65534)
    elif spoil == "symlink":
        elsewhere = tmp_path / "planted"
        shutil.copy(path, elsewhere)
        path.unlink()
        path.symlink_to(elsewhere)
    elif spoil == "garbage":
        path.write_bytes(b"\x93not a bundle")
    elif spoil == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif spoil == "dir-mode":
        cache.chmod(0o777)
    elif spoil == "other-key":
        other = cache / f"{'1' * 64}.bundle"
        shutil.copy(path, other)
        other.chmod(0o600)
        assert bmod.read_cached("1" * 64) is None  # its content names another key
        return
    assert bmod.read_cached(REAL.key) is None


def test_no_cache_where_the_directory_is_not_root_only(monkeypatch, tmp_path):
    monkeypatch.setenv("KSMTRACE_CACHE", str(tmp_path))  # under /tmp: world-writable
    assert not kcache.secure_dir(bmod.cache_dir(), create=True)
    bmod.write_cached(REAL)
    assert not (tmp_path / "bpf").exists()
    assert bmod.read_cached(REAL.key) is None


def test_decoding_refuses_unknown_fields():
    data = msgspec.msgpack.encode({**msgspec.structs.asdict(REAL), "extra": 1})
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(data, type=Bundle)
    assert MapSpec.__struct_config__.forbid_unknown_fields


def test_stale_kprobe_entries_are_those_of_dead_ksmtrace_processes(tmp_path):
    from ksmtrace.sources import loader

    dead = 2 ** 22 + 1  # above pid_max's ceiling: never a live pid
    (tmp_path / "kprobe_events").write_text(
        f"r64:kprobes/ksmtrace_{dead}_do_wp_page do_wp_page\n"
        f"r64:kprobes/ksmtrace_{os.getpid()}_break_ksm break_ksm\n"
        f"p:kprobes/someone_else_{dead} do_wp_page\n")
    assert loader.stale_kprobes(str(tmp_path)) == [f"ksmtrace_{dead}_do_wp_page"]
    assert loader.stale_kprobes(None) == [] and loader.stale_kprobes("/nonexistent") == []
    assert loader.remove_stale(str(tmp_path)) == [f"ksmtrace_{dead}_do_wp_page"]
    # what the kernel's file is told (appended): the removal line
    assert (tmp_path / "kprobe_events").read_text().endswith(
        f"-:kprobes/ksmtrace_{dead}_do_wp_page\n")


def test_every_program_gets_a_unique_readable_kernel_name():
    from ksmtrace.sources import loader

    # every program bpf/ksmtrace.bpf.c defines, under each attach method
    names = [p.name for p in REAL.programs] + [
        f"{k}__{fn}" for k in ("kfunc", "kretfunc")
        for fn in ("ksm_do_scan", "try_to_merge_one_page", "try_to_merge_with_ksm_page",
                   "do_wp_page", "break_ksm")] + ["kfunc__cmp_and_merge_page"] + [
        f"{k}_{p}" for k in ("kp", "kr")
        for p in ("cow", "merge_one", "with_ksm", "scan_batch", "unshare")] + ["kp_page_compare"]
    short = loader.kernel_names(names)
    assert all(0 < len(v) <= 15 for v in short.values())
    assert short["tracepoint__ksm__ksm_start_scan"] == "ksm_start_scan"
    assert short["raw_tracepoint__ksm_merge_with_ksm_page"] == "ksm_merge_with"
    assert short["kfunc__try_to_merge_one_page"] == "f_merge_one"
    assert short["kretfunc__do_wp_page"] == "x_do_wp_page"
    assert short["tracepoint__ksm__ksm_remove_rmap_item"] == "ksm_rm_rmap"
    # bcc 0.27+ (Debian 13) names the object: the same programs, the same names
    assert loader.kernel_name("kfunc__vmlinux__do_wp_page") == "f_do_wp_page"
    assert loader._kind("kretfunc__vmlinux__break_ksm") == ("fexit", "break_ksm")
    with pytest.raises(Exception, match="share a kernel name"):
        loader.kernel_names(["kfunc__a", "kfunc__a_" + "x" * 20 + "1",
                             "kfunc__a_" + "x" * 20 + "2"])
