"""The health cache: at most one HSM probe per interval, with the cause named when it fails."""

from __future__ import annotations

import threading

from p11kms.hsm import ckdefs as ck
from p11kms.hsm.errors import HsmUnavailable, KeyNotFound, LoginFailed, TokenNotFound
from p11kms.plugin.health import HEALTHY, CachedHealth, describe_failure


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_probes_at_most_once_per_interval() -> None:
    clock, calls = Clock(), []
    health = CachedHealth(lambda: calls.append(1), interval=10, clock=clock)
    for _ in range(50):
        assert health.status() == HEALTHY
    assert len(calls) == 1
    clock.now += 9.9
    health.status()
    assert len(calls) == 1
    clock.now += 0.2
    health.status()
    assert len(calls) == 2


def test_failure_is_cached_and_recovery_is_seen_after_the_interval() -> None:
    clock = Clock()
    failing = {"on": True}

    def probe() -> None:
        if failing["on"]:
            raise HsmUnavailable("C_Encrypt failed", ckr=ck.CKR_DEVICE_REMOVED)

    health = CachedHealth(probe, interval=5, clock=clock)
    assert health.status() == "hsm unavailable (CKR_DEVICE_REMOVED)"
    failing["on"] = False
    assert health.status() != HEALTHY  # still within the interval
    clock.now += 5
    assert health.status() == HEALTHY


def test_invalidate_forces_a_new_probe() -> None:
    calls: list[int] = []
    health = CachedHealth(lambda: calls.append(1), interval=1000, clock=Clock())
    health.status()
    health.invalidate()
    health.status()
    assert len(calls) == 2


def test_concurrent_callers_do_not_queue_on_a_slow_probe() -> None:
    clock = Clock()
    release = threading.Event()
    health = CachedHealth(lambda: None, interval=1, clock=clock)
    health.status()  # first answer cached
    clock.now += 2
    started = threading.Event()

    def slow_probe() -> None:
        started.set()
        release.wait(5)

    health._probe = slow_probe
    prober = threading.Thread(target=health.status)
    prober.start()
    assert started.wait(5)
    assert health.status() == HEALTHY  # answered from cache while the probe is still running
    release.set()
    prober.join()


def test_causes_are_named() -> None:
    assert "check the PIN source" in describe_failure(LoginFailed("x", ckr=ck.CKR_PIN_INCORRECT))
    assert describe_failure(TokenNotFound("x")) == "hsm token absent"
    assert describe_failure(KeyNotFound("x")) == "a configured key is missing from the hsm"
    assert describe_failure(RuntimeError("boom")) == "health probe failed (RuntimeError)"
