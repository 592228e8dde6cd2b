"""The plugin's HTTP listener against the standard library's HTTP servers, under idle and slow connections.

Starts three listeners answering GET /livez and /readyz with "ok", each in a process of its own:

- ``p11kms``: ``p11kms.plugin.httpserver.PluginHttpServer`` (one selector thread, 4 workers,
  READ_TIMEOUT 5 s counted from the accept);
- ``ThreadingHTTPServer``: ``http.server.ThreadingHTTPServer``, handler ``timeout = 5`` (a socket
  timeout per read: the one the standard library offers);
- ``HTTPServer``: ``http.server.HTTPServer`` (one thread), the same handler.

Both standard servers get ``request_queue_size = 128``, p11kms's listen backlog. Against each it opens
300 idle TCP connections (non-blocking connects, all at once) and one that sends a request one byte a
second, then reports the server process's threads and open fds (/proc/PID) before and at their peak,
the latency of a fresh GET /livez and /readyz 1 s in (10 s client timeout), how many idle connections
the server closed within 8 s and 20 s, and how long it held the trickling one (given up after 40 s):
the bounds tests/plugin/test_httpserver.py::test_idle_connections_cannot_exhaust_the_http_listener checks.

    .venv/bin/python bench/http_listener.py [--json FILE]
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from p11kms.plugin.httpserver import PluginHttpServer, ProbeSource

LISTENERS = ("p11kms", "ThreadingHTTPServer", "HTTPServer")
HEADERS = ("listener", "threads (peak)", "fds (peak)", "GET /livez", "GET /readyz", "idle closed in 8 s", "in 20 s",
           "trickle held")
IDLE, WATCH, TRICKLE_CAP, GET_TIMEOUT = 300, 20.0, 40.0, 10.0


class Probes(http.server.BaseHTTPRequestHandler):
    timeout = 5  # StreamRequestHandler puts it on the connection: each read may wait this long

    def do_GET(self) -> None:
        code, body = (200, b"ok\n") if self.path in ("/livez", "/readyz") else (404, b"not found\n")
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve(kind: str) -> None:
    """Runs one listener on a free port of 127.0.0.1 and prints the port."""
    if kind == "p11kms":
        source = ProbeSource(serving=lambda: True, healthz=lambda: "ok", details=dict, metrics=None)
        server = PluginHttpServer(("127.0.0.1", 0), source)
        server.start()
        print(server.address.rsplit(":", 1)[1], flush=True)
        threading.Event().wait()
    cls = http.server.ThreadingHTTPServer if kind == "ThreadingHTTPServer" else http.server.HTTPServer
    cls.request_queue_size = 128
    stdlib = cls(("127.0.0.1", 0), Probes)
    print(stdlib.server_address[1], flush=True)
    stdlib.serve_forever()


def threads_and_fds(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    threads = int(next(line for line in status.splitlines() if line.startswith("Threads:")).split()[1])
    return threads, len(os.listdir(f"/proc/{pid}/fd"))


def get_ms(port: int, path: str) -> str:
    start = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=GET_TIMEOUT) as reply:
            reply.read()
    except OSError as exc:  # urllib wraps a connect timeout in URLError
        timed_out = isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError)
        return "timed out" if timed_out else f"failed: {type(exc).__name__}"
    return f"{(time.monotonic() - start) * 1000:.1f} ms"


def closed_by_server(connection: socket.socket) -> bool:
    try:
        return connection.recv(1) == b""
    except ConnectionResetError:
        return True
    except OSError:
        return False


def watch(idle: list[socket.socket], pid: int, started: float, closes: list[float], peak: list[int]) -> None:
    """Notes when the server closes each idle connection (for WATCH s), and the server's peak threads and fds."""
    with selectors.DefaultSelector() as selector:
        for connection in idle:
            selector.register(connection, selectors.EVENT_READ)
        while (left := started + WATCH - time.monotonic()) > 0 and selector.get_map():
            peak[:] = map(max, peak, threads_and_fds(pid))
            for key, _ in selector.select(min(left, 0.1)):
                selector.unregister(key.fileobj)
                if closed_by_server(cast(socket.socket, key.fileobj)):
                    closes.append(time.monotonic() - started)


def trickle(port: int, started: float, held: list[float]) -> None:
    """Sends a request one byte a second until the server closes the connection or TRICKLE_CAP passes."""
    try:
        connection = socket.create_connection(("127.0.0.1", port), timeout=TRICKLE_CAP)
    except OSError:
        return  # never accepted: held for the whole cap
    with connection:
        connection.settimeout(1.0)  # closed_by_server waits up to a second: the pace of the bytes
        for byte in b"GET /livez HTTP/1.1\r\nX-Padding: " + b"a" * int(TRICKLE_CAP):
            if time.monotonic() - started > TRICKLE_CAP:
                return
            try:
                connection.send(bytes([byte]))
                closed = closed_by_server(connection)
            except OSError:
                closed = True
            if closed:
                held.append(time.monotonic() - started)
                return


def measure(kind: str) -> dict[str, Any]:
    server = subprocess.Popen([sys.executable, __file__, "--serve", kind], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)  # no tracebacks of the reset connections
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        get_ms(port, "/livez")
        time.sleep(0.2)
        before = threads_and_fds(server.pid)
        idle = [socket.socket() for _ in range(IDLE)]
        for connection in idle:
            connection.setblocking(False)
            connection.connect_ex(("127.0.0.1", port))
        started, held, closes, peak = time.monotonic(), list[float](), list[float](), list(before)
        sender = threading.Thread(target=trickle, args=(port, started, held), daemon=True)
        watcher = threading.Thread(target=watch, args=(idle, server.pid, started, closes, peak), daemon=True)
        sender.start()
        watcher.start()
        time.sleep(1.0)
        livez, readyz = get_ms(port, "/livez"), get_ms(port, "/readyz")
        watcher.join()
        sender.join(TRICKLE_CAP + 5)
        for connection in idle:
            connection.close()
        return {"listener": kind, "threads_before": before[0], "threads_peak": peak[0], "fds_before": before[1],
                "fds_peak": peak[1], "livez": livez, "readyz": readyz,
                "idle_closed_in_8s": sum(t <= 8.0 for t in closes), "idle_closed_in_20s": len(closes),
                "trickle_held": f"{held[0]:.1f} s" if held else f">{TRICKLE_CAP:.0f} s"}
    finally:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--serve", choices=LISTENERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    widths = (20, 17, 17, 11, 11, 18, 8, 12)
    print(*(h.ljust(w) for h, w in zip(HEADERS, widths, strict=True)))
    rows = []
    for kind in LISTENERS:
        rows.append(row := measure(kind))
        cells = (kind, f"{row['threads_before']} -> {row['threads_peak']}", f"{row['fds_before']} -> {row['fds_peak']}",
                 row["livez"], row["readyz"], f"{row['idle_closed_in_8s']}/{IDLE}",
                 f"{row['idle_closed_in_20s']}/{IDLE}", row["trickle_held"])
        print(*(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
