#!/usr/bin/env bash
# Host packages the QEMU harness needs (Debian/Ubuntu, as root). Idempotent:
# installs only what is missing and does nothing when everything is present.
#   qemu-system-x86  the emulator (TCG; KVM when the host has a usable one)
#   debootstrap      builds the guest root file systems from the Debian mirror
#   e2fsprogs        mkfs.ext4 -d packs the images, debugfs reads results back
#   cpio             packs the busybox initrd (busybox itself comes from the guest)
#   xz-utils zstd    decompress kernel modules for the initrd
#   git              lists the working tree that is copied into the guests
set -euo pipefail

PKGS="qemu-system-x86 debootstrap e2fsprogs cpio gzip xz-utils zstd git python3 debian-archive-keyring"

if [ "$(id -u)" != 0 ]; then
  echo "tests/vm/deps.sh: run as root (apt-get install): sudo $0" >&2
  exit 3
fi

missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -z "$missing" ]; then
  echo "[vm-deps] host packages present"
  exit 0
fi
echo "[vm-deps] installing:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends $missing
