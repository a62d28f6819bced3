"""The BPF ring buffer reader (sources/loader.RingBuffer) on a ring laid out as
the kernel lays it out: a consumer-position page, a producer-position page,
then the data, mapped twice in a row so that no record wraps. Records are
8-byte aligned, each after an 8-byte header (length; busy bit 31, discard
bit 30). The bulk path (records of one known size) must give exactly what
the record-by-record path gives, stop at a record still being written, skip
discarded ones, and hand the space back."""

from __future__ import annotations

import mmap
import struct

import pytest

from ksmtrace.sources.loader import RingBuffer

SIZE = 4 * mmap.PAGESIZE  # data bytes (a power of two, as the kernel's)
RECORD = 72
BUSY, DISCARD = 1 << 31, 1 << 30


class Ring:
    """A producer writing into memory shaped like the kernel's ring (the
    kernel maps the data pages twice; here every write goes to both copies)."""

    def __init__(self, record_size: int | None = RECORD):
        self.cons = mmap.mmap(-1, mmap.PAGESIZE)
        self.prod = mmap.mmap(-1, mmap.PAGESIZE + 2 * SIZE)
        self.rb = RingBuffer.__new__(RingBuffer)
        self.rb._over(self.cons, self.prod, SIZE, record_size)
        self.pos = 0
        self.sent: list[bytes] = []

    def write(self, payload: bytes, flags: int = 0) -> None:
        """Appends a record (both copies of the data), and moves the producer."""
        length = len(payload)
        rec = struct.pack("<II", length | flags, 0) + payload
        rec += b"\0" * (-len(rec) % 8)
        cons = struct.unpack_from("<Q", self.cons, 0)[0]
        assert self.pos + len(rec) - cons <= SIZE, "the ring is full"
        at = self.pos & (SIZE - 1)
        for copy in (0, SIZE):  # the kernel maps the same pages twice
            start = mmap.PAGESIZE + copy + at
            end = min(start + len(rec), mmap.PAGESIZE + 2 * SIZE)
            self.prod[start:end] = rec[: end - start]
            if copy == SIZE and end - start < len(rec):  # wrapped past the second copy
                rest = rec[end - start:]
                self.prod[mmap.PAGESIZE : mmap.PAGESIZE + len(rest)] = rest
        self.pos += len(rec)
        struct.pack_into("<Q", self.prod, 0, self.pos)
        if not flags:
            self.sent.append(payload)

    def set_length(self, index_from_end: int, length: int) -> None:
        """Rewrites the length word of the record `index_from_end` records
        back (1: the last), of RECORD bytes."""
        at = (self.pos - index_from_end * (8 + RECORD)) & (SIZE - 1)
        for copy in (0, SIZE):
            struct.pack_into("<I", self.prod, mmap.PAGESIZE + copy + at, length)

    def consumer(self) -> int:
        return struct.unpack_from("<Q", self.cons, 0)[0]


def payload(i: int) -> bytes:
    return struct.pack("<Q", i) + bytes((i + k) % 256 for k in range(RECORD - 8))


@pytest.mark.parametrize("record_size", [RECORD, None])  # bulk, and one by one
def test_every_record_in_order_across_the_wrap(record_size):
    ring = Ring(record_size)
    if record_size:  # committed records of the one size: never read one by one
        ring.rb._one_by_one = None
    out = bytearray()
    for i in range(1000):  # several times round the ring
        ring.write(payload(i))
        if i % 97 == 0:
            assert ring.rb.consume(out) > 0
            assert ring.consumer() == ring.pos  # the space went back
    ring.rb.consume(out)
    assert bytes(out) == b"".join(ring.sent)
    assert ring.consumer() == ring.pos


@pytest.mark.parametrize("record_size", [RECORD, None])
def test_a_record_being_written_stops_the_read_until_it_is_committed(record_size):
    ring = Ring(record_size)
    for i in range(10):
        ring.write(payload(i))
    ring.set_length(3, RECORD | BUSY)  # the 8th of 10 is still being written
    out = bytearray()
    assert ring.rb.consume(out) == 7
    assert bytes(out) == b"".join(ring.sent[:7])
    assert ring.rb.consume(out) == 0  # still being written
    ring.set_length(3, RECORD)  # committed
    assert ring.rb.consume(out) == 3
    assert bytes(out) == b"".join(ring.sent)


@pytest.mark.parametrize("record_size", [RECORD, None])
def test_discarded_records_are_skipped(record_size):
    ring = Ring(record_size)
    for i in range(5):
        ring.write(payload(i))
    ring.write(payload(99), flags=DISCARD)
    for i in range(5, 8):
        ring.write(payload(i))
    out = bytearray()
    ring.rb.consume(out)
    assert bytes(out) == b"".join(ring.sent)
    assert len(ring.sent) == 8 and ring.consumer() == ring.pos


def test_records_of_another_size_are_read_one_by_one():
    ring = Ring(RECORD)
    ring.write(b"x" * 16)
    for i in range(3):
        ring.write(payload(i))
    ring.write(b"y" * 24)
    out = bytearray()
    ring.rb.consume(out)
    assert bytes(out) == b"".join(ring.sent)
