"""The plugin's HTTP listener: /metrics for Prometheus, and probes for the kubelet.

- ``/livez``: 200 while the process serves; it never looks at the HSM, so an HSM outage can never
  make the kubelet restart the plugin (a restart would only throw kube-apiserver's state away).
- ``/readyz``: 200 when the socket is served and the HSM answers (the cached round trip), else 503.
- ``/healthz``: the same verdict with details as JSON: HSM state, the cause, the key UUID.

With hostNetwork any local process can connect, so holding a connection must cost a file
descriptor for a few seconds, never a thread. One thread accepts every connection and reads its
request without blocking; only a complete request goes to one of a few worker threads. A
connection has READ_TIMEOUT seconds from its accept to deliver its request (one byte a second
does not extend it), at most MAX_CONNECTIONS are held (a new one closes the longest-waiting one,
so a flood cannot keep a probe out), and every answer closes its connection. ``/livez`` is
answered by the accepting thread itself, so it never waits behind a slow ``/readyz``.
"""

from __future__ import annotations

import json
import queue
import selectors
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast

READ_TIMEOUT = 5.0  # seconds a connection has to deliver its request; probes send theirs at once
MAX_CONNECTIONS = 128  # connections held at once (reading or being answered)
WORKERS = 4  # threads answering requests other than /livez
MAX_REQUEST_BYTES = 8192  # a GET needs far less; a longer header block is not a probe


@dataclass(frozen=True)
class ProbeSource:
    """What the endpoints read; provided by the server layer."""

    serving: Callable[[], bool]
    healthz: Callable[[], str]
    details: Callable[[], dict[str, Any]]
    metrics: Callable[[], bytes] | None


@dataclass(frozen=True)
class Reply:
    code: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"

    def encode(self) -> bytes:
        head = (f"HTTP/1.1 {self.code} {HTTPStatus(self.code).phrase}\r\nContent-Type: {self.content_type}\r\n"
                f"Content-Length: {len(self.body)}\r\nConnection: close\r\n\r\n")
        return head.encode("latin-1") + self.body


def route(source: ProbeSource, method: str, target: str) -> Reply:
    """The answer to one request, from its method and target."""
    if method != "GET":
        return Reply(405, b"only GET is served\n")
    path = target.split("?", 1)[0]
    if path == "/livez":
        return Reply(200, b"ok\n")
    if path in ("/readyz", "/healthz"):
        verdict = source.healthz() if source.serving() else "not serving the socket"
        code = 200 if verdict == "ok" else 503
        if path == "/readyz":
            return Reply(code, verdict.encode() + b"\n")
        return Reply(code, json.dumps({"status": verdict, **source.details()}).encode() + b"\n", "application/json")
    if path == "/metrics" and source.metrics is not None:
        return Reply(200, source.metrics(), "text/plain; version=0.0.4; charset=utf-8")
    return Reply(404, b"not found: /livez /readyz /healthz /metrics\n")


def request_line(request: bytes) -> tuple[str, str]:
    """(method, target) of a request, or ("", "") when its first line is not an HTTP request line."""
    parts = request.split(b"\n", 1)[0].decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return "", ""
    return parts[0], parts[1]


def _complete(request: bytes | bytearray) -> bool:
    return b"\r\n\r\n" in request or b"\n\n" in request


def _listen(address: tuple[str, int]) -> socket.socket:
    """A non-blocking listening socket; OSError (with the plain strerror) when the port is taken."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait for TIME_WAIT
        listener.bind(address)
        listener.listen(128)
    except OSError:
        listener.close()
        raise
    listener.setblocking(False)
    return listener


@dataclass
class _Reading:
    deadline: float
    received: bytearray = field(default_factory=bytearray)


class PluginHttpServer:
    """The listener: one thread reads requests from every connection, a few workers answer them."""

    def __init__(self, address: tuple[str, int], source: ProbeSource, *, read_timeout: float = READ_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS, workers: int = WORKERS) -> None:
        self.source = source
        self._read_timeout = read_timeout
        self._max_connections = max_connections
        self._listener = _listen(address)
        self._wake, self._waker = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake, selectors.EVENT_READ)
        self._reading: OrderedDict[socket.socket, _Reading] = OrderedDict()  # oldest (earliest deadline) first
        self._answering = 0
        self._answering_lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[socket.socket, bytes] | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._acceptor = threading.Thread(target=self._serve, daemon=True, name="http")
        self._workers = [threading.Thread(target=self._work, daemon=True, name=f"http-{n}") for n in range(workers)]

    @property
    def address(self) -> str:
        host, port = self._listener.getsockname()[:2]
        return f"{host!s}:{port}"

    def start(self) -> None:
        for thread in (self._acceptor, *self._workers):
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._waker.send(b"x")
        self._acceptor.join(5)
        for _ in self._workers:
            self._jobs.put(None)  # workers are daemons: one stuck in a slow answer does not hold up the exit

    # -- the accepting thread ---------------------------------------------------------------------
    def _serve(self) -> None:
        try:
            while not self._stopping.is_set():
                for key, _ in self._selector.select(self._until_next_deadline()):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake:
                        self._wake.recv(64)
                    else:
                        self._receive(cast(socket.socket, key.fileobj))
                self._expire()
        finally:
            for connection in list(self._reading):
                self._drop(connection)
            self._selector.close()
            for sock in (self._listener, self._wake, self._waker):
                sock.close()

    def _until_next_deadline(self) -> float | None:
        if not self._reading:
            return None
        return max(0.0, next(iter(self._reading.values())).deadline - time.monotonic())

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of file descriptors: free one, or the listener stays readable forever
                self._drop_oldest()
                return
            if self._held() >= self._max_connections and not self._drop_oldest():
                connection.close()
                continue
            connection.setblocking(False)
            self._reading[connection] = _Reading(time.monotonic() + self._read_timeout)
            self._selector.register(connection, selectors.EVENT_READ)

    def _held(self) -> int:
        with self._answering_lock:
            return len(self._reading) + self._answering

    def _drop_oldest(self) -> bool:
        if not self._reading:
            return False
        self._drop(next(iter(self._reading)))
        return True

    def _receive(self, connection: socket.socket) -> None:
        try:
            chunk = connection.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        reading = self._reading[connection]
        reading.received += chunk
        if not chunk or len(reading.received) > MAX_REQUEST_BYTES:
            self._drop(connection)
        elif _complete(reading.received):
            self._selector.unregister(connection)
            del self._reading[connection]
            self._dispatch(connection, bytes(reading.received))

    def _dispatch(self, connection: socket.socket, request: bytes) -> None:
        if request_line(request)[1] == "/livez":
            self._answer(connection, request)  # needs nothing: answered here, never queued behind others
            return
        with self._answering_lock:
            self._answering += 1
        self._jobs.put((connection, request))

    def _expire(self) -> None:
        now = time.monotonic()
        while self._reading and next(iter(self._reading.values())).deadline <= now:
            self._drop(next(iter(self._reading)))

    def _drop(self, connection: socket.socket) -> None:
        self._selector.unregister(connection)
        del self._reading[connection]
        connection.close()

    # -- the workers --------------------------------------------------------------------------------
    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._answer(*job)
            finally:
                with self._answering_lock:
                    self._answering -= 1

    def _answer(self, connection: socket.socket, request: bytes) -> None:
        try:
            reply = self._reply(request)
            connection.settimeout(self._read_timeout)  # a client that stops reading cannot keep a worker
            connection.sendall(reply.encode())
        except OSError:
            pass
        finally:
            connection.close()

    def _reply(self, request: bytes) -> Reply:
        method, target = request_line(request)
        if not method:
            return Reply(400, b"not an HTTP request\n")
        try:
            return route(self.source, method, target)
        except Exception as exc:  # the probe answers 500 and the worker lives on
            return Reply(500, f"internal error: {type(exc).__name__}\n".encode())
