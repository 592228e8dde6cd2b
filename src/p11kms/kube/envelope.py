"""kube-apiserver's KMS v2 storage format in etcd (spec section 3).

A stored value is ``k8s:enc:kms:v2:<provider>:`` followed by a protobuf
``EncryptedObject``. For the seed type (1), ``encryptedData`` is
``info(32) | nonce(12) | AES-GCM ciphertext | tag(16)``, the data key is
HKDF-Expand-SHA256(seed, info, 32) (no Extract step), and the additional data is
the full etcd key. For the legacy type (0), the decrypted DEK is the AES key and
``encryptedData`` is ``nonce(12) | ciphertext | tag``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError

from p11kms.kmsv2 import encrypted_object_pb2
from p11kms.kube.apiserver_rules import encrypted_object_problems

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KMS_V2_PREFIX = b"k8s:enc:kms:v2:"
SEED_BYTES = 32
INFO_BYTES = 32
NONCE_BYTES = 12
TYPE_AES_GCM_KEY = encrypted_object_pb2.AES_GCM_KEY
TYPE_HKDF_SEED = encrypted_object_pb2.HKDF_SHA256_XNONCE_AES_GCM_SEED
TYPE_NAMES: dict[int, str] = {TYPE_AES_GCM_KEY: "AES_GCM_KEY", TYPE_HKDF_SEED: "HKDF_SHA256_XNONCE_AES_GCM_SEED"}
# Other value prefixes a scanner meets (spec 3.1); anything else is stored in clear ("identity").
OTHER_PREFIXES = {
    b"k8s:enc:kms:v1:": "kms-v1",
    b"k8s:enc:aescbc:v1:": "aescbc",
    b"k8s:enc:aesgcm:v1:": "aesgcm",
    b"k8s:enc:secretbox:v1:": "secretbox",
}


class EnvelopeError(Exception):
    """A value claims to be KMS v2 but cannot be decoded or fails kube-apiserver's validation."""


@dataclass(frozen=True)
class Envelope:
    provider: str
    key_id: str
    encrypted_dek_source: bytes
    dek_source_type: int
    annotations: dict[str, bytes]
    encrypted_data: bytes

    @property
    def cache_key(self) -> tuple[int, bytes, str, tuple[tuple[str, bytes], ...]]:
        """What kube-apiserver keys its decrypted-DEK cache on (spec 2.5)."""
        return (self.dek_source_type, self.encrypted_dek_source, self.key_id,
                tuple(sorted(self.annotations.items())))


def value_kind(value: bytes) -> str:
    """``kms-v2``, another encryption provider's name, or ``identity`` (stored in clear)."""
    if value.startswith(KMS_V2_PREFIX):
        return "kms-v2"
    for prefix, kind in OTHER_PREFIXES.items():
        if value.startswith(prefix):
            return kind
    return "identity"


def decode(value: bytes) -> Envelope:
    if not value.startswith(KMS_V2_PREFIX):
        raise EnvelopeError("value does not start with k8s:enc:kms:v2:")
    provider, sep, body = value[len(KMS_V2_PREFIX):].partition(b":")
    if not sep:
        raise EnvelopeError("no ':' after the provider name")
    message = encrypted_object_pb2.EncryptedObject()
    try:
        message.ParseFromString(body)
    except DecodeError as exc:
        raise EnvelopeError(f"EncryptedObject does not parse: {exc}") from exc
    envelope = Envelope(
        provider=provider.decode("utf-8", errors="replace"),
        key_id=message.keyID,
        encrypted_dek_source=message.encryptedDEKSource,
        dek_source_type=message.encryptedDEKSourceType,
        annotations=dict(message.annotations),
        encrypted_data=message.encryptedData,
    )
    problems = list(encrypted_object_problems(envelope.encrypted_dek_source, envelope.key_id, envelope.annotations))
    if envelope.dek_source_type not in TYPE_NAMES:
        problems.append(f"unknown encryptedDEKSourceType {envelope.dek_source_type}")
    if not envelope.encrypted_data:
        problems.append("encryptedData is empty")
    if problems:
        raise EnvelopeError("; ".join(problems))
    return envelope


def encode(envelope: Envelope) -> bytes:
    message = encrypted_object_pb2.EncryptedObject(
        encryptedData=envelope.encrypted_data,
        keyID=envelope.key_id,
        encryptedDEKSource=envelope.encrypted_dek_source,
        annotations=envelope.annotations,
        encryptedDEKSourceType=envelope.dek_source_type,  # type: ignore[arg-type]
    )
    return KMS_V2_PREFIX + envelope.provider.encode() + b":" + message.SerializeToString(deterministic=True)


# cryptography is imported where it is used: `p11kms serve` starts through the same CLI as the
# tools that use this module, and the package would add about 7 MiB to the plugin's memory.
def _seed_key(seed: bytes, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    return HKDFExpand(algorithm=hashes.SHA256(), length=32, info=info).derive(seed)


def _aes_gcm(key: bytes) -> AESGCM:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def seal_with_seed(seed: bytes, plaintext: bytes, etcd_key: bytes) -> bytes:
    """encryptedData for the seed type: a fresh info and nonce per write, AAD = the etcd key."""
    info, nonce = os.urandom(INFO_BYTES), os.urandom(NONCE_BYTES)
    return info + nonce + _aes_gcm(_seed_key(seed, info)).encrypt(nonce, plaintext, etcd_key)


def open_data(envelope: Envelope, dek_source: bytes, etcd_key: bytes) -> bytes:
    """Decrypts encryptedData with the plaintext DEK source that the plugin's Decrypt returned."""
    data = envelope.encrypted_data
    if envelope.dek_source_type == TYPE_HKDF_SEED:
        if len(dek_source) < SEED_BYTES:
            raise EnvelopeError(f"seed is {len(dek_source)} bytes, fewer than {SEED_BYTES}")
        key = _seed_key(dek_source, data[:INFO_BYTES])
        data = data[INFO_BYTES:]
    else:
        key = dek_source
    return _aes_gcm(key).decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], etcd_key)
