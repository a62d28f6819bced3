#!/bin/sh
# PID 1 of a harness guest (kernel command line: init=/ksmvm/src/tests/vm/guest/init.sh).
# The initrd mounted the root image (a throw-away snapshot) at / and the work
# disk at /ksmvm: /ksmvm/src is the project tree, /ksmvm/job.env says what to
# run, /ksmvm/results is read back by the host with debugfs after power-off.
# Markers on the serial console (the host watches them): KSMVM-BOOT, KSMVM-END rc=N.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/lock /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
hostname "$(cat /etc/hostname)"
busybox ip link set lo up 2>/dev/null   # tests may bind to localhost

echo "KSMVM-BOOT up=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r) cpus=$(nproc) mem_kb=$(awk '/MemTotal/{print $2}' /proc/meminfo)"
/bin/bash /ksmvm/src/tests/vm/guest/runner.sh
rc=$?
echo "KSMVM-END rc=$rc up=$(cut -d' ' -f1 /proc/uptime)"

# Flush the results, then power off. Nothing may be read from disk after the
# read-only remount (hence sysrq and a shell busy-loop, not poweroff/sleep).
# (/ksmvm cannot be unmounted: this script is read from it; read-only is as good)
sync
mount -o remount,ro /ksmvm || echo "KSMVM-WARN could not remount /ksmvm read-only"
mount -o remount,ro / 2>/dev/null
echo o > /proc/sysrq-trigger
while :; do :; done
