"""The key UUID rule: how every KEK gets the id that kube-apiserver stores in etcd.

1. A key whose CKA_ID holds a UUID in canonical text form (36 ASCII characters,
   as ``p11kms keys create`` writes it) has that UUID.
2. Any other AES key (made by pkcs11-tool or a vendor tool) gets a name-based
   UUID (RFC 4122 version 5) computed from a fingerprint of its key material:
   the AES-GCM tag of an empty message under a fixed, reserved IV and fixed
   additional data. The tag is a function of the key bytes only, so the UUID is
   the same on every process, node and HSM replica holding the key, survives
   restarts and relabelling, and differs for different key material.

The fixed IV is never drawn for wrapping (wrapping IVs are random 96-bit
values), and the fingerprint always authenticates the same empty message, so
repeating it reveals nothing new about the key.
"""

from __future__ import annotations

import uuid

from p11kms.hsm.token import SecretKeyAttributes, Token

# Namespace of p11kms name-based key UUIDs. Changing it would change every derived key_id.
KEY_UUID_NAMESPACE = uuid.UUID("6c1f2f4e-8d2b-5a51-9a43-3f0e7c5d2b10")
FINGERPRINT_IV = b"p11kms:fp:v1"  # 12 bytes, reserved for fingerprints
FINGERPRINT_AAD = b"p11kms key fingerprint v1"


def uuid_from_cka_id(cka_id: bytes) -> uuid.UUID | None:
    """Returns the UUID a CKA_ID carries in canonical text form, or None."""
    try:
        text = cka_id.decode("ascii")
        parsed = uuid.UUID(text)
    except (UnicodeDecodeError, ValueError):
        return None
    return parsed if str(parsed) == text else None


def fingerprint_uuid(token: Token, key: SecretKeyAttributes) -> uuid.UUID:
    _, tag = token.gcm_encrypt(key.handle, b"", FINGERPRINT_AAD, iv=FINGERPRINT_IV)
    return uuid.uuid5(KEY_UUID_NAMESPACE, "aes-gcm-fingerprint-v1:" + tag.hex())


def key_uuid(token: Token, key: SecretKeyAttributes) -> tuple[uuid.UUID, str]:
    """Returns the key's UUID and where it came from ("cka_id" or "fingerprint")."""
    from_id = uuid_from_cka_id(key.cka_id)
    if from_id is not None:
        return from_id, "cka_id"
    return fingerprint_uuid(token, key), "fingerprint"


def create_kek(token: Token, label: str) -> uuid.UUID:
    """Generates a new AES-256 KEK in the HSM whose CKA_ID carries a fresh random UUID."""
    key_uuid_value = uuid.uuid4()
    token.generate_aes256_key(label, str(key_uuid_value).encode("ascii"))
    return key_uuid_value
