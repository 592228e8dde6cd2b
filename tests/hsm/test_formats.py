"""Frozen formats: the key UUID rule and the ciphertext format, as known answers.

Every key here is imported with known material (CKA_VALUE), as an HSM backup or a cluster member
holds it. The expected values were computed outside p11kms, with the `cryptography` package and
Python's uuid module, from the rule the README states. A change that breaks one of these tests
changes key_ids or ciphertexts that etcd already holds: it is a breaking change, not a test to update.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from p11kms.hsm.keyident import create_kek, key_uuid
from p11kms.hsm.module import Pkcs11Module
from p11kms.hsm.provision import init_token
from p11kms.hsm.token import Token, open_token
from p11kms.ops.devenv import write_softhsm_conf
from p11kms.plugin.keyring import build_keyring
from tests.support import SO_PIN, USER_PIN, PluginProcess, private_module_copy, unique_label

KEY = bytes(range(32))  # 00 01 02 ... 1f
STORED_UUID = "5f4b7a2c-1d3e-4a6b-8c9d-0e1f2a3b4c5d"
# uuid5(6c1f2f4e-8d2b-5a51-9a43-3f0e7c5d2b10, PREFIX + hex(16-byte result)), result over the block b"p11kms key id v2":
ECB_KCV_UUID = "efb2cf7d-a287-5c72-9226-95ceba8d3134"  # AES-ECB encrypt -> 764668aef091a8af16a0656944ec6a3c
CMAC_UUID = "8d825bee-e5f7-53f9-8b72-6e77658d9924"  # AES-CMAC -> 62b88e1200bf8a3db9c83b9fb636a606
ECB_DEC_UUID = "d3768498-661a-5e60-982f-ffa3dac4666d"  # AES-ECB decrypt -> 9ac58b3fc4d5e255ba806281833a931f
# The pre-issue-10 rule: "aes-gcm-fingerprint-v1:" + GCM tag of b"" under IV b"p11kms:fp:v1", AAD
# b"p11kms key fingerprint v1" (tag a95d082ad1bfb6b6f85d8a74cb0b21b3). Kept as a decrypt-only alias.
LEGACY_UUID = "36ebb397-3125-55d8-ab17-7e8190033f35"
# Made by p11kms 0.x (issue 10) with KEY under STORED_UUID: 0x01 | IV | ciphertext | tag.
GOLDEN_PLAINTEXT = b"p11kms golden DEK seed, v1 ....!"
GOLDEN_CIPHERTEXT = bytes.fromhex(
    "01a9115fd080557dadbd90670f2a8750929531bd02edee7285e41f067812c6743796d7f23c9a2a519f32bdfce0b4b2"
    "39ea14c609756cf0aff81848dea0")


def import_key(token: Token, cka_id: bytes = b"", **usage: bool) -> str:
    label = unique_label("known")
    token.import_aes_key(label, KEY, cka_id, **usage)
    return label


@pytest.mark.parametrize(("cka_id", "usage", "expected"), [
    (STORED_UUID.encode(), {}, (STORED_UUID, "cka_id")),
    (b"", {}, (ECB_KCV_UUID, "ecb-kcv")),
    (b"\x0a\x0b\x0c", {}, (ECB_KCV_UUID, "ecb-kcv")),  # a CKA_ID that is not UUID text does not count
    # A key that does not allow encryption has the same ecb-kcv UUID, through AES-CTR decryption (issue 20):
    # its UUID must not depend on its usage flags. Up to issue 20 these two got CMAC_UUID and ECB_DEC_UUID,
    # under which nothing can be stored (a key that never encrypts never wrote a DEK seed); each stays a
    # decrypt-only alias (test_the_old_rules_uuid_of_a_key_that_cannot_encrypt_stays_an_alias).
    (b"", {"encrypt": False, "sign": True}, (ECB_KCV_UUID, "ecb-kcv")),
    (b"", {"encrypt": False}, (ECB_KCV_UUID, "ecb-kcv")),
])
def test_known_key_material_gets_exactly_the_documented_uuid(token: Token, cka_id: bytes, usage: dict[str, bool],
                                                             expected: tuple[str, str]) -> None:
    attrs = token.key_attributes(token.find_one_secret_key(import_key(token, cka_id, **usage)))
    found, source = key_uuid(token, attrs)
    assert (str(found), source) == expected


@pytest.mark.parametrize(("usage", "old_rule"), [({"encrypt": False, "sign": True}, CMAC_UUID),
                                                 ({"encrypt": False}, ECB_DEC_UUID)])
def test_the_old_rules_uuid_of_a_key_that_cannot_encrypt_stays_an_alias(token: Token, usage: dict[str, bool],
                                                                        old_rule: str) -> None:
    primary = unique_label("primary")
    create_kek(token, primary)
    keyring = build_keyring(token, primary, [import_key(token, b"", **usage)])
    old_secondary = keyring.keys[1]
    assert (old_secondary.uuid, old_secondary.aliases) == (ECB_KCV_UUID, (old_rule,))
    assert keyring.key_for(old_rule) is old_secondary


def test_data_stored_under_the_old_gcm_uuid_still_opens(token: Token) -> None:
    """kube-apiserver stored key_ids of the old rule in etcd; a ciphertext issued under one (made
    here with `cryptography`, as p11kms made them) opens through the key's alias."""
    keyring = build_keyring(token, import_key(token), [])
    assert keyring.key_id == ECB_KCV_UUID and keyring.primary.aliases == (LEGACY_UUID,)
    iv = bytes.fromhex("00112233445566778899aabb")
    old = b"\x01" + iv + AESGCM(KEY).encrypt(iv, b"o" * 32, b"\x01" + LEGACY_UUID.encode())
    assert keyring.decrypt(old, LEGACY_UUID) == b"o" * 32
    assert keyring.key_for(LEGACY_UUID) is keyring.primary


def test_a_p11kms_ciphertext_opens_with_the_documented_layout_outside_the_hsm(token: Token) -> None:
    keyring = build_keyring(token, import_key(token, STORED_UUID.encode()), [])
    seed = os.urandom(32)
    ciphertext = keyring.encrypt(seed)
    assert ciphertext[0] == 0x01 and len(ciphertext) == 1 + 12 + 32 + 16
    aad = b"\x01" + STORED_UUID.encode("ascii")
    assert AESGCM(KEY).decrypt(ciphertext[1:13], ciphertext[13:], aad) == seed


def test_the_golden_ciphertext_opens_outside_the_hsm() -> None:
    aad = b"\x01" + STORED_UUID.encode("ascii")
    assert AESGCM(KEY).decrypt(GOLDEN_CIPHERTEXT[1:13], GOLDEN_CIPHERTEXT[13:], aad) == GOLDEN_PLAINTEXT


def test_the_golden_ciphertext_opens_through_the_plugin(run_plugin: Callable[..., PluginProcess],
                                                        token: Token) -> None:
    plugin = run_plugin(import_key(token, STORED_UUID.encode()))
    client = plugin.client()
    assert client.status().key_id == STORED_UUID
    assert client.decrypt(GOLDEN_CIPHERTEXT, STORED_UUID) == GOLDEN_PLAINTEXT


@pytest.fixture
def replica(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token: Token) -> Iterator[Token]:
    """A second, independent SoftHSM2 instance (its own token directory), as a replica HSM."""
    monkeypatch.setenv("SOFTHSM2_CONF", str(write_softhsm_conf(tmp_path / "replica")))
    module = Pkcs11Module(str(private_module_copy(tmp_path / "lib", token.module.path)))
    try:
        info = init_token(module, "replica", SO_PIN.encode(), USER_PIN.encode())
        opened = open_token(module, info, USER_PIN.encode(), pool_size=2)
        yield opened
        opened.close()
    finally:
        module.finalize()


@pytest.mark.parametrize("cka_id", [b"", STORED_UUID.encode()])
def test_replicas_holding_the_same_key_material_agree(token: Token, replica: Token, cka_id: bytes) -> None:
    label = unique_label("replicated")
    token.import_aes_key(label, KEY, cka_id)
    replica.import_aes_key(label, KEY, cka_id)
    assert not replica.find_secret_keys(import_key(token))  # two separate HSMs: a key on one is not on the other
    here, there = build_keyring(token, label, []), build_keyring(replica, label, [])
    assert here.key_id == there.key_id == (STORED_UUID if cka_id else ECB_KCV_UUID)
    for source, target in ((here, there), (there, here)):
        seed = os.urandom(32)
        assert target.decrypt(source.encrypt(seed), source.key_id) == seed
