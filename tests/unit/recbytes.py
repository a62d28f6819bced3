"""A recording's bytes, for the recording tests: walk its records, split and
rebuild a tick's payload (the format: docs/recording-format.md)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from ksmtrace.record import DATA_START

FIX = Path(__file__).parent.parent / "fixtures" / "recordings" / "host-6.18-workload.ksmrec"
HEAD = struct.Struct("<BIII")  # kind, length, crc(payload), crc(first 9 bytes)


def records(data: bytes) -> list[tuple[int, int, bytes]]:
    """(offset, kind, payload) of each record, walking the heads."""
    out, pos = [], DATA_START
    while pos < len(data):
        kind, length, _, _ = HEAD.unpack_from(data, pos)
        out.append((pos, kind, data[pos + HEAD.size:pos + HEAD.size + length]))
        pos += HEAD.size + length
    return out


def tick_parts(payload: bytes) -> tuple[Any, bytes]:
    """A TICK payload's JSON document and its events."""
    (n,) = struct.unpack_from("<I", payload)
    return json.loads(payload[4:4 + n]), payload[4 + n:]


def tick_payload(js: bytes, events: bytes) -> bytes:
    return struct.pack("<I", len(js)) + js + events
