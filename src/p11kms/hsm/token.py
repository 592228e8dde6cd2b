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
    HsmError,
    HsmUnavailable,
    KeyLabelTaken,
    KeyNotFound,
    LoginFailed,
    NotLoggedIn,
    SessionLost,
    error_for,
)
from p11kms.hsm.module import Pkcs11Module, TokenInfo

GCM_IV_BYTES = 12
GCM_TAG_BYTES = 16
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
    """CKM_AES_GCM with a 96-bit IV, additional data and a 128-bit tag."""

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


class _SessionPool:
    """Work sessions lent one per operation (``None``: not opened yet).

    Closing the pool wakes every waiter, and a closed pool refuses at once: a request that
    arrives after a reconnect closed its token must fail fast, never wait for a session that
    will never come back.
    """

    def __init__(self, size: int) -> None:
        self._cond = threading.Condition()
        self._idle: list[int | None] = [None] * size
        self._closed = False

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

    def __init__(self, module: Pkcs11Module, info: TokenInfo, pin: bytes, pool_size: int) -> None:
        self.module = module
        self.info = info
        self._pin = pin
        self._epoch = module.epoch  # the module initialisation our handles belong to
        self._closed = False
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
        handle = self._pool.take(self.info.label)
        try:
            if handle is None:
                handle = self._open_session(read_write=True)
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

    def key_attributes(self, handle: int) -> SecretKeyAttributes:
        def as_int(raw: bytes | None) -> int | None:
            return ck.CK_ULONG.from_buffer_copy(raw).value if raw is not None else None

        def as_bool(raw: bytes | None) -> bool | None:
            return bool(raw[0]) if raw else None

        kinds = (ck.CKA_LABEL, ck.CKA_ID, ck.CKA_KEY_TYPE, ck.CKA_VALUE_LEN, ck.CKA_SENSITIVE,
                 ck.CKA_EXTRACTABLE, ck.CKA_ENCRYPT, ck.CKA_DECRYPT)
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

    # -- AES-GCM ------------------------------------------------------------------------------
    def gcm_encrypt(self, key: int, plaintext: bytes, aad: bytes, iv: bytes | None = None) -> tuple[bytes, bytes]:
        """Encrypts inside the HSM. Returns (iv, ciphertext || tag); the IV is fresh unless given."""
        iv = os.urandom(GCM_IV_BYTES) if iv is None else iv
        mech = _GcmMechanism(iv, aad)
        return iv, self._crypt("C_EncryptInit", "C_Encrypt", key, mech, plaintext,
                               len(plaintext) + GCM_TAG_BYTES)

    def gcm_decrypt(self, key: int, iv: bytes, sealed: bytes, aad: bytes) -> bytes:
        mech = _GcmMechanism(iv, aad)
        return self._crypt("C_DecryptInit", "C_Decrypt", key, mech, sealed, len(sealed))

    def _crypt(self, init_function: str, function: str, key: int, mech: _GcmMechanism, data: bytes,
               out_len: int) -> bytes:
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


def open_token(module: Pkcs11Module, info: TokenInfo, pin: bytes, pool_size: int) -> Token:
    """Opens and logs in; a device-level failure surfaces as HsmUnavailable, a PIN failure as LoginFailed."""
    try:
        return Token(module, info, pin, pool_size)
    except (LoginFailed, HsmUnavailable):
        raise
    except HsmError as exc:
        raise HsmUnavailable(f"cannot open token {info.label!r}: {exc}", ckr=exc.ckr) from exc
