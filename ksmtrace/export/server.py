"""The exporter's HTTP endpoint: GET /metrics from a registry, served by a
thread per request (concurrent scrapes), read-only.

With the SnapshotCollector given, the text of each snapshot is serialised
once per format (OpenMetrics or Prometheus text, gzip or not) and reused by
every scrape until the next snapshot.

prometheus_client's own start_http_server keeps socketserver's listen
backlog of 5; here it is 128, so a burst of scrapers is queued, not refused.
"""

from __future__ import annotations

import errno
import gzip
import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import choose_encoder, gzip_accepted

from ksmtrace.errors import Busy, KsmtraceError
from ksmtrace.export.encode import fast_encoder, plain

LANDING = b"""<html><head><title>ksmtrace exporter</title></head><body>
<h1>ksmtrace exporter</h1>
<p>KSM (Kernel Samepage Merging) metrics: <a href="/metrics">/metrics</a></p>
</body></html>
"""


def parse_listen(text: str) -> tuple[str, int]:
    """"ADDR:PORT", "[v6]:PORT" or ":PORT" (every interface) -> (host, port)."""
    host, sep, port_s = text.rpartition(":")
    if not sep:
        raise ValueError(f"--listen {text!r}: expected ADDR:PORT, e.g. 127.0.0.1:9949")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"--listen {text!r}: port {port_s!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"--listen {text!r}: port {port} is out of range 0-65535")
    return host or "0.0.0.0", port


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # one line per scrape on stderr would drown the exporter's own messages


class _Families:
    """One snapshot's families, as something encoders can collect."""

    def __init__(self, fams):
        self.fams = fams

    def collect(self):
        return iter(self.fams)


def _app(registry, exporter=None):
    metrics = make_wsgi_app(registry)
    # (generation, {(content type, gzip): (headers, body)}), swapped whole
    holder: list[tuple[int, dict]] = [(-1, {})]

    def cached(environ, start_response):
        gen, fams = exporter.current
        encoder, ctype = choose_encoder(environ.get("HTTP_ACCEPT"))
        gz = gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING"))
        held_gen, held = holder[0]
        entries = held if held_gen == gen else {}
        hit = entries.get((ctype, gz))
        if hit is None:
            fast = fast_encoder(ctype) if plain(fams) else None
            body = fast(fams) if fast else encoder(_Families(fams))
            headers = [("Content-Type", ctype)]
            if gz:
                body = gzip.compress(body, compresslevel=1)
                headers.append(("Content-Encoding", "gzip"))
            hit = entries[(ctype, gz)] = (headers, body)
            if gen > held_gen:  # never back to an older snapshot
                holder[0] = (gen, entries)
        start_response("200 OK", list(hit[0]))
        return [hit[1]]

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            if (exporter is not None and environ.get("REQUEST_METHOD") == "GET"
                    and "name[]" not in environ.get("QUERY_STRING", "")):
                return cached(environ, start_response)
            return metrics(environ, start_response)
        if path == "/":
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
            return [LANDING]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: metrics are at /metrics\n"]

    return app


class MetricsServer:
    """Binds at construction (so a busy port fails before any probe is
    attached), serves in a daemon thread after `start()`, `close()` stops."""

    def __init__(self, registry, host: str, port: int, exporter=None):
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise KsmtraceError(f"cannot listen on {host}:{port}: {e.strerror}",
                                "give an IP address or a resolvable name, e.g. "
                                "--listen 127.0.0.1:9949") from None
        family, *_, sockaddr = infos[0]

        class Server(_Server):
            address_family = family

        try:
            self.httpd = make_server(sockaddr[0], port, _app(registry, exporter), Server,
                                     handler_class=_QuietHandler)
        except OSError as e:
            where = f"{host}:{port}"
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
        self.host = host
        self.port = self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        h = self.httpd.server_address[0]
        return f"[{h}]:{self.port}" if ":" in h else f"{h}:{self.port}"

    def start(self) -> MetricsServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="ksmtrace-http",
                                        kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.httpd.server_close()

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
