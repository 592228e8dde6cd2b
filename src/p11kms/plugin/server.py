"""Server lifecycle: open the HSM, claim the socket, serve, reload on SIGHUP, stop on SIGTERM."""

from __future__ import annotations

import grp
import logging
import os
import signal
import socket
import stat
import threading
from concurrent import futures
from pathlib import Path

import grpc

from p11kms.config import ConfigError, PluginConfig, load_config, pin_source_warnings
from p11kms.hsm.errors import HsmError
from p11kms.kmsv2 import api_pb2_grpc
from p11kms.observability import log_event
from p11kms.plugin.health import CachedHealth
from p11kms.plugin.httpserver import PluginHttpServer, ProbeSource
from p11kms.plugin.keyring import Keyring, KeyringError
from p11kms.plugin.metrics import Metrics
from p11kms.plugin.service import KmsService
from p11kms.plugin.supervisor import KeyringSupervisor, log_keyring

# Settings read once at start; the rest (the key labels, log level) follow a SIGHUP reload.
_RESTART_ONLY = ("module", "token_label", "token_serial", "slot", "pin_file", "pin_env", "socket",
                 "socket_mode", "socket_group", "sessions", "health_interval", "log_format", "http_address")


class SocketInUse(Exception):
    """The socket path is served by a live process or is not a socket at all."""


def claim_socket_path(path: Path, logger: logging.Logger) -> None:
    """Removes a stale socket left by a crash; refuses a live one or a file that is not a socket."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
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


def _bind(server: grpc.Server, config: PluginConfig) -> None:
    # The socket must never exist with looser permissions than configured, not even briefly.
    previous = os.umask(0o177)
    try:
        if server.add_insecure_port(f"unix:{config.socket}") == 0:
            raise SocketInUse(f"cannot listen on {config.socket}")
    finally:
        os.umask(previous)
    if config.socket_group is not None:
        group = config.socket_group
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        os.chown(config.socket, -1, gid)
    os.chmod(config.socket, config.socket_mode)


class Plugin:
    """A running plugin: token, keyring, health and the gRPC server."""

    def __init__(self, config: PluginConfig, logger: logging.Logger) -> None:
        self.config = config
        self.log = logger
        self.metrics = Metrics()
        self.health = CachedHealth(lambda: self.keys.run(Keyring.self_test), config.health_interval)
        self.keys = KeyringSupervisor(config, logger, on_ready=self.health.invalidate, observer=self.metrics,
                                      hsm_observer=self.metrics)
        self.http: PluginHttpServer | None = None
        self._wake = threading.Event()
        self._stop_requested = False
        self._reload_requested = False
        self.server: grpc.Server | None = None

    def healthz(self) -> str:
        """The Status healthz: the supervisor's cause at once while the HSM is down, else the cached probe."""
        return self.keys.unready_reason() or self.health.status()

    def start(self) -> None:
        for warning in pin_source_warnings(self.config):
            log_event(self.log, logging.WARNING, warning)
        claim_socket_path(self.config.socket, self.log)
        self._start_http()  # first: a port conflict must stop the start before anything else is claimed
        self.keys.start()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.config.sessions * 2,
                                                             thread_name_prefix="kms"))
        service = KmsService(self.keys, self.healthz, self.log, self.metrics)
        # The generated registration helper carries no annotations.
        api_pb2_grpc.add_KeyManagementServiceServicer_to_server(service, self.server)  # type: ignore[no-untyped-call]
        _bind(self.server, self.config)
        self.server.start()
        log_event(self.log, logging.INFO, "serving KMS v2", socket=str(self.config.socket),
                  key_id=self.keys.key_id, hsm=self.keys.state.value, sessions=self.config.sessions)

    def _start_http(self) -> None:
        if self.config.http_address is None:
            return
        source = ProbeSource(serving=lambda: self.server is not None and not self._stop_requested,
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
        keys = [{"role": k.role.value, "label": k.label, "uuid": k.uuid} for k in keyring.keys] if keyring else []
        return {"hsm": self.keys.state.value, "key_id": self.keys.key_id, "keys": keys}

    def request_stop(self) -> None:
        self._stop_requested = True
        self._wake.set()

    def request_reload(self) -> None:
        self._reload_requested = True
        self._wake.set()

    def run_until_stopped(self) -> None:
        """Runs reloads on the main thread (never inside a signal handler) until a stop is requested."""
        while not self._stop_requested:
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            if self._reload_requested and not self._stop_requested:
                self._reload_requested = False
                self.reload()
        self.stop()

    def reload(self) -> None:
        """Re-reads the config and swaps in the new keyring; on any error the old keyring stays."""
        try:
            config = load_config(self.config.path)
            keyring = self.keys.reload(config)
        except (ConfigError, HsmError, KeyringError) as exc:
            self.metrics.reload(succeeded=False)
            log_event(self.log, logging.ERROR, "reload failed; still serving the previous keyring",
                      error=str(exc), key_id=self.keys.key_id)
            return
        self.metrics.reload(succeeded=True)
        ignored = [name for name in _RESTART_ONLY if getattr(config, name) != getattr(self.config, name)]
        if ignored:
            log_event(self.log, logging.WARNING, "reload ignores settings that need a restart",
                      settings=",".join(ignored))
        self.health.invalidate()
        self.log.setLevel(config.log_level.upper())
        if keyring is None:
            log_event(self.log, logging.WARNING, "reload noted; the hsm is down, the new keys apply on reconnect")
            return
        log_keyring(self.log, keyring, "keyring reloaded")

    def stop(self) -> None:
        log_event(self.log, logging.INFO, "stopping; finishing in-flight calls",
                  grace_seconds=self.config.shutdown_grace)
        if self.server is not None:
            self.server.stop(self.config.shutdown_grace).wait()
        if self.http is not None:
            self.http.stop()
        self.config.socket.unlink(missing_ok=True)
        self.keys.stop()
        log_event(self.log, logging.INFO, "stopped")


def install_signal_handlers(plugin: Plugin) -> None:
    signal.signal(signal.SIGTERM, lambda _s, _f: plugin.request_stop())
    signal.signal(signal.SIGINT, lambda _s, _f: plugin.request_stop())
    signal.signal(signal.SIGHUP, lambda _s, _f: plugin.request_reload())
