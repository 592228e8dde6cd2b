"""Shared test helpers: a real SoftHSM2 token and real plugin processes on real Unix sockets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from p11kms.client import KmsClient

USER_PIN = "test-user-pin-7391"
SO_PIN = "test-so-pin-2204"
TOKEN_LABEL = "p11kms-test"


def unique_label(prefix: str = "kek") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class HsmEnv:
    """Where the test token lives and how a plugin process reaches it."""

    directory: Path
    module: str
    softhsm_conf: Path
    pin_file: Path

    def process_env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["SOFTHSM2_CONF"] = str(self.softhsm_conf)
        env.update(extra)
        return env

    def write_config(self, path: Path, primary: str, secondary: str = "", **attributes: str) -> Path:
        lines = [
            f"Primary_key = {primary}",
            f"PKCS11_Module = {self.module}",
            f"Token_Label = {TOKEN_LABEL}",
            f"PIN_File = {self.pin_file}",
            f"Socket = {path.parent / 'kms.sock'}",
            "Health_Interval = 1",
        ]
        if secondary:
            lines.append(f"Secondary_key = {secondary}")
        lines += [f"{name} = {value}" for name, value in attributes.items()]
        path.write_text("\n".join(lines) + "\n")
        return path


@dataclass
class PluginProcess:
    """A ``p11kms serve`` OS process and the socket it serves on."""

    proc: subprocess.Popen[bytes]
    socket: Path
    log_path: Path
    clients: list[KmsClient] = field(default_factory=list)

    def client(self, timeout: float = 3.0) -> KmsClient:
        client = KmsClient(self.socket, timeout)
        self.clients.append(client)
        return client

    def log(self) -> str:
        return self.log_path.read_text()

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 20.0) -> int:
        for client in self.clients:
            client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def start_plugin(env: HsmEnv, config: Path, *, wait: bool = True, cwd: Path | None = None,
                 args: list[str] | None = None) -> PluginProcess:
    socket_path = _configured_socket(config)
    log_path = config.parent / f"plugin-{uuid.uuid4().hex[:6]}.log"
    command = [sys.executable, "-m", "p11kms", "serve", *(args or ["--config", str(config)])]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env.process_env(),
                                cwd=cwd)
    plugin = PluginProcess(proc, socket_path, log_path)
    if wait:
        wait_until_serving(plugin)
    return plugin


def _configured_socket(config: Path) -> Path:
    for line in config.read_text().splitlines():
        name, _, value = line.partition("=")
        if name.strip().lower() == "socket":
            return config.parent / value.strip()  # relative paths are relative to the config file
    raise AssertionError(f"no Socket in {config}")


def wait_until_serving(plugin: PluginProcess, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    last: grpc.RpcError | None = None
    while time.monotonic() < end:
        if plugin.proc.poll() is not None:
            raise AssertionError(f"plugin exited with {plugin.proc.returncode}:\n{plugin.log()}")
        if plugin.socket.exists():
            try:
                with KmsClient(plugin.socket, 1.0) as client:
                    client.status()
                return
            except grpc.RpcError as exc:
                last = exc
        time.sleep(0.05)
    raise AssertionError(f"plugin did not serve within {deadline}s (last error {last}):\n{plugin.log()}")
