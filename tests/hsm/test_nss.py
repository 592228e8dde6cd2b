"""A second, independent PKCS#11 implementation: NSS softoken (libsoftokn3.so, Debian libnss3).

The same code that serves SoftHSM2 runs here unchanged: the round trip, the key UUID rule (the same
known answers as on SoftHSM2), a rotation, a bad tag, and a plugin process that needs
Module_Init_Args. Measured facts (NSS 3.87): the normal slot and the FIPS slot (entry point
FC_GetFunctionList) both use a caller's GCM IV and write none back when asked to generate one, so
GCM_IV = auto decides "caller" and GCM_IV = hsm fails the start; a bad tag is CKR_ENCRYPTED_DATA_INVALID;
the FIPS slot refuses to import key material in clear (CKR_ATTRIBUTE_VALUE_INVALID).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from p11kms.hsm import ckdefs as ck
from p11kms.hsm.errors import CiphertextRejected, HsmError
from p11kms.hsm.keyident import create_kek, key_uuid
from p11kms.hsm.module import Pkcs11Module, TokenInfo
from p11kms.hsm.token import Token, open_token
from p11kms.plugin.keyring import GcmIvUnusable, build_keyring
from tests.support import HsmEnv, start_plugin, unique_label

SOFTOKN = Path("/usr/lib/x86_64-linux-gnu/libsoftokn3.so")
PIN = b"nss-user-pin-5521"
KEY = bytes(range(32))
ECB_KCV_UUID = "efb2cf7d-a287-5c72-9226-95ceba8d3134"  # as in test_formats.py: the rule holds on every module
LEGACY_UUID = "36ebb397-3125-55d8-ab17-7e8190033f35"



@pytest.fixture(autouse=True)
def require_softoken() -> None:
    if not SOFTOKN.exists():
        pytest.fail(f"{SOFTOKN} (Debian package libnss3) is required by this test: run scripts/setup.sh --dev")


def init_args(database: Path) -> str:
    return f"configdir='sql:{database}' certPrefix='' keyPrefix='' secmod='secmod.db' flags="


def set_user_pin(module: Pkcs11Module, slot: int) -> TokenInfo:
    """A new NSS database has no password: the security officer logs in with an empty PIN and sets one."""
    session = ck.CK_SESSION_HANDLE()
    module.call("C_OpenSession", slot, ck.CKF_SERIAL_SESSION | ck.CKF_RW_SESSION, None, None, ctypes.byref(session))
    try:
        module.call("C_Login", session, ck.CKU_SO, ck.byte_buffer(b"-"), 0)
        module.call("C_InitPIN", session, ck.byte_buffer(PIN), len(PIN))
        module.call_rv("C_Logout", session)
    finally:
        module.call_rv("C_CloseSession", session)
    return module.token_info(slot)


def nss_token(database: Path, *, entry_point: str = "C_GetFunctionList", label: str = "NSS Certificate DB",
              gcm_iv: str = "auto") -> tuple[Pkcs11Module, Token]:
    database.mkdir(parents=True, exist_ok=True)
    module = Pkcs11Module(str(SOFTOKN), init_args=init_args(database), entry_point=entry_point)
    info = module.find_token(label=label, serial=None, slot=None)
    if not info.flags & 0x8:  # CKF_USER_PIN_INITIALIZED
        info = set_user_pin(module, info.slot)
    return module, open_token(module, info, PIN, pool_size=4, gcm_iv=gcm_iv)


@pytest.fixture
def nss(tmp_path: Path) -> Iterator[Token]:
    module, token = nss_token(tmp_path / "nssdb")
    yield token
    token.close()
    module.finalize()


def test_round_trip_uuid_rule_and_rotation_on_nss(nss: Token) -> None:
    known = unique_label("known")
    nss.import_aes_key(known, KEY)
    found, source = key_uuid(nss, nss.key_attributes(nss.find_one_secret_key(known)))
    assert (str(found), source) == (ECB_KCV_UUID, "ecb-kcv")
    first = build_keyring(nss, known, [])
    assert (nss.gcm_iv_used, first.primary.aliases) == ("caller", (LEGACY_UUID,))
    old = first.encrypt(b"1" * 32)
    assert first.decrypt(old, first.key_id) == b"1" * 32

    new = unique_label("kek")  # rotation: a new KEK made in the token, the old one decrypt-only
    new_uuid = str(create_kek(nss, new))
    rotated = build_keyring(nss, new, [known])
    assert rotated.key_id == new_uuid
    assert rotated.decrypt(old, first.key_id) == b"1" * 32
    fresh = rotated.encrypt(b"2" * 32)
    assert rotated.decrypt(fresh, new_uuid) == b"2" * 32

    tampered = bytearray(fresh)
    tampered[-1] ^= 1
    with pytest.raises(CiphertextRejected) as caught:
        rotated.decrypt(bytes(tampered), new_uuid)
    assert caught.value.ckr == ck.CKR_ENCRYPTED_DATA_INVALID


def test_nss_fips_slot_uses_caller_ivs_and_refuses_clear_key_material(tmp_path: Path) -> None:
    module, token = nss_token(tmp_path / "fipsdb", entry_point="FC_GetFunctionList",
                              label="NSS FIPS 140-2 Certificate DB", gcm_iv="hsm")
    try:
        with pytest.raises(HsmError, match="CKR_ATTRIBUTE_VALUE_INVALID"):
            token.import_aes_key(unique_label("clear"), KEY)
        label = unique_label("kek")
        create_kek(token, label)
        with pytest.raises(GcmIvUnusable, match="wrote no IV back"):  # it does not generate IVs
            build_keyring(token, label, [])
        token.close()
        token = open_token(module, token.info, PIN, pool_size=2, gcm_iv="auto")
        keyring = build_keyring(token, label, [])
        assert token.gcm_iv_used == "caller"
        seed = os.urandom(32)
        assert keyring.decrypt(keyring.encrypt(seed), keyring.key_id) == seed
    finally:
        token.close()
        module.finalize()


def test_a_plugin_serves_from_nss_with_module_init_args(hsm_env: HsmEnv, tmp_path: Path) -> None:
    database = tmp_path / "nssdb"
    module, token = nss_token(database)
    label = unique_label("kek")
    key_id = str(create_kek(token, label))
    token.close()
    module.finalize()  # the plugin process opens the database itself
    pin_file = tmp_path / "nss.pin"
    pin_file.write_text(PIN.decode() + "\n")
    pin_file.chmod(0o600)
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", label, PKCS11_Module=str(SOFTOKN),
                                  Token_Label="NSS Certificate DB", PIN_File=str(pin_file),
                                  Module_Init_Args=init_args(database))
    plugin = start_plugin(hsm_env, config)
    try:
        client = plugin.client()
        reply = client.encrypt(b"n" * 32)
        assert reply.key_id == key_id
        assert client.decrypt(reply.ciphertext, key_id) == b"n" * 32
        assert "mode=caller" in plugin.log()
    finally:
        plugin.stop()
