"""The operator's HTTP dashboard: `/` (live page), `/api/v1/state` (JSON), `/metrics` (Prometheus).

A stdlib threading HTTP server in a daemon thread of `coordinator serve`, bound to the same host as
gRPC. It only reads: every route is built from the ledger (coordinator/run_view.py), computed at
most once per CACHE_SECONDS however many browsers and scrapers ask. The page's files, including the
vendored chart library (static/vendor/uplot, see VENDOR.md there), are package data: no CDN, the
page works offline.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Callable

from coordinator.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from coordinator.metrics import Metrics
from peer.errors import UserError

log = logging.getLogger("potluck.dashboard")

CACHE_SECONDS = 1.0
STATIC_FILES = {  # URL path -> (file under coordinator/static, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/static/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "/static/vendor/uplot/uPlot.iife.min.js": ("vendor/uplot/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "/static/vendor/uplot/uPlot.min.css": ("vendor/uplot/uPlot.min.css", "text/css; charset=utf-8"),
    "/static/vendor/uplot/LICENSE": ("vendor/uplot/LICENSE", "text/plain; charset=utf-8"),
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class CachedState:
    """The run view, recomputed at most once per ``seconds`` (thread-safe)."""

    def __init__(self, build: Callable[[], dict], seconds: float = CACHE_SECONDS):
        self._build, self._seconds = build, seconds
        self._lock = threading.Lock()
        self._value: dict | None = None
        self._at = 0.0

    def __call__(self) -> dict:
        with self._lock:
            if self._value is None or time.monotonic() - self._at >= self._seconds:
                self._value, self._at = self._build(), time.monotonic()
            return self._value


def _read_static(name: str) -> bytes:
    return (resources.files("coordinator") / "static" / name).read_bytes()


def _handler(state: CachedState, metrics: Metrics):
    class DashboardHandler(BaseHTTPRequestHandler):
        server_version = "potluck-dashboard"

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for name, value in SECURITY_HEADERS.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            try:
                if path == "/api/v1/state":
                    self._send(HTTPStatus.OK, json.dumps(state()).encode(), "application/json")
                elif path == "/metrics":
                    state()  # refresh the cache the collector reads
                    self._send(HTTPStatus.OK, metrics.render(), METRICS_CONTENT_TYPE)
                elif path in STATIC_FILES:
                    name, content_type = STATIC_FILES[path]
                    self._send(HTTPStatus.OK, _read_static(name), content_type)
                else:
                    self._send(HTTPStatus.NOT_FOUND, b"not found: try /, /api/v1/state or /metrics\n",
                               "text/plain; charset=utf-8")
            except (BrokenPipeError, ConnectionResetError):
                pass
            except Exception:  # a bad moment in the ledger must not kill the dashboard
                log.exception("dashboard request %s failed", path)
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n", "text/plain; charset=utf-8")

        do_HEAD = do_GET

        def log_message(self, format: str, *args) -> None:
            log.debug("dashboard %s: " + format, self.address_string(), *args)

    return DashboardHandler


class Dashboard:
    """The HTTP server, serving in a daemon thread until stop()."""

    def __init__(self, host: str, port: int, state: CachedState, metrics: Metrics):
        try:
            self._server = ThreadingHTTPServer((host, port), _handler(state, metrics))
        except OSError as error:
            raise UserError(f"cannot serve the dashboard on {host}:{port} ({error.strerror}); pick another "
                            f"--dashboard-port, 0 for any free one, or --no-dashboard") from None
        self._server.daemon_threads = True
        bound_host, bound_port = self._server.server_address[:2]
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{bound_port}/"
        self._thread = threading.Thread(target=self._server.serve_forever, name="dashboard", daemon=True)

    def start(self) -> "Dashboard":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
