"""Workload identity on real command lines and cgroup paths.

Every string below was copied from the named project's documentation, source
or tests (or, where said, its own issue tracker), not made up. Where a test
joins two real pieces (a format from source, a value from a doc), both are
cited. Argument lists keep the process's argv[0] and the arguments that
matter; the rest of a long QEMU command line is cut ("...").
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import pytest

from ksmtrace.kernel import identity
from ksmtrace.kernel.identity import (
    NAME_MAX,
    Workload,
    clean,
    identify,
    read_identity,
    unit_name_unescape,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

# libvirt tests/qemuxmlconfdata/boot-cdrom.x86_64-latest.args
LIBVIRT_ARGV = [
    "/usr/bin/qemu-system-x86_64",
    "-name",
    "guest=QEMUGuest1,debug-threads=on",
    "-S",
    "-machine",
    "pc,usb=off,dump-guest-core=off,memory-backend=pc.ram,acpi=off",
    "-uuid",
    "c7a5fdbd-edaf-9455-926a-d65c16db1809",
    "-display",
    "none",
]
# libvirt docs/cgroups.rst, "Systemd cgroup layout" (libvirt >= 7.1.0 adds libvirt/).
LIBVIRT_EMULATOR = "/machine.slice/machine-qemu\\x2d1\\x2dvm1.scope/libvirt/emulator"
# proxmox/qemu-server src/test/cfg2cmd/simple1.conf.cmd (QEMU >= 11: no debug-threads)
PROXMOX_ARGV = ["/usr/bin/kvm", "-id", "8006", "-name", "simple", "-no-shutdown"]
# proxmox/qemu-server src/PVE/QemuServer/CGroup.pm get_subdir: "qemu.slice/$vmid.scope/",
# with the VMID of the cfg2cmd test above.
PROXMOX_CGROUP = "/qemu.slice/8006.scope"
# kubevirt/kubevirt pkg/virt-launcher/virtwrap/util/libvirt_helper_test.go (qemuLogs)
KUBEVIRT_ARGV = [
    "/usr/libexec/qemu-kvm",
    "-name",
    "guest=default_vmi-alpine-efi,debug-threads=on",
    "-S",
    "-uuid",
    "5c6fa8f7-c3f6-4b3f-b596-d16ea3912302",
]
# kubevirt/kubevirt pkg/virt-handler/isolation/testdata/mountinfo/btrfs_launcher
# (the cgroup of a virt-launcher pod under CRI-O, as the kernel printed it).
KUBEVIRT_LAUNCHER = (
    "/kubepods.slice/kubepods-burstable.slice/"
    "kubepods-burstable-pod08ff2263_5cf1_49f7_b3e7_80b6e0840fd5.slice/"
    "crio-1a5b9a1eb29e863bf504561344f7ffc67cfc469150418b7727c8959e0c5f8982.scope"
)
# kata-containers docs/Developer-Guide.md (a logged sandbox id)
KATA_SANDBOX = "ab9f633385d4987828d342e47554fc6442445b32039023eeddaa971c1bb56791"
# docs.docker.com runmetrics (docker/docs content/manuals/engine/containers/runmetrics.md):
# "its long ID might be something like ...", and the paths "system.slice/docker-<longid>.scope"
# (cgroup v2, systemd driver), "docker/<longid>" (cgroup v2, cgroupfs driver).
DOCKER_ID = "ae836c95b4c3c9e9179e0e91015512da89fdec91612f63cebae57df9a5444c79"


def detail(w: Workload) -> dict[str, str]:
    return dict(w.detail)


# --- vm ----------------------------------------------------------------------


def test_libvirt_qemu_cmdline():
    w = identify(LIBVIRT_ARGV, "/")
    assert (w.kind, w.name, w.id, w.label) == (
        "vm",
        "QEMUGuest1",
        "c7a5fdbd-edaf-9455-926a-d65c16db1809",
        "vm:QEMUGuest1",
    )
    assert detail(w) == {"hypervisor": "qemu"}


def test_qemu_name_escaped_comma():
    # libvirt tests/qemuxmlconfdata/name-escape.x86_64-latest.args: the domain
    # is named "foo=1,bar=2"; QemuOpts writes a comma in a value as ",,".
    w = identify(
        ["/usr/bin/qemu-system-x86_64", "-name", "guest=foo=1,,bar=2,debug-threads=on"], ""
    )
    assert w.name == "foo=1,bar=2"


def test_qemu_name_suboptions_and_double_dash():
    # qemu/qemu qemu-options.hx: "-name string1[,process=string2][,debug-threads=on|off]";
    # system/vl.c lookup_opt: "Treat --foo the same as -foo."
    w = identify(["qemu-system-x86_64", "--name", "string1,process=string2,debug-threads=on"], "")
    assert (w.kind, w.name) == ("vm", "string1")


def test_libvirt_cgroup_adds_manager_to_cmdline_vm():
    w = identify(LIBVIRT_ARGV, LIBVIRT_EMULATOR)
    assert (w.name, w.id) == ("QEMUGuest1", "c7a5fdbd-edaf-9455-926a-d65c16db1809")
    assert detail(w) == {"hypervisor": "qemu", "manager": "libvirt", "domid": "1"}


@pytest.mark.parametrize(
    "cgroup, name, domid",
    [
        # libvirt docs/cgroups.rst: the emulator and vCPU cgroups, and the layout
        # before 7.1.0 ("Prior libvirt 7.1.0 the topology doesn't have extra libvirt").
        (LIBVIRT_EMULATOR, "vm1", "1"),
        ("/machine.slice/machine-qemu\\x2d2\\x2dvm2.scope/libvirt/vcpu1", "vm2", "2"),
        ("/machine.slice/machine-qemu\\x2d3\\x2dvm3.scope", "vm3", "3"),
        # libvirt tests/virsystemdtest.c TEST_SCOPE_NEW("qemu-3-demo", ...)
        ("/machine.slice/machine-qemu\\x2d3\\x2ddemo.scope", "demo", "3"),
        # libvirt tests/virsystemdtest.c TEST_MACHINE: "qemu-embed-0991f456-1-demo" and the
        # truncated "qemu-100-kstest-network-device-default-httpksc9eed63e-981e-48ec",
        # escaped as systemd does ('-' is \x2d).
        ("/machine.slice/machine-qemu\\x2dembed\\x2d0991f456\\x2d1\\x2ddemo.scope", "demo", "1"),
        (
            "/machine.slice/machine-qemu\\x2d100\\x2dkstest\\x2dnetwork\\x2ddevice\\x2d"
            "default\\x2dhttpksc9eed63e\\x2d981e\\x2d48ec.scope",
            "kstest-network-device-default-httpksc9eed63e-981e-48ec",
            "100",
        ),
    ],
)
def test_libvirt_machine_scope(cgroup, name, domid):
    w = identify(b"", cgroup, "CPU 0/KVM", 4242)
    assert (w.kind, w.name) == ("vm", name)
    assert detail(w) == {"manager": "libvirt", "domid": domid}


def test_proxmox():
    w = identify(PROXMOX_ARGV, PROXMOX_CGROUP)
    assert (w.kind, w.name, w.id, w.label) == ("vm", "simple", "8006", "vm:simple")
    assert detail(w) == {"hypervisor": "qemu", "manager": "proxmox"}


def test_proxmox_before_qemu_11():
    # proxmox/qemu-server src/test/cfg2cmd/simple1.conf.cmd at 9aa9d714 (the parent of
    # 0bde956c "avoid using deprecated 'debug-threads' option"): -name 'simple,debug-threads=on'
    w = identify(["/usr/bin/kvm", "-id", "8006", "-name", "simple,debug-threads=on"], "/")
    assert (w.name, w.id) == ("simple", "8006")


def test_proxmox_cgroup_alone():
    w = identify(b"", PROXMOX_CGROUP)
    assert (w.kind, w.name, w.id) == ("vm", "8006", "8006")
    assert detail(w) == {"manager": "proxmox"}


def test_kubevirt():
    w = identify(KUBEVIRT_ARGV, KUBEVIRT_LAUNCHER)
    assert (w.kind, w.name, w.id) == (
        "vm",
        "default/vmi-alpine-efi",
        "5c6fa8f7-c3f6-4b3f-b596-d16ea3912302",
    )
    assert detail(w) == {
        "hypervisor": "qemu",
        "pod": "08ff2263-5cf1-49f7-b3e7-80b6e0840fd5",
        "container": "1a5b9a1eb29e863bf504561344f7ffc67cfc469150418b7727c8959e0c5f8982",
        "manager": "kubevirt",
        "namespace": "default",
    }


def test_kata_qemu():
    # kata-containers src/runtime/virtcontainers/qemu.go: Name: fmt.Sprintf("sandbox-%s", q.id),
    # passed by src/runtime/pkg/govmm/qemu/qemu.go appendName as "-name" NAME; the binary
    # from docs/hypervisors.md (path = "/opt/kata/bin/qemu-system-x86_64").
    argv = ["/opt/kata/bin/qemu-system-x86_64", "-name", f"sandbox-{KATA_SANDBOX}"]
    w = identify(argv, "/")
    assert (w.kind, w.name, w.id) == ("vm", KATA_SANDBOX[:12], KATA_SANDBOX)
    assert detail(w) == {"hypervisor": "qemu", "manager": "kata"}


def test_kata_cloud_hypervisor():
    # kata-containers src/runtime/virtcontainers/clh.go: cscAPIsocket "--api-socket" and
    # apiSocketPath = BuildSocketPath(VMStorePath, id, "clh-api.sock"); VMStorePath
    # /run/vc/vm as in docs/Developer-Guide.md; binary from docs/hypervisors.md.
    path = f"/run/vc/vm/{KATA_SANDBOX}/clh-api.sock"
    w = identify(["/opt/kata/bin/cloud-hypervisor", "--api-socket", path], "/")
    assert (w.kind, w.name, w.id) == ("vm", KATA_SANDBOX[:12], KATA_SANDBOX)
    assert detail(w) == {"hypervisor": "cloud-hypervisor", "manager": "kata"}


@pytest.mark.parametrize(
    "argv, name",
    [
        # cloud-hypervisor docs/api.md (both spellings) and docs/live_migration.md
        (
            ["./target/debug/cloud-hypervisor", "--api-socket", "path=/tmp/cloud-hypervisor.sock"],
            "cloud-hypervisor.sock",
        ),
        (
            ["./target/debug/cloud-hypervisor", "--api-socket", "/tmp/cloud-hypervisor.sock"],
            "cloud-hypervisor.sock",
        ),
        (["target/release/cloud-hypervisor", "--api-socket=/tmp/api2"], "api2"),
    ],
)
def test_cloud_hypervisor(argv, name):
    w = identify(argv, "/")
    assert (w.kind, w.name) == ("vm", name)
    assert detail(w) == {"hypervisor": "cloud-hypervisor"}


@pytest.mark.parametrize(
    "argv",
    [
        # firecracker docs/jailer.md: what the jailer execs ("--id=<id>" in the doc) ...
        [
            "./firecracker",
            "--id=551e7604-e35c-42b3-b825-416853441234",
            "--start-time-us=<opaque>",
            "--start-time-cpu-us=<opaque>",
        ],
        # ... and src/jailer/src/env.rs exec_command: .args(["--id", &self.id])
        ["firecracker", "--id", "551e7604-e35c-42b3-b825-416853441234", "--start-time-us", "1"],
    ],
)
def test_firecracker_jailed(argv):
    w = identify(argv, "/")
    uid = "551e7604-e35c-42b3-b825-416853441234"
    assert (w.kind, w.name, w.id) == ("vm", uid, uid)
    assert detail(w) == {"hypervisor": "firecracker"}


def test_firecracker_api_sock():
    # firecracker docs/getting-started.md
    argv = [
        "./firecracker",
        "--api-sock",
        "/tmp/firecracker.socket",
        "--config-file",
        "<path_to_the_configuration_file>",
    ]
    w = identify(argv, "/")
    assert (w.kind, w.name, w.id) == ("vm", "firecracker.socket", "")


def test_crosvm():
    # crosvm docs/book/src/running_crosvm/advanced_usage.md, "Control Socket"
    w = identify(["crosvm", "run", "-s", "/run/crosvm.sock", "vmlinux"], "/")
    assert (w.kind, w.name) == ("vm", "crosvm.sock")
    assert detail(w) == {"hypervisor": "crosvm"}


# --- container -----------------------------------------------------------------


@pytest.mark.parametrize(
    "cgroup", [f"/system.slice/docker-{DOCKER_ID}.scope", f"/docker/{DOCKER_ID}"]
)
def test_docker(cgroup):
    w = identify(["nginx: master process"], cgroup, "nginx", 77)
    assert (w.kind, w.name, w.id, w.label) == (
        "container",
        DOCKER_ID[:12],
        DOCKER_ID,
        "ctr:ae836c95b4c3",
    )
    assert detail(w) == {"runtime": "docker"}


def test_containerd():
    # containerd/cri pull request #290 ("Add systemd cgroup support"), the path the
    # author verified: /sys/fs/cgroup/systemd/system.slice/system-getty.slice/cri-containerd-...
    cid = "0e768f8db752fcd648adb264498daa1d8f31562320e881d6a9ec593d24b1f779"
    w = identify(b"", f"/system.slice/system-getty.slice/cri-containerd-{cid}.scope")
    assert (w.kind, w.name, w.id) == ("container", cid[:12], cid)
    assert detail(w) == {"runtime": "containerd"}


def test_crio_in_pod():
    w = identify(["/usr/bin/virt-launcher"], KUBEVIRT_LAUNCHER)
    cid = "1a5b9a1eb29e863bf504561344f7ffc67cfc469150418b7727c8959e0c5f8982"
    assert (w.kind, w.name, w.id) == ("container", cid[:12], cid)
    assert detail(w) == {"runtime": "cri-o", "pod": "08ff2263-5cf1-49f7-b3e7-80b6e0840fd5"}


def test_crio_conmon_in_pod():
    # kubernetes/kubernetes test/e2e_node/cpumanager_test.go, comment "example path (systemd)"
    # (printed there with a space after two of the slashes, removed here).
    cid = "0bc5eac79e3ae7a0c2651f14722aa10fa333eb2325c2ca97da33aa284cda81b0"
    cgroup = (
        "/kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod0b7632a2_a56e_4278_987a_22de18008dbe.slice/crio-conmon-{cid}.scope"
    )
    w = identify(["/usr/bin/conmon"], cgroup)
    assert (w.kind, w.name, w.id) == ("container", cid[:12], cid)
    assert detail(w) == {
        "runtime": "cri-o",
        "pod": "0b7632a2-a56e-4278-987a-22de18008dbe",
        "process": "conmon",
    }


def test_docker_in_pod():
    # kubevirt/kubevirt pkg/virt-handler/isolation/testdata/mountinfo/devicemapper_launcher
    cid = "747f3ec762def86ef7681d6340e09650879e11f75fa3bf35db5d537fef9f98e9"
    cgroup = (
        "/kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-podd1a9ffa0_15d5_4447_a202_5427b2771049.slice/docker-{cid}.scope"
    )
    w = identify(b"", cgroup)
    assert (w.name, w.id) == (cid[:12], cid)
    assert detail(w) == {"runtime": "docker", "pod": "d1a9ffa0-15d5-4447-a202-5427b2771049"}


def test_pod_in_a_container_innermost_wins():
    # kubernetes/minikube issue #11280: `systemctl status kubepods.slice` inside a
    # docker "node" (CGroup: /docker/d6701e.../kubepods.slice) and its tree below.
    inner = "0ba8ac17e4e7a31fb82279503552fe94e64bab4745bf6fd2ff231e7c8ca8bed0"
    cgroup = (
        "/docker/d6701ec289c56e4391acb11d07474b3139466857a305490575508a8b7a9fcf22/kubepods.slice/"
        "kubepods-besteffort.slice/kubepods-besteffort-pod2ca4a155_3599_498d_bb9d_4446693fa3ea.slice/"
        f"crio-{inner}.scope"
    )
    w = identify(["/pause"], cgroup)
    assert (w.name, w.id) == (inner[:12], inner)
    assert detail(w) == {"runtime": "cri-o", "pod": "2ca4a155-3599-498d-bb9d-4446693fa3ea"}


def test_pod_cgroupfs_driver():
    # kata-containers src/tools/genpolicy/tests/policy/testdata/createcontainer/
    # ignored_fields/testcases.json, "CgroupsPath" (kubelet with the cgroupfs driver).
    cid = "4bae4a8e74302a8edfe17424aff0b632cae893687f4d9ad2f2115666899f9a12"
    pod = "/kubepods/burstable/pod9c64c5bf-298f-46c4-ad63-e2270a2ff44c"
    w = identify(b"", f"{pod}/{cid}")
    assert (w.kind, w.name, w.id) == ("container", cid[:12], cid)
    assert detail(w) == {"pod": "9c64c5bf-298f-46c4-ad63-e2270a2ff44c"}
    # The pod's own cgroup (the parent of that path): the pod, no container.
    w = identify(b"", pod)
    assert (w.kind, w.name, w.id) == (
        "container",
        "pod-9c64c5bf",
        "9c64c5bf-298f-46c4-ad63-e2270a2ff44c",
    )


def test_podman_rootless_beats_user_service():
    # containers/podman issue #20423: cat /proc/$(podman inspect ... .State.Pid)/cgroup
    cid = "cf21d19260ace8544fe8b769fc2638bf2c0873dfbfff0b6253f0569b26a1d5eb"
    cgroup = f"/user.slice/user-0.slice/user@0.service/machine.slice/libpod-{cid}.scope/container"
    w = identify(["/bin/bash"], cgroup, "bash", 19061)
    assert (w.kind, w.name, w.id) == ("container", cid[:12], cid)
    assert detail(w) == {"runtime": "podman"}


def test_podman_conmon():
    # falcosecurity/libs pull request #1613 (podman's layout, from systemd-cgls):
    # machine.slice/libpod-conmon-ID.scope next to machine.slice/libpod-ID.scope/container
    cid = "a2bc7b153f034b17f358cde43a7f8c7475147e8a0d1b2573c26473244ec44ce4"
    w = identify(["/usr/bin/conmon"], f"/machine.slice/libpod-conmon-{cid}.scope")
    assert (w.kind, w.id, detail(w)) == (
        "container",
        cid,
        {"runtime": "podman", "process": "conmon"},
    )
    w = identify(
        ["nginx: master process nginx -g daemon off;"],
        f"/machine.slice/libpod-{cid}.scope/container",
    )
    assert (w.kind, w.id, detail(w)) == ("container", cid, {"runtime": "podman"})


@pytest.mark.parametrize(
    "cgroup, name",
    [
        # libvirt docs/cgroups.rst: LXC guests in custom partitions
        (
            "/machine.slice/machine-engineering.slice/machine-engineering-testing.slice/"
            "machine-lxc\\x2d11111\\x2dcontainer1.scope",
            "container1",
        ),
        # libvirt tests/virsystemdtest.c TEST_SCOPE_OLD (names of old libvirt)
        ("/machine.slice/machine-lxc\\x2ddemo\\x2dname.scope", "demo-name"),
        ("/machine.slice/machine-lxc\\x2dbull\\xf0\\x9f\\x92\\xa9.scope", "bull\U0001f4a9"),
    ],
)
def test_libvirt_lxc(cgroup, name):
    w = identify(["/sbin/init"], cgroup)
    assert (w.kind, w.name) == ("container", name)
    assert detail(w) == {"manager": "libvirt", "driver": "lxc"}


# --- service and process ----------------------------------------------------------


@pytest.mark.parametrize(
    "cgroup, name, user",
    [
        # libvirt docs/cgroups.rst: system.slice/libvirtd.service
        ("/system.slice/libvirtd.service", "libvirtd", ""),
        # systemd docs/CGROUP_DELEGATION.md: "A service quux.service which is attached to the
        # slice foo-bar-baz.slice maps to the cgroup
        # /foo.slice/foo-bar.slice/foo-bar-baz.slice/quux.service/"
        ("/foo.slice/foo-bar.slice/foo-bar-baz.slice/quux.service/", "quux", ""),
        # systemd man/user@.service.xml, "Hierarchy of control groups with two logged in users"
        ("/user.slice/user-1000.slice/user@1000.service/pulseaudio.service", "pulseaudio", "1000"),
        (
            "/user.slice/user-1000.slice/user@1000.service/gnome-terminal-server.service/init.scope",
            "gnome-terminal-server",
            "1000",
        ),
        ("/user.slice/user-1001.slice/user@1001.service/sleep.service", "sleep", "1001"),
        ("/user.slice/user-1001.slice/user@1001.service/init.scope", "user@1001", ""),
        # systemd man/systemd-escape.xml: the template instance
        # 'systemd-nspawn@My\x20Container\x201.service'; units/systemd-nspawn@.service.in
        # puts it in Slice=machine.slice.
        (
            "/machine.slice/systemd-nspawn@My\\x20Container\\x201.service",
            "systemd-nspawn@My Container 1",
            "",
        ),
    ],
)
def test_service(cgroup, name, user):
    w = identify(["/usr/bin/something"], cgroup, "something", 5)
    assert (w.kind, w.name, w.label) == ("service", name, f"svc:{name}")
    assert w.id == f"{name}.service"
    assert detail(w) == ({"user": user} if user else {})


def test_process_fallback():
    # systemd man/user@.service.xml: an ssh login session is a scope, not a service.
    w = identify([b"-zsh".decode()], "/user.slice/user-1000.slice/session-19.scope", "zsh", 6509)
    assert (w.kind, w.name, w.id, w.label) == ("process", "zsh[6509]", "6509", "proc:zsh[6509]")
    assert identify(["/usr/bin/stress-ng"], "/", "", 12).name == "stress-ng[12]"
    assert identify(b"", "/", "", 0).name == "?[0]"


def test_unit_name_unescape():
    # systemd man/systemd-escape.xml, "To undo escaping on a single string"
    assert unit_name_unescape("Hall\\xc3\\xb6chen\\x2c\\x20Meister") == "Hallöchen, Meister"
    # libvirt docs/cgroups.rst: "lxc-12345-demo which when escaped is lxc\x2d12345\x2ddemo"
    assert unit_name_unescape("lxc\\x2d12345\\x2ddemo") == "lxc-12345-demo"
    # Malformed escapes stay as written; a lone byte that is not UTF-8 is replaced.
    assert unit_name_unescape("a\\x2\\xZZ\\") == "a\\x2\\xZZ\\"
    assert unit_name_unescape("\\xff") == "\ufffd"


# --- read_identity --------------------------------------------------------------


def _proc_dir(tmp_path: Path, pid: int, recorded: int, cmdline: bytes) -> Path:
    """A fake /proc/<pid> with cgroup and comm as recorded on 6.18 (fixtures)."""
    src = FIXTURES / "host-6.18" / "proc" / str(recorded)
    dst = tmp_path / "proc" / str(pid)
    dst.mkdir(parents=True)
    for name in ("cgroup", "comm"):
        shutil.copy(src / name, dst / name)
    (dst / "cmdline").write_bytes(cmdline)
    return dst


def test_read_identity(tmp_path):
    # Recorded cgroup "0::/" and comm "ksm-dup-0"; a cmdline as /proc prints it (NUL-ended).
    _proc_dir(tmp_path, 22696, 22696, b"\0".join(a.encode() for a in PROXMOX_ARGV) + b"\0")
    w = read_identity(22696, tmp_path)
    assert (w.kind, w.name, w.id) == ("vm", "simple", "8006")
    # The recorded kernel thread (pid 2, kthreadd): empty cmdline, cgroup "/".
    _proc_dir(tmp_path, 2, 2, b"")
    assert read_identity(2, tmp_path) == Workload("process", "kthreadd[2]", "2")


def test_read_identity_gone(tmp_path):
    assert read_identity(999999, tmp_path) is None
    d = _proc_dir(tmp_path, 7, 22696, b"x\0")
    (d / "cgroup").unlink()  # exited between the two reads
    assert read_identity(7, tmp_path) is None


# --- hostile input ----------------------------------------------------------------


def _check(w: Workload) -> None:
    assert isinstance(w, Workload)
    assert w.kind in ("vm", "container", "service", "process")
    assert 0 < len(w.name) <= NAME_MAX and w.name.isprintable()
    assert len(w.id) <= identity.ID_MAX and w.id.isprintable()
    assert w.label.isprintable() and len(w.label) <= NAME_MAX + 5
    for key, value in w.detail:
        assert key.isprintable() and value.isprintable() and value


def test_names_are_terminal_and_label_safe():
    evil = "\x1b]0;pwned\x07\x1b[2J\u202egnp.exe\n\r\t\x00" + "A" * 10_000
    w = identify(["qemu-system-x86_64", "-name", f"guest={evil}"], "/")
    _check(w)
    assert w.name.startswith("]0;pwned[2Jgnp.exe")
    assert len(w.name) == NAME_MAX
    # A unit name may spell control characters as \xNN escapes: decoded, then dropped.
    w = identify(
        b"", "/system.slice/\\x1b]0;pwned\\x07\\x0a\\xe2\\x80\\xae" + "A" * 200 + ".service"
    )
    _check(w)
    assert w.kind == "service" and w.name == "]0;pwned" + "A" * (NAME_MAX - 8)
    # A cgroup path is one line: what follows a newline is not part of it.
    assert identify(b"", "/system.slice/a.service\n/system.slice/b.service").name == "a"
    _check(identify(b"", "/", evil, 2**40))
    assert clean("\u202e\x1b[31m ok \x7f") == "[31m ok"


def test_bounded_on_huge_input():
    started = time.monotonic()
    huge = b"qemu-system-x86_64\0" + b"-name\0x,,\0" * 500_000 + b"\xff" * 1_000_000
    _check(identify(huge, "/a" * 1_000_000 + "/docker-" + "f" * 64 + ".scope"))
    _check(identify(["crosvm", "run"] + ["--name"] * 1_000_000, "/" * 2_000_000))
    _check(identify(b"", "/machine.slice/" + "machine-" + "\\x2d" * 1_000_000 + ".scope"))
    _check(identify(b"", "/kubepods" + "/pod" + "_" * 1_000_000))
    assert time.monotonic() - started < 5


def test_odd_types_never_raise():
    for cmdline, cgroup in [(None, None), ([1, b"x", None], 5), (iter(["kvm"]), "0::/x\n1::/y")]:
        _check(identify(cmdline, cgroup, None, "12"))  # type: ignore[arg-type]


def _mutate(rng: random.Random, text: str) -> str:
    junk = ["/", "\\x", "\\x2d", ",", ",,", "=", "-", "\x00", "\x1b", "\u202e", "\ufffd", ".scope"]
    chars = list(text)
    for _ in range(rng.randint(1, 8)):
        at = rng.randint(0, len(chars))
        if rng.random() < 0.5 and chars:
            del chars[at : at + rng.randint(1, 10)]
        else:
            chars[at:at] = rng.choice(junk)
    return "".join(chars)


def test_fuzz_random_bytes_always_give_a_workload():
    rng = random.Random(20261128)
    seeds_argv = [LIBVIRT_ARGV, PROXMOX_ARGV, KUBEVIRT_ARGV, ["crosvm", "run", "--name", "x"]]
    seeds_cgroup = [LIBVIRT_EMULATOR, PROXMOX_CGROUP, KUBEVIRT_LAUNCHER, f"/docker/{DOCKER_ID}"]
    for _ in range(3000):
        raw = rng.randbytes(rng.randint(0, 300))
        _check(
            identify(
                raw, raw.decode("latin-1"), raw.decode("utf-8", "replace"), rng.randint(0, 10**7)
            )
        )
        argv = [_mutate(rng, a) for a in rng.choice(seeds_argv)]
        _check(
            identify(
                "\0".join(argv).encode("utf-8", "surrogatepass"),
                _mutate(rng, rng.choice(seeds_cgroup)),
            )
        )
        _check(identify(argv, _mutate(rng, rng.choice(seeds_cgroup)), _mutate(rng, "comm"), 1))


def test_a_qemu_without_a_name_takes_its_libvirt_scopes():
    # libvirt always passes -name; a QEMU started by hand in such a scope
    # (tests/kernel/test_share_qemu_kernel.py) is named by the scope
    scope = "/machine.slice/machine-qemu\\x2d3\\x2dweb3.scope"
    w = identify(b"qemu-system-x86_64\0-m\x00768\0", scope, "qemu-system-x86", 42)
    assert (w.kind, w.name) == ("vm", "web3")
    named = identify(b"qemu-system-x86_64\0-name\0guest=a\0", scope, "qemu-system-x86", 42)
    assert named.name == "a"  # the command line's name wins
