"""Fault drill: for each HSM fault, what the plugin did, how long recovery took, how many calls failed.

One caller thread sends Decrypt calls back to back while a fault is injected (through the p11fault
pass-through module, or by killing a real `p11-kit server`), held for HOLD seconds, and cleared.
Prints one row per fault; docs/reliability.md records a run.

    python bench/faults.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from _env import ROOT, TOKEN, build_fault_module, healthz, make_token, p11kit_client_module, start_plugin, write_config

from p11kms.client import KmsClient

HOLD = 2.0
EVERYTHING = ("C_GetSlotList", "C_GetTokenInfo", "C_OpenSession", "C_Login", "C_FindObjectsInit",
              "C_EncryptInit", "C_DecryptInit")


@dataclass
class Caller:
    """Decrypts one ciphertext in a loop and records every failure with its time and latency."""

    socket: Path
    ciphertext: bytes
    key_id: str
    ok: int = 0
    wrong: int = 0
    failures: list[tuple[float, str, float]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with KmsClient(self.socket) as client:
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    plain = client.decrypt(self.ciphertext, self.key_id)
                except grpc.RpcError as exc:
                    self.failures.append((started, exc.code().name, time.monotonic() - started))
                    time.sleep(0.01)
                    continue
                if plain == b"f" * 32:
                    self.ok += 1
                else:
                    self.wrong += 1


def drill(name: str, socket: Path, inject: object, clear: object) -> str:
    with KmsClient(socket) as client:
        reply = client.encrypt(b"f" * 32)
    caller = Caller(socket, reply.ciphertext, reply.key_id)
    thread = threading.Thread(target=caller.run)
    thread.start()
    time.sleep(0.5)
    fault_at = time.monotonic()
    inject()  # type: ignore[operator]
    unhealthy_after = None
    while time.monotonic() - fault_at < HOLD:
        if unhealthy_after is None and healthz(socket) != "ok":
            unhealthy_after = time.monotonic() - fault_at
        time.sleep(0.02)
    cleared_at = time.monotonic()
    clear()  # type: ignore[operator]
    while healthz(socket) != "ok":
        time.sleep(0.02)
    recovered = time.monotonic() - cleared_at
    time.sleep(0.3)
    caller.stop.set()
    thread.join()
    codes = sorted({code for _, code, _ in caller.failures})
    slowest = max((seconds for _, _, seconds in caller.failures), default=0.0)
    seen = "never unhealthy" if unhealthy_after is None else f"unhealthy after {unhealthy_after:.2f}s"
    return (f"| {name} | {seen}; failed calls: {len(caller.failures)} {'/'.join(codes) or ''}"
            f" (slowest {slowest * 1000:.0f} ms) | {recovered:.2f}s | {caller.wrong} |")


def main() -> None:
    directory = Path(tempfile.mkdtemp(prefix="p11kms-faults-"))
    env, softhsm, pin = make_token(directory, ("bench-kek-1",))
    control = directory / "p11fault.control"
    fault_env = dict(env, P11FAULT_MODULE=softhsm, P11FAULT_CONTROL=str(control))
    config = write_config(directory, build_fault_module(directory), pin)
    plugin = start_plugin(config, fault_env, directory / "plugin.log")
    socket = directory / "kms.sock"

    def set_faults(*lines: str) -> None:
        staging = control.with_suffix(".new")
        staging.write_text("".join(line + "\n" for line in lines))
        os.replace(staging, control)

    print("| fault | what the plugin did | time to recover after the fault ends | wrong answers |")
    print("| --- | --- | --- | --- |")
    print(drill("session handle invalid (once)", socket, lambda: set_faults("fail C_DecryptInit 0xB3 1"),
                lambda: set_faults()))
    print(drill("login lost (once)", socket, lambda: set_faults("fail C_DecryptInit 0x101 1"), lambda: set_faults()))
    for code, label in ((0x30, "CKR_DEVICE_ERROR"), (0x32, "CKR_DEVICE_REMOVED"), (0xE0, "CKR_TOKEN_NOT_PRESENT")):
        print(drill(f"{label} for {HOLD:.0f}s", socket,
                    lambda code=code: set_faults(*(f"fail {f} {code:#x} -1" for f in EVERYTHING)),
                    lambda: set_faults()))
    plugin.send_signal(signal.SIGTERM)
    plugin.wait()

    client_module = p11kit_client_module()
    hsm_socket = directory / "hsm.sock"
    remote_env = dict(env, LD_LIBRARY_PATH=str(client_module.parent.parent),
                      P11_KIT_SERVER_ADDRESS=f"unix:path={hsm_socket}")
    server: list[subprocess.Popen[bytes]] = []

    def start_server() -> None:
        hsm_socket.unlink(missing_ok=True)
        server.append(subprocess.Popen(
            [str(ROOT / ".cache" / "p11kit" / "bin" / "p11-kit"), "server", "-f", "-n", str(hsm_socket),
             "--provider", softhsm, f"pkcs11:token={TOKEN}"], env=remote_env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True))
        while not hsm_socket.exists():
            time.sleep(0.02)

    def kill_server() -> None:
        os.killpg(server[-1].pid, signal.SIGKILL)
        server[-1].wait()

    start_server()
    (directory / "kms.sock").unlink(missing_ok=True)
    config = write_config(directory, client_module, pin)
    plugin = start_plugin(config, remote_env, directory / "plugin-remote.log")
    print(drill(f"remote HSM process killed, restarted after {HOLD:.0f}s", socket, kill_server, start_server))
    plugin.send_signal(signal.SIGTERM)
    plugin.wait()
    kill_server()


if __name__ == "__main__":
    main()
