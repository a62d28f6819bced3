#!/bin/bash
# The harness's work inside a guest, started by init.sh: install the tree
# offline, then what /ksmvm/job.env asks for. Every step leaves its files in
# /ksmvm/results (<step>.rc, logs, JSON, JUnit XML); the host judges the run
# from those files, not from this script's exit status.
#
# job.env (written by tests/vm/run.py):
#   GUEST=trixie  BACKENDS="fentry kprobe tracepoint"  PASSES="untraced ..."  ALL=0|1
#   SMOKE=0|1  TESTS=0|1
#   PYTEST_ARGS="..." (shell-quoted)  PYTEST_TIMEOUT=300 (per test)  BACKEND_TIMEOUT=420
set -uo pipefail

GUEST_DIR=$(cd "$(dirname "$0")" && pwd)
SRC=/ksmvm/src
R=/ksmvm/results
VENV=${KSMTRACE_VENV:-/opt/ksmtrace/venv}
# shellcheck disable=SC1091
. /ksmvm/job.env
mkdir -p "$R"

up() { cut -d' ' -f1 /proc/uptime; }
step() { echo "KSMVM-STEP $1 up=$(up)"; echo "$1=$(up)" >> "$R/steps.env"; }

# run NAME CMD...: output to the console and $R/NAME.log, exit status to $R/NAME.rc
run() {
  local name=$1 rc
  shift
  step "$name"
  "$@" 2>&1 | tee "$R/$name.log"
  rc=${PIPESTATUS[0]}
  echo "$rc" > "$R/$name.rc"
  sync   # if the host has to kill the guest later, what is done so far still comes back
  echo "KSMVM-RC $name=$rc"
  return "$rc"
}

{
  echo "KVER=$(uname -r)"
  echo "DEBIAN_VERSION=$(cat /etc/debian_version)"
  echo "OFFERED=\"$("$GUEST_DIR/kernel-tier.sh" --offered)\""
  echo "BCC=$(dpkg-query -W -f='${Version}' python3-bpfcc)"
  echo "PYTHON=$("$VENV/bin/python" -c 'import platform; print(platform.python_version())')"
  echo "CPUS=$(nproc)"
} > "$R/guest.env"
cat "$R/guest.env"

run install "$GUEST_DIR/provision.sh" --project "$SRC" --offline || exit 1

if [ "${SMOKE:-0}" = 1 ]; then
  run smoke "$VENV/bin/python" "$GUEST_DIR/smoke.py" --json "$R/smoke.json"
fi

if [ "${TESTS:-1}" = 1 ]; then
  step kernel-tier
  eval "set -- ${PYTEST_ARGS:-}"
  all=()
  [ "${ALL:-0}" = 1 ] && all=(--all)
  PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-300} \
    "$GUEST_DIR/kernel-tier.sh" -o "$R" -b "$BACKENDS" -n "$GUEST" -t "$BACKEND_TIMEOUT" "${all[@]}" -- "$@"
  echo $? > "$R/kernel-tier.rc"
fi
step finished
exit 0
