"""The keyring: which key encrypts, which keys decrypt, and the ciphertext format.

Ciphertext format, version 1 (what Encrypt returns and kube-apiserver stores):

    0x01 | IV (12 bytes) | AES-256-GCM ciphertext | tag (16 bytes)

The additional authenticated data is ``0x01 | key UUID (ASCII)``, so a
ciphertext only opens under the key_id it was issued with, and a future format
cannot be confused with this one.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from p11kms.hsm import ckdefs as ck
from p11kms.hsm.errors import (
    AmbiguousDecryptFailure,
    CiphertextRejected,
    GcmIvError,
    HsmError,
    HsmUnavailable,
    KeyNotFound,
    KeyNotUsable,
)
from p11kms.hsm.keyident import alias_uuids, key_uuid
from p11kms.hsm.token import GCM_IV_BYTES, GCM_TAG_BYTES, SecretKeyAttributes, Token, policy_problems

FORMAT_V1 = 0x01
MAX_CIPHERTEXT_BYTES = 1024  # kube-apiserver rejects longer ciphertexts (spec 2.4)
OVERHEAD_BYTES = 1 + GCM_IV_BYTES + GCM_TAG_BYTES
MAX_PLAINTEXT_BYTES = MAX_CIPHERTEXT_BYTES - OVERHEAD_BYTES
_SELF_TEST_PLAINTEXT = bytes(32)


class Role(enum.StrEnum):
    PRIMARY = "primary"
    SECONDARY = "secondary"


@dataclass(frozen=True)
class Kek:
    """One key-encryption key as the keyring knows it."""

    role: Role
    label: str
    uuid: str
    uuid_source: str
    handle: int
    # Decrypt-only UUIDs of the same key (what an earlier UUID rule gave it); never used to encrypt.
    aliases: tuple[str, ...] = ()
    # What makes it weaker than a key `keys create` makes (extractable, short, can wrap...): served, with a warning.
    policy_warnings: tuple[str, ...] = ()


class KeyringError(Exception):
    """Base class of request-level problems the keyring detects before or after the HSM."""


class UnknownKeyId(KeyringError):
    def __init__(self, key_id: str, known: Iterable[Kek], missing: Iterable[MissingKey] = ()) -> None:
        listing = ", ".join(f"{k.uuid} ({k.role}, label {k.label!r})" for k in known)
        gone = ", ".join(repr(m.label) for m in missing)
        also = f"; configured but missing from the HSM: {gone}" if gone else ""
        super().__init__(
            f"key_id {key_id!r} is not a configured key; configured keys: {listing}{also}. "
            "Data wrapped under an old key needs that key listed in Secondary_key and still present "
            "in the HSM: never delete an old key while etcd holds objects that use it"
        )
        self.key_id = key_id


@dataclass(frozen=True)
class MissingKey:
    """A configured decrypt-only key that is not in the HSM. The primary is never allowed to be missing."""

    role: Role
    label: str
    uuid: str | None  # known when the key was loaded earlier in this process


class KeyMissing(UnknownKeyId):
    """The key_id names a configured key that has gone from the HSM."""

    def __init__(self, key_id: str, missing: MissingKey) -> None:
        KeyringError.__init__(
            self,
            f"key_id {key_id} belongs to the {missing.role} key {missing.label!r}, which is configured but no "
            "longer in the HSM: restore it from an HSM backup or replica (objects under it cannot be read "
            "until then); never create a new key under the old label",
        )
        self.key_id = key_id


class MalformedCiphertext(KeyringError):
    """The ciphertext is not in a format p11kms produces."""


class InvalidPlaintext(KeyringError):
    """The plaintext to wrap is empty or too long."""


class UnsuitableKey(KeyringError):
    """A configured key cannot serve as a KEK (wrong type or usage flags, or a duplicate)."""


def _aad(key_uuid_text: str) -> bytes:
    return bytes([FORMAT_V1]) + key_uuid_text.encode("ascii")


class Keyring:
    """An immutable set of KEKs on one token: exactly one primary and any number of secondaries."""

    def __init__(self, token: Token, primary: Kek, secondaries: tuple[Kek, ...],
                 missing: tuple[MissingKey, ...] = ()) -> None:
        self.token = token
        self.primary = primary
        self.secondaries = secondaries
        self.missing = missing
        self._by_uuid = {alias: k for k in (primary, *secondaries) for alias in k.aliases}
        self._by_uuid.update({k.uuid: k for k in (primary, *secondaries)})
        self._missing_by_uuid = {m.uuid: m for m in missing if m.uuid is not None}
        # Self-tests run for ambiguous Decrypt failures, one at a time: how many have started, and
        # the number and outcome (None: passed) of the last one to finish.
        self._self_test_lock = threading.Lock()
        self._self_tests_started = 0
        self._last_self_test: tuple[int, HsmError | None] = (0, None)

    @property
    def key_id(self) -> str:
        return self.primary.uuid

    @property
    def keys(self) -> tuple[Kek, ...]:
        return (self.primary, *self.secondaries)

    def known_uuids(self) -> dict[str, str]:
        """label -> UUID of every key this keyring knows the UUID of, missing ones included."""
        known = {m.label: m.uuid for m in self.missing if m.uuid is not None}
        return known | {k.label: k.uuid for k in self.keys}

    def key_for(self, key_id: str) -> Kek:
        kek = self._by_uuid.get(key_id)
        if kek is not None:
            return kek
        missing = self._missing_by_uuid.get(key_id)
        if missing is not None:
            raise KeyMissing(key_id, missing)
        raise UnknownKeyId(key_id, self.keys, self.missing)

    def encrypt(self, plaintext: bytes) -> bytes:
        if not plaintext:
            raise InvalidPlaintext("plaintext is empty; kube-apiserver always sends a 32-byte DEK seed")
        check_plaintext_size(plaintext)
        iv, sealed = self.token.gcm_encrypt(self.primary.handle, plaintext, _aad(self.primary.uuid))
        return bytes([FORMAT_V1]) + iv + sealed

    def decrypt(self, ciphertext: bytes, key_id: str) -> bytes:
        kek = self.key_for(key_id)
        try:
            return self._open(kek, ciphertext, key_id)
        except CiphertextRejected as exc:
            raise CiphertextRejected(_rejected_message(kek), ckr=exc.ckr) from exc
        except AmbiguousDecryptFailure as exc:
            # Some modules answer a bad tag with CKR_GENERAL_ERROR (SoftHSM 2.6) or CKR_FUNCTION_FAILED,
            # codes that also mean a device fault. A self-test that started after this failure tells
            # whether the HSM works now; if it does, one retry tells a transient fault (it opens) from
            # a bad ciphertext (it fails again).
            failure = exc
            seen = self._self_tests_started
        problem = self._self_test_after(seen)
        if problem is not None:
            raise HsmUnavailable(
                f"decrypt failed with {failure.ckr_name} and the HSM self-test failed too: {problem}",
                ckr=failure.ckr,
            ) from problem
        try:
            return self._open(kek, ciphertext, key_id)
        except (CiphertextRejected, AmbiguousDecryptFailure) as exc:
            raise CiphertextRejected(_rejected_message(kek), ckr=exc.ckr) from exc

    def _open(self, kek: Kek, ciphertext: bytes, key_id: str) -> bytes:
        """Opens under ``key_id`` as issued: the key's UUID, or one of its decrypt-only aliases."""
        iv, sealed = _split_v1(ciphertext)
        return self.token.gcm_decrypt(kek.handle, iv, sealed, _aad(key_id))

    def self_test(self) -> None:
        """Encrypts and decrypts a fixed non-secret buffer with the primary key."""
        wrapped = self.encrypt(_SELF_TEST_PLAINTEXT)
        if self._open(self.primary, wrapped, self.primary.uuid) != _SELF_TEST_PLAINTEXT:
            raise HsmError("self-test round trip returned different bytes")

    def _self_test_after(self, seen: int) -> HsmError | None:
        """The outcome of a self-test that started after ``seen`` self-tests had: the last one's if it
        did, else a new one's. One runs at a time, so callers that failed before it started share it."""
        with self._self_test_lock:
            number, outcome = self._last_self_test
            if number > seen:
                return outcome
            self._self_tests_started = number = self._self_tests_started + 1
            try:
                self.self_test()
                outcome = None
            except HsmError as exc:
                outcome = exc
            self._last_self_test = (number, outcome)
            return outcome


def check_plaintext_size(plaintext: bytes) -> None:
    """Refuses a plaintext too long to wrap; the service calls it too, before a call takes an HSM slot."""
    if len(plaintext) > MAX_PLAINTEXT_BYTES:
        raise InvalidPlaintext(
            f"plaintext is {len(plaintext)} bytes; at most {MAX_PLAINTEXT_BYTES} fit in the "
            f"{MAX_CIPHERTEXT_BYTES}-byte ciphertext limit of KMS v2"
        )


def check_ciphertext_size(ciphertext: bytes) -> None:
    """Refuses a ciphertext longer than p11kms ever issues; the service calls it too, before the HSM slot."""
    if len(ciphertext) > MAX_CIPHERTEXT_BYTES:
        raise MalformedCiphertext(
            f"ciphertext is {len(ciphertext)} bytes; p11kms never issues more than {MAX_CIPHERTEXT_BYTES}"
        )


def _split_v1(ciphertext: bytes) -> tuple[bytes, bytes]:
    if not ciphertext:
        raise MalformedCiphertext("ciphertext is empty")
    check_ciphertext_size(ciphertext)
    if ciphertext[0] != FORMAT_V1:
        raise MalformedCiphertext(
            f"ciphertext format byte is 0x{ciphertext[0]:02x}, expected 0x{FORMAT_V1:02x}: "
            "it was not produced by p11kms (or by a newer version)"
        )
    if len(ciphertext) < OVERHEAD_BYTES + 1:
        raise MalformedCiphertext(
            f"ciphertext is {len(ciphertext)} bytes, shorter than the {OVERHEAD_BYTES + 1}-byte minimum: truncated"
        )
    return ciphertext[1 : 1 + GCM_IV_BYTES], ciphertext[1 + GCM_IV_BYTES :]


def _rejected_message(kek: Kek) -> str:
    return (
        f"ciphertext failed authentication under key {kek.uuid} (label {kek.label!r}): it was altered, "
        "truncated, or issued under a different key_id"
    )


def usage_problems(attrs: SecretKeyAttributes, role: Role) -> list[str]:
    """Why the key cannot wrap and unwrap as ``role`` at all; serve refuses such a key, doctor fails it."""
    problems = []
    if attrs.key_type != ck.CKK_AES:
        problems.append("it is not an AES key")
    if attrs.can_decrypt is False:
        problems.append("CKA_DECRYPT is false")
    if role is Role.PRIMARY and attrs.can_encrypt is False:
        problems.append("CKA_ENCRYPT is false")
    return problems


def resolve_kek(token: Token, label: str, role: Role) -> Kek:
    """Finds the key labelled ``label`` and checks it can wrap and unwrap with AES-GCM."""
    try:
        handle = token.find_one_secret_key(label)
    except KeyNotFound as exc:
        raise KeyNotFound(f"{role} key {label!r} is not on token {token.info.label!r}", ckr=exc.ckr) from exc
    attrs = token.key_attributes(handle)
    problems = usage_problems(attrs, role)
    if problems:
        raise UnsuitableKey(f"key {label!r} ({role}) cannot be used: {'; '.join(problems)}")
    try:
        uuid, source = key_uuid(token, attrs)
    except KeyNotUsable as exc:
        raise UnsuitableKey(f"key {label!r} ({role}) has no stable UUID: {exc}") from exc
    aliases = tuple(str(alias) for alias in alias_uuids(token, attrs, uuid))
    return Kek(role=role, label=label, uuid=str(uuid), uuid_source=source, handle=handle, aliases=aliases,
               policy_warnings=tuple(policy_problems(attrs)))


class GcmIvUnusable(UnsuitableKey):
    """No GCM IV mode works for the primary key on this module, or not the configured one."""


def build_keyring(token: Token, primary_label: str, secondary_labels: Iterable[str],
                  known_uuids: Mapping[str, str] | None = None) -> Keyring:
    """Looks every key up once; requests then use the handles found here.

    A missing primary raises KeyNotFound: nothing can be encrypted. A missing secondary is
    recorded instead, with its UUID when ``known_uuids`` (label -> UUID from an earlier keyring)
    knows it, so the primary keeps serving and only Decrypts under that key are refused.
    """
    primary = resolve_kek(token, primary_label, Role.PRIMARY)
    try:
        token.resolve_gcm_iv(primary.handle)  # GCM_IV = auto decides here, once per token
    except GcmIvError as exc:
        raise GcmIvUnusable(str(exc)) from exc
    secondaries: list[Kek] = []
    missing: list[MissingKey] = []
    for label in secondary_labels:
        try:
            secondaries.append(resolve_kek(token, label, Role.SECONDARY))
        except KeyNotFound:
            missing.append(MissingKey(Role.SECONDARY, label, (known_uuids or {}).get(label)))
    seen: dict[str, Kek] = {}
    for kek in (primary, *secondaries):
        for name in (kek.uuid, *kek.aliases):
            twin = seen.get(name)
            if twin is not None:
                raise UnsuitableKey(
                    f"labels {twin.label!r} and {kek.label!r} name the same key (UUID {name}); list it once"
                )
            seen[name] = kek
    return Keyring(token, primary, tuple(secondaries), tuple(missing))
