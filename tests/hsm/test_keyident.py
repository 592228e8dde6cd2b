"""The key UUID rule against real keys, including keys made by another tool (OpenSC pkcs11-tool)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from p11kms.hsm.ckdefs import CKA_ENCRYPT, CKA_SIGN
from p11kms.hsm.keyident import create_kek, key_uuid, uuid_from_cka_id
from p11kms.hsm.module import Pkcs11Module
from p11kms.hsm.token import Token, open_token
from p11kms.plugin.keyring import UnsuitableKey, build_keyring
from tests.support import TOKEN_LABEL, USER_PIN, FaultControl, HsmEnv, pkcs11_tool_keygen, unique_label

Keys = Callable[[], tuple[str, str]]


def uuid_in_fresh_process(env: HsmEnv, label: str) -> str:
    code = (
        "from p11kms.hsm.module import load_module;from p11kms.hsm.token import open_token\n"
        "from p11kms.hsm.keyident import key_uuid\n"
        f"m=load_module({env.module!r});i=m.find_token(label={TOKEN_LABEL!r},serial=None,slot=None)\n"
        f"t=open_token(m,i,{USER_PIN!r}.encode(),1)\n"
        f"print(key_uuid(t,t.key_attributes(t.find_one_secret_key({label!r})))[0])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env.process_env(), capture_output=True,
                            text=True, timeout=30, check=True)
    return result.stdout.strip()


@pytest.fixture
def require_pkcs11_tool() -> None:
    if subprocess.run(["which", "pkcs11-tool"], capture_output=True).returncode != 0:
        pytest.fail("pkcs11-tool (Debian package opensc) is required by this test")


def test_p11kms_keys_carry_their_uuid_in_cka_id(token: Token, new_key: Keys) -> None:
    label, created = new_key()
    attrs = token.key_attributes(token.find_one_secret_key(label))
    assert key_uuid(token, attrs) == (uuid_from_cka_id(created.encode()), "cka_id")


@pytest.mark.usefixtures("require_pkcs11_tool")
def test_foreign_key_gets_a_stable_uuid_across_processes(hsm_env: HsmEnv, token: Token) -> None:
    label = unique_label("tool")
    pkcs11_tool_keygen(hsm_env, label, cka_id="0a0b0c")
    attrs = token.key_attributes(token.find_one_secret_key(label))
    here, source = key_uuid(token, attrs)
    assert source == "ecb-kcv"
    assert key_uuid(token, attrs)[0] == here  # stable in one process
    assert uuid_in_fresh_process(hsm_env, label) == str(here)  # and in another


@pytest.mark.usefixtures("require_pkcs11_tool")
def test_a_reused_label_on_new_key_material_gets_a_new_uuid(hsm_env: HsmEnv, token: Token) -> None:
    label = unique_label("tool")
    pkcs11_tool_keygen(hsm_env, label, cka_id="0a0b0c")
    handle = token.find_one_secret_key(label)
    first = key_uuid(token, token.key_attributes(handle))[0]
    token.destroy_object(handle)
    pkcs11_tool_keygen(hsm_env, label, cka_id="0a0b0c")  # same label, same CKA_ID, new key bytes
    second = key_uuid(token, token.key_attributes(token.find_one_secret_key(label)))[0]
    assert first != second


@pytest.mark.parametrize(("cka_id", "expected"), [
    (b"3f2d5c1e-0b7a-4c4e-9a51-7d3c2e1f0a9b", "3f2d5c1e-0b7a-4c4e-9a51-7d3c2e1f0a9b"),
    (b"3F2D5C1E-0B7A-4C4E-9A51-7D3C2E1F0A9B", None),  # not canonical text
    (b"\x01\x02", None),
    (b"", None),
    (bytes(range(16)), None),  # raw 16 bytes are not treated as a UUID
])
def test_only_canonical_uuid_text_in_cka_id_counts(cka_id: bytes, expected: str | None) -> None:
    parsed = uuid_from_cka_id(cka_id)
    assert (str(parsed) if parsed else None) == expected


def test_a_key_whose_fingerprint_is_not_deterministic_is_refused(private_fault_module: Path, faults: FaultControl,
                                                                 token: Token) -> None:
    """No module here answers AES-ECB differently twice; the fault module does, so the refusal is proven."""
    label = unique_label("noisy")
    token.import_aes_key(label, bytes(range(32)))
    faults.set("ecb_noise")
    module = Pkcs11Module(str(private_fault_module))
    try:
        noisy = open_token(module, module.find_token(label=TOKEN_LABEL, serial=None, slot=None), USER_PIN.encode(), 2)
        expected = rf"no stable UUID: .*ecb-kcv fingerprint differs .*keys adopt --label {label}"
        with pytest.raises(UnsuitableKey, match=expected):
            build_keyring(noisy, label, [])
        noisy.close()
    finally:
        module.finalize()


def test_a_keys_uuid_does_not_change_when_its_usage_attributes_do(token: Token) -> None:
    """A common hardening clears CKA_ENCRYPT (and CKA_SIGN) on an old, now decrypt-only key: kube-apiserver
    stored its key_id while it encrypted, so its UUID must stay the same and its data must still open."""
    label = unique_label("hardened")
    handle = token.import_aes_key(label, bytes(range(32)), sign=True)
    primary = build_keyring(token, label, [])
    sealed = primary.encrypt(b"s" * 32)
    before = primary.key_id
    for attribute in (CKA_ENCRYPT, CKA_SIGN):  # on its own: ecb-kcv -> cmac; both: -> ecb-dec (the old rule)
        token.set_key_flag(handle, attribute, False)
        attrs = token.key_attributes(handle)
        assert key_uuid(token, attrs) == (uuid.UUID(before), "ecb-kcv")
        keyring = build_keyring(token, primary_label(token), [label])
        assert keyring.decrypt(sealed, before) == b"s" * 32
    token.set_key_flag(handle, CKA_ENCRYPT, True)
    assert str(key_uuid(token, token.key_attributes(handle))[0]) == before


def primary_label(token: Token) -> str:
    label = unique_label("primary")
    create_kek(token, label)
    return label
