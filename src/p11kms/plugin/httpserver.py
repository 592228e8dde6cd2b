"""The plugin's HTTP listener: /metrics for Prometheus, and probes for the kubelet.

- ``/livez``: 200 while the process serves; it never looks at the HSM, so an HSM outage can never
  make the kubelet restart the plugin (a restart would only throw kube-apiserver's state away).
- ``/readyz``: 200 when the socket is served and the HSM answers (the cached round trip), else 503.
- ``/healthz``: the same verdict with details as JSON: HSM state, the cause, the key UUID.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class ProbeSource:
    """What the endpoints read; provided by the server layer."""

    serving: Callable[[], bool]
    healthz: Callable[[], str]
    details: Callable[[], dict[str, Any]]
    metrics: Callable[[], bytes] | None


class _Handler(BaseHTTPRequestHandler):
    server: PluginHttpServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes every few seconds would flood the plugin log

    def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        source = self.server.source
        path = self.path.split("?", 1)[0]
        if path == "/livez":
            self._reply(200, b"ok\n")
        elif path in ("/readyz", "/healthz"):
            verdict = source.healthz() if source.serving() else "not serving the socket"
            code = 200 if verdict == "ok" else 503
            if path == "/readyz":
                self._reply(code, verdict.encode() + b"\n")
            else:
                body = {"status": verdict, **source.details()}
                self._reply(code, json.dumps(body).encode() + b"\n", "application/json")
        elif path == "/metrics" and source.metrics is not None:
            self._reply(200, source.metrics(), "text/plain; version=0.0.4; charset=utf-8")
        else:
            self._reply(404, b"not found: /livez /readyz /healthz /metrics\n")


class PluginHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], source: ProbeSource) -> None:
        super().__init__(address, _Handler)
        self.source = source
        self._thread = threading.Thread(target=self.serve_forever, daemon=True, name="http")

    @property
    def address(self) -> str:
        host, port = self.server_address[:2]
        return f"{host!s}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
