"""Health from a real HSM round trip, cached so kube-apiserver's polling stays cheap.

kube-apiserver calls Status every minute when healthy, every 10 s when not, and
on every /healthz or /readyz hit outside its own cache (spec 2.3). The probe
runs at most once per interval whatever the call rate; callers that arrive
while a probe runs get the previous answer instead of queueing on the HSM.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from p11kms.hsm.errors import (
    HsmError,
    HsmUnavailable,
    KeyNotFound,
    KeyNotUsable,
    LoginFailed,
    TokenNotFound,
)

HEALTHY = "ok"


def describe_failure(exc: BaseException) -> str:
    """A few words naming the cause, for the Status healthz text. Never carries secrets."""
    if isinstance(exc, LoginFailed):
        return f"hsm login refused ({exc.ckr_name}): check the PIN source"
    if isinstance(exc, TokenNotFound):
        return "hsm token absent"
    if isinstance(exc, KeyNotFound):
        return "a configured key is missing from the hsm"
    if isinstance(exc, KeyNotUsable):
        return f"primary key unusable ({exc.ckr_name})"
    if isinstance(exc, HsmUnavailable):
        return f"hsm unavailable ({exc.ckr_name})"
    if isinstance(exc, HsmError):
        return f"hsm error ({exc.ckr_name})"
    return f"health probe failed ({type(exc).__name__})"


class CachedHealth:
    def __init__(self, probe: Callable[[], None], interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._probe = probe
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._answer = HEALTHY
        self._checked_at: float | None = None
        self.probes_run = 0

    def status(self) -> str:
        """``"ok"`` or a short cause; probes the HSM when the cached answer is older than the interval."""
        if self._fresh():
            return self._answer
        if not self._lock.acquire(blocking=self._checked_at is None):
            return self._answer  # another thread is probing right now
        try:
            if not self._fresh():
                self._answer = self._run_probe()
                self._checked_at = self._clock()
            return self._answer
        finally:
            self._lock.release()

    def invalidate(self) -> None:
        """Forces the next status() to probe, e.g. after the keyring changed."""
        self._checked_at = None

    def _fresh(self) -> bool:
        return self._checked_at is not None and self._clock() - self._checked_at < self._interval

    def _run_probe(self) -> str:
        self.probes_run += 1
        try:
            self._probe()
        except Exception as exc:
            return describe_failure(exc)
        return HEALTHY
