"""Overload with a slow HSM: work that cannot be done in time is refused before it reaches the HSM.

The fault module (tests/faultmodule/p11fault.c) adds latency to every wrapped PKCS#11 call, so an
Encrypt or Decrypt (C_*Init + C_*) takes two latencies; its call log counts what reached the HSM.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from p11kms.kube.client import KmsClient
from p11kms.plugin.keyring import MAX_CIPHERTEXT_BYTES, MAX_PLAINTEXT_BYTES
from tests.support import FaultControl, HsmEnv, PluginProcess, start_and_join, start_fault_plugin

Keys = Callable[[], tuple[str, str]]

LATENCY_MS = 250  # per wrapped call: an Encrypt or Decrypt takes about 0.5 s
REFUSED = "refused before reaching the HSM"  # the plugin's own DEADLINE_EXCEEDED, not the caller's timer


@dataclass
class Outcome:
    method: str
    code: grpc.StatusCode
    details: str
    seconds: float


@pytest.fixture
def slow_plugin(hsm_env: HsmEnv, faults: FaultControl, tmp_path: Path,
                new_key: Keys) -> Iterator[Callable[..., PluginProcess]]:
    started: list[PluginProcess] = []

    def start(**attributes: str) -> PluginProcess:
        plugin = start_fault_plugin(hsm_env, faults, tmp_path / "p11kms.cfg", new_key()[0],
                                    Health_Interval="300", **attributes)
        started.append(plugin)
        wait_until(lambda: faults.calls("C_Decrypt") >= 1)  # the start-up health probe is over
        return plugin

    yield start
    for plugin in started:
        plugin.stop()


def wait_until(condition: Callable[[], bool], seconds: float = 20.0) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, f"condition not met within {seconds}s"
        time.sleep(0.05)


def calls_held(plugin: PluginProcess) -> float:
    """The plugin's own count of the calls it holds (running or waiting for a handler thread)."""
    for line in plugin.http_get("/metrics")[1].splitlines():
        if line.startswith("p11kms_grpc_calls_held "):
            return float(line.split()[1])
    raise AssertionError("no p11kms_grpc_calls_held in /metrics")


def hsm_operations(faults: FaultControl) -> tuple[int, int]:
    return faults.calls("C_EncryptInit"), faults.calls("C_DecryptInit")


def settle(faults: FaultControl) -> None:
    """Returns once no operation has reached the HSM for a whole second (a backlog would keep it busy)."""
    last = None
    end = time.monotonic() + 60
    while (now := hsm_operations(faults)) != last and time.monotonic() < end:
        last = now
        time.sleep(1.0)


def timed(method: str, call: Callable[[], object]) -> Outcome:
    started = time.monotonic()
    try:
        call()
    except grpc.RpcError as exc:
        return Outcome(method, exc.code(), exc.details() or "", time.monotonic() - started)
    return Outcome(method, grpc.StatusCode.OK, "", time.monotonic() - started)


def together(calls: list[tuple[str, Callable[[], object]]]) -> list[Outcome]:
    """Runs every call on its own thread, released at the same moment."""
    outcomes: list[Outcome] = []
    gate = threading.Barrier(len(calls))

    def run(method: str, call: Callable[[], object]) -> None:
        gate.wait()
        outcomes.append(timed(method, call))

    start_and_join([threading.Thread(target=run, args=call) for call in calls], 60)
    return outcomes


def slow_warm_plugin(slow_plugin: Callable[..., PluginProcess], faults: FaultControl, sessions: int,
                     **attributes: str) -> tuple[PluginProcess, bytes, str]:
    """A plugin with ``sessions`` sessions on an HSM slowed to LATENCY_MS, every session opened and the
    operation time learned; returns it, a ciphertext and the ciphertext's key_id."""
    plugin = slow_plugin(Sessions=str(sessions), **attributes)
    faults.set(f"latency_ms {LATENCY_MS}")
    client = plugin.client(timeout=30)
    wrapped = client.encrypt(b"w" * 32)
    for _ in range(2):
        together([("Encrypt", lambda: client.encrypt(b"w" * 32))] * sessions)
        together([("Decrypt", lambda: client.decrypt(wrapped.ciphertext, wrapped.key_id))] * sessions)
    return plugin, bytes(wrapped.ciphertext), wrapped.key_id


def test_calls_whose_deadline_cannot_be_met_never_reach_the_hsm(slow_plugin: Callable[..., PluginProcess],
                                                                faults: FaultControl) -> None:
    plugin, ciphertext, key_id = slow_warm_plugin(slow_plugin, faults, sessions=4)
    hopeless, feasible = KmsClient(plugin.socket, 0.3), KmsClient(plugin.socket, 3.0)
    encrypts_before, decrypts_before = hsm_operations(faults)
    try:
        # 6 Decrypts with 0.3 s left can never be served by a 0.5 s HSM; 6 Encrypts with 3 s can.
        outcomes = together([("Decrypt", lambda: hopeless.decrypt(ciphertext, key_id))] * 6
                            + [("Encrypt", lambda: feasible.encrypt(os.urandom(32)))] * 6)
        settle(faults)
        encrypts, decrypts = (n - before for n, before in zip(hsm_operations(faults),
                                                                (encrypts_before, decrypts_before), strict=True))
    finally:
        hopeless.close()
        feasible.close()
    refused = [o for o in outcomes if o.method == "Decrypt"]
    served = [o for o in outcomes if o.method == "Encrypt"]
    assert {o.code for o in refused} == {grpc.StatusCode.DEADLINE_EXCEEDED}
    assert any(REFUSED in o.details for o in refused), [o.details for o in refused]
    assert decrypts == 0, f"{decrypts} Decrypts reached the HSM after their caller had given up"
    assert [o.code for o in served] == [grpc.StatusCode.OK] * 6
    assert encrypts == 6
    print(f"refused in {sorted(round(o.seconds * 1000) for o in refused)} ms; "
          f"served in {sorted(round(o.seconds * 1000) for o in served)} ms")
    faults.set()
    client = plugin.client()
    assert client.decrypt(ciphertext, key_id) == b"w" * 32  # and it serves normally afterwards


def test_many_callers_on_a_slow_hsm_fail_fast_and_waste_no_hsm_work(slow_plugin: Callable[..., PluginProcess],
                                                                    faults: FaultControl) -> None:
    plugin, ciphertext, key_id = slow_warm_plugin(slow_plugin, faults, sessions=2)
    # 0.5 s left, for an operation of 0.5 s (x 1.25 margin): hopeless, and long enough for the plugin's
    # answer to arrive before the caller's own timer fires.
    short = KmsClient(plugin.socket, 0.5)
    encrypts_before, decrypts_before = hsm_operations(faults)
    try:
        outcomes = together([("Decrypt", lambda: short.decrypt(ciphertext, key_id))] * 60)
        settle(faults)
    finally:
        short.close()
    # Each answer is the plugin's own refusal, never the caller's timer giving up on a plugin that
    # said nothing (that is DEADLINE_EXCEEDED too, with gRPC's "Deadline Exceeded").
    not_refused = [o for o in outcomes
                   if o.code is not grpc.StatusCode.RESOURCE_EXHAUSTED and REFUSED not in o.details]
    assert not not_refused, not_refused
    assert hsm_operations(faults) == (encrypts_before, decrypts_before)
    print(f"60 callers: {sum(o.code == grpc.StatusCode.RESOURCE_EXHAUSTED for o in outcomes)} RESOURCE_EXHAUSTED, "
          f"{sum(REFUSED in o.details for o in outcomes)} refused by the plugin; slowest answer "
          f"{max(o.seconds for o in outcomes) * 1000:.0f} ms")
    faults.set()
    client = plugin.client()
    for _ in range(10):
        reply = client.encrypt(b"n" * 32)
        assert client.decrypt(reply.ciphertext, reply.key_id) == b"n" * 32
    assert client.status().healthz == "ok"


def test_calls_beyond_the_concurrency_bound_are_resource_exhausted(slow_plugin: Callable[..., PluginProcess],
                                                                  faults: FaultControl) -> None:
    plugin, _, _ = slow_warm_plugin(slow_plugin, faults, sessions=1, Max_Calls="4")  # 4 calls: 1 in the HSM, 3 waiting
    patient = KmsClient(plugin.socket, 30.0)
    encrypts_before, _ = hsm_operations(faults)
    held: list[Outcome] = []
    try:
        holders = [threading.Thread(target=lambda: held.append(timed("Encrypt", lambda: patient.encrypt(b"p" * 32))))
                   for _ in range(4)]
        for thread in holders:
            thread.start()
        wait_until(lambda: hsm_operations(faults)[0] > encrypts_before)
        wait_until(lambda: calls_held(plugin) == 4)  # the other three are held, waiting for the one thread
        extra = together([("Encrypt", lambda: patient.encrypt(b"x" * 32)), ("Status", patient.status)] * 2)
        for thread in holders:
            thread.join(30)
    finally:
        patient.close()
    assert [o.code for o in extra] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 4
    assert [o.code for o in held] == [grpc.StatusCode.OK] * 4
    assert hsm_operations(faults)[0] - encrypts_before == 4
    print(f"beyond the bound: answered in {sorted(round(o.seconds * 1000) for o in extra)} ms")


def test_requests_over_the_kms_v2_limits_never_reach_the_hsm(slow_plugin: Callable[..., PluginProcess],
                                                              faults: FaultControl) -> None:
    plugin = slow_plugin()
    client = plugin.client()
    wrapped = client.encrypt(b"k" * 32)
    before = hsm_operations(faults)
    cases: list[tuple[Callable[[], object], grpc.StatusCode, str]] = [
        (lambda: client.encrypt(os.urandom(100_000)), grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
        (lambda: client.encrypt(os.urandom(MAX_PLAINTEXT_BYTES + 1)), grpc.StatusCode.INVALID_ARGUMENT,
         f"at most {MAX_PLAINTEXT_BYTES}"),
        (lambda: client.decrypt(b"\x01" + os.urandom(2 * MAX_CIPHERTEXT_BYTES), wrapped.key_id),
         grpc.StatusCode.INVALID_ARGUMENT, f"never issues more than {MAX_CIPHERTEXT_BYTES}"),
        (lambda: client.decrypt(wrapped.ciphertext, "k" * 2000), grpc.StatusCode.INVALID_ARGUMENT,
         "key_id is 2000 bytes; KMS v2 key_ids are at most 1024 bytes"),
        (lambda: client.decrypt(wrapped.ciphertext, wrapped.key_id, {"a.example.com": b"v" * 30_000}),
         grpc.StatusCode.INVALID_ARGUMENT, "unexpected annotations"),
    ]
    for call, code, message in cases:
        outcome = timed("", call)
        assert (outcome.code, message in outcome.details) == (code, True), outcome
    assert hsm_operations(faults) == before
    assert client.decrypt(wrapped.ciphertext, wrapped.key_id) == b"k" * 32
