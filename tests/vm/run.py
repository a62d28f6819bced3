#!/usr/bin/env python3
"""QEMU harness: run ksmtrace's kernel tier on real Debian kernels.

For each guest (Debian 13 "trixie" / 6.12, Debian 12 "bookworm" / 6.1):
  1. build its image with debootstrap (tests/vm/build-image.sh), cached and
     rebuilt only when the inputs change (build scripts, package list, the
     project's PyPI dependencies);
  2. pack the working tree (git ls-files: tracked + untracked, not ignored)
     into a work disk with `mkfs.ext4 -d`;
  3. boot it with QEMU (KVM when it really boots a guest, TCG otherwise); the
     guest (tests/vm/guest/runner.sh) installs the tree offline, runs
     `ksmtrace doctor --json`, optionally the bcc smoke check, then
     `pytest tests -m kernel` once per backend with KSMTRACE_ATTACH forced;
  4. read the results back from the work disk with `debugfs -R rdump` into
     build/vm-results/<guest>/ (JUnit XML per backend, doctor JSON, logs, the
     full serial log), print a summary table and exit non-zero when anything
     failed, did not run, or produced no results.

Host packages: tests/vm/deps.sh. Stdlib only; runs with Debian's python3, as root.
Run `tests/vm/run.py --help` for options; README.md next to it explains more.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import fcntl
import hashlib
import json
import os
import queue
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# Everything that goes into an image; a change to any of them rebuilds it.
IMAGE_INPUTS = ("build-image.sh", "make-initrd.sh", "guest/provision.sh", "guest/packages.txt")
IMAGE_FORMAT = "1"  # bump to force a rebuild for a reason the hashed files do not show
GUEST_INIT = "/ksmvm/src/tests/vm/guest/init.sh"
BACKENDS = ("fentry", "kprobe", "tracepoint")


@dataclasses.dataclass(frozen=True)
class Guest:
    name: str  # = the Debian suite
    debian: int
    kernel: str  # expected major.minor, checked against the booted kernel
    backends: tuple[str, ...]  # what this kernel must offer; each is run


GUESTS = {
    "trixie": Guest("trixie", 13, "6.12", ("fentry", "kprobe", "tracepoint")),
    "bookworm": Guest("bookworm", 12, "6.1", ("fentry", "kprobe")),  # no ksm:* tracepoints
}


def log(msg: str) -> None:
    print(f"[vm] {msg}", flush=True)


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


# --------------------------------------------------------------------- images


def pypi_requirements() -> list[str]:
    """The project's PyPI dependencies, as the host venv gets them from
    `pip install -e '.[dev]'`: build requirements (for the offline editable
    install in the guest), runtime dependencies and the dev extra."""
    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)
    reqs = list(project.get("build-system", {}).get("requires", []))
    reqs += project["project"].get("dependencies", [])
    reqs += project["project"].get("optional-dependencies", {}).get("dev", [])
    return list(dict.fromkeys(reqs))


def image_key(guest: Guest, requirements: list[str]) -> str:
    h = hashlib.sha256(f"format={IMAGE_FORMAT}\nsuite={guest.name}\n".encode())
    for rel in IMAGE_INPUTS:
        h.update(f"--- {rel}\n".encode() + (HERE / rel).read_bytes())
    h.update(("--- requirements\n" + "\n".join(requirements)).encode())
    return h.hexdigest()


@dataclasses.dataclass
class Image:
    dir: Path
    info: dict[str, str]
    built_seconds: float | None  # None: reused from the cache

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"


def read_env(path: Path) -> dict[str, str]:
    """KEY=value lines (values may be shell-quoted) -> dict; {} when absent."""
    out: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() and not key.startswith("#"):
                try:
                    out[key.strip()] = " ".join(shlex.split(value))
                except ValueError:
                    out[key.strip()] = value
    return out


def ensure_image(guest: Guest, opts: argparse.Namespace) -> Image:
    requirements = pypi_requirements()
    key = image_key(guest, requirements)
    images = opts.cache / "images"
    images.mkdir(parents=True, exist_ok=True)
    out = images / guest.name
    with open(images / f"{guest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per image; others wait, then reuse
        stamp = out / "inputs.sha256"
        complete = all((out / f).is_file() for f in ("rootfs.ext4", "vmlinuz", "initrd.gz"))
        if complete and not opts.rebuild and stamp.is_file() and stamp.read_text().strip() == key:
            log(f"{guest.name}: image up to date ({out}, inputs {key[:12]})")
            return Image(out, read_env(out / "image.env"), None)
        why = "--rebuild" if opts.rebuild else ("inputs changed" if complete else "no image yet")
        log(f"{guest.name}: building image ({why}); inputs {key[:12]}")
        with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="ksmvm-req-") as req:
            req.write("\n".join(requirements) + "\n")
            req.flush()
            env = dict(
                os.environ, MIRROR=opts.mirror, DEB_CACHE=str(opts.cache / "debs" / guest.name)
            )
            cmd = [*nice(opts), str(HERE / "build-image.sh"), guest.name, str(out), req.name]
            t0 = time.monotonic()
            build_log = images / f"{guest.name}.build.log"
            rc = stream(cmd, build_log, prefix=f"[build {guest.name}] ", env=env)
            seconds = time.monotonic() - t0
        if rc != 0:
            raise HarnessError(f"{guest.name}: image build failed (exit {rc}); log: {build_log}")
        stamp.write_text(key + "\n")
        (out / "inputs.txt").write_text(
            "\n".join([f"format {IMAGE_FORMAT}", *IMAGE_INPUTS, *requirements]) + "\n"
        )
        log(f"{guest.name}: image built in {fmt_s(seconds)}")
        return Image(out, read_env(out / "image.env"), seconds)


class HarnessError(Exception):
    pass


def nice(opts: argparse.Namespace) -> list[str]:
    return ["nice", "-n", str(opts.nice)] if opts.nice else []


def stream(cmd: list[str], logfile: Path, prefix: str, env: dict | None = None) -> int:
    """Run cmd, copying its output to the terminal (prefixed) and to logfile."""
    with open(logfile, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert proc.stdout
        for raw in proc.stdout:
            logf.write(raw)
            print(prefix + raw.decode(errors="replace").rstrip(), flush=True)
        return proc.wait()


# ----------------------------------------------------------------- work disk


def tree_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files of the working tree, as they
    are on disk now (deleted files are left out)."""
    out = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout
    files = sorted({f for f in out.decode().split("\0") if f})
    return [f for f in files if os.path.lexists(REPO / f)]


def make_work_disk(path: Path, job: dict[str, str]) -> None:
    """An ext4 image (no journal: debugfs reads it back as the guest left it)
    holding /src (the tree), /job.env and an empty /results."""
    with tempfile.TemporaryDirectory(prefix="ksmvm-work-", dir=path.parent) as stage:
        s = Path(stage)
        for rel in tree_files():
            dst = s / "src" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst, follow_symlinks=False)
        (s / "results").mkdir()
        (s / "job.env").write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in job.items()))
        size_mb = du_mb(s) * 3 + 256  # room for the editable install, logs and results
        subprocess.run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-L",
                "ksmwork",
                "-O",
                "^has_journal",
                "-E",
                "root_owner=0:0",
                "-d",
                stage,
                str(path),
                f"{size_mb}M",
            ],
            check=True,
        )


def du_mb(path: Path) -> int:
    total = sum(p.lstat().st_size for p in path.rglob("*"))
    return total // (1 << 20) + 1


def read_back(disk: Path, dest: Path) -> bool:
    """Copy /results out of the work disk with debugfs (no mount)."""
    with tempfile.TemporaryDirectory(prefix="ksmvm-rdump-", dir=disk.parent) as tmp:
        r = subprocess.run(
            ["debugfs", "-R", f"rdump /results {tmp}", str(disk)], capture_output=True, text=True
        )
        got = Path(tmp) / "results"
        if r.returncode != 0 or not got.is_dir():
            log(f"debugfs rdump failed: {r.stderr.strip()[-300:]}")
            return False
        for item in got.iterdir():
            shutil.move(str(item), dest / item.name)
    return True


# ---------------------------------------------------------------------- boot


@dataclasses.dataclass
class Boot:
    accel: str
    booted: bool = False  # the guest's init printed KSMVM-BOOT
    boot_seconds: float | None = None  # qemu launch -> KSMVM-BOOT
    seconds: float | None = None  # qemu launch -> qemu exit
    end_rc: int | None = None  # KSMVM-END rc=N
    qemu_rc: int | None = None
    timed_out: str | None = None  # which deadline expired
    end_at: float | None = None  # monotonic time of KSMVM-END
    tail: list[str] = dataclasses.field(default_factory=list)  # last console lines

    @property
    def finished(self) -> bool:
        return self.end_rc is not None


def qemu_command(image: Image, disk: Path, accel: str, opts: argparse.Namespace) -> list[str]:
    if accel == "kvm":
        cpu = ["-accel", "kvm", "-cpu", opts.kvm_cpu]
    else:
        cpu = ["-accel", "tcg,thread=multi", "-cpu", "max"]
    # mem-merge=off: guest RAM must not be MADV_MERGEABLE on the host, or the
    # host's ksmd merges it and the host kernel tier's exact counts break.
    machine = [
        "-machine",
        "mem-merge=off",
        "-smp",
        str(opts.smp or (2 if accel == "kvm" else 1)),
        "-m",
        str(opts.mem),
        "-no-reboot",
    ]
    console = ["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio"]
    cmdline = f"console=ttyS0 quiet loglevel=4 panic=-1 mitigations=off init={GUEST_INIT}"
    kernel = ["-kernel", str(image.kernel), "-initrd", str(image.dir / "initrd.gz")]
    # vda: the cached root image; the guest writes to a throw-away overlay (snapshot=on).
    # vdb: the work disk (tree in, results out).
    root = f"file={image.dir / 'rootfs.ext4'},if=virtio,format=raw,snapshot=on,cache=unsafe"
    work = f"file={disk},if=virtio,format=raw,cache=writeback"
    return [
        *nice(opts),
        "qemu-system-x86_64",
        *cpu,
        *machine,
        *console,
        *kernel,
        "-append",
        cmdline,
        "-drive",
        root,
        "-drive",
        work,
    ]


def boot(
    guest: Guest,
    image: Image,
    disk: Path,
    accel: str,
    serial_log: Path,
    boot_timeout: float,
    opts: argparse.Namespace,
) -> Boot:
    """Boot, stream the console to the terminal and serial_log, and watch the
    guest's markers. Kills QEMU when a deadline passes."""
    cmd = qemu_command(image, disk, accel, opts)
    result = Boot(accel)
    t0 = time.monotonic()
    limit = guest_timeout(guest, opts)
    deadline_boot, deadline_all = t0 + boot_timeout, t0 + limit
    # a loaded host slows the guest but never silences it: pytest prints a
    # result per test, and the in-guest watchdog ends a silent pass first
    silence = opts.backend_timeout + 120
    activity = [t0]  # monotonic time of the console's last byte
    lines: queue.Queue[bytes | None] = queue.Queue()
    with open(serial_log, "ab") as logf:
        logf.write(f"### {shlex.join(cmd)}\n".encode())
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

        def pump() -> None:
            """Console lines to the queue; any byte (pytest's progress dots
            come without a newline) counts as the guest being alive."""
            assert proc.stdout
            fd, buf = proc.stdout.fileno(), b""
            while chunk := os.read(fd, 65536):
                activity[0] = time.monotonic()
                *done, buf = (buf + chunk).split(b"\n")
                for line in done:
                    lines.put(line + b"\n")
            if buf:
                lines.put(buf)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        while True:
            now = time.monotonic()
            if not result.booted and now > deadline_boot:
                result.timed_out = f"no KSMVM-BOOT within {boot_timeout:.0f}s"
            elif now > deadline_all:
                result.timed_out = f"guest still running after {limit:.0f}s"
            elif result.booted and now - activity[0] > silence:
                result.timed_out = f"guest console silent for {silence:.0f}s"
            elif result.end_at is not None and now > result.end_at + 60:
                result.timed_out = "guest did not power off within 60s of KSMVM-END"
            if result.timed_out:
                log(f"{guest.name} ({accel}): {result.timed_out}; killing QEMU")
                proc.kill()
                break
            try:
                raw = lines.get(timeout=1.0)
            except queue.Empty:
                continue
            if raw is None:
                break
            logf.write(raw)
            logf.flush()
            text = raw.decode(errors="replace").rstrip("\r\n")
            print(f"[{guest.name}] {text}", flush=True)
            result.tail = (result.tail + [text])[-40:]
            if accel == "kvm" and "KVM internal error" in text:
                # QEMU stops the vCPU and waits forever: no need to sit out the timeout
                result.timed_out = "KVM internal error (emulation failure)"
                log(f"{guest.name} (kvm): {text}; killing QEMU")
                proc.kill()
                break
            if "KSMVM-BOOT" in text and not result.booted:
                result.booted = True
                result.boot_seconds = time.monotonic() - t0
            elif text.startswith("KSMVM-END rc="):
                result.end_rc = int(text.split("=", 1)[1].split()[0])
                result.end_at = time.monotonic()
        result.qemu_rc = proc.wait()
        result.seconds = time.monotonic() - t0
        logf.write(
            f"### qemu exit {result.qemu_rc} after {result.seconds:.1f}s"
            f"{'; ' + result.timed_out if result.timed_out else ''}\n".encode()
        )
    return result


def guest_timeout(guest: Guest, opts: argparse.Namespace) -> float:
    """--timeout, or 75 minutes: only the bound that keeps a run inside CI's
    90; the guest's own progress (its console) decides before that."""
    return opts.timeout or 4500.0


def guest_passes(guest: Guest, opts: argparse.Namespace) -> list[str]:
    """The pytest passes a guest runs (guest/kernel-tier.sh): the tests that do
    not depend on the backend once ("untraced"), then one per backend."""
    backends = [b for b in guest.backends if b in opts.backends]
    return backends if opts.all else ["untraced", *backends]


def kvm_usable() -> str | None:
    """None when /dev/kvm can be opened, else why not."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError as e:
        return f"/dev/kvm: {e.strerror}"
    os.close(fd)
    return None


# ------------------------------------------------------------------- results


@dataclasses.dataclass
class BackendResult:
    backend: str
    status: str  # passed | FAILED | NO TESTS | ERROR | NOT RUN
    rc: str
    tests: int = 0
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    probes: str = ""  # the doctor's attach plan with this backend forced


@dataclasses.dataclass
class GuestResult:
    guest: str
    kernel: str = "-"
    accel: str = "-"
    build_seconds: float | None = None
    boot_seconds: float | None = None
    tier_start: float | None = None  # guest uptime when the kernel tier began
    run_seconds: float | None = None
    backends: list[BackendResult] = dataclasses.field(default_factory=list)
    doctor: str = "-"
    mechanisms: str = "-"
    smoke: str = "-"
    notes: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def junit_counts(path: Path) -> dict[str, int] | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for s in suites:
        for k in counts:
            counts[k] += int(s.get(k, 0))
    return counts


def describe_plan(doctor: dict) -> str:
    """ "probe=method" for every probe of the doctor's attach plan; tolerant of
    a report without a plan (an older or newer doctor)."""
    try:
        choices = doctor["plan"]["choices"]
        return " ".join(f"{c['probe']}={c.get('method') or 'NONE'}" for c in choices)
    except (KeyError, TypeError):
        return "(no attach plan in doctor JSON)"


def describe_mechanisms(doctor: dict) -> str:
    facts = doctor.get("facts", {}) if isinstance(doctor, dict) else {}
    parts = []
    for m in ("fentry", "kprobe", "tracepoint", "ringbuf"):
        t = facts.get(m)
        if isinstance(t, dict) and "ok" in t:
            parts.append(f"{m}={'yes' if t['ok'] else 'no' if t['ok'] is False else '?'}")
    return " ".join(parts) or "(no trials in doctor JSON)"


def load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def evaluate(guest: Guest, out: Path, job: dict[str, str], opts: argparse.Namespace) -> GuestResult:
    """Turn the files a guest left in `out` into a verdict. Anything expected
    and missing is a problem: nothing is skipped silently."""
    g = GuestResult(guest.name)
    genv = read_env(out / "guest.env")
    if not genv:
        g.problems.append("the guest left no results (guest.env missing)")
        return g
    g.kernel = genv.get("KVER", "?")
    steps = read_env(out / "steps.env")
    if "kernel-tier" in steps:
        g.tier_start = float(steps["kernel-tier"])
    if not g.kernel.startswith(guest.kernel + "."):
        g.problems.append(f"expected a {guest.kernel} kernel, booted {g.kernel}")
    offered = set(genv.get("OFFERED", "").split())
    for b in job["BACKENDS"].split():
        if b not in offered:
            g.problems.append(f"{b}: expected on {guest.name} but the kernel does not offer it")

    def rc_of(step: str) -> str | None:
        p = out / f"{step}.rc"
        return p.read_text().strip() if p.is_file() else None

    if rc_of("install") != "0":
        g.problems.append(f"installing the tree failed (install.rc={rc_of('install')})")

    doctor_rc = rc_of("doctor")
    doctor = load_json(out / "doctor.json")
    if doctor_rc == "absent":
        g.doctor = "absent"
        g.notes.append("`ksmtrace doctor` is not available yet (ksmtrace.cli does not import)")
    elif doctor_rc is None:
        g.doctor = "not run"
        g.problems.append("doctor did not run")
    else:
        g.doctor = "ok" if doctor_rc == "0" else f"exit {doctor_rc}"
        if doctor_rc != "0":
            g.problems.append(f"ksmtrace doctor exited {doctor_rc} (see doctor.err)")
        if doctor is None:
            g.problems.append("doctor.json is not valid JSON")
        else:
            g.mechanisms = describe_mechanisms(doctor)

    if job.get("SMOKE") == "1":
        smoke = load_json(out / "smoke.json")
        if rc_of("smoke") != "0" or smoke is None:
            problems = "; ".join(smoke.get("problems", [])) if smoke else "no smoke.json"
            g.smoke = "FAILED"
            g.problems.append(f"smoke check failed (smoke.rc={rc_of('smoke')}): {problems}")
        else:
            attached = smoke.get("attached", {})
            ok = sum(1 for v in attached.values() if v == "ok")
            g.smoke = f"ok ({ok}/{len(attached)} probes attached)"

    if job.get("TESTS") == "1":
        for b in job["PASSES"].split():
            g.backends.append(backend_result(g, b, rc_of(f"pytest-{b}"), out, opts))
    return g


def backend_result(
    g: GuestResult, b: str, rc: str | None, out: Path, opts: argparse.Namespace
) -> BackendResult:
    plan = load_json(out / f"doctor-{b}.json")
    probes = describe_plan(plan) if plan else "-"
    if rc is None:
        log_file = out / f"pytest-{b}.log"
        if log_file.is_file():  # started, never finished: the guest was killed meanwhile
            lines = [x for x in log_file.read_text(errors="replace").splitlines() if x.strip()]
            last = lines[-1].strip()[-120:] if lines else "(no output)"
            g.problems.append(f"{b}: still running when the guest was stopped; last: {last}")
            return BackendResult(b, "INCOMPLETE", "-", probes=probes)
        g.problems.append(f"{b}: the kernel tier did not run")
        return BackendResult(b, "NOT RUN", "-", probes=probes)
    counts = junit_counts(out / f"junit-{b}.xml")
    r = BackendResult(b, "passed", rc, probes=probes)
    if counts:
        r.tests, r.failed, r.errors, r.skipped = (
            counts["tests"],
            counts["failures"],
            counts["errors"],
            counts["skipped"],
        )
        r.passed = r.tests - r.failed - r.errors - r.skipped
    if rc == "5":  # pytest: no tests collected
        r.status = "NO TESTS"
        msg = f"{b}: pytest collected no kernel-tier tests (exit 5)"
        (g.notes if opts.allow_empty else g.problems).append(msg)
    elif rc in ("124", "137"):  # kernel-tier.sh's watchdog: no progress
        r.status = "TIMEOUT"
        g.problems.append(
            f"{b}: stopped after {opts.backend_timeout}s without any pytest output "
            f"(JUnit XML has the tests done by then; see pytest-{b}.log)"
        )
    elif rc != "0":
        r.status = "FAILED" if rc == "1" else "ERROR"
        g.problems.append(f"{b}: pytest exit {rc} (see pytest-{b}.log)")
    elif counts is None:
        r.status = "ERROR"
        g.problems.append(f"{b}: pytest passed but wrote no JUnit XML")
    return r


def summary_table(results: list[GuestResult]) -> str:
    rows = [
        (
            "guest",
            "kernel",
            "accel",
            "build",
            "boot",
            "tier@",
            "run",
            "backend",
            "result",
            "pass",
            "fail",
            "err",
            "skip",
        )
    ]
    for g in results:
        head = (
            g.guest,
            g.kernel,
            g.accel,
            fmt_s(g.build_seconds),
            fmt_s(g.boot_seconds),
            fmt_s(g.tier_start),
            fmt_s(g.run_seconds),
        )
        if not g.backends:
            rows.append((*head, "-", "ok" if g.ok else "FAILED", "", "", "", ""))
        for i, b in enumerate(g.backends):
            rows.append(
                (
                    *(head if i == 0 else ("",) * len(head)),
                    b.backend,
                    b.status,
                    str(b.passed),
                    str(b.failed),
                    str(b.errors),
                    str(b.skipped),
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(
        "build: image build (- = cached); boot: QEMU start to the guest's init; "
        "tier@: guest uptime when the kernel tier started; run: QEMU start to power-off"
    )
    for g in results:
        lines.append("")
        lines.append(
            f"{g.guest}: {'OK' if g.ok else 'FAILED'}; doctor {g.doctor}; "
            f"BPF mechanisms {g.mechanisms}; smoke {g.smoke}"
        )
        for b in g.backends:
            if b.probes != "-":
                lines.append(f"  attach plan with {b.backend}: {b.probes}")
        lines += [f"  note: {n}" for n in g.notes]
        lines += [f"  PROBLEM: {p}" for p in g.problems]
    return "\n".join(lines)


# ---------------------------------------------------------------------- main


def run_guest(guest: Guest, opts: argparse.Namespace, state: dict) -> GuestResult:
    out = opts.results / guest.name
    out.mkdir(parents=True)
    g = GuestResult(guest.name)
    try:
        image = ensure_image(guest, opts)
    except (HarnessError, subprocess.CalledProcessError, OSError) as e:
        g.problems.append(str(e))
        return g
    g.build_seconds = image.built_seconds
    for name in ("image.env", "pip-freeze.txt"):  # what the guest was made of
        if (image.dir / name).is_file():
            shutil.copy(image.dir / name, out / name)
    if opts.build_only:
        g.kernel = image.info.get("KVER", "?")
        return g

    backends = [b for b in guest.backends if b in opts.backends]
    job = {
        "GUEST": guest.name,
        "BACKENDS": " ".join(backends),
        "PASSES": " ".join(guest_passes(guest, opts)),
        "ALL": "1" if opts.all else "0",
        "TESTS": "0" if opts.smoke_only else "1",
        "SMOKE": "1" if (opts.smoke or opts.smoke_only) else "0",
        "PYTEST_ARGS": shlex.join(opts.pytest_args),
        "PYTEST_TIMEOUT": str(opts.pytest_timeout),
        "BACKEND_TIMEOUT": str(opts.backend_timeout),
    }
    try:
        return boot_and_collect(guest, image, job, out, g, opts, state)
    except (subprocess.CalledProcessError, OSError) as e:
        g.problems.append(f"harness error: {e}")
        return g


def boot_and_collect(
    guest: Guest,
    image: Image,
    job: dict[str, str],
    out: Path,
    g: GuestResult,
    opts: argparse.Namespace,
    state: dict,
) -> GuestResult:
    serial = out / "serial.log"
    work = opts.cache / "run" / guest.name
    work.mkdir(parents=True, exist_ok=True)
    disk = work / "work.ext4"
    attempts = ["kvm", "tcg"] if state["accel"] == "auto" else [state["accel"]]
    for accel in attempts:
        make_work_disk(disk, job)
        boot_timeout = opts.kvm_boot_timeout if accel == "kvm" else opts.boot_timeout
        log(f"{guest.name}: booting {image.info.get('KVER', '?')} with {accel}")
        b = boot(guest, image, disk, accel, serial, boot_timeout, opts)
        g.accel, g.boot_seconds, g.run_seconds = accel, b.boot_seconds, b.seconds
        if (
            accel == "kvm"
            and len(attempts) > 1
            and not b.finished
            and not (b.booted and b.timed_out and "still running" in b.timed_out)
        ):
            # KVM that cannot boot or dies: say what happened, then TCG for every guest
            why = b.timed_out or f"qemu exit {b.qemu_rc} before KSMVM-END"
            said = next((t for t in reversed(b.tail) if "KVM" in t or "error" in t.lower()), "")
            state["kvm_failure"] = f"{why}{': ' + said if said else ''} ({fmt_s(b.seconds)})"
            state["accel"] = "tcg"
            log(f"{guest.name}: KVM unusable ({state['kvm_failure']}); falling back to TCG")
            continue
        break

    if not b.booted:
        g.problems.append(f"guest did not boot ({b.timed_out or f'qemu exit {b.qemu_rc}'})")
    elif not b.finished:
        g.problems.append(
            f"guest runner did not finish ({b.timed_out or f'qemu exit {b.qemu_rc}'})"
        )
    if not read_back(disk, out):
        g.problems.append("could not read the results back from the work disk")
    disk.unlink(missing_ok=True)
    r = evaluate(guest, out, job, opts)
    r.accel, r.build_seconds, r.boot_seconds, r.run_seconds = (
        g.accel,
        g.build_seconds,
        g.boot_seconds,
        g.run_seconds,
    )
    r.problems = g.problems + r.problems
    return r


def parse_args(argv: list[str]) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after `--` go to pytest in the guests. "
        "Environment: KSMTRACE_VM_CACHE, KSMTRACE_VM_RESULTS, KSMTRACE_VM_ACCEL, MIRROR.",
    )
    p.add_argument(
        "--guests",
        default=env("KSMTRACE_VM_GUESTS", ",".join(GUESTS)),
        help="comma-separated, from: %(default)s",
    )
    p.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="restrict the forced backends (each guest runs those its kernel offers)",
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=Path(env("KSMTRACE_VM_CACHE", "/var/cache/ksmtrace-vm")),
        help="images and Debian packages (default %(default)s)",
    )
    p.add_argument(
        "--results",
        type=Path,
        default=Path(env("KSMTRACE_VM_RESULTS", str(REPO / "build" / "vm-results"))),
        help="where results go (default %(default)s)",
    )
    p.add_argument(
        "--accel",
        choices=("auto", "kvm", "tcg"),
        default=env("KSMTRACE_VM_ACCEL", "auto"),
        help="auto: try KVM once, fall back to TCG (default %(default)s)",
    )
    p.add_argument("--kvm-cpu", default="host", help="QEMU -cpu under KVM (default %(default)s)")
    p.add_argument(
        "--mirror",
        default=env("MIRROR", "http://deb.debian.org/debian"),
        help="Debian mirror for debootstrap (default %(default)s)",
    )
    p.add_argument("--mem", type=int, default=2048, help="guest MiB (default %(default)s)")
    p.add_argument(
        "--smp",
        type=int,
        default=int(env("KSMTRACE_VM_SMP", "0")),
        help="guest CPUs (default: 2 under KVM, 1 under TCG, where a second vCPU races "
        "the kernel's text patching of tracepoints and probes: see README)",
    )
    p.add_argument(
        "--serial",
        action="store_true",
        default=env("KSMTRACE_VM_PARALLEL", "1") == "0",
        help="boot the guests one after the other (default: in parallel)",
    )
    p.add_argument(
        "--all",
        action="store_true",
        help="the whole kernel tier per backend, not the focused `vm` selection",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=int(env("KSMTRACE_VM_NICE", "10")),
        help="run builds and QEMU under nice N, 0 to disable (default %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=float(env("KSMTRACE_VM_TIMEOUT", "0")),
        help="seconds per guest, QEMU start to power-off, after which QEMU is killed "
        "whatever it is doing (default 4500: inside CI's 90 minutes); before that it "
        "is killed when its console is silent for --backend-timeout + 120 s",
    )
    p.add_argument(
        "--backend-timeout",
        type=int,
        default=int(env("KSMTRACE_VM_BACKEND_TIMEOUT", "420")),
        help="seconds a backend's pytest run may go without output (pytest prints each "
        "test's result; a hung test is ended by --pytest-timeout first); then it is "
        "interrupted and the next backend runs (default %(default)s)",
    )
    p.add_argument("--boot-timeout", type=float, default=300, help="seconds to the guest's init")
    p.add_argument(
        "--kvm-boot-timeout",
        type=float,
        default=60,
        help="seconds KVM gets to reach the guest's init before TCG takes over",
    )
    p.add_argument(
        "--pytest-timeout",
        type=int,
        default=300,
        help="seconds per test in the guests (pytest-timeout; default %(default)s)",
    )
    p.add_argument("--rebuild", action="store_true", help="rebuild images even when cached")
    p.add_argument("--build-only", action="store_true", help="only build/refresh the images")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="also run the bcc sanity check (tests/vm/guest/smoke.py)",
    )
    p.add_argument("--smoke-only", action="store_true", help="the sanity check, no kernel tier")
    p.add_argument(
        "--allow-empty",
        action="store_true",
        help="a kernel tier without tests is a note, not a failure",
    )
    p.add_argument("pytest_args", nargs="*", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    names = [n.strip() for n in opts.guests.split(",") if n.strip()]
    unknown = [n for n in names if n not in GUESTS]
    if unknown or not names:
        p.error(f"unknown guest(s) {unknown}; known: {', '.join(GUESTS)}")
    opts.guests = [GUESTS[n] for n in names]
    opts.backends = [b.strip() for b in opts.backends.split(",") if b.strip()]
    if bad := [b for b in opts.backends if b not in BACKENDS]:
        p.error(f"unknown backend(s) {bad}; known: {', '.join(BACKENDS)}")
    opts.cache, opts.results = opts.cache.resolve(), opts.results.resolve()
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print(
            "tests/vm/run.py: run as root (debootstrap, chroot, mkfs -d with ownership)",
            file=sys.stderr,
        )
        return 3
    missing = [
        c
        for c in ("qemu-system-x86_64", "debootstrap", "mkfs.ext4", "debugfs", "cpio", "git")
        if not shutil.which(c)
    ]
    if missing:
        print(
            f"tests/vm/run.py: missing {', '.join(missing)}; run tests/vm/deps.sh", file=sys.stderr
        )
        return 2
    opts.results.mkdir(parents=True, exist_ok=True)
    for name in GUESTS:  # no stale results from an earlier run may pass for this one's
        shutil.rmtree(opts.results / name, ignore_errors=True)
    for stale in opts.results.glob("summary.*"):
        stale.unlink()
    state = {"accel": opts.accel, "kvm_failure": None}
    if opts.accel == "auto" and (why := kvm_usable()):
        log(f"KVM not tried: {why}; using TCG")
        state.update(accel="tcg", kvm_failure=f"not tried: {why}")
    t0 = time.monotonic()
    if opts.serial or len(opts.guests) == 1:
        results = [run_guest(guest, opts, state) for guest in opts.guests]
    else:
        # one thread per guest: TCG runs a guest's vCPU on one host core, so
        # two guests use the two cores of a CI machine
        with concurrent.futures.ThreadPoolExecutor(len(opts.guests)) as pool:
            results = list(pool.map(lambda g: run_guest(g, opts, state), opts.guests))
    wall = time.monotonic() - t0

    text = summary_table(results)
    accel_note = (
        f"KVM: {state['kvm_failure']}" if state["kvm_failure"] else f"accel: {state['accel']}"
    )
    text += f"\n\n{accel_note}\ntotal wall time {fmt_s(wall)}; results in {opts.results}\n"
    if not opts.build_only:  # the closing line CI's log reader looks for
        n = {k: sum(getattr(b, k) for r in results for b in r.backends)
             for k in ("passed", "failed", "errors", "skipped")}
        problems = sum(len(r.problems) for r in results)
        text += f"{problems} problem(s) (PROBLEM lines above)\n"
        text += (f"test-vm: {n['passed']} passed, {n['failed'] + n['errors']} failed, "
                 f"{n['skipped']} skipped\n")
    print("\n" + text)
    (opts.results / "summary.txt").write_text(text)
    (opts.results / "summary.json").write_text(
        json.dumps(
            {
                "wall_seconds": round(wall, 1),
                "kvm": state["kvm_failure"] or state["accel"],
                "guests": [dataclasses.asdict(r) | {"ok": r.ok} for r in results],
            },
            indent=2,
        )
    )
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
