"""Mutation fuzzing of recordings: thousands of damaged copies of the
recording made on the real host (tests/fixtures/recordings), each read by
`report`, `report --json` and `timeline` through the CLI entry point,
in-process. Each must end with exit 0, or exit 9 with one `ksmtrace:` line
(and the optional `  how to fix:` line): never a traceback, never unbounded
memory.

The mutations cover the framing (flipped bytes, lengths up to 0xFFFFFFFF,
record kinds, truncation, records dropped, duplicated, swapped, reversed,
garbage appended), the JSON values with CRCs recomputed so they pass the
framing (type swaps at every path, deep nesting, huge numbers, NaN,
missing and extra keys, seq/mono order, END counts) and the packed events.

Memory: tracemalloc follows every TRACE_EVERY-th case and every length
mutation; each command run's peak must stay under PEAK_LIMIT (measured: 1-5
MiB). One case in FULL_EVERY mutates the whole 243 KB fixture, the others a
small recording made of its records (fast: 10,000 cases take about a minute
on a 2-core machine). Before the schema and the length checks, the same
10,000 cases gave 1,171 tracebacks and 538 runs allocating 256 MiB to 4 GiB.

Deterministic: a fixed seed, the same cases on every run. KSMTRACE_FUZZ_CASES
sets the number of cases (default CASES); `python tests/unit/test_record_fuzz.py
[N]` runs them outside pytest and prints a summary of every failure kind.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import random
import signal
import struct
import sys
import tempfile
import time
import traceback
import tracemalloc
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recbytes import FIX, HEAD, records, tick_parts, tick_payload

SEED = 0x4B534D  # "KSM"
CASES = 10_000
FULL_EVERY = 50  # one case in FULL_EVERY mutates the whole fixture, the others a small copy
TRACE_EVERY = 10  # tracemalloc measures one case in TRACE_EVERY (and every length mutation)
PEAK_LIMIT = 16 * 2**20  # bytes a traced command run may allocate at its peak
MAGIC_LEN, PREAMBLE = 13, 15
EVENT_SIZE = 72
HEADER, TICK, END = 1, 2, 3

Record = tuple[int, bytes]  # kind, payload


# ------------------------------------------------------------------ the bases
def split(data: bytes) -> list[Record]:
    return [(kind, payload) for _, kind, payload in records(data)]


def frame(kind: int, payload: bytes, length: int | None = None) -> bytes:
    head = struct.pack("<BII", kind, len(payload) if length is None else length,
                       zlib.crc32(payload))
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def join(records: list[Record], preamble: bytes) -> bytes:
    return preamble + b"".join(frame(k, p) for k, p in records)


def _dumps(d: Any) -> bytes:
    return json.dumps(d, separators=(",", ":")).encode()


def small_base(records: list[Record]) -> list[Record]:
    """Header, seven of the fixture's ticks (before, during and after the
    workload, events thinned to every 25th), one of them enriched with what
    the fixture lacks (merge errors, exited mms, program costs), and an END
    that counts them."""
    ticks = [p for k, p in records if k == TICK]
    out = [records[0]]
    n_events = 0
    for i in (0, 4, 7, 8, 10, 11, 24):
        d, events = tick_parts(ticks[i])
        events = b"".join(events[j:j + EVENT_SIZE]
                          for j in range(0, len(events), 25 * EVENT_SIZE))
        if i == 8:
            b = d["bpf"]
            b["errors"] = {"into_ksm_page:-16": 2, "new_ksm_page:-11": 1}
            b["exited"] = {"18446612686436800000": [[1, 2, 3], 4, [5, 6], 7, 8, 9]}
            b["programs"] = [["ksm:ksm_merge_with_ksm_page", 812345, 30000], ["kp_cow", 0, 0]]
            b["hist"]["merge_latency_seconds"] = {"12": 4, "63": 1}
        n_events += len(events) // EVENT_SIZE
        out.append((TICK, tick_payload(_dumps(d), events)))
    end = json.loads(records[-1][1])
    out.append((END, _dumps({**end, "ticks": len(out) - 1, "events": n_events})))
    return out


@functools.cache
def bases() -> tuple[bytes, list[Record], list[Record]]:
    data = FIX.read_bytes()
    full = split(data)
    return data[:PREAMBLE], full, small_base(full)


# --------------------------------------------------------------- JSON values
DEEP = "[" * 2000 + "]" * 2000
RAW = "\x00raw\x00"  # placeholder: replaced by raw JSON text after dumps
RAW_VALUES = ["NaN", "Infinity", "-Infinity", "1" + "0" * 5000, "1e400", "-1e400",
              "18446744073709551616", "-9223372036854775809", "1e-400", DEEP,
              "{" + '"a":{' * 1500 + "}" * 1501]
VALUES: list[Any] = ["x", "", "9" * 300, "1", -1, 0, 1, 2**63, 2**64 - 1, 10**30, -(10**30),
                     1.5, -0.0, 1e308, None, True, False, [], {}, [1, [2]], {"a": 1},
                     [[["x"]]], ["x"], [None], {"1": "x"}, 4194305, -2**31, 2**32]


def paths(node: Any, at: tuple = ()) -> list[tuple]:
    """Every path to a value inside a JSON document (keys and indices)."""
    out = [at]
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths(v, at + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += paths(v, at + (i,))
    return out


def get(node: Any, path: tuple) -> Any:
    for k in path:
        node = node[k]
    return node


def mutate_json(rng: random.Random, doc: Any) -> bytes:
    """`doc` with one value swapped, a key removed or added, a list changed."""
    raw: list[str] = []
    path = rng.choice(paths(doc))
    what = rng.random()
    if not path or what < 0.55:
        if rng.random() < 0.2:
            raw.append(rng.choice(RAW_VALUES))
            value: Any = RAW
        else:
            value = rng.choice(VALUES)
        if not path:
            doc = value
        else:
            get(doc, path[:-1])[path[-1]] = value
    else:
        parent = get(doc, path[:-1])
        if what < 0.75:
            del parent[path[-1]]  # a missing key, a shorter list
        elif what < 0.85 and isinstance(parent, dict):
            parent[rng.choice(["extra", "1", "-5", "", "seq"]) + str(rng.randrange(3))] = \
                rng.choice(VALUES)
        elif isinstance(parent, list):
            parent.append(rng.choice(VALUES + [parent[path[-1]]]))
        else:
            parent[path[-1]] = [parent[path[-1]]]  # wrapped in a list
    text = json.dumps(doc, separators=(",", ":"))
    if raw:
        text = text.replace(json.dumps(RAW), raw[0], 1)
    return text.encode()


# ------------------------------------------------------------------ mutators
Mutator = Callable[[random.Random, bytes, list[Record]], bytes]


def m_flip(rng, pre, recs):
    data = bytearray(join(recs, pre))
    for _ in range(rng.choice((1, 1, 2, 4))):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def _offsets(recs: list[Record]) -> list[int]:
    out, pos = [], PREAMBLE
    for _, p in recs:
        out.append(pos)
        pos += HEAD.size + len(p)
    return out


def m_length(rng, pre, recs):
    """A record's length field changed, its head checksum recomputed (mostly)."""
    i = rng.randrange(len(recs))
    kind, payload = recs[i]
    size = len(join(recs, pre))
    length = rng.choice([0, 1, 3, 4, 12, len(payload) - 1, len(payload) + 1, size, size * 2,
                         0x7FFFFFFF, 0xFFFFFFFF, 2**30, 256 * 2**20 + 1, rng.randrange(2**32)])
    length = max(length, 0)
    head = struct.pack("<BII", kind, length, zlib.crc32(payload))
    head_crc = zlib.crc32(head) if rng.random() < 0.85 else rng.randrange(2**32)
    rec = head + struct.pack("<I", head_crc) + payload
    return pre + b"".join(frame(*r) for r in recs[:i]) + rec + \
        b"".join(frame(*r) for r in recs[i + 1:])


def m_kind(rng, pre, recs):
    i = rng.randrange(len(recs))
    kind = rng.choice([0, HEADER, TICK, END, 4, 7, 255])
    recs = list(recs)
    recs[i] = (kind, recs[i][1])
    return join(recs, pre)


def m_truncate(rng, pre, recs):
    data = join(recs, pre)
    return data[:rng.randrange(len(data) + 1)]


def m_records(rng, pre, recs):
    """Records dropped, duplicated, swapped, reversed, moved; garbage added."""
    recs = list(recs)
    ticks = [i for i, (k, _) in enumerate(recs) if k == TICK]
    op = rng.randrange(9)
    if op == 0:
        del recs[rng.randrange(len(recs))]
    elif op == 1:
        i = rng.choice(ticks)
        recs.insert(i, recs[i])  # a duplicated tick
    elif op == 2 and len(ticks) > 1:
        i, j = rng.sample(ticks, 2)
        recs[i], recs[j] = recs[j], recs[i]
    elif op == 3:
        recs[1:-1] = recs[1:-1][::-1]  # ticks in reverse order
    elif op == 4:
        recs.insert(rng.randrange(1, len(recs)), recs[-1])  # END in the middle
    elif op == 5:
        recs.pop()  # no END
    elif op == 6:
        recs.insert(rng.randrange(1, len(recs) + 1), recs[0])  # a second header
    elif op == 7:
        recs.append(recs[rng.choice(ticks)])  # a tick after END
    else:
        return join(recs, pre) + rng.randbytes(rng.randrange(1, 40))
    return join(recs, pre)


def m_preamble(rng, pre, recs):
    data = join(recs, pre)
    if rng.random() < 0.5:
        return data[:MAGIC_LEN] + struct.pack("<H", rng.randrange(2**16)) + data[PREAMBLE:]
    return rng.randbytes(rng.randrange(PREAMBLE + 1)) + data[PREAMBLE:]


def m_splice(rng, pre, recs):
    """Bytes inserted or deleted somewhere: every later record is misaligned."""
    data = join(recs, pre)
    at = rng.randrange(len(data))
    if rng.random() < 0.5:
        return data[:at] + rng.randbytes(rng.randrange(1, 16)) + data[at:]
    return data[:at] + data[at + rng.randrange(1, 16):]


def m_payload_bytes(rng, pre, recs):
    """A payload's bytes changed with its checksums recomputed: damaged JSON
    text, bad UTF-8, a wrong json_length, events cut short."""
    recs = list(recs)
    i = rng.randrange(len(recs))
    kind, p = recs[i]
    b = bytearray(p)
    op = rng.randrange(5)
    if op == 0 and b:
        for _ in range(rng.choice((1, 3))):
            b[rng.randrange(len(b))] = rng.choice(b'\xff\x00"{}[],:0-e.\\ ')
    elif op == 1:
        b = b[:rng.randrange(len(b) + 1)]
    elif op == 2 and kind == TICK and len(b) >= 4:
        n = rng.choice([0, 1, 0xFFFFFFFF, len(b), len(b) - 4, rng.randrange(len(b))])
        b[:4] = struct.pack("<I", n % 2**32)
    elif op == 3:
        b = bytearray(rng.choice([b"", b"{}", b"[]", b"null", b"\xef\xbb\xbf{}", b"1",
                                  DEEP.encode(), b'"\\ud800"', b"{" * 3000]))
        if kind == TICK:
            b = bytearray(tick_payload(bytes(b), b""))
    else:
        b += rng.randbytes(rng.randrange(1, 100))
    recs[i] = (kind, bytes(b))
    return join(recs, pre)


def _json_record(rng, recs, kinds):
    recs = list(recs)
    i = rng.choice([i for i, (k, _) in enumerate(recs) if k in kinds])
    return recs, i


def m_json(rng, pre, recs):
    """One JSON value of the header, a tick or END changed (checksums recomputed)."""
    kinds = rng.choice([(HEADER,), (TICK,), (TICK,), (TICK,), (END,)])
    recs, i = _json_record(rng, recs, kinds)
    kind, p = recs[i]
    if kind == TICK:
        d, events = tick_parts(p)
        recs[i] = (kind, tick_payload(mutate_json(rng, d), events))
    else:
        recs[i] = (kind, mutate_json(rng, json.loads(p)))
    return join(recs, pre)


def m_order(rng, pre, recs):
    """seq and mono of one tick moved: equal to, or behind, or far ahead of
    the previous one; END's counts changed."""
    recs = list(recs)
    if rng.random() < 0.25:
        end = json.loads(recs[-1][1])
        key = rng.choice(["ticks", "events"])
        end[key] += rng.choice([-1, 1, 1000, -end[key]])
        recs[-1] = (END, _dumps(end))
        return join(recs, pre)
    recs, i = _json_record(rng, recs, (TICK,))
    d, events = tick_parts(recs[i][1])
    key = rng.choice(["seq", "mono", "wall"])
    d[key] = max(0, d[key] + rng.choice([-1, -0.5, -100, 0.0001, 10**6, -d[key] + 1]))
    recs[i] = (TICK, tick_payload(_dumps(d), events))
    return join(recs, pre)


EVENT_FIELDS = [(0, "Q"), (8, "Q"), (16, "Q"), (24, "Q"), (32, "Q"), (40, "I"), (44, "I"),
                (48, "i"), (52, "H"), (54, "H")]


def m_events(rng, pre, recs):
    """Event fields set to extreme or random values, random events added,
    the blob cut to a partial event (checksums recomputed)."""
    recs = list(recs)
    i = rng.choice([i for i, (k, _) in enumerate(recs) if k == TICK])
    d, events = tick_parts(recs[i][1])
    ev = bytearray(events)
    op = rng.randrange(4)
    if op == 0 and ev:
        for _ in range(rng.choice((1, 2, 8))):
            at = rng.randrange(0, len(ev), EVENT_SIZE)
            off, fmt = rng.choice(EVENT_FIELDS)
            bits = struct.calcsize(fmt) * 8
            lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if fmt == "i" else (0, 2**bits - 1)
            v = rng.choice([lo, hi, 0, 1, 2, 3, 12, rng.randint(lo, hi)])
            struct.pack_into("<" + fmt, ev, at + off, v)
    elif op == 1 and ev:
        for _ in range(rng.choice((1, 16))):
            ev[rng.randrange(len(ev))] = rng.randrange(256)
    elif op == 2:
        ev += rng.randbytes(EVENT_SIZE * rng.randrange(1, 20))
    else:
        ev = ev[:len(ev) - rng.randrange(1, EVENT_SIZE)] if ev else bytearray(b"\x01")
    recs[i] = (TICK, tick_payload(_dumps(d), bytes(ev)))
    return join(recs, pre)


MUTATORS: list[tuple[str, Mutator, int]] = [  # name, mutator, weight
    ("flip", m_flip, 6), ("length", m_length, 6), ("kind", m_kind, 3),
    ("truncate", m_truncate, 4), ("records", m_records, 6), ("preamble", m_preamble, 1),
    ("splice", m_splice, 3), ("payload_bytes", m_payload_bytes, 8), ("json", m_json, 40),
    ("order", m_order, 6), ("events", m_events, 12),
]


def cases(n: int, seed: int = SEED):
    """(index, mutator name, file bytes) for n cases, the same every time."""
    rng = random.Random(seed)
    pre, full, small = bases()
    names = [m[0] for m in MUTATORS]
    weights = [m[2] for m in MUTATORS]
    fns = {m[0]: m[1] for m in MUTATORS}
    for i in range(n):
        name = rng.choices(names, weights)[0]
        base = full if i % FULL_EVERY == 0 else small
        yield i, name, fns[name](rng, pre, base)


# -------------------------------------------------------------------- running
def run_cli(argv: list[str]) -> tuple[int | None, str, str, str | None]:
    """(exit code, stdout, stderr, traceback or None) of ksmtrace.cli.main."""
    from ksmtrace import cli

    out, err = io.StringIO(), io.StringIO()
    tb = None
    rc = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except BaseException:  # noqa: BLE001 (a traceback is what the fuzzer looks for)
            tb = traceback.format_exc()
    return rc, out.getvalue(), err.getvalue(), tb


def check(rc: int | None, stderr: str, tb: str | None) -> str | None:
    """Why this outcome is wrong, or None."""
    if tb is not None:
        return "traceback: " + tb.strip().splitlines()[-1][:200]
    if "Traceback" in stderr:
        return "traceback on stderr"
    lines = stderr.splitlines()
    if rc == 0:
        if not all(line.startswith(("ksmtrace: warning: ", "ksmtrace timeline: "))
                   for line in lines):
            return f"exit 0 with stderr {stderr[:200]!r}"
        return None
    if rc != 9:
        return f"exit {rc}: {stderr[:200]!r}"
    if not (len(lines) in (1, 2) and lines[0].startswith("ksmtrace: ")
            and (len(lines) == 1 or lines[1].startswith("  how to fix: "))):
        return f"exit 9 with stderr {stderr[:300]!r}"
    if len(lines[0]) > 1000:
        return f"exit 9 with a {len(lines[0])}-character line: {lines[0][:300]!r}"
    return None


@contextlib.contextmanager
def fast_cli():
    """The CLI with its argument parser built once (building it is most of a
    short command's time); everything else as `ksmtrace` runs it. Signal
    handlers the CLI installs are put back after."""
    from ksmtrace import cli

    old = cli.build_parser
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    cli.build_parser = functools.cache(old)
    try:
        yield
    finally:
        cli.build_parser = old
        for s, h in handlers.items():
            signal.signal(s, h)


def fuzz(n: int, directory: Path, seed: int = SEED, stop_after: int | None = None):
    """Run n cases in `directory`; (failures [(case, mutator, command, why)],
    outcomes Counter[(mutator, exit code)] of the command runs, the peak
    bytes of the traced runs, how many runs were traced)."""
    path, out = directory / "fuzz.ksmrec", directory / "fuzz-trace.json"
    commands = [("report", ["report", str(path)]),
                ("report --json", ["report", "--json", str(path)]),
                ("timeline", ["timeline", str(path), "-o", str(out)])]
    failures: list[tuple[int, str, str, str]] = []
    outcomes: Counter = Counter()
    peak = traced = 0
    with fast_cli():
        for i, name, data in cases(n, seed):
            path.write_bytes(data)
            trace = i % TRACE_EVERY == 0 or name == "length"
            for cmd, argv in commands:
                if trace:
                    tracemalloc.start()
                try:
                    rc, _, err, tb = run_cli(argv)
                finally:
                    if trace:
                        peak_here = tracemalloc.get_traced_memory()[1]
                        tracemalloc.stop()
                if trace:
                    traced += 1
                    peak = max(peak, peak_here)
                    if peak_here > PEAK_LIMIT:
                        failures.append((i, name, cmd, f"peak {peak_here / 2**20:.1f} MiB"))
                why = check(rc, err, tb)
                outcomes[name, rc] += 1
                if why:
                    failures.append((i, name, cmd, why))
            if stop_after is not None and len(failures) >= stop_after:
                break
    return failures, outcomes, peak, traced


@contextlib.contextmanager
def workdir(fallback: Path):
    """A directory in memory if there is one: on a disk, writing the case
    and the timeline (truncating the last ones) is most of a case's time."""
    if os.access("/dev/shm", os.W_OK):
        with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="ksmtrace-fuzz-") as d:
            yield Path(d)
    else:
        yield fallback


def test_fuzzed_recordings_end_in_exit_0_or_one_line_exit_9(tmp_path):
    n = int(os.environ.get("KSMTRACE_FUZZ_CASES", CASES))
    t0 = time.monotonic()
    with workdir(tmp_path) as d:
        failures, outcomes, peak, traced = fuzz(n, d)
    took = time.monotonic() - t0
    summary = Counter((name, why.split(" - at ")[0][:120]) for _, name, _, why in failures)
    assert not failures, (f"{len(failures)} failures in {n} cases ({took:.0f} s); first: "
                          f"{failures[:5]}; by kind: {summary.most_common(20)}")
    # command runs by exit code: the mutations reach past the framing (many
    # runs read to the end), and most are caught
    ok = sum(c for (_, rc), c in outcomes.items() if rc == 0)
    bad = sum(c for (_, rc), c in outcomes.items() if rc == 9)
    assert ok > 3 * n * 0.1 and bad > 3 * n * 0.5, outcomes
    assert traced >= n * 3 // TRACE_EVERY and peak < PEAK_LIMIT
    print(f"\n{n} cases, {3 * n} command runs in {took:.1f} s: exit 0 {ok}, exit 9 {bad}; "
          f"tracemalloc peak {peak / 2**20:.2f} MiB over {traced} traced runs")


def test_the_cases_are_the_same_every_run():
    a = [(i, name, zlib.crc32(d)) for i, name, d in cases(300)]
    b = [(i, name, zlib.crc32(d)) for i, name, d in cases(300)]
    assert a == b
    assert {name for _, name, _ in a} == {m[0] for m in MUTATORS}


def test_the_small_base_is_a_valid_recording(tmp_path):
    pre, _, small = bases()
    path = tmp_path / "small.ksmrec"
    path.write_bytes(join(small, pre))
    with fast_cli():
        for argv in (["report", str(path)], ["timeline", str(path), "-o", str(tmp_path / "t")]):
            rc, _, err, tb = run_cli(argv)
            assert (rc, tb) == (0, None), err


if __name__ == "__main__":  # a survey: every failure kind, with counts

    n = int(sys.argv[1]) if len(sys.argv) > 1 else CASES
    with tempfile.TemporaryDirectory() as tmp, workdir(Path(tmp)) as d:
        t0 = time.monotonic()
        failures, outcomes, peak, traced = fuzz(n, d)
        took = time.monotonic() - t0
    by_cmd = Counter(cmd for _, _, cmd, _ in failures)
    kinds = Counter(why[:140] for _, _, _, why in failures)
    print(f"{n} cases in {took:.1f} s; {len(failures)} failing command runs "
          f"in {len({i for i, *_ in failures})} cases; by command {dict(by_cmd)}")
    print(f"peak {peak / 2**20:.2f} MiB over {traced} traced runs")
    print("outcomes:", sorted(outcomes.items(), key=lambda kv: str(kv[0])))
    for why, c in kinds.most_common(40):
        print(f"{c:6}  {why}")
