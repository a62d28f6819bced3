"""KSM workload generator: child processes full of duplicate pages, and the
exact figures the kernel should show for them.

N child processes each map M pages cycling through D distinct contents (plus
optional unique pages and zero pages), register them with KSM
(`madvise(MADV_MERGEABLE)` or `prctl(PR_SET_MEMORY_MERGE)`), and on command
write to merged pages (copy-on-write breaks), put them in a page state
(PROT_NONE, userfaultfd write-protected, discarded), put the original
contents back (re-merge) or unmerge. `expect()` predicts, as a pure function,
what /sys/kernel/mm/ksm, /proc/<pid>/ksm_stat and /proc/vmstat `cow_ksm`
must then show; `Workload` runs it, optionally drives ksmd fast (restoring
every knob on every exit path) and waits until the kernel agrees. Used by the
demo, the kernel-tier tests and benchmarks, and as `ksmtrace workload`.

    model     the pure expectations (no kernel, no processes)
    contents  page contents, shared by parent and children
    reads     what is read from the kernel to compare
    child     the child process and its JSON line protocol
    parent    `Workload`: children, phases, ksmd, waiting
    cli       `ksmtrace workload`
"""

from ksmtrace.kernel.procfs import PAGE_SIZE
from ksmtrace.workload.cli import add_cli, main, run_cli
from ksmtrace.workload.contents import cow_marker, dup_content, new_nonce, page_content
from ksmtrace.workload.model import (
    PAGE_STATES,
    Expectation,
    MergeTimeout,
    Model,
    WorkloadError,
    WorkloadSpec,
    cow_plan,
    expect,
    restore_plan,
)
from ksmtrace.workload.parent import Workload
from ksmtrace.workload.reads import KsmUser, Measurement, other_ksm_users

__all__ = [
    "PAGE_SIZE",
    "PAGE_STATES",
    "Expectation",
    "KsmUser",
    "Measurement",
    "MergeTimeout",
    "Model",
    "Workload",
    "WorkloadError",
    "WorkloadSpec",
    "add_cli",
    "cow_marker",
    "cow_plan",
    "dup_content",
    "expect",
    "main",
    "new_nonce",
    "other_ksm_users",
    "page_content",
    "restore_plan",
    "run_cli",
]
