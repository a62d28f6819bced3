"""Page map reader: pagemap entries/s of the numpy reader against the
page-by-page reader it replaced (kept below as the baseline), on four real
subjects, measured side by side in one run:

- a child process with 4 GiB of private anonymous MADV_MERGEABLE memory,
  every page written (each with its own content), base pages (THP is
  madvise-only on the development host and the child does not ask for it);
- the same child with 1024 contents, page i holding content i % 1024, every
  page merged by ksmd (KSM pages, each frame mapped by up to 256 PTEs);
- the same child with unique contents but for its last 64 pages, merged with
  a partner that then exits: KSM pages with one mapper, which pagemap marks
  exclusive like the million ordinary pages before them. The reader's worst
  case: it reads every exclusive page's flags until it has found them;
- a QEMU/TCG guest, `-m 4096 -machine mem-merge=on` (guest RAM is
  MADV_MERGEABLE on the host), booted from the cached test image
  (tests/vm/) with init=/bin/sh, which then writes 3000 MiB with dd so most
  of its RAM is present (THP-backed: QEMU madvises it).

Each repetition reads the subject's page map (its mergeable areas, smaps
included) with both readers in turn, the order rotating
(`common.interleaved`); the figures are medians. An entry is one virtual
page of the mergeable areas, absent or not; the notes give present pages/s
and the process CPU time (all threads) per GiB. A third figure per subject
is the kernel's own reads alone, on one thread, for an exact map that does
not use pagemap's exclusive bit: smaps, pagemap, and kpageflags +
kpagecount at every present pfn.

ksmd runs only to merge the two merged subjects (knobs restored, stopped
while measuring). The subjects' memory is mergeable, so the run holds
/run/lock/ksmtrace-kernel-tests.lock (a kernel test starting ksmd would scan
it) and refuses while ksmd runs. Every process it starts is killed on every
exit path. Quick: 64 MiB children and a 256 MiB guest left paused (-S: no
boot, nothing present).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import shutil
import subprocess
import sys
import time
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

try:
    from bench.common import interleaved, median, row, spread
except ImportError:  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.common import interleaved, median, row, spread

from ksmtrace.kernel import pagemap as pm
from ksmtrace.kernel import pfnreads

LOCK_PATH = "/run/lock/ksmtrace-kernel-tests.lock"
TARGET_RATE = 10_000_000  # entries/s: a 64 GiB guest (16.8M pages) in under 2 s
TARGET_S_PER_GIB = 2.0 / 64
GIB = 1 << 30
VM_IMAGES = Path(os.environ.get("KSMVM_CACHE", "/var/cache/ksmtrace-vm")) / "images"
GUEST_WRITE_MIB = 3000

# argv: size, contents (0: every page its own), common (the last pages,
# alike in every child of the run), token (makes the run's contents its own)
CHILD = r"""
import mmap, sys
size, contents, common, token = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ps = mmap.PAGESIZE
pages = size // ps
m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_MERGEABLE)
tag = token.encode()
n = len(tag) + 8
for i in range(pages - common):
    v = i % contents if contents else i
    m[i * ps:i * ps + n] = tag + v.to_bytes(8, "little")  # present; alike only as asked
for k in range(common):
    at = (pages - common + k) * ps
    m[at:at + n] = tag + b"c" + k.to_bytes(7, "little")
print("ready", flush=True)
sys.stdin.read()
"""
MERGE_TIMEOUT = 600.0


# ---------------------------------------------------------------- baseline
# BASELINE: the page-by-page reader as it was before the numpy one
# (ksmtrace/kernel/pagemap.py at 51145cd), verbatim but for names, without
# the fixture path of RootFiles.pread (live files only here) and without the
# error mapping (NoProcess, NotRoot), which costs nothing on success.
# Measured, not used.


def _old_u64s(data: bytes) -> array:
    a = array("Q")
    a.frombytes(data[: len(data) - len(data) % 8])
    return a


class _OldFiles(pm.RootFiles):
    def pread(self, rel: str, offset: int, size: int) -> bytes:
        p = self.path(rel)
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        try:
            parts = []
            while size > 0:
                data = os.pread(fd, size, offset)
                if not data:
                    break
                parts.append(data)
                offset += len(data)
                size -= len(data)
            return b"".join(parts)
        finally:
            os.close(fd)


def _old_pfn_runs(pfns: list[int]) -> Iterator[tuple[int, int]]:
    if not pfns:
        return
    start = prev = pfns[0]
    for pfn in pfns[1:]:
        if pfn - prev > pfnreads.PFN_GAP:
            yield start, prev - start + 1
            start = pfn
        prev = pfn
    yield start, prev - start + 1


def _old_read_per_pfn(files: pm.RootFiles, rel: str, pfns: list[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for first, count in _old_pfn_runs(pfns):
        values = _old_u64s(files.pread(rel, first * 8, count * 8))
        for pfn in pfns[bisect_right(pfns, first - 1) : bisect_right(pfns, first + count - 1)]:
            idx = pfn - first
            out[pfn] = values[idx] if idx < len(values) else 0
    return out


def old_read_page_map(pid: int) -> tuple[bytes, array, array, dict]:
    """(states, pfns, mappers) per page as the old PageMap held them, and the
    counts its constructor made."""
    files = _OldFiles("/")
    if not files.exists(f"proc/{pid}"):
        raise RuntimeError(f"no process {pid}")
    areas = pm.mergeable_areas(pid, files=files)
    entries = array("Q")
    for area in areas:
        data = files.pread(f"proc/{pid}/pagemap", area.start // pm.PAGE_SIZE * 8, area.pages * 8)
        got = _old_u64s(data)
        if len(got) < area.pages:
            got.extend([0] * (area.pages - len(got)))
        entries.extend(got)
    pfns = array("Q", bytes(8 * len(entries)))
    present = []
    for i, e in enumerate(entries):
        if e & pm.PM_PRESENT:
            pfn = e & pm.PM_PFN_MASK
            if pfn == 0:
                raise RuntimeError("pfns hidden")
            pfns[i] = pfn
            present.append(i)
    distinct = sorted({pfns[i] for i in present})
    flags = _old_read_per_pfn(files, "proc/kpageflags", distinct)
    counts = _old_read_per_pfn(files, "proc/kpagecount", distinct)
    codes = {s: i for i, s in enumerate(pm.PageState)}
    states = bytearray([codes[pm.PageState.ABSENT]]) * len(entries)
    mappers = array("q", [-1]) * len(entries)
    ksm, zero, plain = (codes[pm.PageState.KSM], codes[pm.PageState.ZERO],
                        codes[pm.PageState.PRESENT])
    infer = not pm.kpf_ksm_reliable()
    for i in present:
        pfn = pfns[i]
        f = flags[pfn]
        is_ksm = f & pm.KPF_KSM and (not infer or counts[pfn] >= 2)
        states[i] = zero if f & pm.KPF_ZERO_PAGE else ksm if is_ksm else plain
        mappers[i] = counts[pfn]
    states = bytes(states)
    return states, pfns, mappers, {s: states.count(codes[s]) for s in pm.PageState}


# ----------------------------------------------------------------- subjects
@contextlib.contextmanager
def kernel_lock() -> Iterator[None]:
    os.makedirs(os.path.dirname(LOCK_PATH), exist_ok=True)
    with open(LOCK_PATH, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _kill(p: subprocess.Popen) -> None:
    p.kill()
    p.wait(timeout=30)


@contextlib.contextmanager
def child(size: int, contents: int = 0, common: int = 0,
          token: str = "ksmtrace") -> Iterator[subprocess.Popen]:
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(size), str(contents), str(common),
                          token], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if p.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
            raise RuntimeError(f"the {size >> 20} MiB child did not start")
        yield p
    finally:
        _kill(p)


def _merge(pids: list[int], want: dict[int, int]) -> None:
    """ksmd on until each pid's ksm_merging_pages reaches `want`; off again
    (every knob restored) on every exit path."""
    from ksmtrace.kernel import procfs, sysfs

    with sysfs.KsmKnobs() as k:
        k.set(pages_to_scan=20000, sleep_millisecs=0, run=1)
        deadline = time.monotonic() + MERGE_TIMEOUT
        while any((procfs.read_ksm_merging_pages(p) or 0) < want[p] for p in pids):
            if time.monotonic() > deadline:
                got = {p: procfs.read_ksm_merging_pages(p) for p in pids}
                raise RuntimeError(f"ksmd merged {got} of {want} in {MERGE_TIMEOUT:.0f} s")
            time.sleep(0.2)


def _settle() -> None:
    """Pages of exited processes stay in pages_shared/pages_sharing until
    ksmd walks their mm slots: two full scans (knobs restored), so nobody's
    next deltas see them vanish."""
    from ksmtrace.kernel import sysfs

    with sysfs.KsmKnobs() as k:
        k.set(pages_to_scan=20000, sleep_millisecs=0, run=1)
        target = (sysfs.read_sysfs().full_scans or 0) + 2
        deadline = time.monotonic() + 60
        while (sysfs.read_sysfs().full_scans or 0) < target and time.monotonic() < deadline:
            time.sleep(0.05)


@contextlib.contextmanager
def merged_child(size: int) -> Iterator[int]:
    """Every page of the child merged: 1024 contents."""
    try:
        with child(size, contents=1024, token=os.urandom(8).hex()) as p:
            _merge([p.pid], {p.pid: size // pm.PAGE_SIZE})
            yield p.pid
    finally:
        _settle()


@contextlib.contextmanager
def lone_child(size: int, common: int = 64) -> Iterator[int]:
    """The child's last `common` pages merged with a partner's, which exits."""
    token = os.urandom(8).hex()
    try:
        with child(size, common=common, token=token) as a:
            with child(common * pm.PAGE_SIZE, common=common, token=token) as b:
                _merge([a.pid, b.pid], {a.pid: common, b.pid: common})
            yield a.pid
    finally:
        _settle()


def vm_image() -> Path | None:
    for name in ("trixie", "bookworm"):
        d = VM_IMAGES / name
        if all((d / f).is_file() for f in ("rootfs.ext4", "vmlinuz", "initrd.gz")):
            return d
    return None


class _Console:
    """QEMU's serial console on its stdin/stdout."""

    def __init__(self, p: subprocess.Popen):
        self.p, self.seen = p, b""

    def wait_for(self, token: bytes, timeout: float) -> None:
        end = time.monotonic() + timeout
        while token not in self.seen:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.p.stdout], [], [], left)[0]:
                raise TimeoutError(f"guest: no {token!r} in {timeout:.0f} s: "
                                   f"{self.seen[-300:]!r}")
            data = os.read(self.p.stdout.fileno(), 65536)  # type: ignore[union-attr]
            if not data:
                raise RuntimeError(f"QEMU exited: {self.seen[-300:]!r}")
            self.seen += data

    def send(self, line: str) -> None:
        self.p.stdin.write(line.encode() + b"\n")  # type: ignore[union-attr]
        self.p.stdin.flush()  # type: ignore[union-attr]


@contextlib.contextmanager
def qemu_guest(image: Path, quick: bool) -> Iterator[int]:
    cmd = ["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max",
           "-machine", "mem-merge=on", "-smp", "1", "-m", "256" if quick else "4096",
           "-no-reboot", "-nodefaults", "-no-user-config", "-display", "none",
           "-serial", "stdio", "-kernel", str(image / "vmlinuz"),
           "-initrd", str(image / "initrd.gz"),
           "-append", "console=ttyS0 quiet loglevel=4 mitigations=off init=/bin/sh",
           "-drive", f"file={image / 'rootfs.ext4'},if=virtio,format=raw,snapshot=on,"
                     "cache=unsafe"]
    if quick:
        cmd.append("-S")  # paused before the first instruction: RAM untouched
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    try:
        if not quick:
            con = _Console(p)
            con.wait_for(b"# ", 600)  # the shell's prompt (TCG boots in ~10 s here)
            # the marker is computed by the shell, so the echoed command is not it
            con.send(f"dd if=/dev/zero of=/dev/null bs={GUEST_WRITE_MIB}M count=1 "
                     "iflag=fullblock; echo KSMTRACE-$((6*7))")
            con.wait_for(b"KSMTRACE-42", 900)
        else:
            deadline = time.monotonic() + 60
            while not pm.mergeable_areas(p.pid):  # RAM mapped and madvised
                if p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("QEMU did not map its RAM")
                time.sleep(0.1)
        yield p.pid
    finally:
        _kill(p)


# ------------------------------------------------------------- measurement
def kernel_reads(pid: int) -> float:
    """Seconds the kernel's reads alone take, one after another: smaps,
    pagemap, kpageflags and kpagecount over the numpy reader's pfn ranges."""
    files = pm.RootFiles("/")
    with files.held_open():
        return _kernel_reads(pid, files)


def _kernel_reads(pid: int, files: pm.RootFiles) -> float:
    spent = 0.0
    t = time.perf_counter()
    text = Path(f"/proc/{pid}/smaps").read_text()
    spent += time.perf_counter() - t
    areas = pm.parse_smaps_areas(text)
    parts = []
    for a in areas:
        for lo in range(0, a.pages, pm._CHUNK):
            n = min(pm._CHUNK, a.pages - lo)
            t = time.perf_counter()
            parts.append(files.pread(f"proc/{pid}/pagemap", (a.start // pm.PAGE_SIZE + lo) * 8,
                                     n * 8))
            spent += time.perf_counter() - t
    entries = np.frombuffer(b"".join(parts), np.uint64)
    for lo in range(0, len(entries), pm._CHUNK):
        e = entries[lo : lo + pm._CHUNK]
        pfns = (e[e >= np.uint64(pm.PM_PRESENT)] & np.uint64(pm.PM_PFN_MASK)).view(np.int64)
        if len(pfns):
            first, length, _ = pfnreads.reads(pfns)
            for rel in ("proc/kpageflags", "proc/kpagecount"):
                t = time.perf_counter()
                pfnreads.read_u64s(files, rel, first, length)
                spent += time.perf_counter() - t
    return spent


def agreement(pid: int) -> float:
    """Share of pages on which both readers agree (state, pfn, mappers)."""
    new = pm.read_page_map(pid)
    states, pfns, mappers, _ = old_read_page_map(pid)
    if len(states) != len(new):
        return 0.0
    same = ((np.frombuffer(states, np.uint8) == new._states)
            & (np.frombuffer(pfns, np.int64) == new._pfns)
            & (np.frombuffer(mappers, np.int64) == new._mappers))
    return float(same.mean()) if len(same) else 1.0


def measure(pid: int, reps: int) -> dict:
    new = pm.read_page_map(pid)  # warm: imports, kpf_ksm_reliable's one-time test
    entries, present = len(new), len(new) - new.counts[pm.PageState.ABSENT]
    cpu: dict[str, list[float]] = {"new": [], "old": [], "kernel": []}

    def timed(name: str, fn: Callable[[int], object]) -> Callable[[], float]:
        def one() -> float:
            c0, t0 = time.process_time(), time.perf_counter()
            fn(pid)
            wall = time.perf_counter() - t0
            cpu[name].append(time.process_time() - c0)
            return wall
        return one

    walls = interleaved({"new": timed("new", pm.read_page_map),
                         "old": timed("old", old_read_page_map),
                         "kernel": lambda: kernel_reads(pid)}, reps)
    return {"entries": entries, "present": present, "walls": walls, "cpu": cpu,
            "agree": agreement(pid)}


def subject_rows(what: str, m: dict | None, why: str = "") -> list[dict]:
    names = (f"page map, {what}: numpy reader",
             f"page map, {what}: page-by-page reader (before)",
             f"page map, {what}: numpy / page-by-page",
             f"page map, {what}: numpy reader, time per GiB mapped",
             f"page map, {what}: page-by-page reader, time per GiB mapped",
             f"page map, {what}: the kernel's reads alone, one thread")
    units = ("entries/s", "entries/s", "x", "s/GiB", "s/GiB", "entries/s")
    targets = (f">= {TARGET_RATE:,} entries/s", None, None,
               f"<= {TARGET_S_PER_GIB:.3f} s/GiB (64 GiB in 2 s)", None, None)
    if m is None:
        return [row(n, float("nan"), u, t, None, f"not measured: {why}")
                for n, u, t in zip(names, units, targets, strict=True)]
    n, w = m["entries"], m["walls"]
    gib = n * pm.PAGE_SIZE / GIB
    rate = {k: [n / x for x in v] for k, v in w.items()}
    new, old, kern = median(rate["new"]), median(rate["old"]), median(rate["kernel"])
    ratios = [o / x for x, o in zip(w["new"], w["old"], strict=True)]
    s_gib = {k: median(v) / gib for k, v in w.items()}
    cpu_gib = {k: median(v) / gib for k, v in m["cpu"].items() if v}
    size = (f"{n:,} entries ({gib:.2f} GiB mapped), {m['present']:,} present "
            f"({100 * m['present'] / max(n, 1):.0f} %)")
    return [
        row(names[0], new, units[0], targets[0], new >= TARGET_RATE,
            f"median, {spread(rate['new'], '{:,.0f}')}; {size}; present pages "
            f"{new * m['present'] / n:,.0f}/s; CPU {cpu_gib['new']:.3f} s/GiB (smaps read on "
            f"a second thread, kpageflags and kpagecount on two); both readers agree on "
            f"{100 * m['agree']:.3f} % of pages"),
        row(names[1], old, units[1], note=f"median, {spread(rate['old'], '{:,.0f}')}; "
            f"CPU {cpu_gib['old']:.3f} s/GiB; the baseline kept in bench/pagemap.py"),
        row(names[2], median(ratios), units[2],
            note=f"median of per-repetition ratios, {spread(ratios)}"),
        row(names[3], s_gib["new"], units[3], targets[3], s_gib["new"] <= TARGET_S_PER_GIB,
            "median wall time / GiB of mergeable areas"),
        row(names[4], s_gib["old"], units[4], note="median wall time / GiB of mergeable areas"),
        row(names[5], kern, units[5],
            note=f"median, {spread(rate['kernel'], '{:,.0f}')}; wall time of the preads "
            "alone (smaps, pagemap, kpageflags and kpagecount at every present pfn), one "
            "after another: the ceiling of an exact reader on one thread that does not use "
            "pagemap's exclusive bit"),
    ]


def run(quick: bool) -> list[dict]:
    from ksmtrace.kernel import sysfs

    if os.geteuid() != 0:
        raise RuntimeError("the page map benchmark needs root (pfns, kpageflags)")
    reps = 2 if quick else 7
    size = (64 << 20) if quick else (4 << 30)
    rows: list[dict] = []
    with kernel_lock():
        if sysfs.read_knob("run") != 0:
            raise RuntimeError("ksmd is running: it would scan the subjects' mergeable memory")
        with child(size) as p:
            rows += subject_rows(f"{size >> 20} MiB anonymous child", measure(p.pid, reps))
        with merged_child(size) as pid:
            rows += subject_rows(f"{size >> 20} MiB child, all merged (1024 contents)",
                                 measure(pid, reps))
        with lone_child(size) as pid:
            rows += subject_rows(f"{size >> 20} MiB child, 64 one-mapper KSM pages at its end",
                                 measure(pid, reps))
        what = "QEMU guest " + ("256 MiB, paused" if quick
                                else f"4 GiB, booted, {GUEST_WRITE_MIB} MiB written")
        image = vm_image()
        if not shutil.which("qemu-system-x86_64") or image is None:
            rows += subject_rows(what, None, "qemu-system-x86_64 or the cached test image "
                                 f"({VM_IMAGES}) is missing: tests/vm/deps.sh, tests/vm/run.py")
        else:
            with qemu_guest(image, quick) as pid:
                rows += subject_rows(f"{what} ({image.name} image, TCG)", measure(pid, reps))
    return rows


if __name__ == "__main__":
    for x in run(quick="--quick" in sys.argv):
        print(x)
