#!/bin/bash
# ksmtrace's kernel tier on this machine, once per forced attach backend,
# after `ksmtrace doctor --json`. Shared by the QEMU harness guests
# (tests/vm/guest/runner.sh) and the Vagrant box (vagrant/provision.sh).
#
# usage: kernel-tier.sh [-o RESULTS] [-b "BACKENDS"] [-n NAME] [-t SECONDS] [--all] [-- PYTEST_ARGS...]
#        kernel-tier.sh --offered      print the backends this kernel offers, and exit
#   -o  results directory (default ./build/kernel-tier); it gets
#       doctor.json doctor.err doctor.rc ("absent" when the CLI has no doctor yet)
#       and per pass P: pytest-P.log, pytest-P.rc, junit-P.xml, selection-P.txt
#       (the -m expression), and per backend B: doctor-B.json (the plan with B forced)
#   -b  backends to force, in turn (default: every one the kernel offers)
#   -n  a name for the JUnit suites (default: the host name)
#   -t  silence budget per pass: pytest gets SIGINT when its output has not
#       grown for this long (it then stops, writes its JUnit XML and exits;
#       SIGKILL 30 s later) and pytest-P.rc is 124, so one hung test cannot
#       eat the other passes' time, while a pass slowed by a loaded host runs
#       as long as it makes progress; keep it above PYTEST_TIMEOUT (default:
#       none)
#   --all  the whole kernel tier per backend (`-m kernel`), not the focused
#       selection below (what a developer in the Vagrant box may want)
# The focused selection (default), in this order:
#   pass "untraced": `-m "kernel and vm and not traced"` once, automatic plan
#       (the workload and page-map figures do not depend on the backend);
#   pass B, per backend: `-m "kernel and vm and traced"` with KSMTRACE_ATTACH=B,
#       without the `fn_probes` tests when B is tracepoint (they need fentry or
#       kprobe, which that pass does not attach).
#   Tests marked `ksm_zero_pages` are left out where the kernel has no
#   ksm_zero_pages counter (< 6.10), and those marked `prctl_merge` where it
#   has no PR_SET_MEMORY_MERGE (< 6.4); selection-P.txt says so.
# env: KSMTRACE_VENV (default /opt/ksmtrace/venv), PYTEST_TIMEOUT (default 300 s per test)
# Exit status 0 when doctor and every pass passed, else 1.
set -uo pipefail

SRC=$(cd "$(dirname "$0")/../../.." && pwd)
VENV=${KSMTRACE_VENV:-/opt/ksmtrace/venv}
R=$SRC/build/kernel-tier
BACKENDS="" NAME=$(hostname) BUDGET="" ALL=0

# What the kernel offers, independently of ksmtrace: fentry needs BTF, kprobe
# needs kprobe events, the tracepoint backend needs the ksm:* tracepoints.
offered() {
  local t=/sys/kernel/tracing o=""
  [ -d $t/events ] || t=/sys/kernel/debug/tracing
  [ -e /sys/kernel/btf/vmlinux ] && o="$o fentry"
  [ -e $t/kprobe_events ] && o="$o kprobe"
  [ -d $t/events/ksm ] && o="$o tracepoint"
  echo "${o# }"
}

while [ $# -gt 0 ]; do
  case $1 in
    --offered) offered; exit 0 ;;
    -o) R=$2; shift 2 ;;
    -b) BACKENDS=$2; shift 2 ;;
    -n) NAME=$2; shift 2 ;;
    -t) BUDGET=$2; shift 2 ;;
    --all) ALL=1; shift ;;
    --) shift; break ;;
    *) echo "kernel-tier.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$BACKENDS" ] || BACKENDS=$(offered)
mkdir -p "$R" && R=$(cd "$R" && pwd)
cd "$SRC" || exit 2
export PATH="$VENV/bin:$PATH"
failed=0

echo "KSMVM-STEP doctor up=$(cut -d" " -f1 /proc/uptime)"
if python -c 'import ksmtrace.cli' 2>"$R/doctor.err"; then
  have_doctor=1
  ksmtrace doctor --json > "$R/doctor.json" 2>>"$R/doctor.err"
  echo $? > "$R/doctor.rc"
  echo "doctor --json exit $(cat "$R/doctor.rc"): $(tail -n 1 "$R/doctor.err")"
  [ "$(cat "$R/doctor.rc")" = 0 ] || failed=1
else
  have_doctor=0
  echo absent > "$R/doctor.rc"
  echo "KSMVM-NOTE ksmtrace doctor is not available yet (ksmtrace.cli does not import):"
  tail -n 3 "$R/doctor.err"
fi

# the pytest -m expression of one pass (see the usage above)
selection() {
  local pass=$1 m
  if [ "$ALL" = 1 ]; then
    m="kernel"
  elif [ "$pass" = untraced ]; then
    m="kernel and vm and not traced"
  else
    m="kernel and vm and traced"
    [ "$pass" = tracepoint ] && m="$m and not fn_probes"
  fi
  [ -e /sys/kernel/mm/ksm/ksm_zero_pages ] || m="$m and not ksm_zero_pages"
  # PR_GET_MEMORY_MERGE (68) is EINVAL before 6.4
  python -c 'import ctypes, sys; sys.exit(ctypes.CDLL(None).prctl(68, 0, 0, 0, 0) < 0)' ||
    m="$m and not prctl_merge"
  echo "$m"
}

# watchdog PID LOG SECONDS FLAG: SIGINT to PID (SIGKILL 30 s later) once LOG
# has not grown for SECONDS; FLAG records that it fired
watchdog() {
  local pid=$1 log=$2 limit=$3 flag=$4 size last=-1 quiet=0
  while kill -0 "$pid" 2>/dev/null; do
    size=$(stat -c %s "$log" 2>/dev/null || echo 0)
    if [ "$size" != "$last" ]; then last=$size quiet=0; else quiet=$((quiet + 5)); fi
    if [ "$quiet" -ge "$limit" ]; then
      touch "$flag"
      kill -INT "$pid" 2>/dev/null
      sleep 30
      kill -KILL "$pid" 2>/dev/null
      return
    fi
    sleep 5
  done
}

PASSES=$BACKENDS
[ "$ALL" = 1 ] || PASSES="untraced $BACKENDS"
for b in $PASSES; do
  echo "KSMVM-STEP pytest-$b up=$(cut -d" " -f1 /proc/uptime)"
  attach=()
  if [ "$b" != untraced ]; then
    attach=(KSMTRACE_ATTACH="$b")
    if [ "$have_doctor" = 1 ]; then
      ksmtrace doctor --json --attach "$b" > "$R/doctor-$b.json" 2>/dev/null
    fi
  fi
  sel=$(selection "$b")
  echo "$sel" > "$R/selection-$b.txt"
  echo "pass $b: pytest -m \"$sel\""
  # Output to the file, and from there to the console: a pipe into tee would
  # wait for any straggling child process that still holds it open.
  : > "$R/pytest-$b.log"
  rm -f "$R/stalled-$b"
  env "${attach[@]}" CI=true python -m pytest tests -m "$sel" \
    -p no:cacheprovider --timeout="${PYTEST_TIMEOUT:-300}" --junitxml="$R/junit-$b.xml" \
    -o junit_suite_name="$NAME-$b" "$@" > "$R/pytest-$b.log" 2>&1 &
  pid=$!
  tail -n +1 -f --pid="$pid" "$R/pytest-$b.log" &
  [ -n "$BUDGET" ] && watchdog "$pid" "$R/pytest-$b.log" "$BUDGET" "$R/stalled-$b" &
  wait "$pid"
  rc=$?
  [ -e "$R/stalled-$b" ] && rc=124
  wait  # for tail, which stops within a second of pytest, and the watchdog
  echo "$rc" > "$R/pytest-$b.rc"
  sync
  case $rc in
    0) echo "KSMVM-RC pytest-$b=0 passed" ;;
    5) echo "KSMVM-RC pytest-$b=5 no tests collected"; failed=1 ;;
    124) echo "KSMVM-RC pytest-$b=$rc TIMEOUT: no progress for ${BUDGET}s"; failed=1 ;;
    *) echo "KSMVM-RC pytest-$b=$rc FAILED"; failed=1 ;;
  esac
done
exit $failed
