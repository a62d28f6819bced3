"""The exporter's HTTP edges, each on the real server (waitress, in this
process) or the real command: --listen refusals, HEAD, Accept-Encoding
q-values, ?name[]= filters, odd Accept headers, the request size limits, the
idle timeout and the request deadline, the connection limit, close(), and a
corrupt recording replayed (exit 9 at start, or the good prefix served).
"""

from __future__ import annotations

import gzip
import http.client
import socket
import struct
import subprocess
import sys
import threading
import time
import types
import urllib.request
import zlib
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ksmtrace.collector import observe
from ksmtrace.errors import BadRecording
from ksmtrace.export import command, server
from ksmtrace.export.collector import make_registry, scrape
from ksmtrace.export.server import MetricsServer, gzip_accepted, parse_listen
from ksmtrace.sources.replay import ReplaySource

ROOT = Path(__file__).resolve().parents[2]
RECORDING = ROOT / "tests" / "fixtures" / "recordings" / "host-6.18-workload.ksmrec"


@pytest.fixture(scope="module")
def snap():
    with observe(ReplaySource(RECORDING, warn=None)) as obs:
        snaps = list(obs.snapshots())
    return snaps[-1]


@pytest.fixture
def served(snap):
    reg, col = make_registry()
    col.publish(snap)
    with MetricsServer(reg, "127.0.0.1", 0, col) as srv:
        yield srv, scrape(reg)


def request(port: int, method: str = "GET", path: str = "/metrics", body=None, **headers):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


def closed_by_server(s: socket.socket) -> bytes:
    """What the server sends before it closes `s` (b"" for nothing)."""
    s.settimeout(60)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


# ------------------------------------------------------------------ --listen

@pytest.mark.parametrize("text", ["[]:9949", "[:9949", "]:9949", "[1.2.3.4]:9949",
                                  "[nope]:9949", "a" * 64 + ".example:9949", "a..b:9949"])
def test_parse_listen_refuses(text):
    with pytest.raises(ValueError, match="--listen"):
        parse_listen(text)


def test_parse_listen_accepts():
    assert parse_listen("[::]:9949") == ("::", 9949)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen("a" * 63 + ".example:1") == ("a" * 63 + ".example", 1)
    assert parse_listen("localhost:9949") == ("localhost", 9949)


@pytest.mark.parametrize("listen", ["[]:9949", "a" * 64 + ".example:9949"])
def test_bad_listen_exits_2_with_one_line(listen):
    r = subprocess.run([sys.executable, "-m", "ksmtrace", "export", "--replay", str(RECORDING),
                        "--listen", listen], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0].startswith("ksmtrace: --listen ") and "Traceback" not in r.stderr
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("  how to fix: "))


def test_an_unencodable_host_name_is_a_usage_error_at_bind_too():
    with pytest.raises(server.UsageError):
        MetricsServer(None, "a" * 64 + ".example", 0)


# ------------------------------------------------------------------ the app

def test_head_is_get_without_the_body(served):
    srv, text = served
    status, headers, body = request(srv.port, "HEAD")
    assert status == 200 and body == b""
    assert headers["Content-Length"] == str(len(text))
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    status, headers, body = request(srv.port, "HEAD", "/")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


def test_other_methods(served):
    srv, _ = served
    status, headers, _ = request(srv.port, "OPTIONS")
    assert status == 200 and headers["Allow"] == "GET, HEAD, OPTIONS"
    status, headers, _ = request(srv.port, "POST", body=b"x")
    assert status == 405 and "GET" in headers["Allow"]
    assert request(srv.port, "GET", "/nope")[0] == 404


def test_gzip_only_when_its_q_value_is_above_0(served):
    srv, text = served
    for accept, gz in (("gzip", True), ("GZIP;q=0.5", True), ("br, gzip;q=1.0", True),
                       ("x-gzip", True), ("gzip;q=0", False), ("gzip; q=0.000", False),
                       ("gzip;q=nope", False), ("identity", False), ("", False),
                       ("deflate, gzip;q=0", False)):
        assert gzip_accepted(accept) is gz, accept
        status, headers, body = request(srv.port, **{"Accept-Encoding": accept})
        assert status == 200
        assert (headers.get("Content-Encoding") == "gzip") is gz, accept
        assert (gzip.decompress(body) if gz else body) == text


def test_name_filter_serves_the_named_series_as_client_python_does(served):
    srv, text = served
    want = {"ksmtrace_ksm_pages_sharing", "ksmtrace_merges_total"}
    for query in ("name[]=ksmtrace_ksm_pages_sharing&name[]=ksmtrace_merges_total",
                  "name%5B%5D=ksmtrace_ksm_pages_sharing&name%5B%5D=ksmtrace_merges_total"):
        status, _, body = request(srv.port, path=f"/metrics?{query}")
        assert status == 200
        got = {s.name for f in text_string_to_metric_families(body.decode()) for s in f.samples}
        assert got == want, query
        for line in body.decode().splitlines():  # the same lines as the full text
            assert line in text.decode().splitlines()
    # no such name: an empty body, like client_python; any other query: everything
    assert request(srv.port, path="/metrics?name[]=nope")[2] == b""
    assert request(srv.port, path="/metrics?x=1")[2] == text


def test_an_accept_header_prometheus_client_cannot_parse_gets_text(served):
    srv, text = served
    for accept in ("text/plain; version=x", "application/openmetrics-text; version=abc",
                   "application/openmetrics-text; version=1.0.0\xe9"):
        status, headers, body = request(srv.port, Accept=accept)
        assert status == 200 and body == text, accept
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    status, headers, body = request(srv.port, Accept="application/openmetrics-text")
    assert status == 200 and body.endswith(b"# EOF\n")


def test_odd_accept_headers_do_not_grow_the_cache(served, snap, monkeypatch):
    calls = []
    real = server._encode
    monkeypatch.setattr(server, "_encode", lambda *a: calls.append(a) or real(*a))
    srv, _ = served
    for i in range(3 * server.MAX_CACHED):
        accept = f"application/openmetrics-text; version=1.0.{i + 1}"
        assert request(srv.port, Accept=accept)[0] == 200
    assert len(calls) == 3 * server.MAX_CACHED  # not kept: encoded each time
    calls.clear()
    for _ in range(3):  # what Prometheus and curl ask for is kept
        for headers in ({}, {"Accept": "application/openmetrics-text; version=1.0.0"},
                        {"Accept-Encoding": "gzip"}):
            assert request(srv.port, **headers)[0] == 200
    assert len(calls) <= 3


# ------------------------------------------------------------------ limits

def test_a_header_over_16_kib_gets_431(served):
    srv, _ = served
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n")
        assert closed_by_server(s).startswith(b"HTTP/1.0 431 Request Header Fields Too Large")


def test_a_body_over_the_limit_gets_413(served):
    srv, _ = served
    assert request(srv.port, "POST", body=b"x" * (server.MAX_BODY_BYTES + 1))[0] == 413


def test_an_idle_connection_is_closed(snap):
    reg, col = make_registry()
    col.publish(snap)
    with MetricsServer(reg, "127.0.0.1", 0, col, idle_timeout=0.5) as srv:
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            assert closed_by_server(s) == b""
        # keep-alive after a scrape: the same
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert closed_by_server(s).startswith(b"HTTP/1.1 200 OK")


def test_a_request_dripped_forever_is_cut_at_its_deadline(snap, monkeypatch):
    monkeypatch.setattr(server, "REQUEST_TIMEOUT", 0.5)
    reg, col = make_registry()
    col.publish(snap)
    with MetricsServer(reg, "127.0.0.1", 0, col) as srv:
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\n")
            # never idle (a byte every 0.05 s), never too big: only the deadline
            # closes it; 100,000 drips would be 83 minutes
            for _ in range(100_000):
                try:
                    s.sendall(b"X: y\r\n")
                except OSError:
                    break
                s.settimeout(0.05)
                try:
                    if s.recv(1) == b"":
                        break
                except TimeoutError:
                    continue
                except OSError:
                    break
            else:
                pytest.fail("a dripped request was never cut off")
        assert request(srv.port)[0] == 200


class _Blocking:
    """An exporter whose scrapes wait for `release`: connections stay busy."""

    def __init__(self, reg, col):
        self.col = col
        self.release = threading.Event()
        self.waiting = threading.Semaphore(0)

    @property
    def current(self):
        self.waiting.release()
        self.release.wait(60)
        return self.col.current


def test_at_the_limit_idle_connections_make_room_busy_ones_make_new_ones_wait(snap):
    reg, col = make_registry()
    col.publish(snap)
    blocking = _Blocking(reg, col)
    with MetricsServer(reg, "127.0.0.1", 0, blocking, max_connections=4) as srv:
        assert srv.max_connections == 4
        # 4 idle connections: a scrape still gets in, the longest idle is closed
        idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(4)]
        blocking.release.set()
        assert request(srv.port)[0] == 200
        assert closed_by_server(idle[0]) == b""
        for s in idle:
            s.close()
        # 4 requests being served: a 5th connection waits, without spinning
        blocking.release.clear()
        blocking.waiting = threading.Semaphore(0)
        results: list = []

        def scraper() -> None:
            try:
                results.append(request(srv.port)[0])
            except Exception as e:  # noqa: BLE001 - reported below
                results.append(e)

        threads = [threading.Thread(target=scraper) for _ in range(4)]
        for t in threads:
            t.start()
        for _ in range(4):
            assert blocking.waiting.acquire(timeout=60)
        late = socket.create_connection(("127.0.0.1", srv.port))
        late.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        cpu0, t0 = time.process_time(), time.monotonic()
        time.sleep(1)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
        assert srv.connections == 4
        assert cpu < 0.5 * wall  # paused in poll(2), not spinning on accept
        blocking.release.set()
        for t in threads:
            t.join(60)
        assert results == [200] * 4
        assert closed_by_server(late).startswith(b"HTTP/1.1 200 OK")
        late.close()


def test_close_from_another_thread_with_clients_connected(snap):
    reg, col = make_registry()
    col.publish(snap)
    srv = MetricsServer(reg, "127.0.0.1", 0, col).start()
    clients = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(50)]
    clients[0].sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX: ")  # half a request
    assert request(srv.port)[0] == 200
    t = threading.Thread(target=srv.close)
    t.start()
    t.join(60)
    assert not t.is_alive()
    for s in clients:
        assert closed_by_server(s) == b""
        s.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    assert not [th for th in threading.enumerate() if th.name.startswith("waitress-")]
    srv.close()  # twice: nothing


def test_fit_connections_raises_the_soft_limit_or_allows_fewer(monkeypatch):
    import resource

    calls = []
    monkeypatch.setattr(server, "_open_fds", lambda: 20)
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 4096))
    monkeypatch.setattr(resource, "setrlimit", lambda _, v: calls.append(v))
    assert server.fit_connections(1024) == (1024, 20 + 1024 + server.FD_RESERVE)
    assert calls == [(20 + 1024 + server.FD_RESERVE, 4096)]
    calls.clear()
    assert server.fit_connections(10_000) == (4096 - 20 - server.FD_RESERVE, 4096)
    monkeypatch.setattr(resource, "getrlimit", lambda _: (64, 64))
    assert server.fit_connections(1024) == (server.MIN_CONNECTIONS, 64)


# ------------------------------------------------------------------ bad recordings

_HEAD = struct.Struct("<BIII")  # kind, length, crc(payload), crc(first 9 bytes)
DATA_START = len(b"KSMTRACE-REC\n") + 2


def records(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, kind, payload length) of each record of a version-2 file."""
    out, pos = [], DATA_START
    while pos + _HEAD.size <= len(data):
        kind, length, _, _ = _HEAD.unpack_from(data, pos)
        out.append((pos, kind, length))
        pos += _HEAD.size + length
    return out


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def export(path: Path, *args: str, **kw):
    return subprocess.Popen([sys.executable, "-m", "ksmtrace", "export", "--replay", str(path),
                             "--speed", "1000", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_a_bad_header_exits_9_at_start(tmp_path):
    data = RECORDING.read_bytes()
    (head_at, kind, _), *_ = records(data)
    assert kind == 1
    bad = tmp_path / "bad-header.ksmrec"
    bad.write_bytes(flip(data, head_at + _HEAD.size + 3))
    p = export(bad, "--listen", "127.0.0.1:0")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 9, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ksmtrace: ") and "byte offset" in lines[0]


@pytest.mark.parametrize("damage", ["crc", "schema"])
def test_a_recording_corrupt_in_the_middle_keeps_serving_its_good_prefix(tmp_path, damage):
    data = RECORDING.read_bytes()
    ticks = [r for r in records(data) if r[1] == 2]
    at, _, length = ticks[10]
    if damage == "crc":  # a flipped byte: the payload's checksum does not match
        data = flip(data, at + _HEAD.size + length // 2)
    else:  # a well-formed record whose JSON is not a tick
        js = b'{"seq": "not a number"}'
        payload = struct.pack("<I", len(js)) + js
        head = struct.pack("<BII", 2, len(payload), zlib.crc32(payload))
        rec = head + struct.pack("<I", zlib.crc32(head)) + payload
        data = data[:at] + rec + data[at + _HEAD.size + length:]
    bad = tmp_path / "bad-tick.ksmrec"
    bad.write_bytes(data)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = export(bad, "--listen", f"127.0.0.1:{port}")
    try:
        want = b"\nksmtrace_collector_cycles_total 10.0\n"
        for _ in range(3000):  # a guard against a hang, not a time limit
            assert p.poll() is None, p.stderr.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                            timeout=60) as r:
                    status, body = r.status, r.read()
            except OSError:
                status, body = 0, b""
            if want in body:
                break
            assert status in (0, 200)
            time.sleep(0.2)
        assert status == 200 and want in body
        for _ in range(5):  # and it stays served, never a 500
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as r:
                assert r.status == 200 and want in r.read()
        p.terminate()
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 143, err
    assert "Traceback" not in err
    stopped = [line for line in err.splitlines() if "replay stopped there" in line]
    assert len(stopped) == 1, err
    assert f"at byte offset {at}" in stopped[0] and "serving the snapshot of tick 10" in stopped[0]
    assert "end of the recording" not in err


def test_a_tick_that_cannot_be_exported_stops_the_replay_like_a_corrupt_one(snap, capsys):
    class Col:
        def add_tick(self, tick):
            if tick == "bad":
                raise TypeError("comm is not a string")
            return snap

    def obs(ticks, col):
        return types.SimpleNamespace(src=types.SimpleNamespace(ticks=lambda: iter(ticks)),
                                     collector=col)

    published = []

    class Exp:
        def publish(self, s, t0, check=False):
            assert check
            published.append(s)

    assert command._replay(obs(["good", "good", "bad", "good"], Col()), Exp(),
                           "x.ksmrec") is False
    assert len(published) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "x.ksmrec: tick 3 cannot be exported (TypeError('comm is not a string'))" in err
    assert "serving the snapshot of tick 2" in err
    # with no good tick before it: exit 9
    with pytest.raises(BadRecording):
        command._replay(obs(["bad"], Col()), Exp(), "x.ksmrec")
    # SIGTERM while a tick is aggregated is SIGTERM, not a bad tick
    from ksmtrace.signals import Terminated

    class Interrupted(Col):
        def add_tick(self, tick):
            raise Terminated(15)  # SIGTERM

    with pytest.raises(Terminated):
        command._replay(obs(["good"], Interrupted()), Exp(), "x.ksmrec")
    assert command._replay(obs(["good"], Col()), Exp(), "x.ksmrec") is True


def test_publish_check_keeps_the_previous_snapshot_when_one_cannot_be_encoded(snap):
    import dataclasses

    reg, col = make_registry()
    col.publish(snap, check=True)
    before = col.current
    row = dataclasses.replace(snap.processes[0], comm=None, alive=True, merging_pages=5)
    bad = dataclasses.replace(snap, processes=(row,))
    with pytest.raises(Exception):  # noqa: B017 - whatever the encoder raises
        col.publish(bad, check=True)
    assert col.current == before
