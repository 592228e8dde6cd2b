"""kube-apiserver's etcd storage format (framing, validation), and the seed crypto as the stand-in models it."""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from p11kms.kube import envelope
from tests.standin.seedcrypto import open_data, seal_with_seed

ETCD_KEY = b"/registry/secrets/default/mysecret"


def sealed(seed: bytes, plaintext: bytes = b"k8s\x00payload", **changes: object) -> envelope.Envelope:
    fields: dict[str, object] = dict(provider="p11kms", key_id="kid", encrypted_dek_source=b"wrapped",
                                     dek_source_type=envelope.TYPE_HKDF_SEED, annotations={},
                                     encrypted_data=seal_with_seed(seed, plaintext, ETCD_KEY))
    fields.update(changes)
    return envelope.Envelope(**fields)  # type: ignore[arg-type]


def test_round_trip_through_the_stored_bytes() -> None:
    seed = os.urandom(32)
    value = envelope.encode(sealed(seed))
    assert value.startswith(b"k8s:enc:kms:v2:p11kms:")
    decoded = envelope.decode(value)
    assert (decoded.key_id, decoded.encrypted_dek_source, decoded.dek_source_type) == ("kid", b"wrapped", 1)
    assert open_data(decoded, seed, ETCD_KEY) == b"k8s\x00payload"


def test_seed_key_is_hkdf_expand_only_which_equals_one_hmac_block() -> None:
    """Independent check of spec 3.3: HKDF-Expand(seed, info, 32) == HMAC-SHA256(seed, info || 0x01)."""
    seed, plaintext = os.urandom(32), b"object bytes"
    data = seal_with_seed(seed, plaintext, ETCD_KEY)
    info, nonce, body = data[:32], data[32:44], data[44:]
    key = hmac.new(seed, info + b"\x01", hashlib.sha256).digest()
    assert AESGCM(key).decrypt(nonce, body, ETCD_KEY) == plaintext


def test_the_etcd_key_is_bound_as_additional_data() -> None:
    seed = os.urandom(32)
    decoded = envelope.decode(envelope.encode(sealed(seed)))
    with pytest.raises(InvalidTag):
        open_data(decoded, seed, b"/registry/secrets/default/other")


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field, written by hand (lengths under 128 bytes)."""
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


def test_legacy_type_0_when_field_5_is_absent() -> None:
    """A value as kube-apiserver before 1.29 wrote it: fields 1-3 only, no encryptedDEKSourceType on the wire.

    The bytes are built by hand, not by the generated class, so the test pins the wire format: it fails if
    decoding ever needs field 5, or reads its absence as anything but the legacy AES_GCM_KEY type.
    """
    dek, nonce = os.urandom(32), os.urandom(12)
    data = nonce + AESGCM(dek).encrypt(nonce, b"old", ETCD_KEY)
    body = _field(1, data) + _field(2, b"k") + _field(3, b"w")
    decoded = envelope.decode(b"k8s:enc:kms:v2:p11kms:" + body)
    assert (decoded.key_id, decoded.encrypted_dek_source, decoded.dek_source_type) == ("k", b"w", 0)
    assert open_data(decoded, dek, ETCD_KEY) == b"old"
    seeded = envelope.decode(b"k8s:enc:kms:v2:p11kms:" + body + bytes([5 << 3, envelope.TYPE_HKDF_SEED]))
    assert seeded.dek_source_type == envelope.TYPE_HKDF_SEED  # the same bytes plus field 5 = 1: the seed type


@pytest.mark.parametrize(("value", "problem"), [
    (b"k8s:enc:kms:v2:p11kms", "no ':' after the provider name"),
    (b"k8s:enc:kms:v2:p11kms:\xff\xff\xff", "does not parse"),
    (b"k8s:enc:kms:v2:p11kms:", "ciphertext is empty"),
])
def test_corrupt_values_are_named(value: bytes, problem: str) -> None:
    with pytest.raises(envelope.EnvelopeError, match=problem):
        envelope.decode(value)


def test_validation_applies_on_read() -> None:
    seed = os.urandom(32)
    for changes, problem in (({"key_id": ""}, "key_id is empty"),
                             ({"annotations": {"Bad_Key": b"1"}}, "not a fully qualified domain name"),
                             ({"dek_source_type": 7}, "unknown encryptedDEKSourceType 7")):
        with pytest.raises(envelope.EnvelopeError, match=problem):
            envelope.decode(envelope.encode(sealed(seed, **changes)))


@pytest.mark.parametrize(("value", "kind"), [
    (b"k8s:enc:kms:v1:old:\x00\x01x", "kms-v1"), (b"k8s:enc:aescbc:v1:key1:xx", "aescbc"),
    (b"k8s:enc:aesgcm:v1:key1:xx", "aesgcm"), (b"k8s:enc:secretbox:v1:key1:xx", "secretbox"),
    (b"k8s\x00\n\x0c\n\x02v1", "identity"), (b'{"kind":"ConfigMap"}', "identity"),
])
def test_value_kinds(value: bytes, kind: str) -> None:
    assert envelope.value_kind(value) == kind
