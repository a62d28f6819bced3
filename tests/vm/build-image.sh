#!/usr/bin/env bash
# Build one harness guest image, without loop mounts:
#   debootstrap (Debian mirror) -> chroot provisioning (tests/vm/guest/provision.sh:
#   Debian packages + venv + the project's PyPI deps) -> trim -> ext4 image packed
#   with `mkfs.ext4 -d` -> kernel + a tiny busybox initrd next to it.
#
# usage: build-image.sh SUITE OUTDIR REQUIREMENTS
#   OUTDIR gets: rootfs.ext4  vmlinuz  initrd.gz  image.env (KVER, SUITE, BCC, ...)
#   It is written to OUTDIR.tmp and renamed at the end, so a failed or
#   interrupted build never leaves a half image behind.
# env: MIRROR (default http://deb.debian.org/debian), DEB_CACHE (debootstrap
#      --cache-dir, kept between builds; optional)
# Normally called by tests/vm/run.py, which decides when a rebuild is due.
set -euo pipefail

SUITE=$1 OUT=$2 REQUIREMENTS=$3
HERE=$(cd "$(dirname "$0")" && pwd)
GUEST=$HERE/guest
MIRROR=${MIRROR:-http://deb.debian.org/debian}
TMP=$OUT.tmp
ROOT=$TMP/root
T0=$SECONDS

say() { printf '[image %s +%ss] %s\n' "$SUITE" $((SECONDS - T0)) "$*"; }
cleanup() { rm -rf "$TMP"; }
trap cleanup EXIT

rm -rf "$TMP"
mkdir -p "$TMP"

# ---- 1. debootstrap: minbase plus the shared package list (Depends only, no Recommends)
PKGS=$(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$GUEST/packages.txt" | paste -sd, -)
say "1/5 debootstrap $SUITE from $MIRROR: $PKGS"
cache_opt=()
if [ -n "${DEB_CACHE:-}" ]; then mkdir -p "$DEB_CACHE"; cache_opt=(--cache-dir="$DEB_CACHE"); fi
debootstrap --variant=minbase --components=main "${cache_opt[@]}" \
  --include="$PKGS" "$SUITE" "$ROOT" "$MIRROR" 2>&1 |
  sed -u -E '/^I: (Retrieving|Validating|Extracting|Unpacking|Configuring) [^ ]+( [^ ]+)?$/d'
[ -x "$ROOT/usr/bin/python3" ] || { say "debootstrap produced no python3"; exit 1; }

# ---- 2. provisioning inside the chroot: the same script Vagrant runs (network: host resolver)
say "2/5 provisioning in the chroot (venv + PyPI dependencies)"
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
mkdir -p "$ROOT/tmp/ksmvm-provision"
cp "$GUEST/provision.sh" "$GUEST/packages.txt" "$ROOT/tmp/ksmvm-provision/"
cp "$REQUIREMENTS" "$ROOT/tmp/ksmvm-provision/requirements.txt"
# pip trusts the host's CA bundle, and uses its proxy and index settings, so a
# build works behind a TLS-intercepting egress proxy too (none of it stays in the image)
chroot_env=(PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8)
if [ -r /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt "$ROOT/tmp/ksmvm-provision/host-ca.crt"
  chroot_env+=(PIP_CERT=/tmp/ksmvm-provision/host-ca.crt)
fi
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY PIP_INDEX_URL PIP_DEFAULT_TIMEOUT; do
  [ -n "${!v:-}" ] && chroot_env+=("$v=${!v}")
done
chroot "$ROOT" /usr/bin/env -i "${chroot_env[@]}" \
  /bin/bash /tmp/ksmvm-provision/provision.sh --requirements /tmp/ksmvm-provision/requirements.txt
chroot "$ROOT" /opt/ksmtrace/venv/bin/python -m pip list --format=freeze --disable-pip-version-check \
  > "$TMP/pip-freeze.txt"

# ---- 3. trim what a test guest never reads, and record what is in the image
say "3/5 trimming"
rm -rf "$ROOT"/tmp/ksmvm-provision "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/* \
       "$ROOT"/usr/share/doc "$ROOT"/usr/share/man "$ROOT"/usr/share/locale "$ROOT"/usr/share/info \
       "$ROOT"/boot/initrd.img-* "$ROOT"/root/.cache
: > "$ROOT/etc/resolv.conf"
echo "ksmvm-$SUITE" > "$ROOT/etc/hostname"
mkdir -p "$ROOT/ksmvm" "$ROOT/sys/kernel/tracing" "$ROOT/sys/kernel/debug"

KVERS=$(ls "$ROOT/lib/modules")
[ "$(echo "$KVERS" | wc -l)" = 1 ] || { say "expected one kernel, found: $KVERS"; exit 1; }
KVER=$KVERS
# (build is an absolute symlink: resolve it inside the chroot)
chroot "$ROOT" test -e "/lib/modules/$KVER/build/Makefile" || { say "headers for $KVER are missing"; exit 1; }
cp "$ROOT/boot/vmlinuz-$KVER" "$TMP/vmlinuz"
# shellcheck disable=SC2016  # ${Version} is dpkg-query's, not the shell's
dpkg_ver() { chroot "$ROOT" dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo "?"; }
{
  echo "SUITE=$SUITE"
  echo "KVER=$KVER"
  echo "DEBIAN_VERSION=$(cat "$ROOT/etc/debian_version")"
  echo "BCC=$(dpkg_ver python3-bpfcc)"
  echo "PYTHON=$(chroot "$ROOT" python3 -c 'import platform; print(platform.python_version())')"
} > "$TMP/image.env"

# ---- 4. initrd: static busybox + the modules needed to mount virtio ext4 disks
say "4/5 initrd for $KVER"
"$HERE/make-initrd.sh" "$ROOT" "$KVER" "$TMP/initrd.gz"

# ---- 5. the root file system image (root is booted with snapshot=on: it never changes)
mb=$(( $(du -sm "$ROOT" | cut -f1) * 12 / 10 + 512 ))
say "5/5 mkfs.ext4 -d (${mb} MiB)"
mkfs.ext4 -q -F -L ksmroot -E root_owner=0:0 -d "$ROOT" "$TMP/rootfs.ext4" "${mb}M"
rm -rf "$ROOT"

rm -rf "$OUT"
mv "$TMP" "$OUT"
say "done: kernel $KVER, image $(du -h --apparent-size "$OUT/rootfs.ext4" | cut -f1) ($(du -h "$OUT/rootfs.ext4" | cut -f1) allocated)"
