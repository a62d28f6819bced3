#!/usr/bin/env bash
# One-step, idempotent set-up on Debian 12/13 as root: apt packages, a venv
# that can import Debian's bcc, and ksmtrace in editable mode with dev extras.
# Re-running it does nothing that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "setup: run as root (apt packages and BPF need it): sudo $0" >&2
  exit 3
fi

# bcc and its tools come from Debian (python3-bpfcc); the PyPI 'bcc' is another project.
# linux-headers-amd64: bcc compiles against headers; ksmtrace merges them into a
# private tree when the running kernel has none (see ksmtrace/kernel/headers.py).
# prometheus: the metrics tests start a real one. tmux: the real-terminal TUI test.
# bpftrace: the benchmark's side-by-side baseline. python3-numpy: the page map
# reader (pyproject lists numpy too; the venv sees Debian's, so pip adds none).
PKGS="python3 python3-venv python3-dev python3-bpfcc bpfcc-tools bpftool linux-headers-amd64
      gcc make prometheus tmux bpftrace procps util-linux python3-numpy"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  say "installing Debian packages:$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q $missing  # with recommends, as the packages were tested
else
  say "Debian packages present"
fi

# Debian's python3, not a pyenv/conda one: bcc lives in its dist-packages.
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import bcc' 2>/dev/null; then
  say "creating $VENV from /usr/bin/python3 with --system-site-packages (for bcc)"
  rm -rf "$VENV"
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi

stamp="$VENV/.ksmtrace-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing ksmtrace (editable) with dev extras"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[dev]'
  touch "$stamp"
else
  say "ksmtrace already installed in $VENV"
fi
