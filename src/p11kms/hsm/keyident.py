"""The key UUID rule: how every KEK gets the id that kube-apiserver stores in etcd.

Frozen: a change to this rule changes key_ids that etcd already holds, and is a breaking change.

1. ``cka_id``: a key whose CKA_ID holds a UUID in canonical text form (36 lower-case ASCII
   characters, as ``p11kms keys create`` and ``p11kms keys adopt`` write it) has that UUID.
2. Any other AES key gets a name-based UUID (RFC 4122 version 5, namespace
   ``KEY_UUID_NAMESPACE``) of a fingerprint of its key material, computed inside the HSM by the
   first of these the key and module allow (the name is the prefix followed by the 32 lower-case
   hex digits of the 16-byte result):

   ``ecb-kcv``   the AES encryption of the block ``FINGERPRINT_BLOCK``;      name "aes-ecb-kcv-v2:<hex>"
   ``cmac``      CKM_AES_CMAC (full 16 bytes) of ``FINGERPRINT_BLOCK``;        name "aes-cmac-v2:<hex>"
   ``ecb-dec``   CKM_AES_ECB decryption of the block ``FINGERPRINT_BLOCK``;   name "aes-ecb-dec-v2:<hex>"

   ``ecb-kcv`` is computed by CKM_AES_ECB encryption; for a key that does not allow encryption
   (CKA_ENCRYPT false) on a module that offers AES-ECB encryption, by CKM_AES_CTR decryption of a
   zero block with the block as the counter, which yields the same 16 bytes. So clearing
   CKA_ENCRYPT or CKA_SIGN (a decrypt-only hardening) does not change a key's UUID (issue 20).

   None of them takes an IV, so a module that replaces GCM IVs (AWS CloudHSM, FIPS-mode Luna and
   nShield) computes the same value as SoftHSM. The fingerprint is computed twice and a key whose
   two answers differ is refused, never given a UUID that could change.

The fingerprint reveals one AES block of a fixed, p11kms-specific input, which says nothing useful
about the key (AES resists known-plaintext attacks); the block is never a wrapped DEK seed.

Compatibility: up to issue 10 the rule for foreign keys was a v5 UUID of the AES-GCM tag of an
empty message under a fixed IV (``legacy_gcm_uuid``). kube-apiserver stored those UUIDs in etcd,
so a key keeps that UUID as a decrypt-only *alias* wherever it can still be computed (the
module honours a caller's IV and the tag is the same twice). That is exactly where old data can
exist: on a module that replaces IVs the old rule never gave a stable UUID, so nothing was stored
under one. The new UUID encrypts from now on; kube-apiserver sees a key_id change once, as after a
rotation, and re-encrypting (``kubectl replace``) moves old objects to it. In the same way a key
that ``keys adopt`` gave a stored UUID keeps its fingerprint UUID as an alias (``alias_uuids``).

Up to issue 20 the ``ecb-kcv`` value needed CKA_ENCRYPT, so a key without it got its ``cmac`` or
``ecb-dec`` UUID: clearing CKA_ENCRYPT on an old primary changed its UUID and stranded every object
stored under it. Such a key now has its ``ecb-kcv`` UUID again, the one it had while it encrypted.
Nothing can be stored under the ``cmac`` or ``ecb-dec`` UUID of a key that does not allow encryption
(kube-apiserver only stores the key_id of a primary, which encrypts, and a key that encrypts gets
``ecb-kcv`` wherever the module offers AES-ECB encryption), yet that old-rule UUID stays a
decrypt-only alias wherever it can be computed (``old_rule_uuid``), so nothing stored under any
UUID p11kms ever served becomes unreadable. Where the module offers no AES-ECB encryption, every
key keeps exactly the UUID the old rule gave it. Where it offers AES-ECB but not AES-CTR, a key
without CKA_ENCRYPT cannot compute its ``ecb-kcv`` value and still falls through to ``cmac`` or
``ecb-dec``: on such a module leave CKA_ENCRYPT set on old keys (a decrypt-only key never encrypts).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable

from p11kms.hsm import ckdefs as ck
from p11kms.hsm.errors import GcmIvError, HsmError, KeyNotUsable, UnstableFingerprint
from p11kms.hsm.token import SecretKeyAttributes, Token

# Namespace of p11kms name-based key UUIDs. Changing it would change every derived key_id.
KEY_UUID_NAMESPACE = uuid.UUID("6c1f2f4e-8d2b-5a51-9a43-3f0e7c5d2b10")
FINGERPRINT_BLOCK = b"p11kms key id v2"  # exactly one AES block (16 ASCII bytes)
# The rule before issue 10, kept only to recognise the UUIDs it gave (decrypt-only aliases).
LEGACY_FINGERPRINT_IV = b"p11kms:fp:v1"  # 12 bytes
LEGACY_FINGERPRINT_AAD = b"p11kms key fingerprint v1"

SOURCE_CKA_ID = "cka_id"


def _key_check_value(token: Token, key: SecretKeyAttributes) -> bytes:
    """AES_K(FINGERPRINT_BLOCK): by AES-ECB encryption, or by AES-CTR decryption (the same bytes) for a key that
    does not allow encryption, where the module offers AES-ECB encryption (so the old rule gave such a key this
    value for as long as it allowed encryption)."""
    if key.can_encrypt is False and token.offers(ck.CKM_AES_ECB, ck.CKF_ENCRYPT):
        return token.aes_block_by_ctr_decryption(key.handle, FINGERPRINT_BLOCK)
    return token.aes_ecb_block(key.handle, FINGERPRINT_BLOCK)


_Fingerprint = tuple[str, str, Callable[[Token, SecretKeyAttributes], bytes]]
_FINGERPRINTS: tuple[_Fingerprint, ...] = (
    ("ecb-kcv", "aes-ecb-kcv-v2:", _key_check_value),
    ("cmac", "aes-cmac-v2:", lambda token, key: token.aes_cmac(key.handle, FINGERPRINT_BLOCK)),
    ("ecb-dec", "aes-ecb-dec-v2:",
     lambda token, key: token.aes_ecb_block(key.handle, FINGERPRINT_BLOCK, decrypt=True)),
)
assert len(FINGERPRINT_BLOCK) == 16 and len(LEGACY_FINGERPRINT_IV) == 12


def uuid_from_cka_id(cka_id: bytes) -> uuid.UUID | None:
    """Returns the UUID a CKA_ID carries in canonical text form, or None."""
    try:
        text = cka_id.decode("ascii")
        parsed = uuid.UUID(text)
    except (UnicodeDecodeError, ValueError):
        return None
    return parsed if str(parsed) == text else None


def fingerprint_uuid(token: Token, key: SecretKeyAttributes,
                     rules: tuple[_Fingerprint, ...] = _FINGERPRINTS) -> tuple[uuid.UUID, str]:
    """The v5 UUID of the first fingerprint the key allows, and its source name.

    Raises KeyNotUsable when the key allows none of them, UnstableFingerprint when one is not
    deterministic on this module.
    """
    refusals = []
    for source, prefix, compute in rules:
        try:
            first = compute(token, key)
        except KeyNotUsable as exc:
            refusals.append(f"{source}: {exc.ckr_name}")
            continue
        if compute(token, key) != first:
            raise UnstableFingerprint(
                f"key {key.label!r}: the {source} fingerprint differs between two computations, so no stable "
                "UUID can be derived; give the key a stored UUID with `p11kms keys adopt --label "
                f"{key.label}` on the primary HSM")
        return uuid.uuid5(KEY_UUID_NAMESPACE, prefix + first.hex()), source
    raise KeyNotUsable(
        f"key {key.label!r} allows no fingerprint mechanism ({'; '.join(refusals)}); give it a stored UUID "
        f"with `p11kms keys adopt --label {key.label}`")


def legacy_gcm_uuid(token: Token, key: SecretKeyAttributes) -> uuid.UUID | None:
    """The UUID the pre-issue-10 rule gave a foreign key, or None where it cannot be computed stably."""
    if key.can_encrypt is False:
        return None
    tags = []
    for _ in range(2):
        try:
            _, sealed = token.gcm_encrypt_caller_iv(key.handle, b"", LEGACY_FINGERPRINT_AAD, LEGACY_FINGERPRINT_IV)
        except (KeyNotUsable, GcmIvError):
            return None
        tags.append(sealed)
    if tags[0] != tags[1]:
        return None
    return uuid.uuid5(KEY_UUID_NAMESPACE, "aes-gcm-fingerprint-v1:" + tags[0].hex())


def old_rule_uuid(token: Token, key: SecretKeyAttributes) -> uuid.UUID | None:
    """The UUID the rule before issue 20 gave a key that does not allow encryption (its ``cmac`` or ``ecb-dec``
    fingerprint UUID: the ``ecb-kcv`` value needed CKA_ENCRYPT), or None where it is the same rule as now or
    cannot be computed stably."""
    if key.can_encrypt is not False:
        return None
    try:
        return fingerprint_uuid(token, key, _FINGERPRINTS[1:])[0]
    except KeyNotUsable:
        return None


def key_uuid(token: Token, key: SecretKeyAttributes) -> tuple[uuid.UUID, str]:
    """Returns the key's UUID and where it came from ("cka_id", "ecb-kcv", "cmac" or "ecb-dec")."""
    from_id = uuid_from_cka_id(key.cka_id)
    if from_id is not None:
        return from_id, SOURCE_CKA_ID
    return fingerprint_uuid(token, key)


def alias_uuids(token: Token, key: SecretKeyAttributes, main: uuid.UUID) -> tuple[uuid.UUID, ...]:
    """Decrypt-only UUIDs of the key besides ``main``: what earlier rules (or the fingerprint, before
    ``keys adopt`` stored a UUID) gave it and etcd may still name. Each only where it is stable."""
    aliases: list[uuid.UUID] = []
    if uuid_from_cka_id(key.cka_id) is not None:
        with contextlib.suppress(KeyNotUsable):  # no fingerprint, so nothing was ever stored under one
            aliases.append(fingerprint_uuid(token, key)[0])
    for earlier in (old_rule_uuid(token, key), legacy_gcm_uuid(token, key)):
        if earlier is not None:
            aliases.append(earlier)
    return tuple(dict.fromkeys(a for a in aliases if a != main))


def create_kek(token: Token, label: str) -> uuid.UUID:
    """Generates a new AES-256 KEK in the HSM whose CKA_ID carries a fresh random UUID."""
    key_uuid_value = uuid.uuid4()
    token.generate_aes256_key(label, str(key_uuid_value).encode("ascii"))
    return key_uuid_value


def adopt_key(token: Token, key: SecretKeyAttributes) -> uuid.UUID:
    """Writes a fresh random UUID into CKA_ID of a key that has none (refuses one that has)."""
    if uuid_from_cka_id(key.cka_id) is not None:
        raise KeyNotUsable(f"key {key.label!r} already carries UUID {key.cka_id.decode()} in CKA_ID; nothing to do")
    new = uuid.uuid4()
    try:
        token.set_cka_id(key.handle, str(new).encode("ascii"))
    except HsmError as exc:
        if exc.ckr not in (_CKR_ATTRIBUTE_READ_ONLY, _CKR_ACTION_PROHIBITED):
            raise
        raise KeyNotUsable(f"the HSM refuses to write CKA_ID of key {key.label!r} ({exc.ckr_name}: the key is not "
                           "modifiable); it keeps its fingerprint UUID, which is stable wherever the fingerprint is "
                           "deterministic", ckr=exc.ckr) from exc
    return new


_CKR_ATTRIBUTE_READ_ONLY = 0x010
_CKR_ACTION_PROHIBITED = 0x01B
