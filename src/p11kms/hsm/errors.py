"""Typed HSM errors.

Every PKCS#11 return code that reaches the plugin becomes one of these classes,
so the layers above decide by type, never by number. The service layer maps
them to gRPC status codes in one place.
"""

from __future__ import annotations

from p11kms.hsm import ckdefs as ck


def ckr_name(rv: int) -> str:
    return ck.CKR_NAMES.get(rv, f"CKR_0x{rv:X}")


class HsmError(Exception):
    """Base class. ``ckr`` is the PKCS#11 return code when one caused the error."""

    def __init__(self, message: str, *, ckr: int | None = None) -> None:
        super().__init__(message)
        self.ckr = ckr

    @property
    def ckr_name(self) -> str:
        return ckr_name(self.ckr) if self.ckr is not None else "none"


class ModuleLoadError(HsmError):
    """The PKCS#11 module file cannot be loaded or does not export C_GetFunctionList."""


class TokenNotFound(HsmError):
    """No slot holds a token matching the configured label, serial or slot id."""


class HsmUnavailable(HsmError):
    """The device, token or session went away; the operation may succeed after recovery."""


class SessionLost(HsmUnavailable):
    """The session handle is no longer valid; a fresh session may work at once."""


class NotLoggedIn(HsmUnavailable):
    """The application's login is gone (e.g. the HSM restarted); logging in again may work at once."""


class LoginFailed(HsmError):
    """The PIN was refused. Never retried automatically: retries can lock the token."""


class CiphertextRejected(HsmError):
    """The HSM refused to decrypt: the ciphertext or its authentication tag is not valid."""


class AmbiguousDecryptFailure(HsmError):
    """C_Decrypt returned a code that some HSMs use for a bad tag and others for a fault.

    SoftHSM 2.6 reports a GCM tag mismatch as CKR_GENERAL_ERROR, other modules as
    CKR_FUNCTION_FAILED; the keyring resolves the ambiguity with a known-good self-test and a retry.
    """


class KeyNotUsable(HsmError):
    """The key exists but cannot do the requested operation (type, usage flags, mechanism)."""


class KeyHandleInvalid(HsmError):
    """A key handle no longer names an object: the key was deleted (or re-created) behind our back.

    Not a device fault: the rest of the token works, so the keys are looked up again instead of
    reconnecting the whole HSM.
    """


class GcmIvError(HsmError):
    """The module's handling of the AES-GCM IV does not fit the configured ``GCM_IV`` mode.

    Raised before a ciphertext leaves the HSM layer whenever the IV a ciphertext would carry is not
    provably the IV the module used (a caller IV the module replaced, or no IV written back in
    ``hsm`` mode), and when the module refuses a caller IV. The message names the mode to use.
    """


class UnstableFingerprint(KeyNotUsable):
    """A key's fingerprint differs between two computations, so no stable UUID can be derived from it."""


class KeyNotFound(HsmError):
    """No key with the given label exists on the token."""


class DuplicateKeyLabel(HsmError):
    """More than one key carries the same label, so the label does not name one key."""


class KeyLabelTaken(HsmError):
    """A key with the label already exists; creating another would make the label ambiguous."""


_UNAVAILABLE = frozenset({
    ck.CKR_DEVICE_ERROR,
    ck.CKR_DEVICE_MEMORY,
    ck.CKR_DEVICE_REMOVED,
    ck.CKR_SESSION_CLOSED,
    ck.CKR_SESSION_HANDLE_INVALID,
    ck.CKR_TOKEN_NOT_PRESENT,
    ck.CKR_TOKEN_NOT_RECOGNIZED,
    ck.CKR_USER_NOT_LOGGED_IN,
    ck.CKR_CRYPTOKI_NOT_INITIALIZED,
    ck.CKR_FUNCTION_FAILED,
})
_STALE_KEY = frozenset({ck.CKR_KEY_HANDLE_INVALID, ck.CKR_OBJECT_HANDLE_INVALID})
_LOGIN = frozenset({
    ck.CKR_PIN_INCORRECT,
    ck.CKR_PIN_INVALID,
    ck.CKR_PIN_LEN_RANGE,
    ck.CKR_PIN_EXPIRED,
    ck.CKR_PIN_LOCKED,
})
_KEY_USAGE = frozenset({0x063, 0x068, 0x070, 0x071})  # KEY_TYPE_INCONSISTENT .. MECHANISM_PARAM_INVALID
_CIPHERTEXT = frozenset({ck.CKR_ENCRYPTED_DATA_INVALID, ck.CKR_ENCRYPTED_DATA_LEN_RANGE,
                         ck.CKR_AEAD_DECRYPT_FAILED})
# What modules answer to a bad GCM tag besides the codes above: SoftHSM 2.6 CKR_GENERAL_ERROR, some
# others CKR_FUNCTION_FAILED. Both also mean a device fault elsewhere, so on C_Decrypt they are
# ambiguous and the keyring settles them with a self-test and a retry instead of a reconnect.
_AMBIGUOUS_DECRYPT = frozenset({ck.CKR_GENERAL_ERROR, ck.CKR_FUNCTION_FAILED})


def error_for(function: str, rv: int) -> HsmError:
    """Builds the typed exception for a failed PKCS#11 call."""
    message = f"{function} failed: {ckr_name(rv)} (0x{rv:X})"
    if function == "C_Decrypt" and rv in _CIPHERTEXT:
        return CiphertextRejected(message, ckr=rv)
    if function == "C_Decrypt" and rv in _AMBIGUOUS_DECRYPT:
        return AmbiguousDecryptFailure(message, ckr=rv)
    if rv in (ck.CKR_SESSION_HANDLE_INVALID, ck.CKR_SESSION_CLOSED):
        return SessionLost(message, ckr=rv)
    if rv == ck.CKR_USER_NOT_LOGGED_IN:
        return NotLoggedIn(message, ckr=rv)
    if rv in _UNAVAILABLE:
        return HsmUnavailable(message, ckr=rv)
    if rv in _STALE_KEY:
        return KeyHandleInvalid(message, ckr=rv)
    if rv in _LOGIN:
        return LoginFailed(message, ckr=rv)
    if rv in _KEY_USAGE:
        return KeyNotUsable(message, ckr=rv)
    return HsmError(message, ckr=rv)
