"""What a failed C_Decrypt means, by module behaviour: a bad ciphertext or a bad HSM.

SoftHSM2 2.6 answers a bad GCM tag with CKR_GENERAL_ERROR (a real answer, used below). The codes
other modules give (CKR_AEAD_DECRYPT_FAILED from PKCS#11 3.0 modules, CKR_FUNCTION_FAILED, the
ENCRYPTED_DATA codes) are injected by tests/faultmodule/p11fault.c in front of a real SoftHSM2 token,
because no module available here produces them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
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
def test_ambiguous_codes_go_through_the_self_test_not_a_reconnect(keyring: Keyring, faults: FaultControl,
                                                                   ckr: int) -> None:
    ciphertext = keyring.encrypt(b"c" * 32)
    faults.set(f"fail C_Decrypt {ckr:#x} 1")  # the decrypt fails; the self-test's decrypt works
    with pytest.raises(CiphertextRejected) as caught:
        keyring.decrypt(ciphertext, keyring.key_id)
    assert status_for(caught.value)[0] is grpc.StatusCode.INVALID_ARGUMENT
    faults.set(f"fail C_Decrypt {ckr:#x} -1")  # now the self-test fails too: the HSM is at fault
    keyring._self_test_passed_at = None  # the cache is tested below; here each answer is fresh
    with pytest.raises(HsmUnavailable, match="self-test failed too"):
        keyring.decrypt(ciphertext, keyring.key_id)


def test_a_flood_of_bad_ciphertexts_costs_one_self_test(keyring: Keyring, faults: FaultControl) -> None:
    ciphertext = bytearray(keyring.encrypt(os.urandom(32)))
    ciphertext[-1] ^= 1  # a real bad tag: SoftHSM answers CKR_GENERAL_ERROR
    before = faults.calls("C_EncryptInit")
    for _ in range(30):
        with pytest.raises(CiphertextRejected):
            keyring.decrypt(bytes(ciphertext), keyring.key_id)
    assert faults.calls("C_EncryptInit") - before == 1  # the self-test encrypts once, not 30 times
