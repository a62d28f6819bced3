#!/usr/bin/env bash
# Provisioning of the Vagrant test box (run as root by the Vagrantfile). The
# steps are the QEMU harness's, shared through tests/vm/guest/:
#   provision.sh kernel    newest Debian kernel + matching headers (Vagrant reboots after)
#   provision.sh install   tests/vm/guest/provision.sh: Debian packages (packages.txt),
#                          /opt/ksmtrace/venv, ksmtrace editable with its [dev] extras
#   provision.sh tests     tests/vm/guest/kernel-tier.sh: `ksmtrace doctor --json`, then
#                          the tests CI's QEMU guests run (`-m vm`: the backend-independent
#                          ones once, the traced ones once per backend the kernel offers);
#                          KSMTRACE_TIER_ALL=1: the whole kernel tier per backend instead
# env: KSMTRACE_SRC (default /vagrant, where the Vagrantfile syncs the project)
set -euo pipefail

SRC=${KSMTRACE_SRC:-/vagrant}
GUEST=$SRC/tests/vm/guest
export DEBIAN_FRONTEND=noninteractive

case ${1:-} in
  kernel)
    # the box's kernel may be older than the headers the archive still has
    apt-get update -q
    apt-get install -y -q --no-install-recommends linux-image-amd64 linux-headers-amd64
    # shellcheck disable=SC2012  # kernel versions: plain names
    echo "running $(uname -r); after the reboot: $(ls /lib/modules | sort -V | tail -n 1)"
    ;;
  install)
    "$GUEST/provision.sh" --project "$SRC"
    # `sudo ksmtrace ...` from any shell (sudo's secure_path includes /usr/local/sbin)
    ln -sf /opt/ksmtrace/venv/bin/ksmtrace /usr/local/sbin/ksmtrace
    ;;
  tests)
    all=()
    [ "${KSMTRACE_TIER_ALL:-0}" = 1 ] && all=(--all)
    "$GUEST/kernel-tier.sh" -o "$SRC/build/kernel-tier" -n "vagrant-$(uname -r)" "${all[@]}"
    echo "results (JUnit XML, doctor JSON, logs): $SRC/build/kernel-tier"
    ;;
  *)
    echo "usage: $0 kernel|install|tests" >&2
    exit 2
    ;;
esac
