"""The health cache: at most one HSM probe per interval, with the cause named when it fails."""

from __future__ import annotations

import itertools
import threading
import time

from p11kms.hsm import ckdefs as ck
from p11kms.hsm.errors import HsmUnavailable, KeyNotFound, LoginFailed, TokenNotFound
from p11kms.plugin.health import HEALTHY, PENDING, CachedHealth, describe_failure
from tests.support import SetClock


def test_status_only_reads_and_never_probes() -> None:
    health = CachedHealth(lambda: None, interval=10, clock=SetClock(100.0))
    assert health.status() == PENDING
    health.probe_now()
    for _ in range(1000):
        assert health.status() == HEALTHY
    assert health.probes_run == 1


def test_the_prober_runs_once_per_interval_without_any_caller() -> None:
    calls: list[float] = []
    health = CachedHealth(lambda: calls.append(time.monotonic()), interval=0.2)
    health.invalidate()
    deadline = time.monotonic() + 10
    while len(calls) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    health.stop()
    assert len(calls) >= 4
    gaps = [later - earlier for earlier, later in itertools.pairwise(calls)]
    assert min(gaps) >= 0.19  # never more often than once per interval


def test_failure_is_reported_with_its_cause_and_recovery_is_seen_at_the_next_probe() -> None:
    failing = {"on": True}

    def probe() -> None:
        if failing["on"]:
            raise HsmUnavailable("C_Encrypt failed", ckr=ck.CKR_DEVICE_REMOVED)

    health = CachedHealth(probe, interval=5, clock=SetClock(100.0))
    health.probe_now()
    assert health.status() == "hsm unavailable (CKR_DEVICE_REMOVED)"
    failing["on"] = False
    assert health.status() != HEALTHY  # nothing probed yet
    health.probe_now()
    assert health.status() == HEALTHY


def test_an_answer_older_than_interval_plus_timeout_is_overdue() -> None:
    clock = SetClock(100.0)
    health = CachedHealth(lambda: None, interval=10, timeout=5, clock=clock)
    health.probe_now()
    clock.now += 15
    assert health.status() == HEALTHY
    clock.now += 1
    assert health.status().startswith("hsm probe overdue")


def test_a_hung_probe_never_holds_up_a_caller() -> None:
    release, started = threading.Event(), threading.Event()
    answers = iter([None])

    def probe() -> None:
        if next(answers, "hang") == "hang":  # the first probe answers, the second hangs
            started.set()
            release.wait(10)

    health = CachedHealth(probe, interval=0.1, timeout=0.2)
    health.invalidate()
    assert started.wait(5)
    began = time.monotonic()
    assert health.status() == HEALTHY
    assert time.monotonic() - began < 0.05
    time.sleep(0.4)
    assert health.status().startswith("hsm probe overdue")
    release.set()
    health.stop()


def test_invalidate_asks_for_a_probe_at_once() -> None:
    health = CachedHealth(lambda: None, interval=1000)
    health.invalidate()
    assert health.wait_for_first_answer(5)
    before = health.probes_run
    health.invalidate()
    deadline = time.monotonic() + 5
    while health.probes_run == before and time.monotonic() < deadline:
        time.sleep(0.01)
    health.stop()
    assert health.probes_run == before + 1


def test_causes_are_named() -> None:
    assert "check the PIN source" in describe_failure(LoginFailed("x", ckr=ck.CKR_PIN_INCORRECT))
    assert describe_failure(TokenNotFound("x")) == "hsm token absent"
    assert describe_failure(KeyNotFound("x")) == "the primary key is missing from the hsm"
    assert describe_failure(RuntimeError("boom")) == "health probe failed (RuntimeError)"
