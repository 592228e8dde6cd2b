"""kube-apiserver's KMS v2 storage format in etcd (spec section 3).

A stored value is ``k8s:enc:kms:v2:<provider>:`` followed by a protobuf
``EncryptedObject``. For the seed type (1), ``encryptedData`` is
``info(32) | nonce(12) | AES-GCM ciphertext | tag(16)``, the data key is
HKDF-Expand-SHA256(seed, info, 32) (no Extract step), and the additional data is
the full etcd key. For the legacy type (0), the decrypted DEK is the AES key and
``encryptedData`` is ``nonce(12) | ciphertext | tag``.

Only the framing lives here: p11kms never decrypts stored data (the plugin wraps seeds in the HSM, the
tools read key_ids). The data encryption that kube-apiserver does is modelled by the test stand-in,
tests/standin/seedcrypto.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from p11kms.kmsv2 import encrypted_object_pb2
from p11kms.kube.apiserver_rules import encrypted_object_problems

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
