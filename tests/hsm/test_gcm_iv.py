"""GCM_IV modes: who chooses the AES-GCM IV, and that no ciphertext ever carries an IV the module did not use.

SoftHSM2 uses the caller's IV. No module available here generates its own IV the way AWS CloudHSM
(and Luna or nShield in FIPS mode) do, so those behaviours come from tests/faultmodule/p11fault.c
(`gcm_iv rewrite`, `gcm_iv refuse`) in front of a real SoftHSM2 token: the encryption itself is
still SoftHSM's, and each ciphertext is checked with the `cryptography` package under the known key.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from p11kms.hsm.errors import GcmIvError
from p11kms.hsm.keyident import key_uuid, legacy_gcm_uuid
from p11kms.hsm.module import Pkcs11Module, load_module
from p11kms.hsm.token import Token, open_token
from p11kms.plugin.keyring import FORMAT_V1, GcmIvUnusable, build_keyring
from tests.support import (
    TOKEN_LABEL,
    USER_PIN,
    FaultControl,
    HsmEnv,
    PluginProcess,
    start_fault_plugin,
    start_plugin,
    unique_label,
)

KEY = bytes(range(32))
OpenToken = Callable[[str], Token]
KCV_UUID = "efb2cf7d-a287-5c72-9226-95ceba8d3134"  # the ecb-kcv UUID of KEY (see test_keyident.py)


@pytest.fixture
def fault_token_factory(private_fault_module: Path) -> Iterator[OpenToken]:
    module = Pkcs11Module(str(private_fault_module))
    opened: list[Token] = []

    def open_with(mode: str) -> Token:
        token = open_token(module, module.find_token(label=TOKEN_LABEL, serial=None, slot=None),
                           USER_PIN.encode(), pool_size=2, gcm_iv=mode)
        opened.append(token)
        return token

    yield open_with
    for token in opened:
        token.close()
    module.finalize()


def known_key(token: Token) -> str:
    label = unique_label("known")
    token.import_aes_key(label, KEY)
    return label


def assert_carries_the_iv_used(ciphertext: bytes, key_id: str) -> bytes:
    """Opens the ciphertext outside the HSM: it only opens if bytes 1..12 are the IV the module used."""
    iv = ciphertext[1:13]
    assert AESGCM(KEY).decrypt(iv, ciphertext[13:], bytes([FORMAT_V1]) + key_id.encode()) is not None
    return iv


def test_auto_keeps_caller_ivs_on_softhsm(hsm_env: HsmEnv, token: Token) -> None:
    fresh = open_token(load_module(hsm_env.module), token.info, USER_PIN.encode(), pool_size=2, gcm_iv="auto")
    try:
        keyring = build_keyring(fresh, known_key(token), [])
        assert (fresh.gcm_iv_used, fresh.gcm_iv_reason) == ("caller", "the module uses the IV p11kms chooses")
        assert_carries_the_iv_used(keyring.encrypt(b"s" * 32), keyring.key_id)
    finally:
        fresh.close()


def test_hsm_mode_on_a_module_that_writes_no_iv_fails_the_start_clearly(hsm_env: HsmEnv, token: Token) -> None:
    # SoftHSM leaves pIv as given: in hsm mode every IV would be zero, so the start must fail.
    fresh = open_token(load_module(hsm_env.module), token.info, USER_PIN.encode(), pool_size=2, gcm_iv="hsm")
    try:
        with pytest.raises(GcmIvUnusable, match=r"wrote no IV back .*set GCM_IV = caller"):
            build_keyring(fresh, known_key(token), [])
    finally:
        fresh.close()


@pytest.mark.parametrize(("behaviour", "reason"), [
    ("rewrite", "the module replaces the IV p11kms chooses with one of its own"),
    ("refuse", "the module refuses an IV chosen by p11kms (CKR_MECHANISM_PARAM_INVALID)"),
])
def test_auto_and_hsm_modes_store_the_iv_the_module_wrote(fault_token_factory: OpenToken, faults: FaultControl,
                                                          token: Token, behaviour: str, reason: str) -> None:
    faults.set(f"gcm_iv {behaviour}")
    label = known_key(token)
    for mode in ("auto", "hsm"):
        fault_token = fault_token_factory(mode)
        keyring = build_keyring(fault_token, label, [])
        assert fault_token.gcm_iv_used == "hsm"
        assert fault_token.gcm_iv_reason == (reason if mode == "auto" else "configured")
        assert keyring.key_id == KCV_UUID  # the UUID rule takes no IV: the same as on plain SoftHSM
        ivs = set()
        for _ in range(20):
            ciphertext = keyring.encrypt(os.urandom(32))
            ivs.add(assert_carries_the_iv_used(ciphertext, keyring.key_id))
            keyring.decrypt(ciphertext, keyring.key_id)
        assert len(ivs) == 20 and bytes(12) not in ivs


@pytest.mark.parametrize(("behaviour", "problem"), [
    ("rewrite", "replaces the IV p11kms chooses"),
    ("refuse", r"refuses an IV chosen by p11kms \(CKR_MECHANISM_PARAM_INVALID\)"),
])
def test_caller_mode_on_a_module_that_chooses_ivs_names_the_fix(fault_token_factory: OpenToken, faults: FaultControl,
                                                                token: Token, behaviour: str, problem: str) -> None:
    faults.set(f"gcm_iv {behaviour}")
    with pytest.raises(GcmIvUnusable, match=f"GCM_IV = caller cannot work.*{problem}.*set GCM_IV = hsm"):
        build_keyring(fault_token_factory("caller"), known_key(token), [])


def test_a_module_that_starts_replacing_ivs_later_never_yields_a_mismatched_ciphertext(
        fault_token_factory: OpenToken, faults: FaultControl, token: Token) -> None:
    """Before issue 10, gcm_encrypt returned the IV Python drew without reading pIv back: this
    ciphertext would have carried the wrong IV and could never be opened."""
    keyring = build_keyring(fault_token_factory("auto"), known_key(token), [])
    assert keyring.token.gcm_iv_used == "caller"
    faults.set("gcm_iv rewrite")
    with pytest.raises(GcmIvError, match=r"replaced the IV chosen by p11kms.*discarded.*GCM_IV = hsm"):
        keyring.encrypt(b"s" * 32)


def test_the_old_gcm_uuid_is_only_an_alias_where_it_is_stable(fault_token_factory: OpenToken, faults: FaultControl,
                                                             token: Token) -> None:
    """The pre-issue-10 rule (a GCM tag under a fixed IV) changes on every call on a module that
    replaces IVs; there it gives no alias, and the key keeps its IV-free UUID."""
    label = known_key(token)
    attrs = token.key_attributes(token.find_one_secret_key(label))
    assert str(legacy_gcm_uuid(token, attrs)) == "36ebb397-3125-55d8-ab17-7e8190033f35"  # plain SoftHSM
    faults.set("gcm_iv rewrite")
    fault_token = fault_token_factory("auto")
    fault_attrs = fault_token.key_attributes(fault_token.find_one_secret_key(label))
    assert legacy_gcm_uuid(fault_token, fault_attrs) is None
    assert str(key_uuid(fault_token, fault_attrs)[0]) == KCV_UUID


def test_a_plugin_on_a_cloudhsm_like_module_serves_and_logs_the_decision(
        hsm_env: HsmEnv, faults: FaultControl, tmp_path: Path, token: Token) -> None:
    faults.set("gcm_iv rewrite")
    plugin = start_fault_plugin(hsm_env, faults, tmp_path / "p11kms.cfg", known_key(token))
    try:
        client = plugin.client()
        reply = client.encrypt(b"d" * 32)
        assert reply.key_id == KCV_UUID
        assert_carries_the_iv_used(reply.ciphertext, reply.key_id)
        assert client.decrypt(reply.ciphertext, reply.key_id) == b"d" * 32
        log = plugin.log()
        assert "gcm iv" in log and "mode=hsm" in log and "replaces the IV" in log
        assert "uuid_source=ecb-kcv" in log
    finally:
        plugin.stop()


def test_a_plugin_whose_gcm_iv_mode_cannot_work_stops_the_start_with_the_cause(
        run_plugin_unchecked: Callable[..., PluginProcess], new_key: Callable[[], tuple[str, str]]) -> None:
    plugin = run_plugin_unchecked(new_key()[0], GCM_IV="hsm")  # SoftHSM writes no IV back
    assert plugin.proc.wait(20) != 0
    assert "wrote no IV back" in plugin.log() and "set GCM_IV = caller (or auto)" in plugin.log()


@pytest.fixture
def run_plugin_unchecked(hsm_env: HsmEnv, tmp_path: Path) -> Iterator[Callable[..., PluginProcess]]:
    started: list[PluginProcess] = []

    def run(primary: str, **attributes: str) -> PluginProcess:
        config = hsm_env.write_config(tmp_path / "p11kms.cfg", primary, **attributes)
        plugin = start_plugin(hsm_env, config, wait=False)
        started.append(plugin)
        return plugin

    yield run
    for plugin in started:
        plugin.stop()
