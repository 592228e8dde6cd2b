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

from p11kms.config import ConfigError, PluginConfig, load_config, read_pin
from p11kms.health import CachedHealth
from p11kms.hsm.errors import HsmError
from p11kms.hsm.module import load_module
from p11kms.hsm.token import Token, open_token
from p11kms.keyring import Keyring, KeyringError, build_keyring
from p11kms.kmsv2 import api_pb2_grpc
from p11kms.observability import log_event
from p11kms.service import KmsService

# Settings read once at start; the rest (the key labels, log level) follow a SIGHUP reload.
_RESTART_ONLY = ("module", "token_label", "token_serial", "slot", "pin_file", "pin_env", "socket",
                 "socket_mode", "socket_group", "sessions", "health_interval", "log_format")


class SocketInUse(Exception):
    """The socket path is served by a live process or is not a socket at all."""


def open_configured_token(config: PluginConfig) -> Token:
    module = load_module(config.module)
    info = module.find_token(label=config.token_label, serial=config.token_serial, slot=config.slot)
    return open_token(module, info, read_pin(config), config.sessions)


def log_keyring(logger: logging.Logger, keyring: Keyring, event: str) -> None:
    """One line per key with role, label and UUID: the rotation procedure reads the key UUID here."""
    for kek in keyring.keys:
        log_event(logger, logging.INFO, f"{event}: key", role=kek.role.value, label=kek.label,
                  uuid=kek.uuid, uuid_source=kek.uuid_source)


class KeyringHolder:
    """The current keyring; a reload swaps it atomically while requests keep flowing."""

    def __init__(self, keyring: Keyring) -> None:
        self._keyring = keyring

    def current(self) -> Keyring:
        return self._keyring

    def replace(self, keyring: Keyring) -> None:
        self._keyring = keyring


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
        self.token = open_configured_token(config)
        self.keyrings = KeyringHolder(build_keyring(self.token, config.primary_key, config.secondary_keys))
        self.health = CachedHealth(lambda: self.keyrings.current().self_test(), config.health_interval)
        self._wake = threading.Event()
        self._stop_requested = False
        self._reload_requested = False
        self.server: grpc.Server | None = None

    def start(self) -> None:
        claim_socket_path(self.config.socket, self.log)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.config.sessions * 2,
                                                             thread_name_prefix="kms"))
        service = KmsService(self.keyrings.current, self.health.status, self.log)
        # The generated registration helper carries no annotations.
        api_pb2_grpc.add_KeyManagementServiceServicer_to_server(service, self.server)  # type: ignore[no-untyped-call]
        _bind(self.server, self.config)
        self.server.start()
        log_keyring(self.log, self.keyrings.current(), "keyring loaded")
        log_event(self.log, logging.INFO, "serving KMS v2", socket=str(self.config.socket),
                  key_id=self.keyrings.current().key_id, token=self.token.info.label,
                  sessions=self.config.sessions)

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
            keyring = build_keyring(self.token, config.primary_key, config.secondary_keys)
        except (ConfigError, HsmError, KeyringError) as exc:
            log_event(self.log, logging.ERROR, "reload failed; still serving the previous keyring",
                      error=str(exc), key_id=self.keyrings.current().key_id)
            return
        ignored = [name for name in _RESTART_ONLY if getattr(config, name) != getattr(self.config, name)]
        if ignored:
            log_event(self.log, logging.WARNING, "reload ignores settings that need a restart",
                      settings=",".join(ignored))
        self.keyrings.replace(keyring)
        self.health.invalidate()
        self.log.setLevel(config.log_level.upper())
        log_keyring(self.log, keyring, "keyring reloaded")

    def stop(self) -> None:
        log_event(self.log, logging.INFO, "stopping; finishing in-flight calls",
                  grace_seconds=self.config.shutdown_grace)
        if self.server is not None:
            self.server.stop(self.config.shutdown_grace).wait()
        self.config.socket.unlink(missing_ok=True)
        self.token.close()
        log_event(self.log, logging.INFO, "stopped")


def install_signal_handlers(plugin: Plugin) -> None:
    signal.signal(signal.SIGTERM, lambda _s, _f: plugin.request_stop())
    signal.signal(signal.SIGINT, lambda _s, _f: plugin.request_stop())
    signal.signal(signal.SIGHUP, lambda _s, _f: plugin.request_reload())
