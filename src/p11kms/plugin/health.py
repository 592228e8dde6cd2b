"""Health from a real HSM round trip, probed in the background so no caller ever waits on the HSM.

kube-apiserver calls Status every minute when healthy, every 10 s when not, and
on every /healthz or /readyz hit outside its own cache (spec 2.3). A prober
thread runs the round trip once per interval whether or not anyone asks, so an
HSM that stops answering is noticed with no traffic at all; Status and the HTTP
probes only read the last answer. An answer older than the interval plus the
probe timeout is reported as overdue: a hung HSM shows as unhealthy instead of
as the last "ok" for ever.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from p11kms.config import PinError
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
        return "the primary key is missing from the hsm"
    if isinstance(exc, KeyNotUsable):
        return f"primary key unusable ({exc.ckr_name})"
    if isinstance(exc, HsmUnavailable):
        return f"hsm unavailable ({exc.ckr_name})"
    if isinstance(exc, HsmError):
        return f"hsm error ({exc.ckr_name})"
    if isinstance(exc, PinError):
        return f"pin source unusable: {exc}"  # names the file or variable, never a PIN
    return f"health probe failed ({type(exc).__name__})"


PENDING = "hsm probe pending"


class CachedHealth:
    """The last probe's answer, refreshed by a background thread once per ``interval`` seconds."""

    def __init__(self, probe: Callable[[], None], interval: float, *, timeout: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._probe = probe
        self._interval = interval
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._answer = PENDING
        self._answered_at: float | None = None
        self._created_at = clock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._answered = threading.Event()
        self._thread: threading.Thread | None = None
        self.probes_run = 0

    def status(self) -> str:
        """``"ok"`` or a short cause. Never waits: reads what the prober last found."""
        with self._lock:
            answer, answered_at = self._answer, self._answered_at
        since = answered_at if answered_at is not None else self._created_at
        age = self._clock() - since
        if age > self._interval + self._timeout:
            return f"hsm probe overdue: no answer from the hsm for {age:.0f}s"
        return answer

    def invalidate(self) -> None:
        """Asks for a probe now, e.g. after the keyring changed; starts the prober on first use."""
        if not self._ensure_running():
            self._wake.set()

    def wait_for_first_answer(self, timeout: float) -> bool:
        """Lets start-up wait (bounded) until there is an answer to give."""
        return self._answered.wait(timeout)

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()

    def probe_now(self) -> str:
        """Runs one probe in the calling thread and records its answer."""
        self.probes_run += 1
        try:
            self._probe()
        except Exception as exc:
            answer = describe_failure(exc)
        else:
            answer = HEALTHY
        with self._lock:
            self._answer, self._answered_at = answer, self._clock()
        self._answered.set()
        return answer

    def _ensure_running(self) -> bool:
        """Starts the prober (which probes at once); False when it was already running."""
        with self._lock:
            if self._thread is not None:
                return False
            self._thread = threading.Thread(target=self._run, daemon=True, name="health-probe")
        self._thread.start()
        return True

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._wake.clear()
            self.probe_now()
            self._wake.wait(self._interval)
