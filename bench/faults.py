"""Fault drill: for each HSM fault, what the plugin did, how long recovery took, how many calls failed.

One caller thread sends Decrypt calls back to back while a fault is injected (through the p11fault
pass-through module, or by killing a real `p11-kit server`), held for HOLD seconds, and cleared.
Prints one row per fault; docs/reliability.md records a run.

    python bench/faults.py
"""

from __future__ import annotations

import functools
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from _env import healthz, make_token, remote_hsm, start_plugin, wait_until_healthy, write_config

from p11kms.kube.client import KmsClient
from tests.support import FaultControl, build_fault_module

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


def drill(name: str, socket: Path, inject: Callable[[], object], clear: Callable[[], object]) -> str:
    with KmsClient(socket) as client:
        reply = client.encrypt(b"f" * 32)
    caller = Caller(socket, reply.ciphertext, reply.key_id)
    thread = threading.Thread(target=caller.run)
    thread.start()
    time.sleep(0.5)
    fault_at = time.monotonic()
    inject()
    unhealthy_after = None
    while time.monotonic() - fault_at < HOLD:
        if unhealthy_after is None and healthz(socket) != "ok":
            unhealthy_after = time.monotonic() - fault_at
        time.sleep(0.02)
    cleared_at = time.monotonic()
    clear()
    problem = wait_until_healthy(socket, poll=0.02)
    if problem is not None:
        raise SystemExit(f"plugin {problem} after the fault was cleared")
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
    faults = FaultControl(build_fault_module(directory), directory / "p11fault.control",
                          directory / "p11fault.calls")
    config = write_config(directory, faults.module, pin)
    plugin = start_plugin(config, dict(env, **faults.env(softhsm)), directory / "plugin.log")
    socket = directory / "kms.sock"

    print("| fault | what the plugin did | time to recover after the fault ends | wrong answers |")
    print("| --- | --- | --- | --- |")
    print(drill("session handle invalid (once)", socket, lambda: faults.set("fail C_DecryptInit 0xB3 1"),
                faults.set))
    print(drill("login lost (once)", socket, lambda: faults.set("fail C_DecryptInit 0x101 1"), faults.set))
    for code, label in ((0x30, "CKR_DEVICE_ERROR"), (0x32, "CKR_DEVICE_REMOVED"), (0xE0, "CKR_TOKEN_NOT_PRESENT")):
        print(drill(f"{label} for {HOLD:.0f}s", socket,
                    functools.partial(faults.set, *(f"fail {f} {code:#x} -1" for f in EVERYTHING)),
                    faults.set))
    plugin.send_signal(signal.SIGTERM)
    plugin.wait()

    hsm, remote_env = remote_hsm(directory, env, softhsm)
    hsm.start()
    (directory / "kms.sock").unlink(missing_ok=True)
    config = write_config(directory, hsm.client_module, pin)
    plugin = start_plugin(config, remote_env, directory / "plugin-remote.log")
    print(drill(f"remote HSM process killed, restarted after {HOLD:.0f}s", socket, hsm.kill, hsm.start))
    plugin.send_signal(signal.SIGTERM)
    plugin.wait()
    hsm.kill()


if __name__ == "__main__":
    main()
