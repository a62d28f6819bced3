/* ksmtrace: the one header shared by every BPF program and by user space.
 *
 * The layout of `struct ksm_event` is mirrored, field for field, by
 * ksmtrace/model.py (EVENT_STRUCT); a unit test compiles neither but checks
 * the Python side against the offsets written here in comments.
 *
 * Aggregation happens here, in the kernel: counters and log2 histograms only
 * ever grow (user space takes deltas, so nothing is lost between a read and
 * a clear), per-mm tables are LRU-bounded and drained by lookup-and-delete
 * once their mm has exited.
 */
#ifndef KSMTRACE_H
#define KSMTRACE_H

/* Event kinds (also the stage a line of `ksmtrace trace` belongs to). */
enum ksm_event_kind {
	EV_SCAN_START = 1,	/* searching: ksm_start_scan */
	EV_SCAN_STOP = 2,	/* searching: ksm_stop_scan (value = round ns) */
	EV_MERGE = 3,		/* merging: one page merge attempt */
	EV_REMOVE_KSM_PAGE = 4,	/* updating: stable node removed */
	EV_REMOVE_RMAP_ITEM = 5,/* updating: rmap item removed */
	EV_KSM_ENTER = 6,	/* counting: an mm registers with KSM */
	EV_KSM_EXIT = 7,	/* counting: an mm leaves KSM */
	EV_COW = 8,		/* updating: copy-on-write break of a KSM page */
	EV_WP_FAULT = 9,	/* updating: user write-protect fault (estimate basis) */
	EV_ADVISOR = 10,	/* searching: ksm_advisor (value = scan time) */
	EV_UNSHARE = 11,	/* updating: break_ksm (unmerge) */
};

/* What a merge did (EV_MERGE .sub). */
enum ksm_merge_kind {
	MERGE_NEW_PAIR = 0,	/* page becomes a new KSM page (ksm_page NULL) */
	MERGE_INTO_KSM = 1,	/* page merged into an existing KSM page */
	MERGE_ZERO = 2,		/* page merged with the zero page */
};

/* EV_COW .sub */
enum ksm_cow_kind {
	COW_WRITE = 0,		/* a user write to a KSM page */
	COW_UNSHARE = 1,	/* FAULT_FLAG_UNSHARE (break_ksm, GUP pin) */
};

struct ksm_event {		/* 72 bytes */
	u64 ts_ns;		/*  0: bpf_ktime_get_ns() */
	u64 mm;			/*  8: struct mm_struct * of the page's owner */
	u64 pfn;		/* 16: page frame (merge, cow, removals) */
	u64 value;		/* 24: latency/duration ns; advisor: scan time */
	u64 aux;		/* 32: scans: seq | rmap_entries << 32; advisor: pages_to_scan */
	u32 pid;		/* 40: tgid of the owner when known, else 0 */
	u32 tid;		/* 44: thread that hit the probe (ksmd for merges) */
	s32 err;		/* 48: result, 0 or -errno */
	u16 kind;		/* 52: enum ksm_event_kind */
	u16 sub;		/* 54: merge kind, cow kind, advisor cpu percent */
	char comm[16];		/* 56: comm of the thread that hit the probe */
};

/* Monotonic counters, one slot each (per-CPU array). C_<NAME> is the figure
 * <name> of ksmtrace/figures.py (COUNTERS, in this order; a unit test checks). */
enum ksm_counter {
	C_SCAN_STARTS, C_SCAN_ROUNDS,
	C_MERGES_NEW_KSM_PAGE, C_MERGES_INTO_KSM_PAGE, C_MERGES_ZERO_PAGE,
	C_MERGE_FAILURES_NEW_KSM_PAGE, C_MERGE_FAILURES_INTO_KSM_PAGE, C_MERGE_FAILURES_ZERO_PAGE,
	C_KSM_PAGES_REMOVED, C_RMAP_ITEMS_REMOVED,
	C_MM_ENTERS, C_MM_EXITS,
	C_COW_WRITES, C_COW_UNSHARES, C_WP_FAULTS,
	C_UNSHARES,
	C_ADVISOR_RUNS,
	C_EVENTS_SENT, C_EVENTS_LOST,
	C_OWNERS_RESOLVED,
	C_SCAN_BATCHES, C_PAGES_COMPARED,
	C_NR
};

/* Histograms: key = {which, log2 slot}. H_<NAME>: figures.HISTOGRAMS, in order. */
enum ksm_hist {
	H_SCAN_ROUND_SECONDS, H_MERGE_LATENCY_SECONDS, H_COW_LATENCY_SECONDS,
	H_UNSHARE_LATENCY_SECONDS, H_SCAN_BATCH_SECONDS,
};
#define HIST_SLOTS 64

struct hist_key { u32 which; u32 slot; };
struct err_key { u32 kind; s32 err; };	/* failures by errno, kind = merge kind */

/* Per-mm figures: the mm is the identity KSM itself uses (mm_slot). */
struct mm_stats {
	u64 merges[3];		/* successful, by enum ksm_merge_kind */
	u64 merge_failures;
	u64 cow[2];		/* by enum ksm_cow_kind */
	u64 wp_faults;		/* estimate basis on tracepoint-only kernels */
	u64 unshares;		/* break_ksm calls */
	u64 rmap_removed;
};

/* ksmd's successful merges since it last changed mm, not yet added to
 * mm_stats (MERGE_SLOT, bpf/ksmtrace.bpf.c). `seq` is odd while a flush
 * moves them into mm_stats: user space reads slot, mm_stats, slot, and
 * retries when `seq` moved or was odd. */
struct merge_slot {
	u64 seq;
	u64 mm;
	u64 merges[3];
};

struct owner { u32 pid; char comm[16]; };

#endif
