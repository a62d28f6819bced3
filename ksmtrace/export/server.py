"""The exporter's HTTP endpoint: GET /metrics of the newest snapshot,
read-only, served by waitress so that no client can take it down.

waitress runs one event loop (poll(2), any number of sockets) and a fixed
pool of worker threads that run the WSGI app, so connections cost no
thread. On top of its limits (request header and body size, idle timeout),
`_Server` adds what an exporter facing hostile clients needs:

- a request deadline: a request must arrive whole within REQUEST_TIMEOUT of
  its first byte (a client dripping a never-ending header is cut off, however
  often it sends a byte);
- a connection limit that cannot lock Prometheus out: at the limit, the
  connection waiting longest for nothing (idle, or stuck in its request) is
  closed to admit the new one; when every connection is busy, accepting
  pauses (no spin) rather than failing;
- accept() failing for want of file descriptors pauses accepting instead of
  spinning, and the soft RLIMIT_NOFILE is raised so the limit fits under it;
- close() from any thread ends the loop within a loop turn (SIGTERM).

With the SnapshotCollector given, the text of each snapshot is serialised
once per format (OpenMetrics or Prometheus text, gzip or not) and reused by
every scrape until the next snapshot; a scrape never waits for the kernel.
"""

from __future__ import annotations

import errno
import gzip
import io
import ipaddress
import logging
import os
import resource
import socket
import sys
import threading
import time
from urllib.parse import parse_qs

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer

from ksmtrace.errors import Busy, KsmtraceError, UsageError
from ksmtrace.export.encode import Families, fast_encoder, plain

DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_IDLE_TIMEOUT = 120.0  # s without a byte either way; above usual scrape intervals
REQUEST_TIMEOUT = 10.0  # s from a request's first byte to its last
MAX_HEADER_BYTES = 16384  # request line + headers (Prometheus sends < 1 KiB)
MAX_BODY_BYTES = 4096  # /metrics takes no body
THREADS = 4  # workers running the app; a scrape is a dict look-up when cached
FD_RESERVE = 128  # descriptors kept for the source (BPF maps, /proc reads) beyond those open
MIN_CONNECTIONS = 8
ACCEPT_PAUSE = 0.25  # s without accept() when full of busy connections or out of fds
MAX_CACHED = 16  # bodies kept per snapshot (format x escaping x gzip)
# the formats whose bodies are kept; another version (the client chose it) is
# served but not kept, so odd Accept headers cannot fill memory or the cache
CACHED_VERSIONS = ("; version=0.0.4;", "; version=1.0.0;")
WARN_EVERY = 60.0  # s between two identical warnings on stderr

LANDING = b"""<html><head><title>ksmtrace exporter</title></head><body>
<h1>ksmtrace exporter</h1>
<p>KSM (Kernel Samepage Merging) metrics: <a href="/metrics">/metrics</a></p>
</body></html>
"""
ALLOW = "GET, HEAD, OPTIONS"
NOT_FOUND = b"not found: metrics are at /metrics\n"
NOT_ALLOWED = b"method not allowed: use GET\n"


def parse_listen(text: str) -> tuple[str, int]:
    """"ADDR:PORT", "[v6]:PORT" or ":PORT" (every interface) -> (host, port)."""
    host, sep, port_s = text.rpartition(":")
    text = text if len(text) <= 120 else text[:100] + "..."  # for the messages
    if not sep:
        raise ValueError(f"--listen {text!r}: expected ADDR:PORT, e.g. 127.0.0.1:9949")
    if host.startswith("[") or host.endswith("]"):
        inner = host[1:-1] if host.startswith("[") and host.endswith("]") else None
        if not inner:
            raise ValueError(f"--listen {text!r}: brackets need an IPv6 address inside, "
                             "e.g. [::1]:9949 ([::]:9949 for every interface)")
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError(f"--listen {text!r}: not an IPv6 address in brackets") from None
        host = inner
    elif host:
        try:
            host.encode("idna")  # each label 1-63 characters, as DNS requires
        except UnicodeError as e:
            raise ValueError(f"--listen {text!r}: not a valid host name "
                             f"({e.__cause__ or e})") from None
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"--listen {text!r}: the port is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"--listen {text!r}: port {port} is out of range 0-65535")
    return host or "0.0.0.0", port


_warned: dict[str, float] = {}


def warn(key: str, message: str) -> None:
    """One line on stderr, at most once per WARN_EVERY for the same key (a
    fixed word: never text from a client)."""
    now = time.monotonic()
    if now - _warned.get(key, -WARN_EVERY) >= WARN_EVERY:
        _warned[key] = now
        # a request path may be in it: no control characters reach the terminal
        line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message[:300])
        print(f"ksmtrace export: warning: {line}", file=sys.stderr, flush=True)


class _OneLine(logging.Handler):
    """waitress's own errors (an app bug) as one rate-limited line, no traceback."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            warn(f"waitress:{record.name}", f"HTTP server: {record.getMessage()}")
        except Exception:  # noqa: BLE001 - logging must never raise
            pass


def _quiet_waitress() -> None:
    for name in ("waitress", "waitress.queue"):
        log = logging.getLogger(name)
        log.handlers = [_OneLine()]
        log.propagate = False
        log.setLevel(logging.ERROR)  # queue depth, limits: ksmtrace says what matters


# ------------------------------------------------------------------ the app

def gzip_accepted(header: str | None) -> bool:
    """Whether Accept-Encoding lists gzip with a q-value above 0 (RFC 9110
    12.5.3: "gzip;q=0" means not gzip)."""
    for item in (header or "").split(","):
        coding, *params = item.split(";")
        if coding.strip().lower() not in ("gzip", "x-gzip"):
            continue
        for p in params:
            key, _, val = p.partition("=")
            if key.strip().lower() == "q":
                try:
                    return float(val) > 0
                except ValueError:
                    return False
        return True
    return False


def _negotiate(accept: str | None):
    """(encoder, content type) as prometheus_client chooses, or Prometheus text
    0.0.4 for an Accept header it cannot handle (it raises on version=x)."""
    try:
        encoder, ctype = choose_encoder(accept)
        if ctype.isascii() and ctype.isprintable():
            return encoder, ctype
    except Exception:  # noqa: BLE001 - a client's header, not our bug
        pass
    return generate_latest, CONTENT_TYPE_PLAIN_0_0_4


def _encode(fams, encoder, ctype: str) -> tuple[bytes, str]:
    fast = fast_encoder(ctype) if plain(fams) else None
    try:
        return (fast(fams) if fast else encoder(Families(fams))), ctype
    except Exception:  # noqa: BLE001 - e.g. an OpenMetrics version prometheus_client lacks
        if ctype == CONTENT_TYPE_PLAIN_0_0_4:
            raise
        return _encode(fams, generate_latest, CONTENT_TYPE_PLAIN_0_0_4)


def _restrict(fams, names: set[str]):
    """What client_python serves for ?name[]=...: the named samples only."""
    from prometheus_client.core import Metric

    out = []
    for m in fams:
        samples = [s for s in m.samples if s.name in names]
        if samples:
            r = Metric(m.name, m.documentation, m.type, m.unit)
            r.samples = samples
            out.append(r)
    return out


def _app(registry, exporter=None):
    # (generation, {(content type, gzip): (headers, body)}), swapped whole
    holder: list[tuple[int, dict]] = [(-1, {})]

    def current():
        if exporter is not None:
            return exporter.current
        return None, tuple(registry.collect())  # no generation: never cached

    def render(environ) -> tuple[list[tuple[str, str]], bytes]:
        gen, fams = current()
        encoder, ctype = _negotiate(environ.get("HTTP_ACCEPT"))
        gz = gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING"))
        names = parse_qs(environ.get("QUERY_STRING", "")).get("name[]")
        if names:
            fams, gen = _restrict(fams, set(names)), None
        held_gen, held = holder[0]
        entries = held if gen is not None and held_gen == gen else {}
        key = (ctype, gz)
        hit = entries.get(key)
        if hit is None:
            body, ctype = _encode(fams, encoder, ctype)
            headers = [("Content-Type", ctype)]
            if gz:
                body = gzip.compress(body, compresslevel=1)
                headers.append(("Content-Encoding", "gzip"))
            hit = (headers, body)
            if (gen is not None and len(entries) < MAX_CACHED
                    and any(v in ctype for v in CACHED_VERSIONS)):
                entries[key] = hit
                if gen > held_gen:  # never back to an older snapshot
                    holder[0] = (gen, entries)
        return hit

    def respond(environ) -> tuple[str, list[tuple[str, str]], bytes]:
        path = environ.get("PATH_INFO", "/")
        method = environ.get("REQUEST_METHOD", "GET")
        if path not in ("/metrics", "/"):
            return "404 Not Found", [("Content-Type", "text/plain")], NOT_FOUND
        if method == "OPTIONS":
            return "200 OK", [("Allow", ALLOW)], b""
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", [("Allow", ALLOW),
                                              ("Content-Type", "text/plain")], NOT_ALLOWED
        if path == "/":
            return "200 OK", [("Content-Type", "text/html; charset=utf-8")], LANDING
        headers, body = render(environ)
        return "200 OK", list(headers), body

    def app(environ, start_response):
        status, headers, body = respond(environ)
        if not any(k == "Content-Length" for k, _ in headers):
            headers.append(("Content-Length", str(len(body))))
        start_response(status, headers)
        if environ.get("REQUEST_METHOD") == "HEAD" or not body:
            return []  # HEAD: the headers GET would have, no body
        wrapper = environ.get("wsgi.file_wrapper")
        # waitress sends from the file without copying the cached body per connection
        return wrapper(io.BytesIO(body)) if wrapper else [body]

    return app


# ------------------------------------------------------------------ the server

class _Channel(HTTPChannel):
    started = 0.0  # time.time() of the first byte of the request being received; 0: none

    def received(self, data):
        fresh = self.request is None
        now = time.time()
        done = super().received(data)
        if self.request is None:
            self.started = 0.0
        elif fresh or not self.started:
            self.started = now
        return done


class _Server(TcpWSGIServer):
    channel_class = _Channel
    paused_until = 0.0

    def readable(self):
        now = time.time()
        if now >= self.next_channel_cleanup:
            self.next_channel_cleanup = now + self.adj.cleanup_interval
            self.maintenance(now)
        return self.accepting and time.monotonic() >= self.paused_until

    def maintenance(self, now):
        """Idle connections (waitress's channel_timeout) and requests not
        whole by their deadline are closed."""
        super().maintenance(now)
        cutoff = now - REQUEST_TIMEOUT
        for ch in self.active_channels.values():
            if ch.started and ch.started < cutoff and not ch.requests:
                ch.will_close = True

    def _victim(self) -> _Channel | None:
        """The connection waiting longest for nothing: no request being
        served, no response being sent."""
        best, best_t = None, None
        for ch in self.active_channels.values():
            if ch.requests or ch.total_outbufs_len or ch.will_close or ch.close_when_flushed:
                continue
            t = ch.started or ch.last_activity
            if best_t is None or t < best_t:
                best, best_t = ch, t
        return best

    def handle_accept(self):
        limit = self.adj.connection_limit
        if len(self.active_channels) >= limit:
            victim = self._victim()
            if victim is None:
                self.paused_until = time.monotonic() + ACCEPT_PAUSE
                warn("full", f"{limit} connections open, all busy (--max-connections): "
                     "new ones wait")
                return
            warn("evict", f"{limit} connections open (--max-connections): the longest "
                 "idle ones are closed to admit new ones")
            victim.handle_close()
        try:
            v = self.accept()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self.paused_until = time.monotonic() + ACCEPT_PAUSE
                warn("fds", f"cannot accept a connection: {e.strerror} "
                     f"({len(self.active_channels)} open); lower --max-connections")
            return
        if v is None:
            return
        conn, addr = v
        try:
            self.set_socket_options(conn)
            self.channel_class(self, conn, addr, self.adj, map=self._map)
        except OSError:
            conn.close()  # the client left already

    def handle_error(self):
        """waitress's default closes the listening socket for good: never."""
        self.paused_until = time.monotonic() + ACCEPT_PAUSE
        warn("accept", f"HTTP server: accepting a connection failed: {sys.exc_info()[1]!r}")


def _listen_socket(host: str, port: int) -> socket.socket:
    where = f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise KsmtraceError(f"cannot listen on {where}: {e.strerror}",
                            "give an IP address or a resolvable name, e.g. "
                            "--listen 127.0.0.1:9949") from None
    except UnicodeError:
        raise UsageError(f"cannot listen on {where[:100]}: not a valid host name",
                         "e.g. --listen 127.0.0.1:9949") from None
    family, socktype, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise Busy(f"cannot listen on {where}: the port is in use",
                       "another exporter (or ksmtrace) listens there: stop it, or choose "
                       "another port with --listen ADDR:PORT") from None
        if e.errno == errno.EACCES:
            raise KsmtraceError(f"cannot listen on {where}: permission denied",
                                "ports below 1024 need root or CAP_NET_BIND_SERVICE; "
                                "use a port above 1024") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise KsmtraceError(f"cannot listen on {where}: no such local address",
                                "use an address of this host (see `ip addr`), "
                                "127.0.0.1 or 0.0.0.0") from None
        raise KsmtraceError(f"cannot listen on {where}: {e.strerror or e}") from None
    return sock


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64


def fit_connections(wanted: int) -> tuple[int, int]:
    """(connections allowed, soft RLIMIT_NOFILE): the soft limit is raised
    towards the hard one so that `wanted` connections fit beside the
    descriptors open now and FD_RESERVE; if they cannot, fewer are allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = _open_fds()
    need = used + wanted + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted, soft
    return min(wanted, max(MIN_CONNECTIONS, soft - used - FD_RESERVE)), soft


class MetricsServer:
    """Binds at construction (so a busy port fails before any probe is
    attached), serves in a daemon thread after `start()`, `close()` stops
    (from any thread, within about a second whatever the clients do)."""

    def __init__(self, registry, host: str, port: int, exporter=None, *,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT):
        sock = _listen_socket(host, port)
        self.host = host
        self.port = sock.getsockname()[1]
        self._addr = sock.getsockname()[0]
        self.wanted_connections = max_connections
        self.max_connections = max_connections
        adj = Adjustments(
            sockets=[sock], threads=THREADS, connection_limit=max_connections,
            max_request_header_size=MAX_HEADER_BYTES, max_request_body_size=MAX_BODY_BYTES,
            asyncore_use_poll=True,  # select() fails beyond fd 1023
            asyncore_loop_timeout=1, clear_untrusted_proxy_headers=False,
            log_socket_errors=False, ident="ksmtrace", backlog=1024)
        # waitress parses these two as int (0.5 s would be 0: no timeout at all)
        adj.channel_timeout = idle_timeout
        adj.cleanup_interval = max(0.1, min(idle_timeout, REQUEST_TIMEOUT) / 4)
        _quiet_waitress()
        try:
            self._server = _Server(_app(registry, exporter), map={}, _sock=sock, adj=adj,
                                   bind_socket=False,
                                   sockinfo=(sock.family, sock.type, sock.proto,
                                             sock.getsockname()))
        except OSError as e:
            sock.close()
            raise KsmtraceError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def address(self) -> str:
        h = self._addr
        return f"[{h}]:{self.port}" if ":" in h else f"{h}:{self.port}"

    def start(self) -> MetricsServer:
        """Serve. The connection limit is fitted to the descriptors left now
        (after the source opened its own)."""
        n, soft = fit_connections(self.wanted_connections)
        if n < self.wanted_connections:
            warn("limit", f"at most {n} connections, not {self.wanted_connections}: "
                 f"the open-files limit is {soft} (ulimit -n)")
        self.max_connections = self._server.adj.connection_limit = n
        self._thread = threading.Thread(target=self._run, name="ksmtrace-http", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._server.run()
        except Exception as e:  # noqa: BLE001 - the exporter's loop goes on; say why it stopped
            if not self._closed:
                warn("loop", f"HTTP server stopped: {e!r}")

    @property
    def connections(self) -> int:
        return len(self._server.active_channels)

    def _close_all(self) -> None:
        from waitress import wasyncore

        wasyncore.close_all(self._server._map, ignore_all=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        srv = self._server
        if self._thread is not None and self._thread.is_alive():
            # run in the loop's own thread: every socket closed, the map
            # empty, the loop returns
            try:
                srv.trigger.pull_trigger(self._close_all)
                self._thread.join(timeout=1.0)
            except OSError:
                pass  # the loop's wake-up pipe is gone: the loop is ending anyway
        if self._thread is None or not self._thread.is_alive():
            self._close_all()
        srv.task_dispatcher.shutdown(cancel_pending=True, timeout=0.2)  # daemon threads
        self._thread = None

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
