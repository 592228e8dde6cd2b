"""Server lifecycle: open the HSM, claim the socket, serve, reload on SIGHUP, stop on SIGTERM."""

from __future__ import annotations

import faulthandler
import fcntl
import hashlib
import itertools
import logging
import os
import queue
import secrets
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from p11kms.config import (
    STAGING_NAME_BYTES,
    ConfigError,
    PluginConfig,
    load_config,
    pin_source_warnings,
    prepare_socket_directory,
)
from p11kms.hsm.errors import HsmError
from p11kms.kmsv2 import api_pb2_grpc
from p11kms.observability import build_info, log_event
from p11kms.plugin.configwatch import ConfigWatch, file_generation
from p11kms.plugin.health import CachedHealth
from p11kms.plugin.httpserver import PluginHttpServer, ProbeSource
from p11kms.plugin.keyring import Keyring, KeyringError
from p11kms.plugin.metrics import Metrics
from p11kms.plugin.service import MAX_MESSAGE_BYTES, HsmAdmission, KmsService
from p11kms.plugin.supervisor import KeyringSupervisor, adopt_reloadable, log_keyring, restart_only_changes

FIRST_HEALTH_ANSWER_SECONDS = 5.0  # how long start waits for the first probe, so Status never says "pending"
# After the last call was answered at a stop, how long the connections stay open so that callers
# read their answers before gRPC closes the connections (see CallExecutor).
ANSWER_DELIVERY_SECONDS = 0.1
START_WORKERS = 2  # handler threads at start and at least; WorkerSizer adds more for a slow HSM
_T = TypeVar("_T")

class SocketInUse(Exception):
    """The socket path is served by a live process or is not a socket at all."""


def claim_socket_path(path: Path, logger: logging.Logger) -> None:
    """Removes a stale socket left by a crash; refuses a live one or a file that is not a socket."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketInUse(f"{path} exists and is not a socket; remove it or choose another Socket path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        log_event(logger, logging.WARNING, "removed stale socket left by an earlier process", socket=str(path))
        return
    finally:
        probe.close()
    raise SocketInUse(f"another process is already serving on {path}; stop it first or choose another Socket")


def _bind(server: grpc.Server, config: PluginConfig, path: Path) -> None:
    # The socket must never exist with looser permissions than configured, not even briefly.
    previous = os.umask(0o177)
    try:
        if server.add_insecure_port(f"unix:{path}") == 0:
            raise SocketInUse(f"cannot listen on {path}")
    finally:
        os.umask(previous)
    if config.socket_gid is not None:  # resolved when the config was loaded: a bad group never gets here
        os.chown(path, -1, config.socket_gid)
    os.chmod(path, config.socket_mode)


SocketIdentity = tuple[int, int]  # (st_dev, st_ino) of the socket file this process bound


def staging_path(path: Path) -> Path:
    """The private name the server binds before its socket is published at ``path``.

    grpcio unlinks whatever sits at the path it binds, and unlinks that path again when it stops,
    whoever owns the file by then. Bound to a private name that is gone once published, it can
    neither take over a live socket nor delete a successor's.

    The name is ``.`` + a digest of the socket's file name + random bytes, never the pid: in a
    container p11kms is PID 1, so plugins with different sockets in one hostPath directory would
    all pick ``.1`` and bind over each other. The digest keeps different sockets apart, the random
    part one socket's successive starts.
    """
    named = hashlib.sha256(os.fsencode(path.name)).hexdigest()[:8]
    staged = path.with_name(f".{named}.{secrets.token_hex(3)}")
    assert len(staged.name) <= STAGING_NAME_BYTES  # config loading left room for exactly this much
    return staged


def publish_socket(staging: Path, path: Path, logger: logging.Logger) -> SocketIdentity:
    """Hard-links the bound socket to its configured path; returns the identity of what was published.

    The link fails rather than replace a socket that appeared meanwhile, and the file appears with
    its final mode and group at once.
    """
    try:
        claim_socket_path(path, logger)  # again: the HSM login since the first look took a while
        try:
            os.link(staging, path)
        except FileExistsError:
            raise SocketInUse(f"another process created {path} while p11kms was starting; stop it "
                              "first or choose another Socket") from None
        published = os.lstat(path)
    finally:
        staging.unlink(missing_ok=True)
    return published.st_dev, published.st_ino


def remove_own_socket(path: Path, identity: SocketIdentity | None, logger: logging.Logger) -> None:
    """Unlinks the socket file only if it is still the one this process published."""
    if identity is None:
        return
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if (info.st_dev, info.st_ino) == identity:
        path.unlink(missing_ok=True)
        return
    log_event(logger, logging.WARNING, "the socket path now holds another file; left in place", socket=str(path))


STARTING, SERVING, STOPPING = "starting", "serving", "stopping"
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}  # their handlers mark STOPPING (install_signal_handlers)


@dataclass(frozen=True)
class LockHolder:
    """What the process holding a socket lock wrote into the lock file."""

    pid: int | None
    state: str

    @classmethod
    def read(cls, path: Path) -> LockHolder:
        try:
            fields = dict(part.split("=", 1) for part in path.read_text().split() if "=" in part)
        except OSError:
            fields = {}
        pid = fields.get("pid", "")
        return cls(int(pid) if pid.isdigit() else None, fields.get("state", ""))

    def describe(self) -> str:
        return f"pid {self.pid}" if self.pid is not None else "a process that has not written its pid yet"


class SocketLock:
    """An exclusive flock on ``<socket>.lock``, held from the first look at the socket until exit.

    Looking at the socket path cannot tell two plugins started together apart: both see no
    socket, and the HSM login lies between that look and the bind. The lock decides first. The
    kernel drops it when the process dies, so a crash never leaves it held; the file stays,
    because removing it would let one process lock the old file while another locks a new one.
    The holder writes its pid and state into the file, for the message a second instance gives
    and so that a successor started during a graceful stop waits for it instead of failing.
    """

    # Fixed width: a rewrite never leaves a shorter record with the tail of the previous one.
    _RECORD = "pid={pid:<10} state={state:<10}\n"

    def __init__(self, socket_path: Path) -> None:
        self.socket = socket_path
        self.path = socket_path.with_name(socket_path.name + ".lock")
        self._fd: int | None = None
        self._state = ""
        self._marking = threading.Lock()

    def acquire(self, patience: float, logger: logging.Logger) -> None:
        """Takes the lock, or raises SocketInUse at once; a holder that is stopping gets ``patience`` s."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self._wait_for(fd, time.monotonic() + patience, patience, logger)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.mark(STARTING)

    def _wait_for(self, fd: int, give_up_at: float, patience: float, logger: logging.Logger) -> None:
        unnamed_until = time.monotonic() + 1.0  # a holder writes its pid right after it locks
        announced: int | None = None
        while not _try_lock(fd):
            holder = LockHolder.read(self.path)
            now = time.monotonic()
            if holder.pid is None and now < unnamed_until:
                time.sleep(0.02)
                continue
            if holder.state != STOPPING:
                raise SocketInUse(f"another p11kms ({holder.describe()}) is already serving on {self.socket} "
                                  f"and holds {self.path}; stop it first or choose another Socket")
            if now >= give_up_at:
                raise SocketInUse(f"p11kms {holder.describe()} is still stopping after {patience:.0f}s and holds "
                                  f"{self.path}; wait until it has exited, then start again")
            if announced != holder.pid:
                announced = holder.pid
                log_event(logger, logging.INFO, f"waiting for {holder.describe()} to finish stopping",
                          socket=str(self.socket))
            time.sleep(0.05)

    def mark(self, state: str) -> None:
        """Records this process's state in the lock file (a no-op unless the lock is held).

        Stopping is final: a SIGTERM during start must not be overwritten by the start finishing. The
        SIGTERM handler marks STOPPING on the main thread, possibly in the middle of a mark there, so
        the stop signals wait while one is written (their handlers run once it is done); a stuck-call
        exit marks from another thread, hence the lock.
        """
        if self._fd is None:
            return
        blocked = _STOP_SIGNALS if threading.current_thread() is threading.main_thread() else set()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            with self._marking:
                if self._state == STOPPING:
                    return
                self._state = state
                record = self._RECORD.format(pid=os.getpid(), state=state).encode()
                os.pwrite(self._fd, record, 0)
                os.ftruncate(self._fd, len(record))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


_STOP_ALLOWANCE = 10.0  # seconds beyond Shutdown_Grace a stopping predecessor may take to log out and exit


_Call = tuple["futures.Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any], bool]
# What the handler pools know about the call the current thread runs (a thread-local, not a
# ContextVar: grpcio runs each handler inside a copied context).
_running = threading.local()


def handed_over_after_stop() -> bool:
    """Whether the call this thread runs reached the handler pool after the stop began waiting for calls."""
    return bool(getattr(_running, "handed_over_after_stop", False))


class CallExecutor(futures.ThreadPoolExecutor):
    """The thread pool gRPC runs handlers on: it starts small, can grow and shrink back, and a stop can wait
    for its calls.

    Growing and shrinking: see WorkerSizer. ThreadPoolExecutor cannot grow later: it starts a thread
    only while its count of finished calls, which it takes for idle threads, is zero, and under load
    that count only rises. So threads, queue and accounting here are this class's own; it subclasses
    ThreadPoolExecutor only because grpcio takes a per-method pool (Status) only of that class. A
    thread leaves when it takes a ``None`` from the queue: shrinking queues one for each surplus idle
    thread, a shutdown one for every thread.

    Stopping: a stop waits for the calls handed over before it, queued ones included, before it
    lets gRPC close the connections: grpcio closes a connection in the same instant as its last
    call ends, and a client that happens to write on it then (an HTTP/2 ping or window update)
    loses the answer it had not read yet (UNAVAILABLE "Stream removed"). Calls handed over once
    the wait began are not waited for: the service refuses them in microseconds, and a steady
    stream of them must not hold the stop up until Shutdown_Grace.
    """

    def __init__(self, max_workers: int, thread_name_prefix: str, start_workers: int | None = None) -> None:
        super().__init__(max_workers=1)  # starts nothing; see the class comment
        self.ceiling = max_workers
        self._name = thread_name_prefix
        self._allowed = min(start_workers or max_workers, max_workers)
        self.least = self._allowed  # shrinking stops here
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Condition(threading.Lock())
        self._workers: list[threading.Thread] = []
        self._numbers = itertools.count()  # thread names stay unique as threads come and go
        self._idle_threads = 0  # threads not running a call, those about to leave included
        self._leaving = 0  # threads told to leave (a None is queued for each) that have not taken it yet
        self._calls_peak = 0  # most calls held at once (running or queued) since the last look
        self._queued = 0  # calls handed over that no thread has taken yet
        self._unfinished = 0
        self._waiting = False
        self._backlog = False
        self._closed = False

    @property
    def workers_allowed(self) -> int:
        return self._allowed

    @property
    def threads(self) -> int:
        return len(self._workers)

    def allow_more_workers(self) -> int:
        """Doubles the threads the pool may run, up to its ceiling, and starts them; returns the allowance."""
        with self._lock:
            self._allowed = min(self.ceiling, 2 * self._allowed)
            while self._staying() < self._allowed and not self._closed and self._start_thread():
                pass
            return self._allowed

    def allow_fewer_workers(self) -> int:
        """Halves the allowance, never below where the pool started, and lets surplus idle threads go (a
        running call is never cut short: busy surplus threads leave when their call ends); returns the
        allowance."""
        with self._lock:
            self._allowed = max(self.least, self._allowed // 2)
            # Queued calls come before the Nones: the threads that will take them are not surplus.
            surplus = min(self._staying() - self._allowed, self._free_threads() - self._queued)
            for _ in range(max(0, surplus)):
                self._leaving += 1
                self._calls.put(None)
            return self._allowed

    def backlog_seen(self) -> bool:
        """Whether a call had to queue for a thread since the last look, or one is queued now."""
        with self._lock:
            seen = self._backlog or self._queued > self._free_threads()
            self._backlog = False
            return seen

    def most_calls_since_last_look(self) -> int:
        """The most calls the pool held at once since the last look, running or queued (those held now
        included): the threads the load asked for."""
        with self._lock:
            held_now = self._held_calls()
            most, self._calls_peak = max(self._calls_peak, held_now), held_now
            return most

    def _held_calls(self) -> int:
        return len(self._workers) - self._idle_threads + self._queued

    def _staying(self) -> int:
        return len(self._workers) - self._leaving

    def _free_threads(self) -> int:
        """Idle threads that will take a call: those told to leave take their None first."""
        return self._idle_threads - self._leaving

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> futures.Future[_T]:
        future: futures.Future[_T] = futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the handler pool is shut down")
            counted = not self._waiting
            self._unfinished += counted
            self._queued += 1
            self._calls_peak = max(self._calls_peak, self._held_calls())
            no_free_thread = self._queued > self._free_threads()
            if no_free_thread and (self._staying() >= self._allowed or not self._start_thread()):
                self._backlog = True
            if not self._workers:  # no thread could be started at all: nobody would ever take the call
                self._queued -= 1
                self._unfinished -= counted
                raise RuntimeError("the handler pool could not start a thread")
        self._calls.put((future, fn, args, kwargs, counted))
        return future

    def _start_thread(self) -> bool:
        """Starts one more thread; False when the system refuses one (the call then waits for a running one)."""
        # Daemon: a thread stuck in a hung HSM call must not keep the process from exiting.
        thread = threading.Thread(target=self._work, name=f"{self._name}_{next(self._numbers)}", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # "can't start new thread": a process or memory limit
            return False
        self._workers.append(thread)
        self._idle_threads += 1  # free from now on: it takes the next queued call
        return True

    def _work(self) -> None:
        while True:
            call = self._calls.get()
            with self._lock:
                self._idle_threads -= 1
                if call is None:  # told to leave: the pool shrinks or shuts down
                    self._leaving -= 1
                    self._workers.remove(threading.current_thread())
                    return
                self._queued -= 1
            future, fn, args, kwargs, counted = call
            _running.handed_over_after_stop = not counted
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        result = fn(*args, **kwargs)
                    except BaseException as exc:  # handed to the future, as ThreadPoolExecutor does
                        future.set_exception(exc)
                    else:
                        future.set_result(result)
            finally:
                leave = self._done(counted)
            del call, future, fn, args, kwargs  # drop references before waiting for the next call
            if leave:
                return

    def _done(self, counted: bool) -> bool:
        """Counts a finished call out; True when the calling thread is one more than the allowance and leaves
        (a shrink lets only idle threads go at once; those busy then leave here)."""
        with self._lock:
            if counted:
                self._unfinished -= 1
                if self._unfinished == 0:
                    self._lock.notify_all()
            if self._staying() > self._allowed and not self._closed:
                self._workers.remove(threading.current_thread())
                return True
            self._idle_threads += 1
            return False

    def finish_accepted_calls(self, timeout: float) -> bool:
        """Waits until every call handed over before this call has finished; False after ``timeout`` s."""
        with self._lock:
            self._waiting = True
            return self._lock.wait_for(lambda: self._unfinished == 0, timeout)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            threads = list(self._workers)
            self._leaving += len(threads)
        for _ in threads:
            self._calls.put(None)
        if wait:
            for thread in threads:
                thread.join()


@dataclass
class GrpcServing:
    """A gRPC server and the pools its handlers run on (see ``grpc_serving``)."""

    server: grpc.Server
    calls: CallExecutor
    status: CallExecutor

    def finish_accepted_calls(self, timeout: float) -> bool:
        """True once every call accepted so far has finished; False if ``timeout`` s passed first."""
        give_up_at = time.monotonic() + timeout
        return all(pool.finish_accepted_calls(max(0.0, give_up_at - time.monotonic()))
                   for pool in (self.calls, self.status))


class _StatusOnItsOwnThread:
    """What the generated registration helper sees: the servicer, with Status routed to its own pool.

    grpcio runs a method on the pool named by its handler's ``experimental_thread_pool``; a grpcio
    that ignores the attribute runs Status on the shared pool, which is only slower.
    """

    def __init__(self, servicer: api_pb2_grpc.KeyManagementServiceServicer, status_pool: CallExecutor) -> None:
        self.Encrypt = servicer.Encrypt
        self.Decrypt = servicer.Decrypt
        answer_status: Callable[[Any, grpc.ServicerContext], Any] = servicer.Status

        def status(request: Any, context: grpc.ServicerContext) -> Any:
            return answer_status(request, context)

        status.experimental_thread_pool = status_pool  # type: ignore[attr-defined]
        self.Status = status


def grpc_serving(servicer: api_pb2_grpc.KeyManagementServiceServicer, sessions: int,
                 max_calls: int) -> GrpcServing:
    """A gRPC server serving ``servicer`` that holds at most ``max_calls`` calls at once (beyond: RESOURCE_EXHAUSTED).

    The handler pool starts with START_WORKERS threads and may grow to two per HSM session
    (WorkerSizer decides): every thread beyond what keeps the HSM busy only fights over the GIL
    (measured on SoftHSM2 at 16 callers: 2 threads cost 400-565 µs of CPU per call, 16 threads
    620-750 µs), while a network HSM needs as many threads as operations it should have in flight.
    Held calls beyond the workers wait in the executor's queue, and when one gets a thread,
    HsmAdmission refuses it at once if its deadline can no longer be met, so the HSM does no work
    for a caller that gave up. The bound caps threads and memory. Status has a thread of its own:
    kube-apiserver's health check must not queue behind Decrypts.
    """
    calls = CallExecutor(min(max_calls, 2 * sessions), "kms", start_workers=START_WORKERS)
    status = CallExecutor(1, "kms-status")
    server = grpc.server(calls, maximum_concurrent_rpcs=max_calls,
                         options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                  ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    # The generated registration helper carries no annotations.
    api_pb2_grpc.add_KeyManagementServiceServicer_to_server(  # type: ignore[no-untyped-call]
        _StatusOnItsOwnThread(servicer, status), server)
    return GrpcServing(server, calls, status)


class WorkerSizer:
    """Grows the handler pool while calls keep queueing and the process has CPU to spare; shrinks it back
    when for 30 s the pool never held more calls at once than half its threads.

    Calls that queue while the process is far from one core busy are waiting for threads that
    themselves wait on the HSM: more threads put more operations in flight. Calls that queue while
    the process is busy wait for the GIL, which more threads would only share more ways. Both
    must hold for two looks in a row (0.2 s), so that a burst at the edge of a quiet period
    does not count. The allowance doubles each time.

    Threads the load no longer needs are let go, or a pool grown for one slow spell of the HSM would
    make every later call dearer until a restart (more threads, more GIL hand-offs). The rule looks
    only at how many calls the pool held (running or queued), never at CPU: under a steady load on a
    slow HSM every thread is busy, so nothing shrinks, and a pool shrunk in a quiet spell grows again
    within a second.
    If other processes starve p11kms of CPU it may grow when it should not; it shrinks back once
    the load falls.
    """

    SPARE_CPU = 0.8  # cores: below this, the GIL is not what the queued calls wait for
    LOOK_SECONDS = 0.1
    SHRINK_AFTER_SECONDS = 30.0  # never more calls than half the threads for this long: halve the pool

    def __init__(self, pool: CallExecutor, logger: logging.Logger,
                 process_cpu: Callable[[], float] = time.process_time,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._pool = pool
        self._log = logger
        self._process_cpu = process_cpu
        self._clock = clock
        self._looked_at, self._cpu_then = clock(), process_cpu()
        self._wanted_before = False
        self._quiet_since = self._looked_at  # since when the pool held at most half its allowance in calls
        self._quiet_peak = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="worker-sizer")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(self.LOOK_SECONDS):
            self.look()

    def look(self) -> None:
        now, cpu = self._clock(), self._process_cpu()
        busy = (cpu - self._cpu_then) / max(now - self._looked_at, 1e-3)
        self._looked_at, self._cpu_then = now, cpu
        most_calls = self._pool.most_calls_since_last_look()
        wanted = self._pool.backlog_seen() and busy < self.SPARE_CPU
        grow, self._wanted_before = wanted and self._wanted_before, wanted
        if grow and self._pool.workers_allowed < self._pool.ceiling:
            self._grow(busy)
        else:
            self._shrink_if_quiet(now, most_calls)

    def _grow(self, busy: float) -> None:
        self._wanted_before = False  # the next step is judged on the new allowance alone
        allowed = self._pool.allow_more_workers()
        self._quiet_since, self._quiet_peak = self._looked_at, 0
        log_event(self._log, logging.INFO, "more handler threads: calls kept queueing while the process had CPU "
                  "to spare, so the HSM's answer time is the bound", threads=allowed, ceiling=self._pool.ceiling,
                  process_cpu=f"{busy:.2f}")

    def _shrink_if_quiet(self, now: float, most_calls: int) -> None:
        allowed = self._pool.workers_allowed
        if most_calls > allowed // 2 or allowed <= self._pool.least:
            self._quiet_since, self._quiet_peak = now, 0
            return
        self._quiet_peak = max(self._quiet_peak, most_calls)
        if now - self._quiet_since < self.SHRINK_AFTER_SECONDS:
            return
        fewer = self._pool.allow_fewer_workers()
        log_event(self._log, logging.INFO, f"fewer handler threads: for {self.SHRINK_AFTER_SECONDS:.0f} s the "
                  f"{allowed} threads never had more than {self._quiet_peak} calls at once", threads=fewer,
                  least=self._pool.least)
        self._quiet_since, self._quiet_peak = now, 0


class Plugin:
    """A running plugin: token, keyring, health and the gRPC server."""

    def __init__(self, config: PluginConfig, logger: logging.Logger) -> None:
        self.config = config
        self.log = logger
        self.metrics = Metrics()
        self.health = CachedHealth(lambda: self.keys.run(Keyring.self_test), config.health_interval)
        self.keys = KeyringSupervisor(config, logger, on_ready=self.health.invalidate, observer=self.metrics,
                                      hsm_observer=self.metrics, on_stuck=self._exit_for_restart)
        self.http: PluginHttpServer | None = None
        self._wake = threading.Event()
        self._stop_requested = False
        self._reload_requested = False
        self.failure: str | None = None  # why the plugin stops by itself, to exit non-zero for a restart
        self.serving: GrpcServing | None = None
        self.service: KmsService | None = None
        self.sizer: WorkerSizer | None = None
        self.lock = SocketLock(config.socket)
        self._socket_identity: SocketIdentity | None = None
        # The config generation (a short SHA-256 of the file) serving now, and the newest one rejected.
        self.config_generation = file_generation(config.path)
        self.config_rejected: tuple[str | None, str] | None = None  # (generation, reason)
        self.watch = ConfigWatch(config.path, self.config_generation)
        self.metrics.config_reload(succeeded=True)

    def healthz(self) -> str:
        """The Status healthz: the supervisor's cause at once while the HSM is down, else the cached probe."""
        return self.keys.unready_reason() or self.health.status()

    def start(self) -> None:
        created = prepare_socket_directory(self.config)
        if created is not None:
            log_event(self.log, logging.INFO, "created the socket directory", directory=str(created))
        # A predecessor still finishing its calls after SIGTERM is waited for; its grace is most likely ours.
        self.lock.acquire(patience=self.config.shutdown_grace + _STOP_ALLOWANCE, logger=self.log)
        for warning in pin_source_warnings(self.config):
            log_event(self.log, logging.WARNING, warning)
        claim_socket_path(self.config.socket, self.log)
        self._start_http()  # first: a port conflict must stop the start before anything else is claimed
        self.keys.start()
        if self.keys.unready_reason() is None:
            self.health.wait_for_first_answer(FIRST_HEALTH_ANSWER_SECONDS)
        self.service = KmsService(self.keys, self.healthz, self.log, self.metrics,
                                  admission=HsmAdmission(self.config.sessions))
        self.serving = grpc_serving(self.service, self.config.sessions, self.config.max_calls)
        self.sizer = WorkerSizer(self.serving.calls, self.log)
        self.sizer.start()
        staging = staging_path(self.config.socket)
        _bind(self.serving.server, self.config, staging)
        self.serving.server.start()
        self._socket_identity = publish_socket(staging, self.config.socket, self.log)
        self.lock.mark(SERVING)
        log_event(self.log, logging.INFO, "serving KMS v2", socket=str(self.config.socket),
                  key_id=self.keys.key_id, hsm=self.keys.state.value, sessions=self.config.sessions, **build_info())

    def _start_http(self) -> None:
        if self.config.http_address is None:
            return
        source = ProbeSource(serving=lambda: self.serving is not None and not self._stop_requested,
                             healthz=self.healthz, details=self._details, metrics=self.metrics.exposition)
        try:
            self.http = PluginHttpServer(self.config.http_address, source)
        except OSError as exc:
            host, port = self.config.http_address
            raise SocketInUse(f"cannot listen on HTTP_Address {host}:{port}: {exc.strerror}; choose a free "
                              f"port or set HTTP_Address = off ({self.config.where('http_address')})") from exc
        self.http.start()
        log_event(self.log, logging.INFO, "http listening for /metrics /livez /readyz /healthz",
                  address=self.http.address)

    def _details(self) -> dict[str, object]:
        keyring = self.keys.current_keyring()
        keys: list[dict[str, object]] = []
        if keyring is not None:
            keys = [{"role": k.role.value, "label": k.label, "uuid": k.uuid, "state": "loaded"} for k in keyring.keys]
            for entry, kek in zip(keys, keyring.keys, strict=True):
                if kek.policy_warnings:
                    entry["policy_warnings"] = list(kek.policy_warnings)
            keys += [{"role": m.role.value, "label": m.label, "uuid": m.uuid, "state": "missing from the hsm"}
                     for m in keyring.missing]
        config: dict[str, object] = {"path": str(self.config.path), "generation": self.config_generation,
                                     "reload_failed": self.config_rejected is not None}
        if self.config_rejected is not None:
            config["rejected_generation"], config["error"] = self.config_rejected
        return {"hsm": self.keys.state.value, "key_id": self.keys.key_id, "keys": keys, "config": config}

    def request_stop(self) -> None:
        self._stop_requested = True
        self.lock.mark(STOPPING)  # at once: a successor started right after SIGTERM waits instead of failing
        self._wake.set()

    def _exit_for_restart(self, reason: str) -> None:
        """Stops the plugin so that its process exits with status 1 and kubelet or systemd starts a new one."""
        self.failure = reason
        self.request_stop()

    def request_reload(self) -> None:
        self._reload_requested = True
        self._wake.set()

    def run_until_stopped(self) -> None:
        """Runs reloads on the main thread (never inside a signal handler) until a stop is requested."""
        while not self._stop_requested:
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            if self._stop_requested:
                break
            if self._reload_requested:
                self._reload_requested = False
                self.reload("SIGHUP")
            elif self.watch.poll() is not None:
                self.reload("config file changed")
        self.stop()

    def reload(self, trigger: str = "SIGHUP") -> None:
        """Re-reads the config and swaps in the new keyring; on any error the old keyring stays.

        Calls in flight keep the keyring they took (the supervisor hands each call one keyring),
        so a reload never fails a call. The generation is taken before the file is parsed: if the
        file changes in between, the watch sees a generation other than the one recorded and
        reloads once more.
        """
        generation = file_generation(self.config.path)
        self.watch.settle(generation)
        try:
            config = load_config(self.config.path)
            keyring = self.keys.reload(config)
        except (ConfigError, HsmError, KeyringError) as exc:
            self.metrics.reload(succeeded=False)
            self.config_rejected = (generation, str(exc))
            log_event(self.log, logging.ERROR, "reload failed; still serving the previous keyring",
                      trigger=trigger, error=str(exc), key_id=self.keys.key_id, rejected_generation=generation,
                      serving_generation=self.config_generation)
            return
        self.metrics.reload(succeeded=True)
        self.config_generation, self.config_rejected = generation, None
        ignored = restart_only_changes(self.config, config)
        if ignored:
            log_event(self.log, logging.WARNING, "reload ignores settings that need a restart; they keep their "
                      "running values until the plugin is restarted", settings=",".join(ignored))
        self.config = adopt_reloadable(self.config, config)
        self.health.invalidate()
        self.log.setLevel(self.config.log_level.upper())
        if keyring is None:
            log_event(self.log, logging.WARNING, "reload noted; the hsm is down, the new keys apply on reconnect")
            return
        log_keyring(self.log, keyring, "keyring reloaded")
        log_event(self.log, logging.INFO, "config reloaded", trigger=trigger, generation=generation,
                  key_id=keyring.key_id)

    def stop(self) -> None:
        log_event(self.log, logging.INFO, "stopping; finishing in-flight calls",
                  grace_seconds=self.config.shutdown_grace, reason=self.failure or "SIGTERM or SIGINT")
        if self.sizer is not None:
            self.sizer.stop()
        if self.serving is not None and self.service is not None:
            self._finish_calls(self.serving, self.service)
        if self.http is not None:
            self.http.stop()
        remove_own_socket(self.config.socket, self._socket_identity, self.log)
        self.health.stop()
        self.keys.stop()
        log_event(self.log, logging.INFO, "stopped")

    def _finish_calls(self, serving: GrpcServing, service: KmsService) -> None:
        """Answers every call already accepted within Shutdown_Grace, refusing new ones, and only then
        lets gRPC close the connections (see CallExecutor); calls still running after the grace are
        cancelled."""
        give_up_at = time.monotonic() + self.config.shutdown_grace
        service.refuse_new_calls(handed_over_after_stop)
        if serving.finish_accepted_calls(self.config.shutdown_grace):
            time.sleep(min(ANSWER_DELIVERY_SECONDS, max(0.0, give_up_at - time.monotonic())))
        serving.server.stop(max(0.0, give_up_at - time.monotonic())).wait()


def install_signal_handlers(plugin: Plugin) -> None:
    signal.signal(signal.SIGTERM, lambda _s, _f: plugin.request_stop())
    signal.signal(signal.SIGINT, lambda _s, _f: plugin.request_stop())
    signal.signal(signal.SIGHUP, lambda _s, _f: plugin.request_reload())
    # Every thread's stack to stderr (the log) on demand: shows which PKCS#11 call a hung HSM holds a
    # request in. faulthandler writes from its C handler, so it answers even while the GIL is held.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
