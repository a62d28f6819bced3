"""The schema of a recording's JSON: the header, each tick's JSON part and
END, as msgspec types decoded strictly (no coercion: a string is never a
number, a number never a bool) straight from the record's bytes, with the
ranges the rest of ksmtrace relies on. What does not fit raises SchemaError
naming the field (`$.ksm.pages_shared`); record.py turns it into a
BadRecording with the record's byte offset.

Ranges: counters are 0 .. 2**63-1 (the kernel's are unsigned longs and
u64s, which do not get past 2**63 in centuries; msgspec bounds fit an
int64); `general_profit`, `ksm_zero_pages` and `ksm_process_profit` are
signed (-2**63 .. 2**63-1); pids 0 .. 4194303 (below PID_MAX_LIMIT), process rows
from 1; mm addresses (kernel pointers, above 2**63) 0 .. 2**64-1, checked
after decoding; histogram slots 0 .. 63 (log2 of a u64 of ns);
times (`mono`, `wall`, `started_unix`) finite, 0 .. 1e12 s; the header's
`interval` finite, > 0 and at most 1e12 s. JSON has no NaN or Infinity, and a
number too large for its float is refused, so every float is finite.

The tick and END schemas are closed (an unknown key is corruption: no
writer of these versions writes one; a version-2 process row has no
workload); the header's is open (its `facts` and `plan` are
`doctor --json`'s, free-form), but the fields readers use are typed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct
from msgspec.structs import astuple

from ksmtrace.kernel import identity
from ksmtrace.kernel.procfs import KsmStat, KsmVmstat
from ksmtrace.kernel.sysfs import KsmSysfs
from ksmtrace.model import (
    BpfTotals,
    CounterSample,
    MmStats,
    ProbeStatus,
    ProcessSample,
    ProgramCost,
    Tick,
)

U64_MAX = 2**64 - 1
PID_MAX = 4_194_303  # below PID_MAX_LIMIT (2**22 on 64-bit kernels), as argtypes.pid
MAX_SECONDS = 1e12  # ~31,700 years: finite, and far from float precision trouble

Count = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Signed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
Pid = Annotated[int, Meta(ge=0, le=PID_MAX)]
ProcessPid = Annotated[int, Meta(ge=1, le=PID_MAX)]
Mm = Annotated[int, Meta(ge=0)]  # <= U64_MAX: _check_mms (msgspec bounds are int64)
Slot = Annotated[int, Meta(ge=0, le=63)]
Seconds = Annotated[float, Meta(ge=0, le=MAX_SECONDS)]
Interval = Annotated[float, Meta(gt=0, le=MAX_SECONDS)]


class SchemaError(ValueError):
    """JSON that is not what the schema says. `kind`: "undecodable" (not
    JSON, not UTF-8, nested too deeply), "not_object" (not a JSON object) or
    "field" (a field missing, unknown, of the wrong type or out of range);
    `str()` says which, naming the field (`$.ksm.pages_shared`)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


# ------------------------------------------------------------------- ticks
# Field names and order are the model's (tests/unit/test_record_schema.py
# checks): a decoded struct becomes its dataclass positionally.
class KsmSysfsJ(Struct, forbid_unknown_fields=True):
    full_scans: Count | None = None
    pages_scanned: Count | None = None
    pages_shared: Count | None = None
    pages_sharing: Count | None = None
    pages_unshared: Count | None = None
    pages_volatile: Count | None = None
    pages_skipped: Count | None = None
    stable_node_chains: Count | None = None
    stable_node_dups: Count | None = None
    ksm_zero_pages: Signed | None = None
    general_profit: Signed | None = None
    pages_to_scan: Count | None = None
    sleep_millisecs: Count | None = None
    use_zero_pages: Count | None = None
    max_page_sharing: Count | None = None
    merge_across_nodes: Count | None = None
    stable_node_chains_prune_millisecs: Count | None = None
    smart_scan: Count | None = None
    advisor_mode: str | None = None
    advisor_max_cpu: Count | None = None
    advisor_min_pages_to_scan: Count | None = None
    advisor_max_pages_to_scan: Count | None = None
    advisor_target_scan_time: Count | None = None
    run: Count | None = None
    extra: dict[str, str] = {}


class KsmVmstatJ(Struct, forbid_unknown_fields=True):
    cow_ksm: Count | None
    ksm_swpin_copy: Count | None


class KsmStatJ(Struct, forbid_unknown_fields=True):
    ksm_rmap_items: Count | None = None
    ksm_zero_pages: Signed | None = None
    ksm_merging_pages: Count | None = None
    ksm_process_profit: Signed | None = None
    ksm_merge_any: bool | None = None
    ksm_mergeable: bool | None = None
    extra: dict[str, str] = {}


# MmStats: [[merges new, into, zero], merge_failures, [cow writes, unshares],
# wp_faults, unshares, rmap_removed]
MmJ = tuple[tuple[Count, Count, Count], Count, tuple[Count, Count], Count, Count, Count]


class BpfJ(Struct, forbid_unknown_fields=True):
    counters: dict[str, Count]
    hist: dict[str, dict[Slot, Count]]
    errors: dict[str, Count]
    mms: dict[Mm, MmJ]
    exited: dict[Mm, MmJ]
    owners: dict[Mm, Pid]
    perf_lost: Count
    comms: dict[Pid, str]
    programs: list[tuple[str, Count, Count]] = []


class WorkloadJ(Struct, array_like=True, forbid_unknown_fields=True):
    kind: Literal["vm", "container", "service", "process"]
    name: Annotated[str, Meta(max_length=identity.NAME_MAX)]
    id: Annotated[str, Meta(max_length=identity.ID_MAX)]
    detail: Annotated[list[tuple[Annotated[str, Meta(max_length=32)],
                                 Annotated[str, Meta(max_length=identity.ID_MAX)]]],
                      Meta(max_length=16)]


class ProcessJ(Struct, array_like=True, forbid_unknown_fields=True):
    pid: ProcessPid
    comm: str
    cgroup: str
    stat: KsmStatJ
    workload: WorkloadJ | None = None  # version 3


class TickJ(Struct, forbid_unknown_fields=True):
    seq: Count
    mono: Seconds
    wall: Seconds
    ksm: KsmSysfsJ
    vmstat: KsmVmstatJ
    processes: list[ProcessJ]
    ksmd_cpu_ticks: Count | None = None
    bpf: BpfJ | None = None


# ------------------------------------------------------------ header, END
class ProbeJ(Struct):
    probe: str
    stage: str
    method: str | None
    targets: list[str]
    attached: bool
    estimated: bool
    error: str | None = None


class FactsJ(Struct):
    tracepoints: dict[str, bool] | None = None  # report: was ksm:ksm_advisor there


class HeaderJ(Struct):
    format: Literal[2, 3]  # record.READS
    ksmtrace: str
    kernel: str | None = None
    host: str | None = None
    started: str | None = None
    started_unix: Seconds | None = None
    interval: Interval | None = None
    source: str | None = None
    pids: list[Pid] | None = None
    probes: list[ProbeJ] = []
    cow_estimated: bool = False
    notes: list[str] = []
    facts: FactsJ | None = None
    plan: dict[str, Any] | None = None


class EndJ(Struct, forbid_unknown_fields=True):
    ticks: Count
    events: Count
    ended: str | None = None


_TICK = msgspec.json.Decoder(TickJ)
_END = msgspec.json.Decoder(EndJ)
_ANY = msgspec.json.Decoder()


def _line(text: str, limit: int = 200) -> str:
    """Text from the file (an unknown key's name) as a short single line."""
    short = text[:limit]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in short) \
        + ("..." if len(text) > limit else "")


def _error(e: Exception) -> SchemaError:
    if isinstance(e, RecursionError):
        return SchemaError("undecodable", "JSON nested too deeply")
    text = str(e)
    if not isinstance(e, msgspec.ValidationError):
        return SchemaError("undecodable", _line(text))
    # msgspec's path (after the last " - at ") names schema fields only
    what, at, where = text.rpartition(" - at ")
    if not at:
        what, where = text, ""
    if not where and what.startswith("Expected `object`"):
        return SchemaError("not_object", "not a JSON object")
    return SchemaError("field", f"{where or '`$`'}: {_line(what[:1].lower() + what[1:])}")


# ------------------------------------------------------------------ decoding
def _check_mms(t: TickJ) -> TickJ:
    b = t.bpf
    if b is not None:
        for name in ("mms", "exited", "owners"):
            if (big := max(getattr(b, name), default=0)) > U64_MAX:
                raise SchemaError("field", f"`$.bpf.{name}`: mm {big} is not a 64-bit address")
    return t


def _check_workloads(t: TickJ, version: int) -> TickJ:
    for i, p in enumerate(t.processes):
        w = p.workload
        if w is None:
            continue
        if version < 3:
            raise SchemaError("field", f"`$.processes[{i}]`: a workload in a version "
                              f"{version} recording")
        texts = (w.name, w.id, *(x for kv in w.detail for x in kv))
        if any(identity.clean(x, len(x)) != x for x in texts):
            raise SchemaError("field", f"`$.processes[{i}][4]`: a workload name with "
                              "non-printable characters")
    return t


def tick_struct(js: bytes | memoryview, version: int = 3) -> TickJ:
    try:
        t = _TICK.decode(js)
    except (msgspec.DecodeError, RecursionError) as e:
        raise _error(e) from None
    return _check_workloads(_check_mms(t), version)


def _workload(w: WorkloadJ | None) -> identity.Workload | None:
    return None if w is None else identity.Workload(w.kind, w.name, w.id, tuple(w.detail))


def tick_from_struct(t: TickJ, events: bytes) -> Tick:
    procs = tuple(ProcessSample(p.pid, p.comm, p.cgroup, KsmStat(*astuple(p.stat)),
                                _workload(p.workload))
                  for p in t.processes)
    c = CounterSample(t.mono, t.wall, KsmSysfs(*astuple(t.ksm)), KsmVmstat(*astuple(t.vmstat)),
                      procs, t.ksmd_cpu_ticks)
    b = t.bpf
    bpf = None
    if b is not None:
        bpf = BpfTotals(
            counters=b.counters, hist=b.hist, errors=b.errors,
            mms={mm: MmStats(*v) for mm, v in b.mms.items()},
            exited={mm: MmStats(*v) for mm, v in b.exited.items()},
            owners=b.owners, perf_lost=b.perf_lost, comms=b.comms,
            programs=tuple(ProgramCost(*p) for p in b.programs),
        )
    return Tick(t.seq, c, bpf, events)


def tick_from_dict(d: Any, events: bytes) -> Tick:
    """A tick from `tick_to_json`'s dict (keys of ints as decimal strings)."""
    try:
        t = msgspec.convert(d, TickJ, strict=True, str_keys=True)
    except (msgspec.ValidationError, RecursionError) as e:
        raise _error(e) from None
    return tick_from_struct(_check_workloads(_check_mms(t), 3), events)


def header(payload: bytes, version: int) -> tuple[dict[str, Any], HeaderJ]:
    """The header as written (every key, for `Recording.header`) and as
    checked against the schema; its format is the preamble's `version`."""
    try:
        d = _ANY.decode(payload)
        h = msgspec.convert(d, HeaderJ, strict=True)
    except (msgspec.DecodeError, RecursionError) as e:
        raise _error(e) from None
    if h.format != version:
        raise SchemaError("field", f"`$.format`: {h.format}, but the file's preamble says "
                          f"version {version}")
    return d, h


def end(payload: bytes) -> dict[str, Any]:
    try:
        return msgspec.structs.asdict(_END.decode(payload))
    except (msgspec.DecodeError, RecursionError) as e:
        raise _error(e) from None


def probe(p: ProbeJ) -> ProbeStatus:
    return ProbeStatus(p.probe, p.stage, p.method, tuple(p.targets), p.attached, p.estimated,
                       p.error)


def probe_from_dict(d: Any) -> ProbeStatus:
    try:
        return probe(msgspec.convert(d, ProbeJ, strict=True))
    except (msgspec.ValidationError, RecursionError) as e:
        raise _error(e) from None
