"""Keeps a usable keyring while the HSM comes and goes.

Requests run through :meth:`KeyringSupervisor.run`. When one fails because the
device, token or connection is gone, the supervisor marks the HSM down (later
requests fail at once with UNAVAILABLE instead of waiting on a dead HSM) and a
background thread reconnects with back-off: C_Finalize, C_Initialize, find the
token, log in, look the keys up again. A refused PIN is never retried on a
timer, since retries can lock or erase a token: only a changed PIN source or a
reload (SIGHUP) leads to one new attempt.

Reconnecting invalidates every session and object handle, so it waits until no
request is inside the module (a shared/exclusive gate) before C_Finalize.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol, TypeVar

from p11kms.config import PinError, PluginConfig, read_pin
from p11kms.hsm.errors import (
    DuplicateKeyLabel,
    HsmError,
    HsmUnavailable,
    KeyNotFound,
    LoginFailed,
)
from p11kms.hsm.module import load_module
from p11kms.hsm.observer import HsmObserver
from p11kms.hsm.token import Token, open_token
from p11kms.observability import log_event
from p11kms.plugin.health import describe_failure
from p11kms.plugin.keyring import Keyring, KeyringError, UnsuitableKey, build_keyring

NOT_READY_KEY_ID = "p11kms-keyring-not-loaded"  # Status key_id before any key was ever loaded
_Result = TypeVar("_Result")


def open_configured_token(config: PluginConfig) -> Token:
    """Loads the module, finds the configured token and logs in with the configured PIN source."""
    module = load_module(config.module)
    info = module.find_token(label=config.token_label, serial=config.token_serial, slot=config.slot)
    return open_token(module, info, read_pin(config), config.sessions)


def log_keyring(logger: logging.Logger, keyring: Keyring, event: str) -> None:
    """One line per key with role, label and UUID: the rotation procedure reads the key UUID here."""
    for kek in keyring.keys:
        log_event(logger, logging.INFO, f"{event}: key", role=kek.role.value, label=kek.label,
                  uuid=kek.uuid, uuid_source=kek.uuid_source)


class SupervisorObserver(Protocol):
    def keyring_loaded(self, keyring: Keyring) -> None:
        """A keyring became current (start, reconnect or reload)."""

    def hsm_state(self, state: str) -> None: ...

    def reconnect_attempt(self, succeeded: bool) -> None: ...


class NullSupervisorObserver:
    def keyring_loaded(self, keyring: Keyring) -> None:
        pass

    def hsm_state(self, state: str) -> None:
        pass

    def reconnect_attempt(self, succeeded: bool) -> None:
        pass


class HsmState(enum.StrEnum):
    CONNECTING = "connecting"
    READY = "ready"
    RECOVERING = "recovering"
    LOGIN_REFUSED = "login refused"


class _Gate:
    """Any number of requests at once, or one reconnect alone."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True
            while self._active:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class KeyringSupervisor:
    def __init__(self, config: PluginConfig, logger: logging.Logger, *, retry_initial: float = 0.2,
                 retry_max: float = 5.0, pin_poll: float = 2.0,
                 on_ready: Callable[[], None] | None = None, observer: SupervisorObserver | None = None,
                 hsm_observer: HsmObserver | None = None) -> None:
        self._config = config
        self._log = logger
        # A wrong module path is a config error: raise now. Initialising may fail while the HSM is away.
        self._module = load_module(config.module, initialize=False)
        if hsm_observer is not None:
            self._module.observer = hsm_observer
        self._retry_initial, self._retry_max, self._pin_poll = retry_initial, retry_max, pin_poll
        self._on_ready = on_ready or (lambda: None)
        self._observer = observer or NullSupervisorObserver()
        self._lock = threading.Lock()
        self._gate = _Gate()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._token: Token | None = None
        self._keyring: Keyring | None = None
        self._last_key_id: str | None = None
        self._generation = 0
        self._state = HsmState.CONNECTING
        self._cause = "connecting to the hsm"
        self._pin_fingerprint: str | None = None
        self.reconnects = 0
        self._thread = threading.Thread(target=self._recovery_loop, daemon=True, name="hsm-recovery")

    # -- what the service sees ----------------------------------------------------------------
    @property
    def state(self) -> HsmState:
        return self._state

    @property
    def key_id(self) -> str:
        """The primary key UUID; while the HSM is down, the last one known, so kube-apiserver sees no change."""
        return self._last_key_id or NOT_READY_KEY_ID

    def unready_reason(self) -> str | None:
        return None if self._state is HsmState.READY else self._cause

    def current_keyring(self) -> Keyring | None:
        return self._keyring if self._state is HsmState.READY else None

    def run(self, work: Callable[[Keyring], _Result]) -> _Result:
        """Runs ``work`` with the current keyring; fails fast while the HSM is down."""
        with self._lock:
            keyring, generation, state, cause = self._keyring, self._generation, self._state, self._cause
        if state is not HsmState.READY or keyring is None:
            raise (LoginFailed if state is HsmState.LOGIN_REFUSED else HsmUnavailable)(cause)
        with self._gate.shared():
            try:
                return work(keyring)
            except (HsmUnavailable, LoginFailed) as exc:
                self._on_failure(exc, generation)
                raise

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Connects once. Mistakes an operator must fix (a key missing, duplicated or unsuitable)
        raise; HSM trouble (unreachable, token absent, PIN refused) leaves the plugin up and
        recovering, with the cause in Status."""
        try:
            self._connect(fresh=True)
        except (KeyNotFound, DuplicateKeyLabel, UnsuitableKey):
            raise
        except (HsmError, KeyringError, PinError) as exc:
            self._mark_down(exc, "cannot use the hsm at start; serving and retrying")
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        with self._gate.exclusive():
            if self._token is not None:
                self._token.close()
                self._token = None

    def reload(self, config: PluginConfig) -> Keyring | None:
        """Adopts new key labels. Returns the new keyring, or None when the HSM is down (the next
        reconnect uses the new labels, and a refused login gets one new attempt). Raises, keeping
        the previous keyring, when the new labels cannot be used."""
        if self._state is not HsmState.READY or self._token is None:
            self._config = config
            self._wake.set()
            return None
        token = self._token
        keyring = self.run(lambda _current: build_keyring(token, config.primary_key, config.secondary_keys))
        with self._lock:
            self._config = config
            self._keyring = keyring
            self._last_key_id = keyring.key_id
        self._observer.keyring_loaded(keyring)
        return keyring

    # -- failures and recovery ----------------------------------------------------------------
    def _on_failure(self, exc: HsmError, generation: int) -> None:
        with self._lock:
            if generation != self._generation or self._state is not HsmState.READY:
                return  # an older failure, or recovery already under way
        self._mark_down(exc, "hsm failure; reconnecting")

    def _record_failure(self, exc: BaseException) -> bool:
        """Marks the HSM down with the cause of ``exc``; returns True when the PIN was refused."""
        refused = isinstance(exc, LoginFailed | PinError)
        with self._lock:
            self._state = HsmState.LOGIN_REFUSED if refused else HsmState.RECOVERING
            self._cause = describe_failure(exc)
            if refused:
                self._pin_fingerprint = self._pin_source_fingerprint()
        self._observer.hsm_state(self._state.value)
        return refused

    def _mark_down(self, exc: BaseException, message: str) -> None:
        refused = self._record_failure(exc)
        hint = ("not retrying on a timer: fix the PIN source (a change is noticed) or send SIGHUP"
                if refused else "retrying with back-off")
        log_event(self._log, logging.ERROR, message, error=str(exc), cause=self._cause, next=hint)
        if not refused:
            self._wake.set()  # start reconnecting now; a refused login waits for a reason to retry

    def _connect(self, *, fresh: bool) -> None:
        """Opens the token and builds the keyring. Except on the very first try, the module is
        finalised and initialised again: a dead connection, or a token that appeared late, is only
        seen after that. Callers hold the gate exclusively (or nothing else runs yet)."""
        if fresh:
            if not self._module.initialized:
                self._module.initialize()
        else:
            if self._token is not None:
                self._token.close()
                self._token = None
            self._module.reinitialize()
        config = self._config
        token = open_configured_token(config)
        try:
            keyring = build_keyring(token, config.primary_key, config.secondary_keys)
        except BaseException:
            token.close()
            raise
        with self._lock:
            self._token, self._keyring, self._last_key_id = token, keyring, keyring.key_id
            self._generation += 1
            self._state, self._cause = HsmState.READY, "ok"
        log_keyring(self._log, keyring, "keyring loaded")
        self._observer.keyring_loaded(keyring)
        self._observer.hsm_state(HsmState.READY.value)
        self._on_ready()

    def _recovery_loop(self) -> None:
        delay = self._retry_initial
        while not self._stopped.is_set():
            if self._state is HsmState.READY:
                self._wake.wait()
                self._wake.clear()
                delay = self._retry_initial
                continue
            if self._state is HsmState.LOGIN_REFUSED and not self._login_retry_allowed():
                continue
            self._wake.clear()
            if self._stopped.is_set() or self._attempt():
                delay = self._retry_initial
                continue
            if self._state is not HsmState.LOGIN_REFUSED:
                self._wake.wait(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self._retry_max)

    def _login_retry_allowed(self) -> bool:
        """True after a reload or when the PIN source changed; waits up to one poll interval."""
        if self._wake.wait(self._pin_poll):
            return True
        return self._pin_source_fingerprint() != self._pin_fingerprint

    def _attempt(self) -> bool:
        with self._gate.exclusive():
            if self._stopped.is_set():
                return False
            self.reconnects += 1
            try:
                self._connect(fresh=False)
            except (HsmError, KeyringError, PinError) as exc:
                previous = self._cause
                refused = self._record_failure(exc)
                if self._cause != previous or refused:  # one line per new cause, not one per back-off round
                    log_event(self._log, logging.ERROR, "hsm reconnect failed", error=str(exc), cause=self._cause)
                self._observer.reconnect_attempt(succeeded=False)
                return False
        self._observer.reconnect_attempt(succeeded=True)
        log_event(self._log, logging.INFO, "hsm reconnected", attempts=self.reconnects,
                  key_id=self.key_id)
        return True

    def _pin_source_fingerprint(self) -> str | None:
        """A digest of the PIN source, to notice when an operator fixes it. Never logged."""
        config = self._config
        try:
            raw = config.pin_file.read_bytes() if config.pin_file else os.environ.get(config.pin_env or "", "").encode()
        except OSError:
            return None
        return hashlib.sha256(raw).hexdigest()
