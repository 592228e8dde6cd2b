"""The PKCS#11 binding against a real SoftHSM2 token: concurrency, login, key creation."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from p11kms.hsm import ckdefs as ck
from p11kms.hsm.errors import HsmError, HsmUnavailable, KeyLabelTaken, KeyNotFound, LoginFailed, TokenNotFound
from p11kms.hsm.module import Pkcs11Module, load_module
from p11kms.hsm.token import Token, open_token
from p11kms.plugin.keyring import Keyring, build_keyring
from tests.support import (
    TOKEN_LABEL,
    USER_PIN,
    FaultControl,
    HsmEnv,
    RecordingObserver,
    private_module_copy,
    start_and_join,
    unique_label,
    wait_until,
)

Keys = Callable[[], tuple[str, str]]


def waits_for_a_session(thread: threading.Thread) -> bool:
    """Whether ``thread`` is blocked inside the session pool's wait for a free session right now."""
    frame = sys._current_frames().get(thread.ident or 0)
    names = []
    while frame is not None:
        names.append(frame.f_code.co_qualname)
        frame = frame.f_back
    return "_SessionPool.take" in names and "Condition.wait" in names


def test_module_is_initialised_with_os_locking(private_fault_module: Path, faults: FaultControl) -> None:
    module = Pkcs11Module(str(private_fault_module))
    try:
        assert faults.initialize_args() == [f"flags=0x{ck.CKF_OS_LOCKING_OK:x}"]
        assert module.serialized is False
    finally:
        module.finalize()


def test_a_module_that_cannot_lock_gets_every_call_serialised(private_fault_module: Path, faults: FaultControl,
                                                              new_key: Keys) -> None:
    faults.set(f"fail C_Initialize {ck.CKR_CANT_LOCK:#x} 1")  # refuses OS locking, then accepts NULL
    module = Pkcs11Module(str(private_fault_module))
    try:
        assert faults.initialize_args() == [f"flags=0x{ck.CKF_OS_LOCKING_OK:x}", "args=NULL"]
        assert module.serialized is True
        token = open_token(module, module.find_token(label=TOKEN_LABEL, serial=None, slot=None),
                           USER_PIN.encode(), pool_size=8)
        keyring = build_keyring(token, new_key()[0], [])
        results: list[bool] = []

        def work() -> None:
            for _ in range(200):
                seed = os.urandom(32)
                results.append(keyring.decrypt(keyring.encrypt(seed), keyring.key_id) == seed)

        start_and_join([threading.Thread(target=work) for _ in range(8)])
        assert results.count(True) == 1600
        token.close()
    finally:
        module.finalize()


def test_a_closed_token_refuses_at_once_and_wakes_its_waiters(hsm_env: HsmEnv, new_key: Keys) -> None:
    module = load_module(hsm_env.module)
    token = open_token(module, module.find_token(label=TOKEN_LABEL, serial=None, slot=None), USER_PIN.encode(),
                       pool_size=1)
    keyring = build_keyring(token, new_key()[0], [])
    holding, release = threading.Event(), threading.Event()
    outcome: list[BaseException | bytes] = []

    def hold_the_only_session() -> None:
        with token.session():
            holding.set()
            release.wait(10)

    def wait_for_a_session() -> None:
        try:
            outcome.append(keyring.encrypt(b"w" * 32))
        except BaseException as exc:
            outcome.append(exc)

    holder = threading.Thread(target=hold_the_only_session)
    holder.start()
    assert holding.wait(5)
    waiter = threading.Thread(target=wait_for_a_session)
    waiter.start()
    wait_until(lambda: waits_for_a_session(waiter), 5.0)  # blocked on the empty pool
    token.close()
    waiter.join(5)
    assert not waiter.is_alive(), "a caller waiting for a session of a closed token was never woken"
    assert len(outcome) == 1 and isinstance(outcome[0], HsmUnavailable)
    release.set()
    holder.join(5)
    started = time.monotonic()
    with pytest.raises(HsmUnavailable, match="closed"):
        keyring.encrypt(b"a" * 32)
    assert time.monotonic() - started < 1.0


def test_handles_of_an_earlier_module_initialisation_are_never_used(hsm_env: HsmEnv, tmp_path: Path,
                                                                    new_key: Keys) -> None:
    # After C_Finalize + C_Initialize a module numbers sessions and objects from 1 again: a stale
    # handle could name another session or another key, so not one call may carry one.
    module = Pkcs11Module(str(private_module_copy(tmp_path, hsm_env.module)))
    try:
        token = open_token(module, module.find_token(label=TOKEN_LABEL, serial=None, slot=None),
                           USER_PIN.encode(), pool_size=2)
        keyring = build_keyring(token, new_key()[0], [])
        keyring.encrypt(b"k" * 32)  # the pool now holds an opened session
        module.reinitialize()
        observer = RecordingObserver()
        module.observer = observer
        with pytest.raises(HsmUnavailable):
            keyring.encrypt(b"k" * 32)
        token.close()
        assert observer.calls == []
    finally:
        module.finalize()


def test_many_threads_share_the_token_without_corruption(token: Token, new_key: Keys) -> None:
    """16 threads x 1,500 round trips on one logged-in token: every answer must be exact."""
    label, _ = new_key()
    keyring = build_keyring(token, label, [])
    errors: list[BaseException] = []
    wrong = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal wrong
        try:
            for _ in range(1500):
                seed = os.urandom(32)
                if keyring.decrypt(keyring.encrypt(seed), keyring.key_id) != seed:
                    with lock:
                        wrong += 1
        except BaseException as exc:
            errors.append(exc)

    start_and_join([threading.Thread(target=work) for _ in range(16)])
    assert errors == [] and wrong == 0
    assert token.in_flight == 0
    assert token.in_flight_peak > 1  # operations really were in the module at the same time


def test_wrong_pin_is_login_failed_and_names_no_pin(hsm_env: HsmEnv) -> None:
    # This process is already logged in (session fixture), so the wrong PIN is tried in a fresh process.
    code = (
        "import sys;from p11kms.hsm.module import load_module;from p11kms.hsm.token import open_token\n"
        f"m=load_module({hsm_env.module!r});i=m.find_token(label={TOKEN_LABEL!r},serial=None,slot=None)\n"
        "try:\n open_token(m,i,b'wrong-pin-000',1)\n"
        "except Exception as e:\n print(type(e).__name__, e); sys.exit(0)\n"
        "sys.exit(3)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=hsm_env.process_env(), capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(LoginFailed.__name__)
    assert "wrong PIN" in result.stdout and "wrong-pin-000" not in result.stdout


def test_unknown_token_lists_what_is_there(hsm_env: HsmEnv) -> None:
    with pytest.raises(TokenNotFound, match=f"label='{TOKEN_LABEL}'"):
        load_module(hsm_env.module).find_token(label="nope", serial=None, slot=None)


def test_created_key_is_sensitive_non_extractable_aes256(token: Token, new_key: Keys) -> None:
    label, key_uuid = new_key()
    attrs = token.key_attributes(token.find_one_secret_key(label))
    assert (attrs.key_type, attrs.value_len) == (0x1F, 32)
    assert (attrs.sensitive, attrs.extractable, attrs.can_encrypt, attrs.can_decrypt) == (True, False, True, True)
    assert attrs.cka_id == key_uuid.encode()


def test_creating_an_existing_label_is_refused(token: Token, new_key: Keys) -> None:
    label, _ = new_key()
    with pytest.raises(KeyLabelTaken, match="already exists"):
        token.generate_aes256_key(label, b"x")
    assert len(token.find_secret_keys(label)) == 1


def test_missing_key(token: Token) -> None:
    with pytest.raises(KeyNotFound, match="no secret key labelled"):
        token.find_one_secret_key(unique_label("missing"))


def test_closing_a_second_token_object_keeps_the_first_logged_in(hsm_env: HsmEnv, token: Token) -> None:
    module = load_module(hsm_env.module)
    info = module.find_token(label=TOKEN_LABEL, serial=None, slot=None)
    second = open_token(module, info, USER_PIN.encode(), pool_size=2)
    assert second.find_secret_keys(unique_label("none")) == []
    second.close()
    label = unique_label()
    token.generate_aes256_key(label, b"still-logged-in")  # needs the login: CKR_USER_NOT_LOGGED_IN otherwise
    assert len(token.find_secret_keys(label)) == 1


def test_module_init_args_reach_the_module_as_preserved(private_fault_module: Path, faults: FaultControl) -> None:
    # NSS softoken reads its database directory from pReserved; other modules get NULL there.
    # SoftHSM2 itself follows the standard and refuses a non-NULL pReserved (measured: CKR_ARGUMENTS_BAD).
    text = "configdir='sql:/etc/nss' certPrefix='' keyPrefix='' secmod='secmod.db' flags="
    with pytest.raises(HsmError, match="CKR_ARGUMENTS_BAD"):
        Pkcs11Module(str(private_fault_module), init_args=text)
    faults.set("fail C_Initialize 0x0 1")  # answer CKR_OK without SoftHSM: only the arguments matter here
    module = Pkcs11Module(str(private_fault_module), init_args=text)
    try:
        lines = faults.calllog.read_text().splitlines()
        assert [line for line in lines if line.startswith("C_Initialize:")] == [
            f"C_Initialize:flags=0x{ck.CKF_OS_LOCKING_OK:x}", f"C_Initialize:reserved={text}"] * 2
    finally:
        module.finalize()


def test_gcm_iv_and_module_init_args_are_read_from_the_config(hsm_env: HsmEnv, tmp_path: Path) -> None:
    from p11kms.config import ConfigError, load_config

    config = hsm_env.write_config(tmp_path / "a.cfg", "k", GCM_IV="HSM",
                                  Module_Init_Args="configdir='sql:/var/lib/nss' flags=readOnly")
    loaded = load_config(config)
    assert (loaded.gcm_iv, loaded.module_init_args) == ("hsm", "configdir='sql:/var/lib/nss' flags=readOnly")
    assert load_config(hsm_env.write_config(tmp_path / "b.cfg", "k")).gcm_iv == "auto"
    with pytest.raises(ConfigError, match="GCM_IV must be one of auto, caller, hsm, got 'random'"):
        load_config(hsm_env.write_config(tmp_path / "c.cfg", "k", GCM_IV="random"))


def _hammer(keyring: Keyring, threads: int = 8, rounds: int = 40) -> list[BaseException]:
    errors: list[BaseException] = []

    def work() -> None:
        for _ in range(rounds):
            seed = os.urandom(32)
            try:
                assert keyring.decrypt(keyring.encrypt(seed), keyring.key_id) == seed
            except BaseException as exc:  # collected for the assertion
                errors.append(exc)

    start_and_join([threading.Thread(target=work) for _ in range(threads)])
    return errors


def test_session_count_makes_callers_wait_for_a_pooled_session(private_fault_module: Path, faults: FaultControl,
                                                               new_key: Keys) -> None:
    # A module that enforces a session limit it does not report: the fault module stands in for it.
    faults.set("max_sessions 3")  # the login anchor and two work sessions
    module = Pkcs11Module(str(private_fault_module))
    try:
        token = open_token(module, module.find_token(label=TOKEN_LABEL, serial=None, slot=None),
                           USER_PIN.encode(), pool_size=8)
        assert _hammer(build_keyring(token, new_key()[0], [])) == []
        assert token.pool_capacity == 2
        token.close()
    finally:
        module.finalize()


def test_the_pool_never_exceeds_the_reported_session_limit(private_fault_module: Path, faults: FaultControl,
                                                           new_key: Keys) -> None:
    faults.set("report_max_sessions 4")  # ulMaxSessionCount = 4: the anchor and three work sessions
    module = Pkcs11Module(str(private_fault_module))
    try:
        token = open_token(module, module.find_token(label=TOKEN_LABEL, serial=None, slot=None),
                           USER_PIN.encode(), pool_size=8)
        assert token.pool_capacity == 3
        assert _hammer(build_keyring(token, new_key()[0], [])) == []
        assert faults.calls("C_OpenSession") == 4
        token.close()
    finally:
        module.finalize()
