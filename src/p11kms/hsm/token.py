"""A logged-in token: one login per process and a pool of sessions.

PKCS#11 lets each session run one operation at a time, while the login belongs
to the whole application. The token therefore keeps one idle *anchor* session
that holds the login (closing the last session would log the application out)
and a pool of work sessions, each lent to one thread for one operation.
A session that fails during an operation is closed and replaced, so a stuck
operation state or a dead handle never returns to the pool.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from p11kms.hsm import ckdefs as ck
from p11kms.hsm.errors import (
    DuplicateKeyLabel,
    GcmIvError,
    HsmError,
    HsmUnavailable,
    KeyLabelTaken,
    KeyNotFound,
    KeyNotUsable,
    LoginFailed,
    NotLoggedIn,
    SessionLost,
    error_for,
)
from p11kms.hsm.module import Pkcs11Module, TokenInfo

GCM_IV_BYTES = 12
GCM_TAG_BYTES = 16
AES_BLOCK_BYTES = 16
# GCM_IV modes: who chooses the 96-bit IV of every wrap. "caller": p11kms draws it and the module
# must use it unchanged; "hsm": the module draws it and writes it into CK_GCM_PARAMS.pIv (AWS
# CloudHSM, Luna and nShield in FIPS mode); "auto": a probe at the first use decides.
GCM_IV_MODES = ("auto", "caller", "hsm")
_ZERO_IV = bytes(GCM_IV_BYTES)
_IV_PROBE_PLAINTEXT = b"p11kms gcm iv probe: not secret"
_IV_PROBE_AAD = b"p11kms gcm iv probe"
_Result = TypeVar("_Result")


@dataclass(frozen=True)
class SecretKeyAttributes:
    handle: int
    label: str
    cka_id: bytes
    key_type: int | None
    value_len: int | None
    sensitive: bool | None
    extractable: bool | None
    can_encrypt: bool | None
    can_decrypt: bool | None
    can_wrap: bool | None = None
    can_unwrap: bool | None = None
    can_derive: bool | None = None
    can_sign: bool | None = None


def policy_problems(attrs: SecretKeyAttributes) -> list[str]:
    """What makes a key a weaker KEK than ``keys create`` makes: it can leave the HSM, is short, or
    can do more than wrap DEK seeds. Serve warns about each; doctor fails them."""
    problems = []
    if attrs.extractable is not False:
        problems.append("CKA_EXTRACTABLE is not false")
    if attrs.sensitive is not True:
        problems.append("CKA_SENSITIVE is not true")
    if attrs.value_len is not None and attrs.value_len < 32:
        problems.append(f"it is AES-{attrs.value_len * 8}, shorter than 256 bits")
    if attrs.can_wrap:
        problems.append("CKA_WRAP is true")
    if attrs.can_derive:
        problems.append("CKA_DERIVE is true")
    return problems


def _ulong_bytes(value: int) -> bytes:
    return bytes(ck.CK_ULONG(value))


def _bool_byte(value: bool) -> bytes:
    return b"\x01" if value else b"\x00"


class _Template:
    """A CK_ATTRIBUTE array that owns the buffers it points to."""

    def __init__(self, items: list[tuple[int, bytes]]) -> None:
        self._buffers = [ck.byte_buffer(value) for _, value in items]
        self.array = (ck.CK_ATTRIBUTE * len(items))()
        for slot, ((kind, value), buf) in enumerate(zip(items, self._buffers, strict=True)):
            self.array[slot].type = kind
            self.array[slot].pValue = ctypes.cast(buf, ctypes.c_void_p)
            self.array[slot].ulValueLen = len(value)

    def __len__(self) -> int:
        return len(self._buffers)


class _GcmMechanism:
    """CKM_AES_GCM with a 96-bit IV, additional data and a 128-bit tag.

    ``used_iv`` reads the IV buffer back after the call: a module that generates the IV itself writes
    it there (PKCS#11 lets it; AWS CloudHSM always does).
    """

    def __init__(self, iv: bytes, aad: bytes) -> None:
        self._iv = ck.byte_buffer(iv)
        self._aad = ck.byte_buffer(aad)
        self._params = ck.CK_GCM_PARAMS(
            pIv=ctypes.cast(self._iv, ctypes.c_void_p),
            ulIvLen=len(iv),
            ulIvBits=len(iv) * 8,
            pAAD=ctypes.cast(self._aad, ctypes.c_void_p),
            ulAADLen=len(aad),
            ulTagBits=GCM_TAG_BYTES * 8,
        )
        self.mechanism = ck.CK_MECHANISM(
            mechanism=ck.CKM_AES_GCM,
            pParameter=ctypes.cast(ctypes.byref(self._params), ctypes.c_void_p),
            ulParameterLen=ctypes.sizeof(self._params),
        )

    def used_iv(self) -> bytes:
        return bytes(self._iv)


class _PlainMechanism:
    """A mechanism without parameters (CKM_AES_ECB, CKM_AES_CMAC)."""

    def __init__(self, mechanism: int) -> None:
        self.mechanism = ck.CK_MECHANISM(mechanism=mechanism)


class _CtrMechanism:
    """CKM_AES_CTR whose whole 16-byte counter block is given."""

    def __init__(self, counter_block: bytes) -> None:
        self._params = ck.CK_AES_CTR_PARAMS(ulCounterBits=128)
        ctypes.memmove(self._params.cb, counter_block, AES_BLOCK_BYTES)
        self.mechanism = ck.CK_MECHANISM(
            mechanism=ck.CKM_AES_CTR,
            pParameter=ctypes.cast(ctypes.byref(self._params), ctypes.c_void_p),
            ulParameterLen=ctypes.sizeof(self._params),
        )


class _SessionPool:
    """Work sessions lent one per operation (``None``: not opened yet).

    Closing the pool wakes every waiter, and a closed pool refuses at once: a request that
    arrives after a reconnect closed its token must fail fast, never wait for a session that
    will never come back.
    """

    def __init__(self, size: int) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._idle: list[int | None] = [None] * size
        self._closed = False
        self.capacity = size  # sessions the pool may hold; shrinks when the module refuses one more

    def take(self, token_label: str) -> int | None:
        with self._cond:
            while not self._idle and not self._closed:
                self._cond.wait()
            if self._closed:
                raise HsmUnavailable(f"token {token_label!r} was closed (the plugin is reconnecting to the HSM "
                                     "or stopping); retry")
            return self._idle.pop()  # last in, first out: warm sessions first

    def give_back(self, handle: int | None) -> bool:
        """Returns the session to the pool; False when the pool was closed meanwhile."""
        with self._cond:
            if self._closed:
                return False
            self._idle.append(handle)
            self._cond.notify()
            return True

    def retire_slot(self, token_label: str) -> None:
        """Gives up a taken, never-opened slot for good: the module allows no more sessions (CKR_SESSION_COUNT).
        The caller then waits for a session another thread returns; with none left at all it fails."""
        with self._cond:
            self.capacity -= 1
            if self.capacity <= 0:
                self.capacity = 0
                raise HsmUnavailable(f"token {token_label!r} allows no work session besides the login session "
                                     "(CKR_SESSION_COUNT); close other applications' sessions or raise the "
                                     "HSM's session limit", ckr=ck.CKR_SESSION_COUNT)

    def close(self) -> list[int]:
        """Closes the pool; returns the idle sessions that were opened, for the caller to close."""
        with self._cond:
            self._closed = True
            opened = [handle for handle in self._idle if handle is not None]
            self._idle.clear()
            self._cond.notify_all()
            return opened


class Token:
    """An open, logged-in token with ``pool_size`` work sessions."""

    def __init__(self, module: Pkcs11Module, info: TokenInfo, pin: bytes, pool_size: int,
                 gcm_iv: str = "auto") -> None:
        if gcm_iv not in GCM_IV_MODES:
            raise ValueError(f"GCM IV mode {gcm_iv!r} is not one of {', '.join(GCM_IV_MODES)}")
        self.module = module
        self.info = info
        self.gcm_iv = gcm_iv  # as configured
        self._gcm_iv_used: str | None = None  # decided by the probe at the first use
        self.gcm_iv_reason = ""
        self._gcm_iv_lock = threading.Lock()
        self._pin = pin
        self._epoch = module.epoch  # the module initialisation our handles belong to
        self._closed = False
        if info.max_sessions is not None:  # one session is the login anchor
            pool_size = max(1, min(pool_size, info.max_sessions - 1))
        self._pool = _SessionPool(pool_size)
        self._in_flight = 0
        self._in_flight_peak = 0
        self._counter_lock = threading.Lock()
        self._relogin_lock = threading.Lock()
        self._login_epoch = 0  # counts successful re-logins, so concurrent threads log in once
        self._login_refused: LoginFailed | None = None
        self._anchor = self._open_session(read_write=False)
        self._login()

    # -- sessions -----------------------------------------------------------------------------
    def _open_session(self, *, read_write: bool) -> int:
        handle = ck.CK_SESSION_HANDLE()
        flags = ck.CKF_SERIAL_SESSION | (ck.CKF_RW_SESSION if read_write else 0)
        self.module.call("C_OpenSession", self.info.slot, flags, None, None, ctypes.byref(handle))
        return handle.value

    def _login(self) -> None:
        rv = self.module.call_rv("C_Login", self._anchor, ck.CKU_USER, ck.byte_buffer(self._pin), len(self._pin))
        if rv in (ck.CKR_OK, ck.CKR_USER_ALREADY_LOGGED_IN):
            return
        self.module.call_rv("C_CloseSession", self._anchor)
        if rv in (ck.CKR_PIN_INCORRECT, ck.CKR_PIN_INVALID, ck.CKR_PIN_LEN_RANGE):
            raise LoginFailed(
                f"login to token {self.info.label!r} refused: wrong PIN (CKR 0x{rv:X}); "
                "fix the PIN source; p11kms does not retry a refused PIN", ckr=rv,
            )
        if rv == ck.CKR_PIN_LOCKED:
            raise LoginFailed(f"token {self.info.label!r} has locked its user PIN; unlock it with the SO PIN",
                              ckr=rv)
        raise error_for("C_Login", rv)

    def _relogin(self, seen_epoch: int) -> None:
        """Logs in again after the HSM dropped the login, once for all threads that noticed.

        Single flight: a thread that saw the login fail before another thread restored it does
        not log in again, and after one refusal no thread tries this PIN again: every wrong
        attempt counts towards the HSM's lockout (10 on a Luna partition). The supervisor then
        decides, from the PIN source, whether another attempt is worth making.
        The old anchor is closed only after a new session exists: closing the process's last
        session would log it out and, on some modules (SoftHSM), invalidate the key handles.
        """
        with self._relogin_lock:
            if self._login_refused is not None:
                raise LoginFailed(str(self._login_refused), ckr=self._login_refused.ckr)
            if self._login_epoch != seen_epoch:
                return  # another thread logged in again meanwhile
            try:
                try:
                    self._login()
                except SessionLost:
                    dead = self._anchor
                    self._anchor = self._open_session(read_write=False)
                    self.module.call_rv("C_CloseSession", dead)
                    self._login()
            except LoginFailed as exc:
                self._login_refused = exc
                raise
            self._login_epoch += 1

    def run(self, work: Callable[[int], _Result]) -> _Result:
        """Runs one operation on a lent session, retrying once on a fresh session or after a re-login.

        A lost session or login is repaired here, invisibly to the caller; anything worse (device
        or token gone, PIN refused) propagates for the supervisor to recover from.
        """
        login_epoch = self._login_epoch
        try:
            with self.session() as handle:
                return work(handle)
        except SessionLost:
            pass  # the failed session was closed and replaced; one more try
        except NotLoggedIn:
            self._relogin(login_epoch)
        with self.session() as handle:
            return work(handle)

    def _ensure_current(self) -> None:
        """Refuses to use a handle of a closed token or of an earlier module initialisation."""
        if self._closed or self.module.epoch != self._epoch:
            raise HsmUnavailable(f"token {self.info.label!r} belongs to a closed HSM connection; retry")

    @contextmanager
    def session(self) -> Iterator[int]:
        """Lends one work session to the calling thread for one operation."""
        self._ensure_current()
        while True:
            handle = self._pool.take(self.info.label)
            try:
                if handle is None:
                    handle = self._open_session(read_write=True)
                break
            except HsmError as exc:
                if exc.ckr != ck.CKR_SESSION_COUNT:
                    self._pool.give_back(None)
                    raise
                self._pool.retire_slot(self.info.label)  # wait for a session another operation returns
            except BaseException:
                self._pool.give_back(None)
                raise
        self._enter()
        try:
            yield handle
        except BaseException:
            # The operation may have left the session mid-operation or dead: never reuse it.
            self._close_session(handle)
            self._pool.give_back(None)
            raise
        else:
            if not self._pool.give_back(handle):
                self._close_session(handle)  # the token was closed while this operation ran
        finally:
            self._leave()

    def _close_session(self, handle: int) -> None:
        if self.module.epoch == self._epoch:  # never close a number the module may have reissued
            self.module.call_rv("C_CloseSession", handle)

    def _enter(self) -> None:
        with self._counter_lock:
            self._in_flight += 1
            self._in_flight_peak = max(self._in_flight_peak, self._in_flight)
        self.module.observer.in_flight(+1)

    def _leave(self) -> None:
        with self._counter_lock:
            self._in_flight -= 1
        self.module.observer.in_flight(-1)

    @property
    def pool_capacity(self) -> int:
        """Work sessions this token may hold: ``Sessions``, less what the module's limits allow."""
        return self._pool.capacity

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def in_flight_peak(self) -> int:
        """Most operations seen inside the module at once: evidence that calls really overlap."""
        return self._in_flight_peak

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Closes the sessions; later operations, and any waiting for a session, fail at once."""
        if self._closed:
            return
        self._closed = True
        for handle in self._pool.close():
            self._close_session(handle)
        # No C_Logout: the login belongs to the whole process and ends by itself when its last
        # session closes; logging out here would break any other Token open on the same slot.
        self._close_session(self._anchor)

    # -- objects ------------------------------------------------------------------------------
    def find_secret_keys(self, label: str | None = None) -> list[int]:
        """Handles of the secret keys labelled ``label``, or of all secret keys when it is None."""
        criteria = [(ck.CKA_CLASS, _ulong_bytes(ck.CKO_SECRET_KEY))]
        if label is not None:
            criteria.append((ck.CKA_LABEL, label.encode()))
        template = _Template(criteria)
        batch = (ck.CK_OBJECT_HANDLE * 16)()
        count = ck.CK_ULONG(0)

        def find(s: int) -> list[int]:
            found: list[int] = []
            self.module.call("C_FindObjectsInit", s, template.array, len(template))
            try:
                while True:
                    self.module.call("C_FindObjects", s, batch, len(batch), ctypes.byref(count))
                    if count.value == 0:
                        return found
                    found.extend(batch[: count.value])
            finally:
                self.module.call_rv("C_FindObjectsFinal", s)

        return self.run(find)

    def find_one_secret_key(self, label: str) -> int:
        handles = self.find_secret_keys(label)
        if not handles:
            raise KeyNotFound(f"no secret key labelled {label!r} on token {self.info.label!r}")
        if len(handles) > 1:
            raise DuplicateKeyLabel(
                f"{len(handles)} secret keys are labelled {label!r} on token {self.info.label!r}; "
                "a label must name exactly one key: relabel or remove the extra keys"
            )
        return handles[0]

    def _attribute(self, session: int, handle: int, kind: int) -> bytes | None:
        attr = (ck.CK_ATTRIBUTE * 1)()
        attr[0].type = kind
        rv = self.module.call_rv("C_GetAttributeValue", session, handle, attr, 1)
        if rv != ck.CKR_OK or attr[0].ulValueLen == ck.CK_UNAVAILABLE_INFORMATION:
            if rv in (0x011, 0x012):  # ATTRIBUTE_SENSITIVE / TYPE_INVALID: not an error here
                return None
            if rv != ck.CKR_OK:
                raise error_for("C_GetAttributeValue", rv)
            return None
        buf = (ctypes.c_ubyte * attr[0].ulValueLen)()
        attr[0].pValue = ctypes.cast(buf, ctypes.c_void_p)
        self.module.call("C_GetAttributeValue", session, handle, attr, 1)
        return bytes(buf[: attr[0].ulValueLen])

    def aes_keys(self) -> list[SecretKeyAttributes]:
        """The attributes of every AES secret key on the token: the keys that can be KEKs."""
        every = (self.key_attributes(handle) for handle in self.find_secret_keys())
        return [attrs for attrs in every if attrs.key_type == ck.CKK_AES]

    def key_attributes(self, handle: int) -> SecretKeyAttributes:
        def as_int(raw: bytes | None) -> int | None:
            return ck.CK_ULONG.from_buffer_copy(raw).value if raw is not None else None

        def as_bool(raw: bytes | None) -> bool | None:
            return bool(raw[0]) if raw else None

        kinds = (ck.CKA_LABEL, ck.CKA_ID, ck.CKA_KEY_TYPE, ck.CKA_VALUE_LEN, ck.CKA_SENSITIVE,
                 ck.CKA_EXTRACTABLE, ck.CKA_ENCRYPT, ck.CKA_DECRYPT, ck.CKA_WRAP, ck.CKA_UNWRAP, ck.CKA_DERIVE,
                 ck.CKA_SIGN)
        read = self.run(lambda s: {kind: self._attribute(s, handle, kind) for kind in kinds})
        return SecretKeyAttributes(
            handle=handle,
            label=(read[ck.CKA_LABEL] or b"").decode("utf-8", errors="replace"),
            cka_id=read[ck.CKA_ID] or b"",
            key_type=as_int(read[ck.CKA_KEY_TYPE]),
            value_len=as_int(read[ck.CKA_VALUE_LEN]),
            sensitive=as_bool(read[ck.CKA_SENSITIVE]),
            extractable=as_bool(read[ck.CKA_EXTRACTABLE]),
            can_encrypt=as_bool(read[ck.CKA_ENCRYPT]),
            can_decrypt=as_bool(read[ck.CKA_DECRYPT]),
            can_wrap=as_bool(read[ck.CKA_WRAP]),
            can_unwrap=as_bool(read[ck.CKA_UNWRAP]),
            can_derive=as_bool(read[ck.CKA_DERIVE]),
            can_sign=as_bool(read[ck.CKA_SIGN]),
        )

    def generate_aes256_key(self, label: str, cka_id: bytes) -> int:
        """Creates a token AES-256 key that never leaves the HSM and can only encrypt and decrypt."""
        if self.find_secret_keys(label):
            raise KeyLabelTaken(
                f"a key labelled {label!r} already exists on token {self.info.label!r}; "
                "choose a new label (a reused label would make old ciphertexts ambiguous)"
            )
        true, false = _bool_byte(True), _bool_byte(False)
        template = _Template([
            (ck.CKA_CLASS, _ulong_bytes(ck.CKO_SECRET_KEY)),
            (ck.CKA_KEY_TYPE, _ulong_bytes(ck.CKK_AES)),
            (ck.CKA_VALUE_LEN, _ulong_bytes(32)),
            (ck.CKA_TOKEN, true),
            (ck.CKA_PRIVATE, true),
            (ck.CKA_SENSITIVE, true),
            (ck.CKA_EXTRACTABLE, false),
            (ck.CKA_ENCRYPT, true),
            (ck.CKA_DECRYPT, true),
            (ck.CKA_WRAP, false),
            (ck.CKA_UNWRAP, false),
            (ck.CKA_SIGN, false),
            (ck.CKA_VERIFY, false),
            (ck.CKA_DERIVE, false),
            (ck.CKA_LABEL, label.encode()),
            (ck.CKA_ID, cka_id),
        ])
        mechanism = ck.CK_MECHANISM(mechanism=ck.CKM_AES_KEY_GEN)
        handle = ck.CK_OBJECT_HANDLE()
        self.run(lambda s: self.module.call("C_GenerateKey", s, ctypes.byref(mechanism), template.array,
                                            len(template), ctypes.byref(handle)))
        return handle.value

    def destroy_object(self, handle: int) -> None:
        self.run(lambda s: self.module.call("C_DestroyObject", s, handle))

    def import_aes_key(self, label: str, value: bytes, cka_id: bytes = b"", *, sensitive: bool = True,
                       extractable: bool = False, encrypt: bool = True, decrypt: bool = True,
                       sign: bool = False, wrap: bool = False, derive: bool = False, modifiable: bool = True) -> int:
        """Creates a token AES key from known key material (CKA_VALUE), as an HSM backup or a cluster
        member holds it. For tests and replicas; p11kms never generates key material outside the HSM."""
        items = [
            (ck.CKA_CLASS, _ulong_bytes(ck.CKO_SECRET_KEY)),
            (ck.CKA_KEY_TYPE, _ulong_bytes(ck.CKK_AES)),
            (ck.CKA_TOKEN, _bool_byte(True)),
            (ck.CKA_PRIVATE, _bool_byte(True)),
            (ck.CKA_SENSITIVE, _bool_byte(sensitive)),
            (ck.CKA_EXTRACTABLE, _bool_byte(extractable)),
            (ck.CKA_ENCRYPT, _bool_byte(encrypt)),
            (ck.CKA_DECRYPT, _bool_byte(decrypt)),
            (ck.CKA_SIGN, _bool_byte(sign)),
            (ck.CKA_WRAP, _bool_byte(wrap)),
            (ck.CKA_DERIVE, _bool_byte(derive)),
            (ck.CKA_LABEL, label.encode()),
            (ck.CKA_VALUE, value),
        ]
        if cka_id:
            items.append((ck.CKA_ID, cka_id))
        if not modifiable:
            items.append((ck.CKA_MODIFIABLE, _bool_byte(False)))
        template = _Template(items)
        handle = ck.CK_OBJECT_HANDLE()
        self.run(lambda s: self.module.call("C_CreateObject", s, template.array, len(template), ctypes.byref(handle)))
        return handle.value

    def set_cka_id(self, handle: int, cka_id: bytes) -> None:
        template = _Template([(ck.CKA_ID, cka_id)])
        self.run(lambda s: self.module.call("C_SetAttributeValue", s, handle, template.array, len(template)))

    def set_key_flag(self, handle: int, attribute: int, value: bool) -> None:
        """Sets one CK_BBOOL attribute of a key (CKA_ENCRYPT, CKA_WRAP, ...), where the module allows the change."""
        template = _Template([(attribute, _bool_byte(value))])
        self.run(lambda s: self.module.call("C_SetAttributeValue", s, handle, template.array, len(template)))

    # -- fingerprints -------------------------------------------------------------------------
    def aes_ecb_block(self, key: int, block: bytes, *, decrypt: bool = False) -> bytes:
        """One AES block through CKM_AES_ECB: a deterministic function of the key (a key check value)."""
        if len(block) != AES_BLOCK_BYTES:
            raise ValueError("CKM_AES_ECB takes exactly one 16-byte block here")
        mech = _PlainMechanism(ck.CKM_AES_ECB)
        if decrypt:
            return self._crypt("C_DecryptInit", "C_Decrypt", key, mech, block, AES_BLOCK_BYTES)
        return self._crypt("C_EncryptInit", "C_Encrypt", key, mech, block, AES_BLOCK_BYTES)

    def aes_block_by_ctr_decryption(self, key: int, block: bytes) -> bytes:
        """The AES encryption of one block, as CKM_AES_ECB encryption gives it, computed by a decryption.

        CKM_AES_CTR decryption XORs the encryption of its counter block into the data; with ``block``
        as the counter block and 16 zero bytes as the data, the result is AES_K(block). So a key that
        only allows decryption (CKA_ENCRYPT false) still yields its key check value.
        """
        if len(block) != AES_BLOCK_BYTES:
            raise ValueError("the counter block is exactly one 16-byte block")
        return self._crypt("C_DecryptInit", "C_Decrypt", key, _CtrMechanism(block), bytes(AES_BLOCK_BYTES),
                           AES_BLOCK_BYTES)

    def offers(self, mechanism: int, flag: int) -> bool:
        """Whether the module reports ``mechanism`` with ``flag`` (CKF_ENCRYPT, ...) for this token's slot."""
        return bool(self.module.mechanism_flags(self.info.slot, mechanism) & flag)

    def aes_cmac(self, key: int, message: bytes) -> bytes:
        """The full 16-byte CKM_AES_CMAC of ``message``: a deterministic function of the key."""
        return self._crypt("C_SignInit", "C_Sign", key, _PlainMechanism(ck.CKM_AES_CMAC), message, AES_BLOCK_BYTES)

    # -- AES-GCM ------------------------------------------------------------------------------
    @property
    def gcm_iv_used(self) -> str | None:
        """The IV mode in use ("caller" or "hsm"), or None before the first probe."""
        return self._gcm_iv_used

    def resolve_gcm_iv(self, key: int) -> tuple[str, str]:
        """Decides, once per token, who chooses GCM IVs, by a round trip with ``key``; returns the mode
        and why. Raises GcmIvError, naming the mode to configure, when the configured one cannot work."""
        with self._gcm_iv_lock:
            if self._gcm_iv_used is None:
                self._gcm_iv_used, self.gcm_iv_reason = self._probe_gcm_iv(key)
            return self._gcm_iv_used, self.gcm_iv_reason

    def _probe_gcm_iv(self, key: int) -> tuple[str, str]:
        caller_problem = ""
        if self.gcm_iv in ("auto", "caller"):
            chosen = os.urandom(GCM_IV_BYTES)
            try:
                used, sealed = self._gcm_encrypt_raw(key, _IV_PROBE_PLAINTEXT, _IV_PROBE_AAD, chosen)
            except KeyNotUsable as exc:
                if exc.ckr not in _IV_REFUSALS:
                    raise
                caller_problem = f"the module refuses an IV chosen by p11kms ({exc.ckr_name})"
            else:
                if used == chosen:
                    self._check_round_trip(key, used, sealed, "caller")
                    return "caller", ("configured" if self.gcm_iv == "caller"
                                      else "the module uses the IV p11kms chooses")
                caller_problem = "the module replaces the IV p11kms chooses with one of its own"
            if self.gcm_iv == "caller":
                raise GcmIvError(f"GCM_IV = caller cannot work on token {self.info.label!r}: {caller_problem}; "
                                 "set GCM_IV = hsm (or auto)")
        used, sealed = self._gcm_encrypt_raw(key, _IV_PROBE_PLAINTEXT, _IV_PROBE_AAD, _ZERO_IV)
        if used == _ZERO_IV:
            why = f"{caller_problem}, and " if caller_problem else ""
            raise GcmIvError(
                f"no GCM IV mode works on token {self.info.label!r}: {why}the module wrote no IV back into "
                "CK_GCM_PARAMS.pIv when asked to generate one"
                + ("; set GCM_IV = caller (or auto)" if not caller_problem else
                   "; this module cannot wrap keys for p11kms with AES-GCM")
            )
        self._check_round_trip(key, used, sealed, "hsm")
        return "hsm", caller_problem or "configured"

    def _check_round_trip(self, key: int, iv: bytes, sealed: bytes, mode: str) -> None:
        if self.gcm_decrypt(key, iv, sealed, _IV_PROBE_AAD) != _IV_PROBE_PLAINTEXT:
            raise GcmIvError(f"GCM IV probe in {mode} mode on token {self.info.label!r}: the ciphertext did not "
                             "open under the IV the module reported; this module cannot be used with GCM_IV = "
                             f"{mode}")

    def gcm_encrypt(self, key: int, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """Encrypts inside the HSM. Returns (iv, ciphertext || tag), where iv is the IV the module used.

        In "caller" mode p11kms draws a fresh random IV and checks the module kept it; in "hsm" mode the
        module writes its IV into pIv and p11kms checks it did. Either way no ciphertext is returned
        with an IV the module did not use.
        """
        mode = self._gcm_iv_used or self.resolve_gcm_iv(key)[0]
        if mode == "caller":
            return self.gcm_encrypt_caller_iv(key, plaintext, aad, os.urandom(GCM_IV_BYTES))
        used, sealed = self._gcm_encrypt_raw(key, plaintext, aad, _ZERO_IV)
        if used == _ZERO_IV:
            raise GcmIvError(f"token {self.info.label!r} wrote no IV into pIv in GCM_IV = hsm mode; the ciphertext "
                             "was discarded; set GCM_IV = caller (or auto)")
        return used, sealed

    def gcm_encrypt_caller_iv(self, key: int, plaintext: bytes, aad: bytes, iv: bytes) -> tuple[bytes, bytes]:
        """Encrypts under exactly ``iv``; raises GcmIvError if the module refuses or replaces it."""
        try:
            used, sealed = self._gcm_encrypt_raw(key, plaintext, aad, iv)
        except KeyNotUsable as exc:
            if exc.ckr in _IV_REFUSALS:
                raise GcmIvError(f"token {self.info.label!r} refuses an IV chosen by p11kms ({exc.ckr_name}); "
                                 "set GCM_IV = hsm (or auto)", ckr=exc.ckr) from exc
            raise
        if used != iv:
            raise GcmIvError(f"token {self.info.label!r} replaced the IV chosen by p11kms with its own; the "
                             "ciphertext was discarded; set GCM_IV = hsm (or auto)")
        return used, sealed

    def _gcm_encrypt_raw(self, key: int, plaintext: bytes, aad: bytes, iv: bytes) -> tuple[bytes, bytes]:
        mech = _GcmMechanism(iv, aad)
        sealed = self._crypt("C_EncryptInit", "C_Encrypt", key, mech, plaintext, len(plaintext) + GCM_TAG_BYTES)
        return mech.used_iv(), sealed

    def gcm_decrypt(self, key: int, iv: bytes, sealed: bytes, aad: bytes) -> bytes:
        mech = _GcmMechanism(iv, aad)
        return self._crypt("C_DecryptInit", "C_Decrypt", key, mech, sealed, len(sealed))

    def _crypt(self, init_function: str, function: str, key: int, mech: _GcmMechanism | _PlainMechanism | _CtrMechanism,
               data: bytes, out_len: int) -> bytes:
        source = ck.byte_buffer(data)
        # Room for one extra block: some modules ask for more than the exact GCM output size.
        out = (ctypes.c_ubyte * (out_len + 16))()
        produced = ck.CK_ULONG(len(out))

        def crypt(s: int) -> bytes:
            produced.value = len(out)
            self.module.call(init_function, s, ctypes.byref(mech.mechanism), key)
            self.module.call(function, s, source, len(data), out, ctypes.byref(produced))
            return bytes(out[: produced.value])

        return self.run(crypt)


# What a module answers when it will not take a caller's GCM IV (AWS CloudHSM, Luna in FIPS mode).
_IV_REFUSALS = frozenset({ck.CKR_MECHANISM_PARAM_INVALID, ck.CKR_MECHANISM_INVALID})


def open_token(module: Pkcs11Module, info: TokenInfo, pin: bytes, pool_size: int, gcm_iv: str = "auto") -> Token:
    """Opens and logs in; a device-level failure surfaces as HsmUnavailable, a PIN failure as LoginFailed."""
    try:
        return Token(module, info, pin, pool_size, gcm_iv)
    except (LoginFailed, HsmUnavailable):
        raise
    except HsmError as exc:
        raise HsmUnavailable(f"cannot open token {info.label!r}: {exc}", ckr=exc.ckr) from exc
