"""Workload identity: the VM, container or service a KSM process belongs to.

`identify()` uses two strings only, /proc/<pid>/cmdline and the cgroup v2
path (after `0::` in /proc/<pid>/cgroup), plus comm and pid for the fallback:
no kernel needed; tests/unit/test_identity.py runs it on strings taken from
each project's documentation or source. Precedence, first match wins:

1. vm: QEMU's `-name [guest=]NAME[,...]` (`,,` is a comma; `--name` too), with
   Proxmox's `-id VMID`, Kata's `-name sandbox-ID` and KubeVirt's
   `guest=NAMESPACE_NAME` in a pod; Firecracker `--id`/`--api-sock`;
   cloud-hypervisor `--api-socket [path=]PATH`; `crosvm run --name/-s`. Or the
   cgroup: libvirt's `machine.slice/.../machine-qemu\\x2dID\\x2dNAME.scope`,
   Proxmox's `/qemu.slice/VMID.scope` (these also add the manager).
2. container, from the cgroup: `docker-ID.scope`, `/docker/ID`,
   `cri-containerd-ID.scope`, `crio[-conmon]-ID.scope`,
   `libpod[-conmon]-ID.scope`, libvirt's `machine-lxc\\x2d...scope`; with the
   Kubernetes pod around it (`kubepods[-QOS]-podUID.slice`, dashes of the UID
   written `_`, or cgroupfs `/kubepods/[QOS/]podUID/ID`).
3. service: the innermost `NAME.service` (system, or user below
   `user@UID.service`), unit-name escapes decoded.
4. process: `comm[pid]`.

Input may come from hostile processes: it is bounded before use, names lose
non-printable characters (control, bidi, format) and are cut to 64 characters
(safe in a terminal and as Prometheus label values), and `identify` never
raises.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass

from ksmtrace.kernel.procfs import read_cgroup, read_cmdline, read_comm

NAME_MAX = 64  # characters of a name
ID_MAX = 128  # characters of an id or a detail value
_CMDLINE_MAX = 1 << 16  # bytes of cmdline looked at
_ARGS_MAX = 512  # arguments looked at (QEMU's -name comes early: 2nd or 4th)
_ARG_MAX = 4096  # characters kept of each argument
_CGROUP_MAX = 4096  # characters of the cgroup path (PATH_MAX)
_PARTS_MAX = 64  # components of the cgroup path

_KIND_TAG = {"vm": "vm", "container": "ctr", "service": "svc", "process": "proc"}
_HEX = frozenset("0123456789abcdef")
_HEXDIGITS = frozenset("0123456789abcdefABCDEF")
_DIGITS = frozenset("0123456789")
_UID_CHARS = _HEXDIGITS | {"-", "_"}
# Container cgroup leaf prefixes -> (runtime, is the runtime's monitor process).
# Invariant: a prefix comes before any shorter prefix of it ("crio-conmon-" first).
_LEAF_PREFIXES = (
    ("crio-conmon-", "cri-o", True),
    ("libpod-conmon-", "podman", True),
    ("cri-containerd-", "containerd", False),
    ("docker-", "docker", False),
    ("crio-", "cri-o", False),
    ("libpod-", "podman", False),
)
_QEMU_NAME_KEYS = frozenset({"guest", "process", "debug-threads"})

Detail = dict[str, str]


@dataclass(frozen=True, slots=True)
class Workload:
    """What a process belongs to; every string is printable and bounded."""

    kind: str  # "vm" | "container" | "service" | "process"
    name: str  # VM name, short container id, unit name, "comm[pid]"
    id: str = ""  # stable id where one exists: VMID, UUID, full container id, unit
    detail: tuple[tuple[str, str], ...] = ()  # e.g. (("runtime", "docker"),)

    @property
    def label(self) -> str:
        """What a table shows: a short kind tag, a colon, the name, e.g.
        `vm:vm1`, `ctr:3f2a9c1b2d4e`, `svc:nginx`, `proc:stress[123]`.
        At most 69 characters (the name is at most 64)."""
        return f"{_KIND_TAG.get(self.kind, self.kind)}:{self.name}"


def identify(cmdline: bytes | Sequence[str], cgroup: str, comm: str = "", pid: int = 0) -> Workload:
    """The workload of a process, from its cmdline (NUL-separated bytes, or
    the arguments) and its cgroup v2 path; see the module docstring."""
    try:
        args = _argv(cmdline)
        parts = _parts(cgroup)
        found = _vm(args, parts, pid) or _container(parts) or _service(parts)
        return found or _process(comm, args, pid)
    except Exception:  # last line of defence: no input may make this raise
        return Workload("process", f"?[{_pid(pid)}]")


def read_identity(pid: int, root: str | os.PathLike = "/") -> Workload | None:
    """The workload of `pid` from /proc/<pid>/{cmdline,cgroup,comm}; None if
    the process has exited (or is not ours to read)."""
    cmdline = read_cmdline(pid, root)
    cgroup = read_cgroup(pid, root)
    if cmdline is None or cgroup is None:
        return None
    return identify(cmdline, cgroup, read_comm(pid, root) or "", pid)


def unit_name_unescape(name: str) -> str:
    """Undo systemd's unit-name escaping as `systemd-escape --unescape` does:
    each `\\xNN` is one byte, the bytes decode as UTF-8. A malformed escape is
    kept as written (systemd would refuse it; a label must not fail)."""
    out = bytearray()
    i = 0
    while i < len(name):
        hex2 = name[i + 2 : i + 4]
        if name.startswith("\\x", i) and len(hex2) == 2 and set(hex2) <= _HEXDIGITS:
            out.append(int(hex2, 16))
            i += 4
        else:
            out += name[i].encode("utf-8", "replace")
            i += 1
    return out.decode("utf-8", "replace")


def clean(text: str, limit: int = NAME_MAX) -> str:
    """`text` without non-printable characters, stripped, at most `limit` long."""
    return "".join(ch for ch in text[: limit * 4] if ch.isprintable()).strip()[:limit]


def _argv(cmdline: bytes | Sequence[str]) -> list[str]:
    """The arguments; invariant: at most _ARGS_MAX of at most _ARG_MAX chars."""
    if isinstance(cmdline, bytes | bytearray | memoryview):
        text = bytes(cmdline[:_CMDLINE_MAX]).decode("utf-8", "replace")
        args = text.split("\0", _ARGS_MAX)[:_ARGS_MAX]
    elif isinstance(cmdline, str):
        args = cmdline[:_CMDLINE_MAX].split("\0", _ARGS_MAX)[:_ARGS_MAX]
    else:
        args = [a for a in itertools.islice(cmdline, _ARGS_MAX) if isinstance(a, str)]
    while args and args[-1] == "":  # /proc cmdline ends with a NUL
        args.pop()
    return [a[:_ARG_MAX] for a in args]


def _parts(cgroup: str) -> list[str]:
    """The components of a cgroup path; invariant: at most _PARTS_MAX, none
    empty, `.` or `..` (a path outside our cgroup namespace starts `/..`)."""
    if not isinstance(cgroup, str):
        return []
    path = cgroup[:_CGROUP_MAX].split("\n", 1)[0].removeprefix("0::")
    return [p for p in path.split("/")[:_PARTS_MAX] if p not in ("", ".", "..")]


def _pid(pid: object) -> int:
    return pid if isinstance(pid, int) and 0 <= pid < 1 << 32 else 0


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _option(args: list[str], names: tuple[str, ...], eq: bool = False) -> str:
    """The value of the last of `names` in `args` (`NAME VALUE`, or with `eq`
    also `NAME=VALUE`); "" if absent."""
    value = ""
    for i, arg in enumerate(args):
        if arg in names and i + 1 < len(args):
            value = args[i + 1]
        elif eq and arg.startswith("--") and arg.partition("=")[0] in names:
            value = arg.partition("=")[2]
    return value


def _is_hex_id(text: str) -> bool:
    return 12 <= len(text) <= ID_MAX and set(text) <= _HEX


def _make(kind: str, name: str, ident: str = "", detail: Detail | None = None) -> Workload:
    """The one place names are cleaned: every string of a Workload passes here."""
    pairs = tuple((clean(k, 32), clean(v, ID_MAX)) for k, v in (detail or {}).items() if v)
    return Workload(kind, clean(name) or "?", clean(ident, ID_MAX), pairs)


def _vm(args: list[str], parts: list[str], pid: int) -> Workload | None:
    """A VM from the command line, the cgroup, or both (the command line's
    name wins; the cgroup adds the manager and ids it lacks)."""
    argv_vm, cgroup_vm = _vm_from_argv(args, pid), _vm_from_cgroup(parts)
    found = argv_vm or cgroup_vm
    if found is None:
        return None
    name, vm_id, detail = found
    if argv_vm and cgroup_vm:
        if name.endswith(f"[{_pid(pid)}]"):  # no name on the command line: the scope's
            name = cgroup_vm[0]
        vm_id = vm_id or cgroup_vm[1]
        for key, value in cgroup_vm[2].items():
            detail.setdefault(key, value)
    pod, leaf = _pod(parts), _container_leaf(parts)
    detail.update(pod=pod[1] if pod else "", container=leaf[1] if leaf else "")
    if pod and detail.get("hypervisor") == "qemu" and "manager" not in detail and "_" in name:
        # KubeVirt names the domain NAMESPACE_NAME; a namespace has no "_".
        namespace, _, vm_name = name.partition("_")
        name = f"{namespace}/{vm_name}"
        detail.update(manager="kubevirt", namespace=namespace)
    return _make("vm", name, vm_id, detail)


def _vm_from_argv(args: list[str], pid: int) -> tuple[str, str, Detail] | None:
    if not args:
        return None
    exe = _basename(args[0])
    if exe in ("qemu", "kvm", "qemu-kvm") or exe.startswith("qemu-system-"):
        return _qemu(args, pid)
    if exe == "firecracker" or exe.startswith("firecracker-v"):  # release: firecracker-vX.Y
        vm_id = _option(args, ("--id",), eq=True)
        sock = _basename(_option(args, ("--api-sock",), eq=True))
        return vm_id or sock or f"firecracker[{_pid(pid)}]", vm_id, {"hypervisor": "firecracker"}
    if exe == "cloud-hypervisor":
        return _cloud_hypervisor(args, pid)
    if exe == "crosvm" and args[1:2] == ["run"]:
        sock = _basename(_option(args, ("-s", "--socket"), eq=True))
        name = _option(args, ("--name",), eq=True) or sock or f"crosvm[{_pid(pid)}]"
        return name, "", {"hypervisor": "crosvm"}
    return None


def _qemu(args: list[str], pid: int) -> tuple[str, str, Detail]:
    guest = _qemu_guest(_option(args, ("-name", "--name")))
    vmid = _option(args, ("-id", "--id"))  # Proxmox's QEMU has -id VMID
    detail: Detail = {"hypervisor": "qemu"}
    if guest.startswith("sandbox-") and len(guest) > 8:  # Kata: -name sandbox-ID
        sandbox = guest.removeprefix("sandbox-")
        return sandbox[:12], sandbox, {**detail, "manager": "kata"}
    if vmid and set(vmid) <= _DIGITS:
        return guest or f"vm{vmid}", vmid, {**detail, "manager": "proxmox"}
    uuid = _option(args, ("-uuid", "--uuid"))
    return guest or f"qemu[{_pid(pid)}]", uuid, detail


def _qemu_guest(value: str) -> str:
    """The guest name in a QEMU -name value (QemuOpts, `guest` implied first)."""
    guest = ""
    for i, part in enumerate(_qemu_opts_split(value)):
        key, eq, val = part.partition("=")
        if eq and key in _QEMU_NAME_KEYS:
            guest = val if key == "guest" else guest
        elif i == 0:
            guest = part
    return guest


def _qemu_opts_split(value: str) -> list[str]:
    """QemuOpts' split at commas, `,,` being a literal comma (left to right,
    as QEMU's get_opt_value reads it). NUL stands in for it: no argument
    read from /proc contains one, NUL being the separator there."""
    return [part.replace("\0", ",") for part in value.replace(",,", "\0").split(",")]


def _cloud_hypervisor(args: list[str], pid: int) -> tuple[str, str, Detail]:
    value = _option(args, ("--api-socket",), eq=True)
    fields = dict(f.partition("=")[::2] for f in value.split(",") if "=" in f)
    path = fields.get("path", "" if "=" in value else value)
    segments = path.split("/")
    detail: Detail = {"hypervisor": "cloud-hypervisor"}
    if len(segments) >= 4 and segments[-4:-2] == ["vc", "vm"]:  # Kata: .../vc/vm/ID/clh-api.sock
        return segments[-2][:12], segments[-2], {**detail, "manager": "kata"}
    return _basename(path) or f"cloud-hypervisor[{_pid(pid)}]", path, detail


def _vm_from_cgroup(parts: list[str]) -> tuple[str, str, Detail] | None:
    if len(parts) >= 2 and parts[0] == "qemu.slice" and parts[1].endswith(".scope"):
        vmid = parts[1].removesuffix(".scope")  # Proxmox: /qemu.slice/VMID.scope
        if vmid and set(vmid) <= _DIGITS:
            return vmid, vmid, {"manager": "proxmox"}
    machine = _machine(parts)
    if machine is not None and machine[0] == "qemu":
        return machine[2], "", {"manager": "libvirt", "domid": machine[1]}
    return None


def _machine(parts: list[str]) -> tuple[str, str, str] | None:
    """(driver, domain id, name) from libvirt's `machine-NAME.scope` below
    machine.slice. NAME, unescaped, is `DRIVER-ID-NAME`, `DRIVER-embed-HASH-
    ID-NAME`, `DRIVER-USER-ID-NAME` (unprivileged) or `DRIVER-NAME` (old)."""
    for i, part in enumerate(parts):
        if "machine.slice" in parts[:i] and part.startswith("machine-") and part.endswith(".scope"):
            driver, _, rest = unit_name_unescape(part[8:-6]).partition("-")
            tokens = rest.split("-")
            skip = 2 if tokens[0] == "embed" else 0
            for j in range(skip, min(len(tokens) - 1, skip + 2)):
                if tokens[j] and set(tokens[j]) <= _DIGITS:
                    return driver, tokens[j], "-".join(tokens[j + 1 :])
            return driver, "", rest
    return None


def _pod(parts: list[str]) -> tuple[int, str] | None:
    """(index in `parts`, UID) of a Kubernetes pod cgroup: `...kubepods...-
    podUID.slice` (systemd driver, `-` in the UID written `_`) or
    `kubepods/.../podUID` (cgroupfs driver)."""
    for i, part in enumerate(parts):
        if part.endswith(".slice") and "kubepods" in part:
            head, sep, uid = part.removesuffix(".slice").rpartition("-pod")
            if sep and "kubepods" in head and 0 < len(uid) <= 64 and set(uid) <= _UID_CHARS:
                return i, uid.replace("_", "-")
        elif part.startswith("pod") and "kubepods" in parts[:i]:
            uid = part[3:]
            if 0 < len(uid) <= 64 and set(uid) <= _UID_CHARS:
                return i, uid
    return None


def _container_leaf(parts: list[str]) -> tuple[str, str, bool] | None:
    """(runtime, id, is-monitor) of the innermost container cgroup in
    `parts`; runtime "" when only the layout tells (cgroupfs pods)."""
    for i in range(len(parts) - 1, -1, -1):
        leaf = parts[i].removesuffix(".scope")
        for prefix, runtime, monitor in _LEAF_PREFIXES:
            if leaf.startswith(prefix) and _is_hex_id(leaf[len(prefix) :]):
                return runtime, leaf[len(prefix) :], monitor
        if i > 0 and _is_hex_id(leaf):
            if parts[i - 1] == "docker":  # cgroupfs driver: /docker/ID
                return "docker", leaf, False
            if parts[i - 1].startswith("pod") and "kubepods" in parts[: i - 1]:
                return "", leaf, False  # cgroupfs driver: /kubepods/QOS/podUID/ID
    return None


def _container(parts: list[str]) -> Workload | None:
    pod = _pod(parts)
    leaf = _container_leaf(parts)
    if leaf is not None:
        runtime, cid, monitor = leaf
        detail = {"runtime": runtime, "pod": pod[1] if pod else ""}
        detail["process"] = "conmon" if monitor else ""
        return _make("container", cid[:12], cid, detail)
    if pod is not None:  # a process in the pod's own cgroup
        return _make("container", f"pod-{pod[1][:8]}", pod[1], {"pod": pod[1]})
    machine = _machine(parts)
    if machine is not None and machine[0] == "lxc":
        return _make("container", machine[2], "", {"manager": "libvirt", "driver": "lxc"})
    return None


def _service(parts: list[str]) -> Workload | None:
    """The innermost `.service` unit; a user unit also names its user."""
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].endswith(".service") and len(parts[i]) > len(".service"):
            unit = unit_name_unescape(parts[i])
            detail = {"user": _user(parts[:i])}
            return _make("service", unit.removesuffix(".service"), unit, detail)
    return None


def _user(parts: list[str]) -> str:
    """UID of the user manager (`user@UID.service`) among `parts`, or ""."""
    uids = (p[5:-8] for p in parts if p.startswith("user@") and p.endswith(".service"))
    return next((uid for uid in uids if set(uid) <= _DIGITS), "")


def _process(comm: str, args: list[str], pid: int) -> Workload:
    """`comm[pid]`; argv[0]'s base name when comm is unknown."""
    base = comm if isinstance(comm, str) and comm else (_basename(args[0]) if args else "")
    name = f"{clean(base, NAME_MAX - 12) or '?'}[{_pid(pid)}]"  # "[pid]": at most 12 chars
    return _make("process", name, str(_pid(pid) or ""))
