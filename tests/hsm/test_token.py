"""The PKCS#11 binding against a real SoftHSM2 token: concurrency, login, key creation."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest

from p11kms.hsm.errors import KeyLabelTaken, KeyNotFound, LoginFailed, TokenNotFound
from p11kms.hsm.module import load_module
from p11kms.hsm.token import Token, open_token
from p11kms.plugin.keyring import build_keyring
from tests.support import TOKEN_LABEL, USER_PIN, HsmEnv, unique_label

Keys = Callable[[], tuple[str, str]]


def test_module_is_initialised_with_os_locking(hsm_env: HsmEnv) -> None:
    # SoftHSM accepts CKF_OS_LOCKING_OK; if it had answered CKR_CANT_LOCK we would serialise.
    assert load_module(hsm_env.module).serialized is False


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

    threads = [threading.Thread(target=work) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
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
