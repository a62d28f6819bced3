#!/usr/bin/env bash
# Provision a Debian 12/13 machine for ksmtrace's kernel tier, as root.
# Shared by the QEMU harness and Vagrant, so both get the same machine:
#   - tests/vm/build-image.sh runs it inside the debootstrap chroot with
#     --requirements (the project's PyPI dependencies, pre-installed so the
#     guest needs no network at run time);
#   - the harness guest runs it at boot with --project /ksmvm/src --offline;
#   - vagrant/provision.sh runs it with --project /vagrant (network).
# Idempotent: each step is skipped when already done.
#
# usage: provision.sh [--requirements FILE] [--project DIR [--offline]]
# env:   KSMTRACE_VENV (default /opt/ksmtrace/venv)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
VENV=${KSMTRACE_VENV:-/opt/ksmtrace/venv}
REQUIREMENTS="" PROJECT="" OFFLINE=0
while [ $# -gt 0 ]; do
  case $1 in
    --requirements) REQUIREMENTS=$2; shift 2 ;;
    --project) PROJECT=$2; shift 2 ;;
    --offline) OFFLINE=1; shift ;;
    *) echo "provision.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

say() { echo "[provision] $*" >&2; }

# 1. Debian packages (already there in a harness image: debootstrap --include'd them)
# (no process substitution: a fresh debootstrap chroot has no /proc, hence no /dev/fd)
missing=()
# shellcheck disable=SC2013  # one package name per word is the format
for p in $(sed -e 's/#.*//' "$HERE/packages.txt"); do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$OFFLINE" = 1 ] && { say "missing Debian packages and --offline: ${missing[*]}"; exit 1; }
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# bcc must find headers for the running kernel (in the image-build chroot,
# where the host's kernel runs: for every installed kernel)
if [ -d "/lib/modules/$(uname -r)" ]; then kernels=$(uname -r); else kernels=$(ls /lib/modules); fi
for kver in $kernels; do
  [ -e "/lib/modules/$kver/build" ] || { say "no kernel headers for $kver (/lib/modules/$kver/build)"; exit 1; }
done

# 2. a venv like the host's: Debian's python3 with --system-site-packages (bcc)
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV (Debian python3, --system-site-packages)"
  mkdir -p "$(dirname "$VENV")"
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -c 'import bcc' || { say "bcc is not importable from $VENV"; exit 1; }

pip() { "$VENV/bin/python" -m pip --disable-pip-version-check --no-input "$@"; }

# 3. PyPI dependencies (image build time; the chroot has network)
if [ -n "$REQUIREMENTS" ]; then
  say "installing PyPI dependencies from $REQUIREMENTS"
  pip install -q --no-cache-dir -r "$REQUIREMENTS"
fi

# 4. the project itself, editable
if [ -n "$PROJECT" ]; then
  if [ "$OFFLINE" = 1 ]; then
    say "installing $PROJECT editable, offline (dependencies are in the image)"
    pip install -q --no-index --no-deps --no-build-isolation -e "$PROJECT"
  else
    say "installing $PROJECT editable with [dev] extras"
    pip install -q -e "${PROJECT}[dev]"
  fi
fi
