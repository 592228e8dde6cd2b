"""Keeps a usable keyring while the HSM comes and goes.

Requests run through :meth:`KeyringSupervisor.run`. When one fails because the
device, token or connection is gone, the supervisor marks the HSM down (later
requests fail at once with UNAVAILABLE instead of waiting on a dead HSM) and a
background thread reconnects with back-off: C_Finalize, C_Initialize, find the
token, log in, look the keys up again. A refused PIN is never retried on a
timer, since retries can lock or erase a token: only a changed PIN source or a
reload (SIGHUP) leads to one new attempt.

Reconnecting invalidates every session and object handle, so it waits until no
request is inside the module (a shared/exclusive gate) before C_Finalize. A call that
never comes back from the module (a library wedged by its lost connection) would make
that wait endless: after Stuck_Call_Exit seconds the supervisor reports the module
stuck, and the plugin exits to be restarted, since only a new process can load the
library afresh.

A keyring becomes current one way only, :meth:`KeyringSupervisor._install`, whoever built it
(a reconnect, a reload, a refresh after a stale key handle). Each change of keyring or config
raises one generation; a build remembers the generation its config was read at and is installed
only if nothing changed since, so a slow build can never undo a newer one. A reconnect whose
config was replaced meanwhile builds again with the new one.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol, TypeVar

from p11kms.config import PinError, PluginConfig, read_pin
from p11kms.hsm.errors import (
    DuplicateKeyLabel,
    HsmError,
    HsmUnavailable,
    KeyHandleInvalid,
    KeyNotFound,
    LoginFailed,
)
from p11kms.hsm.keyident import key_uuid
from p11kms.hsm.module import load_module
from p11kms.hsm.observer import HsmObserver
from p11kms.hsm.token import SecretKeyAttributes, Token, open_token
from p11kms.observability import log_event
from p11kms.plugin.health import describe_failure
from p11kms.plugin.keyring import KeyMissing, Keyring, KeyringError, UnknownKeyId, UnsuitableKey, build_keyring

NOT_READY_KEY_ID = "p11kms-keyring-not-loaded"  # Status key_id before any key was ever loaded
# What a reload (SIGHUP) adopts; every other setting keeps its value from the start until a restart.
RELOADABLE = ("primary_key", "secondary_keys", "log_level")
GATE_WAIT_SECONDS = 2.0  # a request waits at most this long for a reconnect to finish, then fails
MISSING_KEY_RECHECK_SECONDS = 5.0  # how often a Decrypt under a missing key may look for it again
# How often Decrypts under key_ids the keyring does not know may search the HSM for the key (one search serves
# every key_id until then): the search reads every key on the token, and unknown key_ids come from outside.
HSM_SEARCH_SECONDS = 10.0
_Result = TypeVar("_Result")


def open_configured_token(config: PluginConfig, pin: bytes | None = None) -> Token:
    """Loads the module, finds the configured token and logs in with ``pin`` or the configured PIN source."""
    module = load_module(config.module, init_args=config.module_init_args)
    info = module.find_token(label=config.token_label, serial=config.token_serial, slot=config.slot)
    return open_token(module, info, read_pin(config) if pin is None else pin, config.sessions, config.gcm_iv)


def restart_only_changes(running: PluginConfig, new: PluginConfig) -> list[str]:
    """The settings that differ between ``running`` and ``new`` but only take effect on a restart."""
    return [f.name for f in dataclasses.fields(PluginConfig)
            if f.compare and f.name not in (*RELOADABLE, "path") and getattr(running, f.name) != getattr(new, f.name)]


def adopt_reloadable(running: PluginConfig, new: PluginConfig) -> PluginConfig:
    """``running`` with the reloadable settings of ``new``: the module, token, PIN source and pool stay."""
    return dataclasses.replace(running, lines=new.lines, **{name: getattr(new, name) for name in RELOADABLE})


def log_keyring(logger: logging.Logger, keyring: Keyring, event: str) -> None:
    """One line per key with role, label and UUID: the rotation procedure reads the key UUID here."""
    for kek in keyring.keys:
        log_event(logger, logging.INFO, event, role=kek.role.value, label=kek.label,
                  uuid=kek.uuid, uuid_source=kek.uuid_source)
        if kek.aliases:  # every key has some on a module that honours caller IVs: debug only (keys list shows them)
            log_event(logger, logging.DEBUG, f"{event}: key aliases", label=kek.label, uuid=kek.uuid,
                      decrypt_only=",".join(kek.aliases))
        if kek.policy_warnings:
            log_event(logger, logging.WARNING, f"{event}: key is weaker than p11kms keys create makes it",
                      role=kek.role.value, label=kek.label, uuid=kek.uuid, problems="; ".join(kek.policy_warnings),
                      fix="move to a new key (p11kms keys create) and rotate; doctor fails this key")
    log_event(logger, logging.INFO, f"{event}: gcm iv", configured=keyring.token.gcm_iv,
              mode=keyring.token.gcm_iv_used or "undecided", reason=keyring.token.gcm_iv_reason or "-")
    for missing in keyring.missing:
        log_event(logger, logging.WARNING, f"{event}: configured key missing from the hsm",
                  role=missing.role.value, label=missing.label, uuid=missing.uuid or "unknown",
                  effect="decrypts under this key fail; the primary keeps serving",
                  fix="restore the key from an hsm backup or replica, then send SIGHUP; never create a new key "
                      "under the old label")


class UnconfiguredKey(UnknownKeyId):
    """The key_id names a key that is in the HSM but not in this node's config: it was not staged here."""

    def __init__(self, key_id: str, label: str) -> None:
        KeyringError.__init__(
            self, f"key_id {key_id} is the key {label!r}, which exists in the HSM but is not in this node's config: "
                  f"stage it (p11kms rotate stage {label} --config FILE on this node); another node already "
                  "encrypts with it, so reads through this node fail until then")
        self.key_id = key_id


def _uuid_or_none(token: Token, attrs: SecretKeyAttributes) -> str | None:
    """The key's UUID, or None for a key that has none here (no fingerprint mechanism, or an unstable one):
    one such key must not end the search through the others."""
    try:
        return str(key_uuid(token, attrs)[0])
    except HsmError:
        return None


def _is_uuid(key_id: str) -> bool:
    """Whether ``key_id`` is a UUID in the canonical form every key UUID and alias has."""
    try:
        return str(uuid.UUID(key_id)) == key_id
    except ValueError:
        return False


def _digest(pin: bytes) -> str:
    """A digest to notice that a PIN changed. Never logged."""
    return hashlib.sha256(pin).hexdigest()


class SupervisorObserver(Protocol):
    def keyring_loaded(self, keyring: Keyring) -> None:
        """A keyring became current (start, reconnect, reload or refresh)."""

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
    """Any number of requests at once, or one reconnect alone. Both kinds of wait can be bounded."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._active = 0
        self._exclusive = False

    @contextmanager
    def shared(self, timeout: float | None = None) -> Iterator[bool]:
        """Yields False, without entering, when a reconnect holds the gate longer than ``timeout``."""
        with self._cond:
            # Every request passes here: wait only when a reconnect is under way.
            if self._exclusive and not self._cond.wait_for(lambda: not self._exclusive, timeout):
                yield False
                return
            self._active += 1
        try:
            yield True
        finally:
            with self._cond:
                self._active -= 1
                if self._exclusive and self._active == 0:  # only a reconnect waits for the last request
                    self._cond.notify_all()

    @property
    def requests_inside(self) -> int:
        return self._active

    @contextmanager
    def exclusive(self, timeout: float | None = None) -> Iterator[bool]:
        """Yields False, holding nothing, when the gate is not free within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if not self._cond.wait_for(lambda: not self._exclusive, _remaining(deadline)):
                yield False
                return
            self._exclusive = True
            if not self._cond.wait_for(lambda: self._active == 0, _remaining(deadline)):
                self._exclusive = False
                self._cond.notify_all()
                yield False
                return
        try:
            yield True
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class KeyringSupervisor:
    def __init__(self, config: PluginConfig, logger: logging.Logger, *, retry_initial: float = 0.2,
                 retry_max: float = 5.0, pin_poll: float = 2.0,
                 on_ready: Callable[[], None] | None = None, observer: SupervisorObserver | None = None,
                 hsm_observer: HsmObserver | None = None, on_stuck: Callable[[str], None] | None = None) -> None:
        self._config = config
        self._log = logger
        # A wrong module path is a config error: raise now. Initialising may fail while the HSM is away.
        self._module = load_module(config.module, initialize=False, init_args=config.module_init_args)
        if hsm_observer is not None:
            self._module.observer = hsm_observer
        self._retry_initial, self._retry_max, self._pin_poll = retry_initial, retry_max, pin_poll
        self._on_ready = on_ready or (lambda: None)
        self._on_stuck = on_stuck or (lambda _reason: None)
        self._observer = observer or NullSupervisorObserver()
        self._lock = threading.Lock()  # the fields below; held briefly, never across an HSM call
        self._builds = threading.Lock()  # one keyring build at a time among requests and reloads
        self._gate = _Gate()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._token: Token | None = None
        self._keyring: Keyring | None = None
        self._known_uuids: dict[str, str] = {}  # label -> UUID of every key ever loaded here
        self._last_key_id: str | None = None
        self._generation = 0  # raised by every change of keyring, token or config (see _install)
        self._last_refresh = 0.0
        self._search_lock = threading.Lock()  # one search of the HSM at a time; the others use its answer
        self._hsm_keys: tuple[float, dict[str, str]] | None = None  # (searched at, UUID -> label of every HSM key)
        self._state = HsmState.CONNECTING
        self._cause = "connecting to the hsm"
        self._env_pin: bytes | None = None
        self._used_pin_digest: str | None = None
        self._refused_pin_digest: str | None = None
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
        """Runs ``work`` with the current keyring; fails fast while the HSM is down.

        The keyring is taken inside the gate: a reconnect, which closes the token the keyring
        uses, can then neither run between taking the keyring and using it nor during its use.
        """
        self._serving_keyring()  # fail fast, without queueing behind a reconnect
        with self._gate.shared(GATE_WAIT_SECONDS) as entered:
            if not entered:
                raise HsmUnavailable("the plugin is reconnecting to the hsm; retry")
            keyring, generation = self._serving_keyring()
            try:
                return self._run_on(keyring, generation, work)
            except (HsmUnavailable, LoginFailed, KeyNotFound) as exc:
                self._on_failure(exc, keyring.token)
                raise

    def _label_in_hsm(self, keyring: Keyring, key_id: str) -> str | None:
        """The label of the HSM key whose UUID is ``key_id``, or None.

        The token is searched at most once per HSM_SEARCH_SECONDS, whatever the number of key_ids asked
        about: one search maps every key on the token, and the map (bounded by the token, not by what
        callers send) answers until the next. A key_id that is no UUID names no key and searches nothing.
        """
        if not _is_uuid(key_id):
            return None
        with self._search_lock:
            now = time.monotonic()
            if self._hsm_keys is None or now - self._hsm_keys[0] >= HSM_SEARCH_SECONDS:
                try:
                    found = {(_uuid_or_none(keyring.token, attrs) or ""): attrs.label
                             for attrs in keyring.token.aes_keys()}
                except HsmError:
                    found = {}
                self._hsm_keys = (now, found)
            return self._hsm_keys[1].get(key_id)

    def _serving_keyring(self) -> tuple[Keyring, int]:
        with self._lock:
            keyring, generation, state, cause = self._keyring, self._generation, self._state, self._cause
        if state is not HsmState.READY or keyring is None:
            raise (LoginFailed if state is HsmState.LOGIN_REFUSED else HsmUnavailable)(cause)
        return keyring, generation

    def _run_on(self, keyring: Keyring, generation: int, work: Callable[[Keyring], _Result]) -> _Result:
        """Runs ``work``; when a key is gone or back behind our back, looks the keys up again and retries once."""
        try:
            return work(keyring)
        except KeyHandleInvalid:
            return work(self._refresh_keyring(keyring, generation))
        except KeyMissing:
            if time.monotonic() - self._last_refresh < MISSING_KEY_RECHECK_SECONDS:
                raise  # looked recently; do not search the token on every such Decrypt
            return work(self._refresh_keyring(keyring, generation))
        except UnknownKeyId as exc:
            label = self._label_in_hsm(keyring, exc.key_id)
            if label is None:
                raise
            configured = {k.label for k in keyring.keys} | {m.label for m in keyring.missing}
            if label not in configured:  # another node encrypts with a key this node has not staged
                raise UnconfiguredKey(exc.key_id, label) from exc
            # A configured key now has another UUID (e.g. `keys adopt` on another node): look the keys up again.
            if time.monotonic() - self._last_refresh < MISSING_KEY_RECHECK_SECONDS:
                raise
            return work(self._refresh_keyring(keyring, generation))

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Connects once. Mistakes an operator must fix (the primary missing, a label duplicated, a
        key unsuitable) raise; HSM trouble (unreachable, token absent, PIN refused) leaves the
        plugin up and recovering, with the cause in Status. A missing secondary only warns."""
        try:
            self._connect(fresh=True)
        except (KeyNotFound, DuplicateKeyLabel, UnsuitableKey):
            raise
        except (HsmError, KeyringError, PinError) as exc:
            self._mark_down(exc, "cannot use the hsm at start; serving")
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Closes the token once no call is inside the module; gives up after ``timeout`` seconds
        (a hung HSM must not hold up the end of the process)."""
        self._stopped.set()
        self._wake.set()
        with self._gate.exclusive(timeout) as entered:
            if entered:
                self._retire_token()
                return
        log_event(self._log, logging.WARNING, "hsm calls still running at stop; leaving their sessions to the "
                  "end of the process", waited_seconds=timeout)

    def reload(self, config: PluginConfig) -> Keyring | None:
        """Adopts new key labels (and nothing that needs a restart). Returns the new keyring, or
        None when the HSM is down or a reconnect is under way: the reconnect then builds with the
        new labels (one in progress builds again), and a refused login gets one new attempt.
        Raises, keeping the previous keyring, when the new labels cannot be used.

        Reloads come one at a time (the plugin's main thread), so the newest is always installed."""
        adopted = adopt_reloadable(self._config, config)
        while True:
            with self._gate.shared(GATE_WAIT_SECONDS) as entered:
                if entered:
                    return self._reload_inside_gate(adopted)
            # A reconnect holds the gate: it takes the new labels (one already building builds again),
            # unless it became ready just before they were adopted; then this reload goes in again.
            self._adopt_for_reconnect(adopted)
            if self._state is not HsmState.READY or self._stopped.is_set():
                return None

    def _reload_inside_gate(self, adopted: PluginConfig) -> Keyring | None:
        with self._builds:
            with self._lock:
                token, ready = self._token, self._state is HsmState.READY
            if not ready or token is None:
                self._adopt_for_reconnect(adopted)
                return None
            try:
                keyring = self._build_keyring(token, adopted)
            except (HsmUnavailable, LoginFailed) as exc:
                self._adopt_for_reconnect(adopted)  # the labels were not the problem
                self._on_failure(exc, token)
                return None
            self._install(adopted, keyring)
        self._observer.keyring_loaded(keyring)
        return keyring

    def _adopt_for_reconnect(self, config: PluginConfig) -> None:
        self._install(config)
        self._wake.set()

    # -- keyrings -------------------------------------------------------------------------------
    def _build_keyring(self, token: Token, config: PluginConfig) -> Keyring:
        try:
            return build_keyring(token, config.primary_key, config.secondary_keys, self._known_uuids)
        except KeyNotFound as exc:
            raise KeyNotFound(
                f"{exc} (Primary_key, {config.where('primary_key')}): create it with `p11kms keys create "
                f"--label {config.primary_key}` or correct Primary_key", ckr=exc.ckr) from exc

    def _install(self, config: PluginConfig, keyring: Keyring | None = None, *, based_on: int | None = None,
                 token: Token | None = None) -> bool:
        """The one way a config, and the keyring built from it, become current; raises the generation.

        ``based_on`` is the generation at which ``config`` was read for the build: if anything was
        installed since, nothing is installed and the answer is False. None installs in any case (a
        reload: the newest config). With ``token`` (a reconnect), that token and the ready state too.
        """
        with self._lock:
            if based_on is not None and based_on != self._generation:
                return False
            self._generation += 1
            self._config = config
            if keyring is not None:
                self._keyring, self._last_key_id = keyring, keyring.key_id
                self._known_uuids.update(keyring.known_uuids())
            if token is not None:
                self._token = token
                self._state, self._cause = HsmState.READY, "ok"
            return True

    def _config_now(self) -> tuple[PluginConfig, int]:
        with self._lock:
            return self._config, self._generation

    def _refresh_keyring(self, stale: Keyring, generation: int) -> Keyring:
        """Looks the configured keys up again on the same token (no reconnect), once for all callers."""
        with self._builds:
            with self._lock:
                current, config, now = self._keyring, self._config, self._generation
            if now != generation:  # another caller, a reload or a reconnect installed since
                if current is None:
                    raise HsmUnavailable("the hsm connection is being repaired; retry")
                return current
            keyring = self._build_keyring(stale.token, config)
            self._last_refresh = time.monotonic()
            if not self._install(config, keyring, based_on=generation):
                # Only a reload that a waiting reconnect kept out of the gate gets here: the reconnect
                # builds from its config, which this keyring does not follow.
                raise HsmUnavailable("the keyring is being replaced by a reconnect; retry")
        log_keyring(self._log, keyring, "keyring refreshed")
        self._observer.keyring_loaded(keyring)
        return keyring

    def _retire_token(self) -> None:
        """Closes the token and forgets the keyring built on it. Callers hold the gate exclusively."""
        with self._lock:
            token, self._token, self._keyring = self._token, None, None
            self._generation += 1
        if token is not None:
            token.close()

    # -- failures and recovery ----------------------------------------------------------------
    def _on_failure(self, exc: HsmError, token: Token) -> None:
        with self._lock:
            if token is not self._token or self._state is not HsmState.READY:
                return  # a failure on a token already replaced, or recovery already under way
        self._mark_down(exc, "hsm failure; reconnecting")

    def _record_failure(self, exc: BaseException) -> bool:
        """Marks the HSM down with the cause of ``exc``; returns True when the PIN was refused."""
        refused = isinstance(exc, LoginFailed | PinError)
        with self._lock:
            self._state = HsmState.LOGIN_REFUSED if refused else HsmState.RECOVERING
            self._cause = describe_failure(exc)
            if refused:
                self._refused_pin_digest = self._used_pin_digest
        self._observer.hsm_state(self._state.value)
        return refused

    def _mark_down(self, exc: BaseException, message: str) -> None:
        refused = self._record_failure(exc)
        next_step = "reconnecting with back-off"
        if refused:
            next_step = ("waiting: restart the plugin with the corrected PIN variable" if self._config.pin_env
                         else "waiting: fix the PIN file (a change is noticed) or send SIGHUP")
        log_event(self._log, logging.ERROR, message, error=str(exc), cause=self._cause, next=next_step)
        if not refused:
            self._wake.set()  # start reconnecting now; a refused login waits for a reason to retry

    def _read_pin(self, config: PluginConfig) -> bytes:
        """The PIN to log in with. An environment variable cannot change under a running process,
        so its value is read once and kept; a PIN file is read again for every login."""
        if config.pin_env is None:
            return read_pin(config)
        if self._env_pin is None:
            self._env_pin = read_pin(config)
        return self._env_pin

    def _connect(self, *, fresh: bool) -> None:
        """Opens the token and builds the keyring. Except on the very first try, the module is
        finalised and initialised again: a dead connection, or a token that appeared late, is only
        seen after that. Callers hold the gate exclusively (or nothing else runs yet)."""
        if fresh:
            if not self._module.initialized:
                self._module.initialize()
        else:
            self._retire_token()
            self._module.reinitialize()
        config, _ = self._config_now()
        pin = self._read_pin(config)
        self._used_pin_digest = _digest(pin)
        token = open_configured_token(config, pin)  # module, token and PIN source: never changed by a reload
        try:
            while True:  # a reload that arrives during the build replaces the labels: build again
                config, generation = self._config_now()
                keyring = self._build_keyring(token, config)
                if self._install(config, keyring, based_on=generation, token=token):
                    break
        except BaseException:
            token.close()
            raise
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
        """True after a reload, or when the PIN source now holds another PIN than the refused one;
        waits up to one poll interval. A PIN that was refused is never tried again by itself."""
        if self._wake.wait(self._pin_poll):
            return True
        return self._pin_source_digest() not in (None, self._refused_pin_digest)

    def _attempt(self) -> bool:
        with self._gate.exclusive(self._config.stuck_call_exit) as entered:
            if not entered:
                self._report_stuck_calls()
                return False
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

    def _report_stuck_calls(self) -> None:
        """A reconnect waited Stuck_Call_Exit seconds for requests that never left the module."""
        token = self._token
        in_module = token.in_flight if token is not None else 0
        waited = self._config.stuck_call_exit
        reason = (f"{in_module} calls stayed inside the PKCS#11 module for over {waited:g} s (Stuck_Call_Exit) "
                  "while a reconnect waited for them: the library is wedged, and only a new process loads it "
                  "afresh")
        log_event(self._log, logging.CRITICAL, "hsm calls stuck in the pkcs#11 module; exiting to be restarted",
                  calls_in_module=in_module, requests_inside=self._gate.requests_inside, waited_seconds=waited,
                  cause=self._cause, fix="kubelet or systemd restarts the plugin; if it recurs, check the "
                  "vendor library and its connection to the HSM (docs/reliability.md)")
        self._on_stuck(reason)

    def _pin_source_digest(self) -> str | None:
        """The digest of the PIN the source holds now, or None when it cannot be read."""
        try:
            return _digest(self._read_pin(self._config))
        except (PinError, OSError):
            return None
