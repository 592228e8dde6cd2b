"""kube-apiserver's data encryption under a KMS v2 DEK seed (spec 3.3), as the stand-in and the tests do it.

The plugin never does this (it only wraps seeds in the HSM) and nothing in the wheel needs it, so the
software cryptography lives here, with the test tools.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from p11kms.kube.envelope import INFO_BYTES, NONCE_BYTES, SEED_BYTES, TYPE_HKDF_SEED, Envelope, EnvelopeError


def _seed_key(seed: bytes, info: bytes) -> bytes:
    """HKDF-Expand only, no Extract step: what kube-apiserver derives each write's key with."""
    return HKDFExpand(algorithm=hashes.SHA256(), length=32, info=info).derive(seed)


def seal_with_seed(seed: bytes, plaintext: bytes, etcd_key: bytes) -> bytes:
    """encryptedData for the seed type: a fresh info and nonce per write, AAD = the etcd key."""
    info, nonce = os.urandom(INFO_BYTES), os.urandom(NONCE_BYTES)
    return info + nonce + AESGCM(_seed_key(seed, info)).encrypt(nonce, plaintext, etcd_key)


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
    return AESGCM(key).decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], etcd_key)
