"""What a failed C_Decrypt means, by module behaviour: a bad ciphertext or a bad HSM.

SoftHSM2 2.6 answers a bad GCM tag with CKR_GENERAL_ERROR (a real answer, used below). The codes
other modules give (CKR_AEAD_DECRYPT_FAILED from PKCS#11 3.0 modules, CKR_FUNCTION_FAILED, the
ENCRYPTED_DATA codes) are injected by tests/faultmodule/p11fault.c in front of a real SoftHSM2 token,
because no module available here produces them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from p11kms.hsm import ckdefs as ck
from p11kms.hsm.errors import CiphertextRejected, HsmUnavailable
from p11kms.hsm.module import Pkcs11Module
from p11kms.hsm.token import open_token
from p11kms.plugin.keyring import Keyring, build_keyring
from p11kms.plugin.service import status_for
from tests.support import TOKEN_LABEL, USER_PIN, FaultControl

Keys = Callable[[], tuple[str, str]]


@pytest.fixture
def keyring(private_fault_module: Path, new_key: Keys) -> Iterator[Keyring]:
    module = Pkcs11Module(str(private_fault_module))
    token = open_token(module, module.find_token(label=TOKEN_LABEL, serial=None, slot=None), USER_PIN.encode(), 4)
    try:
        yield build_keyring(token, new_key()[0], [])
    finally:
        token.close()
        module.finalize()


@pytest.mark.parametrize("ckr", [ck.CKR_AEAD_DECRYPT_FAILED, ck.CKR_ENCRYPTED_DATA_INVALID,
                                 ck.CKR_ENCRYPTED_DATA_LEN_RANGE])
def test_ciphertext_codes_are_invalid_argument(keyring: Keyring, faults: FaultControl, ckr: int) -> None:
    ciphertext = keyring.encrypt(b"c" * 32)
    faults.set(f"fail C_Decrypt {ckr:#x} 1")
    with pytest.raises(CiphertextRejected, match="failed authentication") as caught:
        keyring.decrypt(ciphertext, keyring.key_id)
    assert status_for(caught.value)[0] is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("ckr", [ck.CKR_FUNCTION_FAILED, ck.CKR_GENERAL_ERROR])
def test_a_one_off_ambiguous_failure_on_a_valid_ciphertext_decrypts(keyring: Keyring, faults: FaultControl,
                                                                    ckr: int) -> None:
    # A real HSM cannot be made to fail one C_Decrypt on demand: the fault module injects it.
    plaintext = os.urandom(32)
    ciphertext = keyring.encrypt(plaintext)
    keyring.self_test()  # a pass just before the failure says nothing about the HSM at the failure
    faults.set(f"fail C_Decrypt {ckr:#x} 1")  # one C_Decrypt fails, then the HSM works again
    before = faults.calls("C_EncryptInit")
    assert keyring.decrypt(ciphertext, keyring.key_id) == plaintext
    assert faults.calls("C_EncryptInit") - before == 1  # a self-test after the failure, then the retry


@pytest.mark.parametrize("ckr", [ck.CKR_FUNCTION_FAILED, ck.CKR_GENERAL_ERROR])
def test_an_ambiguous_failure_that_fails_the_self_test_too_is_the_hsm(keyring: Keyring, faults: FaultControl,
                                                                      ckr: int) -> None:
    # An HSM that fails every C_Decrypt with this code: injected, a real one cannot be made to.
    ciphertext = keyring.encrypt(b"c" * 32)
    keyring.self_test()
    faults.set(f"fail C_Decrypt {ckr:#x} -1")
    with pytest.raises(HsmUnavailable, match="self-test failed too") as caught:
        keyring.decrypt(ciphertext, keyring.key_id)
    assert status_for(caught.value)[0] is grpc.StatusCode.UNAVAILABLE


def test_a_bad_tag_is_rejected_after_a_self_test_and_one_retry(keyring: Keyring, faults: FaultControl) -> None:
    ciphertext = bytearray(keyring.encrypt(os.urandom(32)))
    ciphertext[-1] ^= 1  # a real bad tag: SoftHSM 2.6 answers CKR_GENERAL_ERROR, no injection
    before_tests, before_decrypts = faults.calls("C_EncryptInit"), faults.calls("C_Decrypt")
    with pytest.raises(CiphertextRejected, match="failed authentication") as caught:
        keyring.decrypt(bytes(ciphertext), keyring.key_id)
    assert status_for(caught.value)[0] is grpc.StatusCode.INVALID_ARGUMENT
    assert faults.calls("C_EncryptInit") - before_tests == 1  # one self-test
    assert faults.calls("C_Decrypt") - before_decrypts == 3  # the call, the self-test's, the retry


def test_bad_ciphertexts_that_fail_together_share_a_self_test(keyring: Keyring, faults: FaultControl) -> None:
    callers = 4  # the fixture's token has 4 sessions: every first C_Decrypt is in the HSM at once
    ciphertext = bytearray(keyring.encrypt(os.urandom(32)))
    ciphertext[-1] ^= 1
    faults.set("latency_ms 40")  # each PKCS#11 call takes 40 ms, so the callers' failures overlap
    before = faults.calls("C_EncryptInit")
    start = threading.Barrier(callers)

    def bad_decrypt() -> None:
        start.wait()
        with pytest.raises(CiphertextRejected):
            keyring.decrypt(bytes(ciphertext), keyring.key_id)

    with ThreadPoolExecutor(callers) as pool:
        for future in [pool.submit(bad_decrypt) for _ in range(callers)]:
            future.result()
    # One self-test runs at a time and answers every failure before its start: failures that land
    # while it runs share the next one, so 4 failures within one self-test cost at most 2, not 4.
    assert faults.calls("C_EncryptInit") - before <= 2
