"""The keyring against a real token: key resolution, the ciphertext format, precise refusals."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable

import pytest

from p11kms.hsm.errors import CiphertextRejected, DuplicateKeyLabel, HsmError
from p11kms.hsm.token import Token
from p11kms.plugin.keyring import (
    FORMAT_V1,
    MAX_PLAINTEXT_BYTES,
    InvalidPlaintext,
    MalformedCiphertext,
    Role,
    UnknownKeyId,
    UnsuitableKey,
    build_keyring,
)
from tests.support import HsmEnv, pkcs11_tool_keygen, unique_label

Keys = Callable[[], tuple[str, str]]


def test_roles_and_lookup(token: Token, new_key: Keys) -> None:
    (primary, primary_uuid), (old1, old1_uuid), (old2, old2_uuid) = new_key(), new_key(), new_key()
    keyring = build_keyring(token, primary, [old1, old2])
    assert keyring.key_id == primary_uuid
    assert [(k.role, k.uuid) for k in keyring.keys] == [
        (Role.PRIMARY, primary_uuid), (Role.SECONDARY, old1_uuid), (Role.SECONDARY, old2_uuid)]


def test_several_old_keys_all_decrypt(token: Token, new_key: Keys) -> None:
    labels = [new_key()[0] for _ in range(3)]
    wrapped = []
    for generation, label in enumerate(labels):
        keyring = build_keyring(token, label, labels[:generation])
        wrapped.append((keyring.key_id, keyring.encrypt(bytes([generation]) * 32)))
    final = build_keyring(token, labels[-1], labels[:-1])
    for generation, (key_id, ciphertext) in enumerate(wrapped):
        assert final.decrypt(ciphertext, key_id) == bytes([generation]) * 32


def test_format_is_version_iv_ciphertext_tag(token: Token, new_key: Keys) -> None:
    keyring = build_keyring(token, new_key()[0], [])
    ciphertext = keyring.encrypt(os.urandom(32))
    assert ciphertext[0] == FORMAT_V1 and len(ciphertext) == 1 + 12 + 32 + 16


def test_unknown_key_id_lists_configured_keys(token: Token, new_key: Keys) -> None:
    primary, primary_uuid = new_key()
    keyring = build_keyring(token, primary, [])
    with pytest.raises(UnknownKeyId) as caught:
        keyring.decrypt(keyring.encrypt(b"a" * 32), "retired-key")
    assert primary_uuid in str(caught.value) and primary in str(caught.value)


def test_every_single_bit_flip_is_rejected(token: Token, new_key: Keys) -> None:
    keyring = build_keyring(token, new_key()[0], [])
    ciphertext = keyring.encrypt(os.urandom(32))
    for index in range(len(ciphertext)):
        altered = bytearray(ciphertext)
        altered[index] ^= 0x01
        with pytest.raises((CiphertextRejected, MalformedCiphertext)):
            keyring.decrypt(bytes(altered), keyring.key_id)


def test_truncations_and_extensions_are_rejected(token: Token, new_key: Keys) -> None:
    keyring = build_keyring(token, new_key()[0], [])
    ciphertext = keyring.encrypt(os.urandom(32))
    for length in range(len(ciphertext)):
        with pytest.raises((CiphertextRejected, MalformedCiphertext)):
            keyring.decrypt(ciphertext[:length], keyring.key_id)
    with pytest.raises(CiphertextRejected):
        keyring.decrypt(ciphertext + b"\x00", keyring.key_id)


def test_plaintext_limits(token: Token, new_key: Keys) -> None:
    keyring = build_keyring(token, new_key()[0], [])
    assert len(keyring.encrypt(b"p" * MAX_PLAINTEXT_BYTES)) == 1024
    for bad in (b"", b"p" * (MAX_PLAINTEXT_BYTES + 1)):
        with pytest.raises(InvalidPlaintext):
            keyring.encrypt(bad)


def test_self_test_passes_on_a_healthy_token(token: Token, new_key: Keys) -> None:
    build_keyring(token, new_key()[0], []).self_test()


def test_duplicate_label_is_refused(hsm_env: HsmEnv, token: Token) -> None:
    label = unique_label("dup")
    token.generate_aes256_key(label, b"first")
    pkcs11_tool_keygen(hsm_env, label)  # p11kms refuses a second key with a label; a foreign tool does not
    with pytest.raises(DuplicateKeyLabel, match="exactly one key"):
        build_keyring(token, label, [])


def test_a_non_aes_key_is_unsuitable(hsm_env: HsmEnv, token: Token) -> None:
    label = unique_label("generic")
    pkcs11_tool_keygen(hsm_env, label, key_type="GENERIC:32")
    with pytest.raises(UnsuitableKey, match="not an AES key"):
        build_keyring(token, label, [])


def test_the_additional_data_is_exactly_the_format_byte_and_the_key_uuid(token: Token, new_key: Keys) -> None:
    """Opens a ciphertext in the HSM directly with candidate additional data: only the documented
    ``0x01 | key UUID`` works, so a keyring that dropped or changed it would fail here."""
    label, key_uuid = new_key()
    keyring = build_keyring(token, label, [])
    ciphertext = keyring.encrypt(b"a" * 32)
    iv, sealed = ciphertext[1:13], ciphertext[13:]
    handle = keyring.primary.handle
    assert token.gcm_decrypt(handle, iv, sealed, bytes([FORMAT_V1]) + key_uuid.encode()) == b"a" * 32
    for wrong in (b"", key_uuid.encode(), bytes([FORMAT_V1]) + str(uuid.uuid4()).encode(), b"\x02" + key_uuid.encode()):
        with pytest.raises(HsmError):
            token.gcm_decrypt(handle, iv, sealed, wrong)
