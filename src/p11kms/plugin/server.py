"""Server lifecycle: open the HSM, claim the socket (socketowner), serve, reload on SIGHUP, stop on SIGTERM."""

from __future__ import annotations

import faulthandler
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from p11kms.config import (
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
from p11kms.plugin.socketowner import (
    SERVING,
    STOPPING,
    SocketIdentity,
    SocketInUse,
    SocketLock,
    bind_socket,
    claim_socket_path,
    publish_socket,
    remove_own_socket,
    staging_path,
)
from p11kms.plugin.supervisor import KeyringSupervisor, adopt_reloadable, log_keyring, restart_only_changes

FIRST_HEALTH_ANSWER_SECONDS = 5.0  # how long start waits for the first probe, so Status never says "pending"
# After the last call was answered at a stop, how long the connections stay open so that callers
# read their answers before gRPC closes the connections (see HandlerPool).
ANSWER_DELIVERY_SECONDS = 0.1
_STOP_ALLOWANCE = 10.0  # seconds beyond Shutdown_Grace a stopping predecessor may take to log out and exit
_T = TypeVar("_T")

_Call = tuple["futures.Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any], bool]
# What the handler pools know about the call the current thread runs (a thread-local, not a
# ContextVar: grpcio runs each handler inside a copied context).
_running = threading.local()


def handed_over_after_stop() -> bool:
    """Whether the call this thread runs reached the handler pool after the stop began waiting for calls."""
    return bool(getattr(_running, "handed_over_after_stop", False))


class HandlerPool(futures.ThreadPoolExecutor):
    """The threads gRPC runs handlers on: at most ``threads``, each started when a call finds none free;
    calls beyond them wait in a queue, in arrival order.

    A plain ThreadPoolExecutor would do but for two things. Its threads are joined at exit, so a
    call stuck in a wedged PKCS#11 library would keep the process from ever exiting (Stuck_Call_Exit);
    these are daemon threads nobody joins. And a stop must wait for the calls handed over before it,
    queued ones included, before it lets gRPC close the connections: grpcio closes a connection in
    the same instant as its last call ends, and a client that happens to write on it then (an HTTP/2
    ping or window update) loses the answer it had not read yet. Calls handed over once the wait
    began are not waited for: the service refuses them in microseconds, and a steady stream of them
    must not hold the stop up until Shutdown_Grace. It subclasses ThreadPoolExecutor only because
    grpcio takes a per-method pool (Status) only of that class.
    """

    def __init__(self, threads: int, name: str) -> None:
        super().__init__(max_workers=1)  # starts nothing: the threads and the queue are this class's own
        self.size = threads
        self._name = name
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Condition(threading.Lock())
        self._started = 0
        self._free = 0  # threads waiting for a call that no queued call has claimed yet
        self._unclaimed = 0  # queued calls no free or new thread was claimed for: a finishing thread takes them
        self.calls_held = 0  # handed over and not finished, queued or running
        self._accepted = 0  # of those, handed over before a stop began to wait
        self._stopping = False

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> futures.Future[_T]:
        future: futures.Future[_T] = futures.Future()
        with self._lock:
            late = self._stopping
            if self._free:
                self._free -= 1
            elif self._started < self.size and self._start_thread():
                pass
            elif self._started:
                self._unclaimed += 1
            else:  # no thread could be started at all: nobody would ever take the call
                raise RuntimeError("the handler pool could not start a thread")
            self.calls_held += 1
            self._accepted += not late
        self._calls.put((future, fn, args, kwargs, late))
        return future

    def _start_thread(self) -> bool:
        """Starts one more thread for the call being handed over; False when the system refuses one."""
        thread = threading.Thread(target=self._work, name=f"{self._name}_{self._started}", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # "can't start new thread": a process or memory limit
            return False
        self._started += 1
        return True

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args, kwargs, late = call
            _running.handed_over_after_stop = late
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # handed to the future, as ThreadPoolExecutor does
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            with self._lock:
                self.calls_held -= 1
                if not late:
                    self._accepted -= 1
                    if self._accepted == 0:
                        self._lock.notify_all()
                if self._unclaimed:
                    self._unclaimed -= 1
                else:
                    self._free += 1
            del call, future, fn, args, kwargs  # drop references before waiting for the next call

    def finish_accepted_calls(self, timeout: float) -> bool:
        """Waits until every call handed over before this call has finished; False after ``timeout`` s."""
        with self._lock:
            self._stopping = True
            return self._lock.wait_for(lambda: self._accepted == 0, timeout)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            threads, self._started, self._free = self._started, 0, 0
        for _ in range(threads):
            self._calls.put(None)


@dataclass
class GrpcServing:
    """A gRPC server and the pools its handlers run on (see ``grpc_serving``)."""

    server: grpc.Server
    calls: HandlerPool
    status: HandlerPool

    def calls_held(self) -> int:
        return self.calls.calls_held + self.status.calls_held

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

    def __init__(self, servicer: api_pb2_grpc.KeyManagementServiceServicer, status_pool: HandlerPool) -> None:
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

    ``max_calls`` is the one bound on calls in flight; gRPC enforces it as each call arrives. Encrypt
    and Decrypt run on one handler thread per HSM session, so every running call has a session and no
    more threads fight over the GIL than the HSM can keep busy; the others wait in the pool's queue, and
    when one gets a thread, HsmAdmission refuses it at once if its deadline can no longer be met.
    Status has a thread of its own: kube-apiserver's health check must not queue behind Decrypts.
    """
    calls = HandlerPool(sessions, "kms")
    status = HandlerPool(1, "kms-status")
    server = grpc.server(calls, maximum_concurrent_rpcs=max_calls,
                         options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                  ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    # The generated registration helper carries no annotations.
    api_pb2_grpc.add_KeyManagementServiceServicer_to_server(  # type: ignore[no-untyped-call]
        _StatusOnItsOwnThread(servicer, status), server)
    return GrpcServing(server, calls, status)


class Plugin:
    """A running plugin: token, keyring, health and the gRPC server."""

    def __init__(self, config: PluginConfig, logger: logging.Logger) -> None:
        self.config = config
        self.log = logger
        self.metrics = Metrics()
        self.health = CachedHealth(lambda: self.supervisor.run(Keyring.self_test), config.health_interval)
        self.supervisor = KeyringSupervisor(config, logger, on_ready=self.health.invalidate, observer=self.metrics,
                                      hsm_observer=self.metrics, on_stuck=self._exit_for_restart)
        self.http: PluginHttpServer | None = None
        self._wake = threading.Event()
        self._stop_requested = False
        self._reload_requested = False
        self.failure: str | None = None  # why the plugin stops by itself, to exit non-zero for a restart
        self.serving: GrpcServing | None = None
        self.service: KmsService | None = None
        self.socket_lock = SocketLock(config.socket)
        self._socket_identity: SocketIdentity | None = None
        # The config generation (a short SHA-256 of the file) serving now, and the newest one rejected.
        self.config_generation = file_generation(config.path)
        self.config_rejected: tuple[str | None, str] | None = None  # (generation, reason)
        self.watch = ConfigWatch(config.path, self.config_generation)
        self.metrics.config_reload(succeeded=True)

    def healthz(self) -> str:
        """The Status healthz: the supervisor's cause at once while the HSM is down, else the cached probe."""
        return self.supervisor.unready_reason() or self.health.status()

    def start(self) -> None:
        created = prepare_socket_directory(self.config)
        if created is not None:
            log_event(self.log, logging.INFO, "created the socket directory", directory=str(created))
        # A predecessor still finishing its calls after SIGTERM is waited for; its grace is most likely ours.
        self.socket_lock.acquire(patience=self.config.shutdown_grace + _STOP_ALLOWANCE, logger=self.log)
        for warning in pin_source_warnings(self.config):
            log_event(self.log, logging.WARNING, warning)
        claim_socket_path(self.config.socket, self.log)
        self._start_http()  # first: a port conflict must stop the start before anything else is claimed
        self.supervisor.start()
        if self.supervisor.unready_reason() is None:
            self.health.wait_for_first_answer(FIRST_HEALTH_ANSWER_SECONDS)
        self.service = KmsService(self.supervisor, self.healthz, self.log, self.metrics, admission=HsmAdmission())
        self.serving = grpc_serving(self.service, self.config.sessions, self.config.max_calls)
        self.metrics.count_calls_held(self.serving.calls_held)
        staging = staging_path(self.config.socket)
        bind_socket(self.serving.server, self.config, staging)
        self.serving.server.start()
        self._socket_identity = publish_socket(staging, self.config.socket, self.log)
        self.socket_lock.mark(SERVING)
        log_event(self.log, logging.INFO, "serving KMS v2", socket=str(self.config.socket),
                  key_id=self.supervisor.key_id, hsm=self.supervisor.state.value, sessions=self.config.sessions,
                  **build_info())

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
        keyring = self.supervisor.current_keyring()
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
        return {"hsm": self.supervisor.state.value, "key_id": self.supervisor.key_id, "keys": keys, "config": config}

    def request_stop(self) -> None:
        self._stop_requested = True
        self.socket_lock.mark(STOPPING)  # at once: a successor started right after SIGTERM waits instead of failing
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
            keyring = self.supervisor.reload(config)
        except (ConfigError, HsmError, KeyringError) as exc:
            self.metrics.reload(succeeded=False)
            self.config_rejected = (generation, str(exc))
            log_event(self.log, logging.ERROR, "reload failed; still serving the previous keyring",
                      trigger=trigger, error=str(exc), key_id=self.supervisor.key_id, rejected_generation=generation,
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
        if self.serving is not None and self.service is not None:
            self._finish_calls(self.serving, self.service)
        if self.http is not None:
            self.http.stop()
        remove_own_socket(self.config.socket, self._socket_identity, self.log)
        self.health.stop()
        self.supervisor.stop()
        log_event(self.log, logging.INFO, "stopped")

    def _finish_calls(self, serving: GrpcServing, service: KmsService) -> None:
        """Answers every call already accepted within Shutdown_Grace, refusing new ones, and only then
        lets gRPC close the connections (see HandlerPool); calls still running after the grace are
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
