"""`p11kms keys adopt` and `keys list` against the real SoftHSM2 token, through the command line."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from p11kms.hsm.keyident import uuid_from_cka_id
from p11kms.hsm.token import Token
from p11kms.plugin.keyring import build_keyring
from tests.support import HsmEnv, unique_label

Keys = Callable[[], tuple[str, str]]
KEY = bytes(range(32, 64))


def p11kms(hsm_env: HsmEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p11kms", *args], env=hsm_env.process_env(), capture_output=True,
                          text=True, timeout=60)


def test_adopt_stores_a_uuid_and_keeps_the_fingerprint_uuid_for_old_data(hsm_env: HsmEnv, tmp_path: Path,
                                                                        token: Token) -> None:
    foreign = unique_label("foreign")
    handle = token.import_aes_key(foreign, KEY, b"\x0a\x0b")  # as a vendor tool makes it: no UUID in CKA_ID
    before = build_keyring(token, foreign, [])
    assert before.primary.uuid_source == "ecb-kcv"
    # An object kube-apiserver stored under the fingerprint UUID before the adoption.
    iv = bytes(range(12))
    old = b"\x01" + iv + AESGCM(KEY).encrypt(iv, b"k" * 32, b"\x01" + before.key_id.encode())
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", foreign)

    listing = p11kms(hsm_env, "keys", "list", "--config", str(config))
    legacy = before.primary.aliases[0]  # the UUID the rule before issue 10 gave this key
    assert f"{before.key_id} primary    ecb-kcv (decrypt-only aliases: {legacy})" in listing.stdout, listing

    adopted = p11kms(hsm_env, "keys", "adopt", "--config", str(config), "--label", foreign)
    assert adopted.returncode == 0, adopted.stderr
    stored = uuid_from_cka_id(token.key_attributes(handle).cka_id)
    assert stored is not None
    assert f"adopted key label={foreign} uuid={stored} (replaced CKA_ID 0a0b)" in adopted.stdout
    assert f"fingerprint UUID {before.key_id} stays a decrypt-only alias" in adopted.stdout

    after = build_keyring(token, foreign, [])
    assert (after.key_id, after.primary.uuid_source) == (str(stored), "cka_id")
    assert after.decrypt(old, before.key_id) == b"k" * 32  # nothing stranded
    assert set(after.primary.aliases) == {before.key_id, legacy}
    listing = p11kms(hsm_env, "keys", "list", "--config", str(config))
    assert f"{stored} primary    cka_id\n" in listing.stdout, listing

    again = p11kms(hsm_env, "keys", "adopt", "--config", str(config), "--label", foreign)
    assert again.returncode == 1 and f"already carries UUID {stored}" in again.stderr
    assert "Traceback" not in again.stderr


def test_adopt_of_a_key_the_hsm_will_not_modify_says_so(hsm_env: HsmEnv, tmp_path: Path, token: Token) -> None:
    frozen = unique_label("frozen")
    token.import_aes_key(frozen, KEY, modifiable=False)
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", frozen)
    refused = p11kms(hsm_env, "keys", "adopt", "--config", str(config), "--label", frozen)
    assert refused.returncode == 1, refused
    assert "refuses to write CKA_ID" in refused.stderr and "CKR_ACTION_PROHIBITED" in refused.stderr  # SoftHSM's answer
    assert "Traceback" not in refused.stderr
