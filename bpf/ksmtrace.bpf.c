/* ksmtrace BPF programs: one compilation unit whose parts are switched on by
 * cflags from the attach plan (ksmtrace/kernel/capabilities.py decides, the
 * loader passes -D flags; nothing here is templated by string replacement).
 *
 *   -DSCAN_TP        ksm:ksm_start_scan / ksm_stop_scan     (searching)
 *   -DMERGE_TP       ksm:ksm_merge_with_ksm_page / _one_page (merging)
 *   -DMERGE_FN=1|2   try_to_merge_one_page + _with_ksm_page, 1 fentry 2 kprobe
 *   -DMM_TP          ksm:ksm_enter / ksm_exit               (counting)
 *   -DREMOVE_TP      ksm:ksm_remove_ksm_page / _rmap_item    (updating)
 *   -DCOW_FN=1|2     do_wp_page entry+exit, 1 fentry 2 kprobe (updating)
 *   -DCOW_EST        exceptions:page_fault_user write-protect faults
 *   -DUNSHARE_FN=1|2 break_ksm entry+exit
 *   -DADVISOR_TP     ksm:ksm_advisor
 *   -DMERGE_SLOT     ksmd's merges gather in one slot (needs SCAN_TP and a merge probe)
 *   -DSCAN_FN=1|2    ksm_do_scan entry+exit (a scan batch), where not inlined
 *   -DCMP_FN=1|2     cmp_and_merge_page entry (one page compared), where not inlined
 *   -DRESOLVER       mmap_lock:mmap_lock_start_locking mm -> pid resolver
 *   -DSTREAM=0|1     per-event stream: none, or the ring buffer (5.8+)
 *   -DOFF_*          struct member offsets read from BTF, never from headers
 */
#include <uapi/linux/ptrace.h>
#include "ksmtrace.h"

#ifndef STREAM
#define STREAM 0
#endif
#ifndef MAX_MMS
#define MAX_MMS 65536
#endif

BPF_PERCPU_ARRAY(counters, u64, C_NR);
BPF_HASH(hist, struct hist_key, u64, 5 * HIST_SLOTS);
BPF_HASH(errors, struct err_key, u64, 1024);
BPF_TABLE("lru_hash", u64, struct mm_stats, mm_stats, MAX_MMS);
BPF_TABLE("lru_hash", u64, struct owner, owners, MAX_MMS);
BPF_ARRAY(scan_start_ns, u64, 1);
/* struct page * of pfn 0 (vmemmap_base on x86_64, randomised by KASLR and not
 * in kallsyms without CONFIG_KALLSYMS_ALL): learnt from the first do_wp_page
 * that had both a PTE and a page; user space provokes one at start. */
BPF_ARRAY(page_base, u64, 1);

static __always_inline u64 page_base_addr(void)
{
	int zero = 0;
	u64 *b = page_base.lookup(&zero);
	return b ? *b : 0;
}

#ifdef UNSHARE_FN
/* thread -> break_ksm entry time, while inside break_ksm: also what tells
 * an unshare fault from a user write on kernels whose break_ksm takes a
 * fake write fault (6.1: FAULT_FLAG_WRITE, no FAULT_FLAG_UNSHARE). */
BPF_HASH(unshare_calls, u32, u64, 1024);
#endif

#if STREAM == 1
BPF_RINGBUF_OUTPUT(events, 1 << 11);	/* 2048 pages = 8 MiB: a 100k-merge burst */
/* Waking the reader is the dear part of a ring-buffer write (an irq_work,
 * a self-IPI: measured 4.7 us per merge event on the 6.18 host with the
 * default adaptive wake-up, which woke the Python reader for nearly every
 * event). Wake it at most once per WAKEUP_NS; it also polls on a timer. */
#define WAKEUP_NS 10000000ULL	/* 10 ms */
#define RB_NO_WAKEUP 1ULL
#define RB_FORCE_WAKEUP 2ULL
BPF_ARRAY(last_wakeup, u64, 1);

static __always_inline u64 wakeup_flag(u64 now)
{
	int zero = 0;
	u64 *last = last_wakeup.lookup(&zero);
	if (!last || now - *last < WAKEUP_NS)
		return RB_NO_WAKEUP;
	*last = now;	/* racing CPUs at worst both wake it */
	return RB_FORCE_WAKEUP;
}
#endif

static __always_inline void count(int idx)
{
	u64 *v = counters.lookup(&idx);
	if (v)
		(*v)++;	/* per-CPU slot: no atomics needed */
}

static __always_inline u32 log2l(u64 v)
{
	u32 r = 0;
	#pragma unroll
	for (int i = 32; i > 0; i >>= 1) {
		if (v >= (1ULL << i)) {
			v >>= i;
			r += i;
		}
	}
	return r;
}

static __always_inline void hist_add(u32 which, u64 ns)
{
	struct hist_key k = { .which = which, .slot = log2l(ns) };
	if (k.slot >= HIST_SLOTS)
		k.slot = HIST_SLOTS - 1;
	u64 zero = 0, *v = hist.lookup_or_try_init(&k, &zero);
	if (v)
		__sync_fetch_and_add(v, 1);
}

static __always_inline struct mm_stats *mm_get(u64 mm)
{
	struct mm_stats zero = {};
	return mm_stats.lookup_or_try_init(&mm, &zero);
}

static __always_inline u32 owner_pid(u64 mm)
{
	struct owner *o = owners.lookup(&mm);
	return o ? o->pid : 0;
}

#ifdef OFF_TASK_MM
static __always_inline u64 current_mm(void)
{
	u64 mm = 0;
	struct task_struct *t = (struct task_struct *)bpf_get_current_task();
	bpf_probe_read_kernel(&mm, sizeof(mm), (void *)t + OFF_TASK_MM);
	return mm;
}
#endif

#if STREAM
/* One event to the stream. Without a stream (the default) `emit` is a macro
 * that expands to nothing, so its arguments are never evaluated: no owner
 * lookup, no clock read on the hot tracepoints (ksm_merge_with_ksm_page fires
 * once per merged page, ~250k/s in a burst). */
#define emit(...) emit_event(__VA_ARGS__)
static __always_inline void emit_event(void *ctx, u16 kind, u16 sub, u64 mm, u64 pfn, u64 value,
				       u64 aux, s32 err, u32 pid)
{
	struct ksm_event e = {};
	u64 id = bpf_get_current_pid_tgid();
	e.ts_ns = bpf_ktime_get_ns();
	e.mm = mm;
	e.pfn = pfn;
	e.value = value;
	e.aux = aux;
	e.pid = pid;
	e.tid = (u32)id;
	e.err = err;
	e.kind = kind;
	e.sub = sub;
	bpf_get_current_comm(&e.comm, sizeof(e.comm));
	if (events.ringbuf_output(&e, sizeof(e), wakeup_flag(e.ts_ns)) == 0)
		count(C_EVENTS_SENT);
	else
		count(C_EVENTS_LOST);
}
#else
#define emit(...) do { } while (0)
#endif

#ifdef MERGE_SLOT
#if !defined(SCAN_TP) || !(defined(MERGE_TP) || defined(MERGE_FN))
#error "MERGE_SLOT needs scan-round ends (SCAN_TP) and a merge probe"
#endif
/* Per-mm merge counts without a hash lookup per merge. Only ksmd merges, one
 * mm's pages after another, so its successful merges gather in one slot and
 * go into mm_stats when it moves to another mm and at the end of every scan
 * round. The hash lookup was most of the merge program's run time (~94 ns of
 * a ~3.7 us merge, bench/ANALYSIS.md).
 *
 * Why this is exact: user space adds the slot to mm_stats when it reads them
 * (ksmtrace/sources/live.py). An exited mm is freed, and its address can be
 * reused, only after ksmd has passed it in a later round, and a newly
 * registered mm is scanned only after the cursor wraps (__ksm_enter inserts
 * it behind the cursor; ksm_stop_scan fires at the wrap): so the slot never
 * holds an mm whose address has a new owner. User space drains an exited
 * mm's figures only once the slot no longer holds it. */
BPF_ARRAY(merge_slot, struct merge_slot, 1);

static __always_inline void slot_flush(struct merge_slot *c, u64 next_mm)
{
	__sync_fetch_and_add(&c->seq, 1);	/* odd: moving */
	if (c->mm) {
		struct mm_stats *s = mm_get(c->mm);
		if (s) {
			#pragma unroll
			for (int k = 0; k < 3; k++)
				if (c->merges[k])
					__sync_fetch_and_add(&s->merges[k], c->merges[k]);
		}
	}
	c->merges[0] = c->merges[1] = c->merges[2] = 0;
	c->mm = next_mm;
	__sync_fetch_and_add(&c->seq, 1);	/* even: settled */
}

static __always_inline void merged(u64 mm, u16 kind)
{
	int zero = 0;
	struct merge_slot *c = merge_slot.lookup(&zero);
	if (!c || kind >= 3)
		return;
	if (c->mm != mm)
		slot_flush(c, mm);
	c->merges[kind]++;	/* only ksmd writes the slot */
}
#else
static __always_inline void merged(u64 mm, u16 kind)
{
	struct mm_stats *s = mm_get(mm);
	if (s && kind < 3)
		__sync_fetch_and_add(&s->merges[kind], 1);
}
#endif

/* A merge attempt, whichever probe saw it. */
static __always_inline void on_merge(void *ctx, u16 kind, u64 mm, u64 pfn, s32 err, u64 latency)
{
	if (err == 0) {
		count(C_MERGES_NEW_KSM_PAGE + kind);
		merged(mm, kind);
	} else {
		count(C_MERGE_FAILURES_NEW_KSM_PAGE + kind);
		struct err_key k = { .kind = kind, .err = err };
		u64 zero = 0, *v = errors.lookup_or_try_init(&k, &zero);
		if (v)
			__sync_fetch_and_add(v, 1);
		struct mm_stats *s = mm_get(mm);
		if (s)
			__sync_fetch_and_add(&s->merge_failures, 1);
	}
	if (latency)
		hist_add(H_MERGE_LATENCY_SECONDS, latency);
	emit(ctx, EV_MERGE, kind, mm, pfn, latency, 0, err, owner_pid(mm));
}

/* ---------------------------------------------------------------- searching */
#ifdef SCAN_TP
TRACEPOINT_PROBE(ksm, ksm_start_scan)
{
	int zero = 0;
	u64 now = bpf_ktime_get_ns();
	scan_start_ns.update(&zero, &now);
	count(C_SCAN_STARTS);
	emit(args, EV_SCAN_START, 0, 0, 0, 0, (u32)args->seq | ((u64)args->rmap_entries << 32), 0, 0);
	return 0;
}

TRACEPOINT_PROBE(ksm, ksm_stop_scan)
{
	int zero = 0;
	u64 dur = 0, *start = scan_start_ns.lookup(&zero);
	if (start && *start)
		dur = bpf_ktime_get_ns() - *start;
	count(C_SCAN_ROUNDS);
	if (dur)
		hist_add(H_SCAN_ROUND_SECONDS, dur);
#ifdef MERGE_SLOT
	struct merge_slot *c = merge_slot.lookup(&zero);
	if (c && c->mm)
		slot_flush(c, 0);
#endif
	emit(args, EV_SCAN_STOP, 0, 0, 0, dur, (u32)args->seq | ((u64)args->rmap_entries << 32), 0, 0);
	return 0;
}
#endif

#ifdef ADVISOR_TP
TRACEPOINT_PROBE(ksm, ksm_advisor)
{
	count(C_ADVISOR_RUNS);
	emit(args, EV_ADVISOR, args->cpu_percent, 0, 0, args->scan_time, args->pages_to_scan, 0, 0);
	return 0;
}
#endif

#ifdef SCAN_FN
/* ksm_do_scan(scan_npages): one batch of pages_to_scan pages per wake-up.
 * Inlined into ksm_scan_thread on nearly every distro kernel. */
BPF_HASH(batch_start, u32, u64, 64);

static __always_inline void batch_enter(void)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	u64 now = bpf_ktime_get_ns();
	batch_start.update(&tid, &now);
}

static __always_inline void batch_exit(void)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	u64 *ts = batch_start.lookup(&tid);
	if (!ts)
		return;
	count(C_SCAN_BATCHES);
	hist_add(H_SCAN_BATCH_SECONDS, bpf_ktime_get_ns() - *ts);
	batch_start.delete(&tid);
}
#if SCAN_FN == 1
KFUNC_PROBE(ksm_do_scan, unsigned int n) { batch_enter(); return 0; }
KRETFUNC_PROBE(ksm_do_scan, unsigned int n, int ret) { batch_exit(); return 0; }
#else
int kp_scan_batch(struct pt_regs *ctx) { batch_enter(); return 0; }
int kr_scan_batch(struct pt_regs *ctx) { batch_exit(); return 0; }
#endif
#endif

#ifdef CMP_FN
#if CMP_FN == 1
KFUNC_PROBE(cmp_and_merge_page, void *page, void *rmap_item) { count(C_PAGES_COMPARED); return 0; }
#else
int kp_page_compare(struct pt_regs *ctx) { count(C_PAGES_COMPARED); return 0; }
#endif
#endif

/* ------------------------------------------------------------------ merging */
#ifdef MERGE_TP
/* One event per page merged (measured: 200,000 pages -> 200,000 events), in
 * ksmd's hot path: attached as *raw* tracepoints, which hand over the
 * tracepoint's arguments as the kernel passes them, without building the
 * trace record a perf-event tracepoint copies for every hit (bench/: the
 * dearest part of tracing a merge). The argument order is the TP_PROTO of
 * include/trace/events/ksm.h, unchanged since these tracepoints appeared
 * (6.7); the kernel tests check the decoded kinds against pages_shared and
 * pages_sharing exactly, and ksm_zero_pages for the zero-page merges.
 *
 * ksm_merge_with_ksm_page(void *ksm_page, unsigned long pfn, void *rmap_item,
 *                         void *mm, int err)
 * ksm_page NULL: the page becomes a new KSM page; else it joins one. */
RAW_TRACEPOINT_PROBE(ksm_merge_with_ksm_page)
{
	u16 kind = ctx->args[0] ? MERGE_INTO_KSM : MERGE_NEW_PAIR;
	on_merge(ctx, kind, ctx->args[3], ctx->args[1], (s32)ctx->args[4], 0);
	return 0;
}

/* ksm_merge_one_page(unsigned long pfn, void *rmap_item, void *mm, int err):
 * fires only for merges with the zero page (use_zero_pages=1). */
RAW_TRACEPOINT_PROBE(ksm_merge_one_page)
{
	on_merge(ctx, MERGE_ZERO, ctx->args[2], ctx->args[0], (s32)ctx->args[3], 0);
	return 0;
}
#endif

#ifdef MERGE_FN
/* try_to_merge_one_page(vma, page, kpage) is called by
 * try_to_merge_with_ksm_page() for normal merges and directly by
 * cmp_and_merge_page() for zero-page merges: a per-thread flag set while
 * inside the former tells them apart without comparing page pointers. */
struct merge_call { u64 ts; u64 mm; u64 page; u16 kind; };
BPF_HASH(merge_calls, u32, struct merge_call, 1024);
BPF_HASH(in_with_ksm, u32, u8, 1024);

static __always_inline void merge_enter(void *vma, void *page, void *kpage)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct merge_call c = { .ts = bpf_ktime_get_ns(), .page = (u64)page };
	bpf_probe_read_kernel(&c.mm, sizeof(c.mm), vma + OFF_VMA_MM);
	if (in_with_ksm.lookup(&tid))
		c.kind = kpage ? MERGE_INTO_KSM : MERGE_NEW_PAIR;
	else
		c.kind = MERGE_ZERO;
	merge_calls.update(&tid, &c);
}

static __always_inline void merge_exit(void *ctx, int ret)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct merge_call *c = merge_calls.lookup(&tid);
	if (!c)
		return;	/* entered before we attached */
	u64 pfn = 0, base = page_base_addr();
	if (base && c->page >= base)
		pfn = (c->page - base) / STRUCT_PAGE_SIZE;
	on_merge(ctx, c->kind, c->mm, pfn, ret, bpf_ktime_get_ns() - c->ts);
	merge_calls.delete(&tid);
}

static __always_inline void with_ksm_enter(void)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	u8 one = 1;
	in_with_ksm.update(&tid, &one);
}

static __always_inline void with_ksm_exit(void)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	in_with_ksm.delete(&tid);
}

#if MERGE_FN == 1
KFUNC_PROBE(try_to_merge_one_page, void *vma, void *page, void *kpage)
{
	merge_enter(vma, page, kpage);
	return 0;
}
KRETFUNC_PROBE(try_to_merge_one_page, void *vma, void *page, void *kpage, int ret)
{
	merge_exit(ctx, ret);
	return 0;
}
KFUNC_PROBE(try_to_merge_with_ksm_page, void *rmap_item, void *page, void *kpage)
{
	with_ksm_enter();
	return 0;
}
KRETFUNC_PROBE(try_to_merge_with_ksm_page, void *rmap_item, void *page, void *kpage, int ret)
{
	with_ksm_exit();
	return 0;
}
#else
int kp_merge_one(struct pt_regs *ctx)
{
	merge_enter((void *)PT_REGS_PARM1(ctx), (void *)PT_REGS_PARM2(ctx),
		    (void *)PT_REGS_PARM3(ctx));
	return 0;
}
int kr_merge_one(struct pt_regs *ctx)
{
	merge_exit(ctx, (int)PT_REGS_RC(ctx));
	return 0;
}
int kp_with_ksm(struct pt_regs *ctx)
{
	with_ksm_enter();
	return 0;
}
int kr_with_ksm(struct pt_regs *ctx)
{
	with_ksm_exit();
	return 0;
}
#endif
#endif

/* ----------------------------------------------------------------- counting */
#ifdef MM_TP
/* ksm_enter fires in the registering task (madvise/prctl), or in the parent
 * during fork (ksm_fork): only the first names the owner. */
TRACEPOINT_PROBE(ksm, ksm_enter)
{
	u64 mm = (u64)args->mm;
	count(C_MM_ENTERS);
	mm_get(mm);
	u32 pid = 0;
#ifdef OFF_TASK_MM
	if (current_mm() == mm) {
		struct owner o = { .pid = bpf_get_current_pid_tgid() >> 32 };
		bpf_get_current_comm(&o.comm, sizeof(o.comm));
		owners.update(&mm, &o);
		pid = o.pid;
	}
#endif
	emit(args, EV_KSM_ENTER, 0, mm, 0, 0, 0, 0, pid);
	return 0;
}

TRACEPOINT_PROBE(ksm, ksm_exit)
{
	u64 mm = (u64)args->mm;
	count(C_MM_EXITS);
	emit(args, EV_KSM_EXIT, 0, mm, 0, 0, 0, 0, owner_pid(mm));
	return 0;
}
#endif

#ifdef RESOLVER
/* mm -> pid for processes that registered before we attached. User space
 * arms `resolve` with its own thread id and a pid, then reads
 * /proc/<pid>/smaps_rollup, which takes that mm's mmap lock in this thread:
 * the mm the tracepoint reports is the pid's (our own mm is skipped).
 * Attached only while user space resolves (ksmtrace/sources/live.py): ksmd
 * takes an mmap lock for every page it merges, so attached for good this
 * would run two or more times per merged page for nothing. */
struct resolve_req { u32 tid; u32 pid; };
BPF_ARRAY(resolve, struct resolve_req, 1);

TRACEPOINT_PROBE(mmap_lock, mmap_lock_start_locking)
{
	int zero = 0;
	struct resolve_req *r = resolve.lookup(&zero);
	if (!r || !r->tid || r->tid != (u32)bpf_get_current_pid_tgid())
		return 0;
	u64 mm = (u64)args->mm;
	if (mm == current_mm())
		return 0;
	struct owner o = { .pid = r->pid };
	owners.update(&mm, &o);
	mm_get(mm);	/* a KSM mm from now on: its write faults count (COW_EST) */
	count(C_OWNERS_RESOLVED);
	return 0;
}
#endif

/* ----------------------------------------------------------------- updating */
#ifdef REMOVE_TP
TRACEPOINT_PROBE(ksm, ksm_remove_ksm_page)
{
	count(C_KSM_PAGES_REMOVED);
	emit(args, EV_REMOVE_KSM_PAGE, 0, 0, args->pfn, 0, 0, 0, 0);
	return 0;
}

TRACEPOINT_PROBE(ksm, ksm_remove_rmap_item)
{
	u64 mm = (u64)args->mm;
	count(C_RMAP_ITEMS_REMOVED);
	struct mm_stats *s = mm_stats.lookup(&mm);
	if (s)
		__sync_fetch_and_add(&s->rmap_removed, 1);
	emit(args, EV_REMOVE_RMAP_ITEM, 0, mm, args->pfn, 0, 0, 0, owner_pid(mm));
	return 0;
}
#endif

#ifdef COW_EST
/* Tracepoint-only kernels: no probe sees a KSM copy-on-write. Count user
 * write-protect faults (error_code & (PF_PROT|PF_WRITE)) in mms KSM knows;
 * user space splits the exact global cow_ksm delta by these. Estimated. */
TRACEPOINT_PROBE(exceptions, page_fault_user)
{
	if ((args->error_code & 3) != 3)
		return 0;
	u64 mm = current_mm();
	struct mm_stats *s = mm_stats.lookup(&mm);
	if (!s)
		return 0;
	__sync_fetch_and_add(&s->wp_faults, 1);
	count(C_WP_FAULTS);
	emit(args, EV_WP_FAULT, 0, mm, 0, 0, args->address, 0, bpf_get_current_pid_tgid() >> 32);
	return 0;
}
#endif

#ifdef COW_FN
/* do_wp_page(vmf): at entry the faulting PTE (vmf->orig_pte) still maps the
 * page; its struct page tells whether it is a KSM page (PAGE_MAPPING_KSM in
 * page->mapping). The kernel copies every KSM page it reaches here and
 * counts COW_KSM, which is what we count, per process, with latency. */
struct cow_call { u64 ts; u64 mm; u64 pfn; u64 vmf; u16 sub; u8 ksm; };

#define _PAGE_PRESENT	0x001ULL
#define _PAGE_PROTNONE	0x100ULL	/* x86: _PAGE_GLOBAL, meaningful when not present */

/* do_wp_page counts COW_KSM on a KSM folio just before wp_page_copy, and
 * returns without copying only through handle_userfault (a userfaultfd
 * write-protected PTE: SIGBUS when nobody may wait, as in 6.1's break_ksm;
 * RETRY or NOPAGE otherwise), or RETRY before the copy under a per-VMA lock.
 * wp_page_copy itself returns 0, VM_FAULT_WRITE (up to 6.1), OOM or
 * HWPOISON, all after the count. */
#define VM_FAULT_NO_COPY	(0x002 | 0x040 | 0x100 | 0x400)	/* SIGBUS SIGSEGV NOPAGE RETRY */
BPF_HASH(cow_calls, u32, struct cow_call, 4096);

/* struct page: flags, then a union whose first word is compound_head (bit 0
 * set on a tail page of a large folio: the rest is the head's address) and
 * which overlaps lru, a list_head that `mapping` follows. */
#define OFF_PAGE_COMPOUND_HEAD (OFF_PAGE_MAPPING - 16)

/* folio_test_ksm() of the page's folio: the head page's `mapping`. A tail
 * page's own `mapping` word is not a mapping (a large folio's second page
 * holds _nr_pages_mapped and _pincount there, whose low bits can look like
 * PAGE_MAPPING_KSM). */
static __always_inline u8 page_is_ksm(u64 page)
{
	u64 mapping = 0, head = 0;
	bpf_probe_read_kernel(&head, sizeof(head), (void *)page + OFF_PAGE_COMPOUND_HEAD);
	if (head & 1)
		page = head - 1;
	bpf_probe_read_kernel(&mapping, sizeof(mapping), (void *)page + OFF_PAGE_MAPPING);
	return (mapping & 3) == 3;	/* PAGE_MAPPING_KSM */
}

/* Every entry replaces or removes this thread's slot: an entry whose exit
 * never ran (the entry program attached a moment before the exit one, or a
 * return probe missed) must not be taken for a later call's, whose exit
 * would then count a break of a page it never checked, or learn the vmemmap
 * base from a dead frame. */
static __always_inline void cow_forget(u32 tid)
{
	if (cow_calls.lookup(&tid))
		cow_calls.delete(&tid);
}

static __always_inline void cow_enter(void *vmf)
{
	u64 pte = 0, vma = 0, mm = 0, base = page_base_addr();
	u32 flags = 0;
	u32 tid = (u32)bpf_get_current_pid_tgid();
	bpf_probe_read_kernel(&pte, sizeof(pte), vmf + OFF_VMF_ORIG_PTE);
	/* pte_present(): do_wp_page also handles PROT_NONE PTEs (break_ksm on a
	 * PROT_NONE range, a FOLL_FORCE write through /proc/pid/mem), which have
	 * _PAGE_PROTNONE instead of _PAGE_PRESENT and hold the pfn inverted
	 * (x86's L1TF mitigation, undone by pte_pfn()). */
	if (!(pte & (_PAGE_PRESENT | _PAGE_PROTNONE))) {
		cow_forget(tid);
		return;
	}
	if (!(pte & _PAGE_PRESENT))
		pte = ~pte;
	struct cow_call c = { .pfn = (pte & 0x000ffffffffff000ULL) >> 12, .vmf = (u64)vmf };
	if (base) {
		/* decide now, while the PTE still maps the page */
		if (!page_is_ksm(base + c.pfn * STRUCT_PAGE_SIZE)) {
			cow_forget(tid);
			return;
		}
		c.ksm = 1;
	}
	bpf_probe_read_kernel(&vma, sizeof(vma), vmf + OFF_VMF_VMA);
	bpf_probe_read_kernel(&mm, sizeof(mm), (void *)vma + OFF_VMA_MM);
	bpf_probe_read_kernel(&flags, sizeof(flags), vmf + OFF_VMF_FLAGS);
	c.ts = bpf_ktime_get_ns();
	c.mm = mm;
	c.sub = (flags & FAULT_FLAG_UNSHARE) ? COW_UNSHARE : COW_WRITE;
#ifdef UNSHARE_FN
	if (unshare_calls.lookup(&tid))	/* break_ksm's own fault (a write on 6.1) */
		c.sub = COW_UNSHARE;
#endif
	cow_calls.update(&tid, &c);
}

/* vmf: the exiting call's argument where the probe has it (fexit), else 0;
 * ret: do_wp_page's vm_fault_t. */
static __always_inline void cow_exit(void *ctx, u64 vmf, u32 ret)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct cow_call *c = cow_calls.lookup(&tid);
	if (!c)
		return;
	if ((vmf && c->vmf != vmf) ||	/* not this call's entry */
	    (ret & VM_FAULT_NO_COPY)) {	/* returned before counting COW_KSM */
		cow_calls.delete(&tid);
		return;
	}
	u64 lat = bpf_ktime_get_ns() - c->ts;
	if (!c->ksm) {
		/* vmemmap base not known yet: learn it from vmf->page, set by
		 * do_wp_page itself, and classify by it */
		u64 page = 0;
		int zero = 0;
		bpf_probe_read_kernel(&page, sizeof(page), (void *)c->vmf + OFF_VMF_PAGE);
		if (page) {
			u64 base = page - c->pfn * STRUCT_PAGE_SIZE;
			page_base.update(&zero, &base);
		}
		if (!page || !page_is_ksm(page)) {
			cow_calls.delete(&tid);
			return;
		}
	}
	count(C_COW_WRITES + c->sub);
	hist_add(H_COW_LATENCY_SECONDS, lat);
	struct mm_stats *s = mm_get(c->mm);
	if (s)
		__sync_fetch_and_add(&s->cow[c->sub & 1], 1);
	u32 pid = bpf_get_current_pid_tgid() >> 32;
	/* an unshare may be remote (run=2 written by another process): only a
	 * task faulting on its own mm names the owner */
	u8 own = c->sub == COW_WRITE;
#ifdef OFF_TASK_MM
	own = current_mm() == c->mm;
#endif
	if (c->mm && own && !owners.lookup(&c->mm)) {
		struct owner o = { .pid = pid };
		bpf_get_current_comm(&o.comm, sizeof(o.comm));
		owners.update(&c->mm, &o);
	}
	if (!own)
		pid = owner_pid(c->mm);
	emit(ctx, EV_COW, c->sub, c->mm, c->pfn, lat, 0, 0, pid);
	cow_calls.delete(&tid);
}

#if COW_FN == 1
KFUNC_PROBE(do_wp_page, void *vmf)
{
	cow_enter(vmf);
	return 0;
}
KRETFUNC_PROBE(do_wp_page, void *vmf, int ret)
{
	cow_exit(ctx, (u64)vmf, (u32)ret);
	return 0;
}
#else
int kp_cow(struct pt_regs *ctx)
{
	cow_enter((void *)PT_REGS_PARM1(ctx));
	return 0;
}
int kr_cow(struct pt_regs *ctx)
{
	cow_exit(ctx, 0, (u32)PT_REGS_RC(ctx));
	return 0;
}
#endif
#endif

#ifdef UNSHARE_FN
/* break_ksm(vma, addr[, lock_vma]): called for every address of a range
 * being unmerged (MADV_UNMERGEABLE, run=2, PR_SET_MEMORY_MERGE 0); it faults
 * only where a KSM page is mapped. */
static __always_inline void unshare_enter(void)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	u64 now = bpf_ktime_get_ns();
	unshare_calls.update(&tid, &now);
}

static __always_inline void unshare_exit(void *ctx, int ret)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	u64 *ts = unshare_calls.lookup(&tid);
	if (!ts)
		return;
	u64 lat = bpf_ktime_get_ns() - *ts;
	unshare_calls.delete(&tid);
	count(C_UNSHARES);
	hist_add(H_UNSHARE_LATENCY_SECONDS, lat);
	emit(ctx, EV_UNSHARE, 0, 0, 0, lat, 0, ret, bpf_get_current_pid_tgid() >> 32);
}

#if UNSHARE_FN == 1
/* Only the first two arguments are declared: break_ksm has two on 6.1 and
 * three (lock_vma) on 6.12+, and fexit finds the return value after the
 * last one, so it is not read here (the event's err is 0). */
KFUNC_PROBE(break_ksm, void *vma, unsigned long addr)
{
	unshare_enter();
	return 0;
}
KRETFUNC_PROBE(break_ksm, void *vma, unsigned long addr)
{
	unshare_exit(ctx, 0);
	return 0;
}
#else
int kp_unshare(struct pt_regs *ctx)
{
	unshare_enter();
	return 0;
}
int kr_unshare(struct pt_regs *ctx)
{
	unshare_exit(ctx, (int)PT_REGS_RC(ctx));
	return 0;
}
#endif
#endif
