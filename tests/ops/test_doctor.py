"""`p11kms doctor` against the real SoftHSM2 token, and against EncryptionConfiguration mistakes."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from p11kms.hsm import ckdefs as ck
from p11kms.hsm.token import Token
from p11kms.ops.doctor import encryption_config_checks
from tests.support import FaultControl, HsmEnv, pkcs11_tool_keygen, unique_label

Keys = Callable[[], tuple[str, str]]


def doctor(hsm_env: HsmEnv, config: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = subprocess.run([sys.executable, "-m", "p11kms", "doctor", "--config", str(config), *extra],
                            env=hsm_env.process_env(**(env or {})), capture_output=True, text=True, timeout=60)
    assert result.stderr == "", result.stderr  # doctor reports every problem as a check, never on stderr
    return result.returncode, result.stdout


def test_everything_passes_on_a_good_setup(hsm_env: HsmEnv, tmp_path: Path, new_key: Keys) -> None:
    (primary, primary_uuid), (old, old_uuid) = new_key(), new_key()
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", primary, old)
    code, out = doctor(hsm_env, config)
    assert code == 0, out
    assert f"PASS key.primary[{primary}]: AES-256, sensitive, not extractable, uuid {primary_uuid}" in out
    assert f"PASS key.secondary[{old}]" in out and old_uuid in out
    assert "PASS aes_gcm.round_trip" in out and "PASS hsm.mechanism" in out


def test_a_missing_key_fails_with_the_fix(hsm_env: HsmEnv, tmp_path: Path, new_key: Keys) -> None:
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", new_key()[0], "retired-too-early")
    code, out = doctor(hsm_env, config)
    assert code == 1
    assert "FAIL key.secondary[retired-too-early]: no secret key labelled 'retired-too-early'" in out
    assert "never delete an old key" in out


def test_a_missing_secondary_is_restored_never_created(hsm_env: HsmEnv, tmp_path: Path, new_key: Keys) -> None:
    primary, primary_uuid = new_key()
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", primary, "lost-old-key")
    code, out = doctor(hsm_env, config)
    line = next(x for x in out.splitlines() if x.startswith("FAIL key.secondary[lost-old-key]"))
    assert code == 1 and "keys create" not in line
    assert "restore it from an HSM backup or replica" in line
    assert f"p11kms etcd scan --require {primary_uuid}" in line and "remove 'lost-old-key' from Secondary_key" in line


def test_a_missing_primary_may_be_created(hsm_env: HsmEnv, tmp_path: Path) -> None:
    code, out = doctor(hsm_env, hsm_env.write_config(tmp_path / "p11kms.cfg", "not-made-yet"))
    assert code == 1 and "p11kms keys create --config" in out and "--label not-made-yet" in out


def make_decrypt_only(hsm_env: HsmEnv, token: Token, label: str) -> None:
    """Sets CKA_SENSITIVE and clears CKA_ENCRYPT, as a vendor tool would for a key kept only to decrypt.
    p11kms's binding has no C_SetAttributeValue (the plugin never changes a key): this calls the
    library's own export, which is the same loaded library instance."""
    set_attributes = ctypes.CDLL(hsm_env.module).C_SetAttributeValue
    set_attributes.argtypes = [ck.CK_ULONG, ck.CK_ULONG, ctypes.POINTER(ck.CK_ATTRIBUTE), ck.CK_ULONG]
    set_attributes.restype = ck.CK_RV
    handle = token.find_one_secret_key(label)
    values = [(ck.CKA_SENSITIVE, ctypes.c_ubyte(1)), (ck.CKA_ENCRYPT, ctypes.c_ubyte(0))]
    template = (ck.CK_ATTRIBUTE * len(values))()
    for slot, (kind, value) in enumerate(values):
        template[slot].type, template[slot].ulValueLen = kind, 1
        template[slot].pValue = ctypes.cast(ctypes.pointer(value), ctypes.c_void_p)
    assert token.run(lambda session: set_attributes(session, handle, template, len(values))) == ck.CKR_OK
    attributes = token.key_attributes(handle)
    assert (attributes.can_encrypt, attributes.can_decrypt, attributes.sensitive) == (False, True, True)


def test_a_foreign_decrypt_only_key_is_one_failed_check_and_the_rest_still_runs(
        hsm_env: HsmEnv, tmp_path: Path, token: Token, new_key: Keys) -> None:
    primary, _ = new_key()
    foreign = unique_label("foreign")
    pkcs11_tool_keygen(hsm_env, foreign, cka_id="0a0b0c")  # no UUID in CKA_ID: needs a fingerprint
    make_decrypt_only(hsm_env, token, foreign)
    encryption = tmp_path / "enc.yaml"
    encryption.write_text(ENCRYPTION_CONFIG.format(KMS=f"{{apiVersion: v2, name: p11kms, "
                                                       f"endpoint: 'unix://{tmp_path / 'kms.sock'}'}}"))
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", primary, foreign)
    code, out = doctor(hsm_env, config, "--encryption-config", str(encryption))
    assert code == 1, out
    line = next(x for x in out.splitlines() if x.startswith(f"FAIL key.secondary[{foreign}]"))
    # Since issue 10 a decrypt-only key has a UUID (since issue 20 its ecb-kcv one, by AES-CTR decryption);
    # what fails it is the CKA_WRAP pkcs11-tool sets, which doctor refuses in a KEK.
    assert "CKA_WRAP is true" in line and "no UUID" not in line
    assert f"PASS key.primary[{primary}]" in out and "PASS encryption_config.endpoint" in out


def test_socket_directory_follows_the_serve_rule(hsm_env: HsmEnv, tmp_path: Path, new_key: Keys) -> None:
    primary, _ = new_key()
    one_level = hsm_env.write_config(tmp_path / "one.cfg", primary, Socket=str(tmp_path / "new" / "kms.sock"))
    code, out = doctor(hsm_env, one_level)
    assert code == 0, out
    assert f"WARN socket.directory: {tmp_path / 'new'} does not exist; serve creates it with mode 0750" in out
    two_levels = hsm_env.write_config(tmp_path / "two.cfg", primary, Socket=str(tmp_path / "a" / "b" / "kms.sock"))
    code, out = doctor(hsm_env, two_levels)
    assert code == 1 and f"FAIL socket.directory: neither {tmp_path / 'a' / 'b'} nor" in out
    assert f"mkdir -p -m 0750 {tmp_path / 'a' / 'b'}" in out


def test_an_empty_pin_file_is_called_empty(hsm_env: HsmEnv, tmp_path: Path, new_key: Keys) -> None:
    pin = tmp_path / "empty.pin"
    pin.write_text("")
    pin.chmod(0o600)
    code, out = doctor(hsm_env, hsm_env.write_config(tmp_path / "p11kms.cfg", new_key()[0], PIN_File=str(pin)))
    assert code == 1 and "FAIL hsm.login" in out and "is empty" in out
    assert "make the PIN source readable" not in out and f"write the user PIN into {pin}" in out


def test_a_symlinked_pin_file_fails_the_pin_source_check(hsm_env: HsmEnv, tmp_path: Path, new_key: Keys) -> None:
    link = tmp_path / "linked.pin"
    link.symlink_to(hsm_env.pin_file)
    code, out = doctor(hsm_env, hsm_env.write_config(tmp_path / "p11kms.cfg", new_key()[0], PIN_File=str(link)))
    assert code == 1 and "FAIL pin.source" in out and "symbolic link" in out and "PASS hsm.login" in out


@pytest.mark.parametrize(("attributes", "expected"), [
    ({"Socket_Group": "kube-apiservr-typo"}, "no group 'kube-apiservr-typo'"),
    ({"Socket": "/run/" + "s" * 150}, "at most 107 bytes"),
    ({"PIN_Env": "P11KMS_DOCTOR_UNSET_PIN"}, "P11KMS_DOCTOR_UNSET_PIN"),
])
def test_what_serve_refuses_doctor_fails(hsm_env: HsmEnv, tmp_path: Path, attributes: dict[str, str],
                                         expected: str) -> None:
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", "any", **attributes)
    if "PIN_Env" in attributes:
        config.write_text("".join(x for x in config.read_text().splitlines(keepends=True)
                                  if not x.startswith("PIN_File")))
    code, out = doctor(hsm_env, config)
    assert code == 1 and "FAIL config" in out and expected in out


def test_a_wrong_pin_is_tried_exactly_once(hsm_env: HsmEnv, faults: FaultControl, tmp_path: Path,
                                           new_key: Keys) -> None:
    pin = tmp_path / "bad.pin"
    pin.write_text("wrong-pin-value")
    pin.chmod(0o600)
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", new_key()[0], PIN_File=str(pin),
                                  PKCS11_Module=str(faults.module))
    code, out = doctor(hsm_env, config, env=faults.env(hsm_env.module))
    assert code == 1
    assert "FAIL hsm.login" in out and "will not try again" in out
    assert faults.calls("C_Login") == 1
    assert "wrong-pin-value" not in out


def test_unsafe_pin_file_and_socket_directory(hsm_env: HsmEnv, tmp_path: Path, new_key: Keys) -> None:
    pin = tmp_path / "open.pin"
    pin.write_text(hsm_env.pin_file.read_text())
    pin.chmod(0o644)
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    sockets.chmod(0o777)
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", new_key()[0], PIN_File=str(pin),
                                  Socket=str(sockets / "kms.sock"))
    code, out = doctor(hsm_env, config)
    assert code == 1
    assert "FAIL pin.source" in out and f"-> fix: chmod 600 {pin}" in out
    assert out.count(f"chmod 600 {pin}") == 1 and "run: chmod" not in out  # the fix once, not twice
    assert f"FAIL socket.directory: {sockets} has mode 0777" in out


def test_a_config_error_is_reported_not_raised(hsm_env: HsmEnv, tmp_path: Path) -> None:
    config = tmp_path / "bad.cfg"
    config.write_text("Primary_key = a\nSecondry_key = b\n")
    code, out = doctor(hsm_env, config)
    assert code == 1 and "FAIL config" in out and "did you mean Secondary_key?" in out


ENCRYPTION_CONFIG = """\
apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: [secrets]
    providers:
      - kms: {KMS}
      - identity: {{}}
"""


@pytest.mark.parametrize(("kms", "failing"), [
    ("{name: p11kms, endpoint: 'unix:///run/p11kms/kms.sock', timeout: 3s}", "encryption_config.api_version"),
    ("{apiVersion: v2, name: 'a:b', endpoint: 'unix:///run/p11kms/kms.sock'}", "encryption_config.name"),
    ("{apiVersion: v2, name: p11kms, cachesize: 1000, endpoint: 'unix:///run/p11kms/kms.sock'}",
     "encryption_config.cachesize"),
    ("{apiVersion: v2, name: p11kms, endpoint: 'unix:///var/run/other.sock'}", "encryption_config.endpoint"),
])
def test_encryption_config_mistakes(tmp_path: Path, kms: str, failing: str) -> None:
    path = tmp_path / "enc.yaml"
    path.write_text(ENCRYPTION_CONFIG.format(KMS=kms))
    checks = encryption_config_checks(path, Path("/run/p11kms/kms.sock"))
    failed = {c.name.split("[")[0] for c in checks if not c.passed}
    assert failed == {failing}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run doctor as another user (setpriv)")
def test_an_unreadable_config_gets_a_permission_fix_not_an_edit(hsm_env: HsmEnv,
                                                                 new_key: Keys) -> None:
    """As the image's uid 65532 with /etc/p11kms root-owned 0750, the fix is ownership, not the file's lines."""
    base = Path(tempfile.mkdtemp())  # outside pytest's base directory, which is 0700
    try:
        base.chmod(0o755)
        etc = base / "etc-p11kms"
        etc.mkdir(mode=0o750)
        config = hsm_env.write_config(etc / "p11kms.cfg", new_key()[0])
        config.chmod(0o640)
        result = subprocess.run(["setpriv", "--reuid=65532", "--regid=65532", "--clear-groups", sys.executable,
                                 "-m", "p11kms", "doctor", "--config", str(config)],
                                env=hsm_env.process_env(), capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(base)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL config" in result.stdout and "correct the attribute" not in result.stdout
    assert f"-> fix: let the plugin's user (uid 65532) enter {etc}: chgrp p11kms {etc}" in result.stdout


KMS_V2 = "{apiVersion: v2, name: p11kms, endpoint: 'unix:///run/p11kms/kms.sock'}"


@pytest.mark.parametrize(("providers", "resources", "passed", "says"), [
    (["identity: {}", f"kms: {KMS_V2}"], "[secrets]", False, "phase 1 of the enablement"),
    ([f"kms: {KMS_V2}", "identity: {}"], "[secrets]", True, "phase 2"),
    ([f"kms: {KMS_V2}"], "[secrets]", True, "phase 3"),
    (["kms: {apiVersion: v2, name: vendor, endpoint: 'unix:///run/vendor.sock'}", f"kms: {KMS_V2}"], "[secrets]",
     False, "migration: the kms provider writes"),
    ([f"kms: {KMS_V2}", "identity: {}"], "[configmaps]", False, "not secrets"),
])
def test_encryption_config_phases(tmp_path: Path, providers: list[str], resources: str, passed: bool,
                                  says: str) -> None:
    path = tmp_path / "enc.yaml"
    listed = "".join(f"      - {p}\n" for p in providers)
    path.write_text("apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n"
                    f"  - resources: {resources}\n    providers:\n{listed}")
    checks = encryption_config_checks(path, Path("/run/p11kms/kms.sock"))
    relevant = [c for c in checks if c.name.startswith(("encryption_config.phase", "encryption_config.secrets"))
                and says in c.detail]
    assert relevant, [(c.name, c.detail) for c in checks]
    assert all(c.passed is passed and not c.advisory for c in relevant)


def test_a_primary_that_can_wrap_is_fixed_in_place_or_by_a_rotation_never_by_a_new_key(
        hsm_env: HsmEnv, tmp_path: Path, token: Token) -> None:
    """What `pkcs11-tool --keygen` makes allows CKA_WRAP: a primary that may already protect data is fixed by
    clearing the flag in place (its UUID stays) or by a rotation, never by a new key under its label."""
    label = unique_label("wraps")
    token.import_aes_key(label, os.urandom(32), wrap=True, derive=True)
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", label)
    code, out = doctor(hsm_env, config)
    line = next(x for x in out.splitlines() if x.startswith(f"FAIL key.primary[{label}]"))
    assert code == 1 and "CKA_WRAP is true; CKA_DERIVE is true" in line
    assert f"p11kms keys restrict --config {config} --label {label}" in line and "its UUID stays" in line
    assert "p11kms rotate stage NEW --create" in line and "create a new key" not in line

    restricted = subprocess.run([sys.executable, "-m", "p11kms", "keys", "restrict", "--config", str(config),
                                 "--label", label], env=hsm_env.process_env(), capture_output=True, text=True,
                                timeout=60)
    assert restricted.returncode == 0, restricted.stderr
    assert "cleared CKA_WRAP" in restricted.stdout and "cleared CKA_DERIVE" in restricted.stdout
    assert "uuid unchanged" in restricted.stdout
    code, out = doctor(hsm_env, config)
    assert code == 0 and f"PASS key.primary[{label}]" in out, out


def test_a_primary_that_may_have_left_the_hsm_is_fixed_by_a_rotation(hsm_env: HsmEnv, tmp_path: Path,
                                                                      token: Token) -> None:
    label = unique_label("extractable")
    token.import_aes_key(label, os.urandom(32), extractable=True)
    code, out = doctor(hsm_env, hsm_env.write_config(tmp_path / "p11kms.cfg", label))
    line = next(x for x in out.splitlines() if x.startswith(f"FAIL key.primary[{label}]"))
    assert code == 1 and "CKA_EXTRACTABLE is not false" in line
    assert "p11kms rotate stage NEW --create" in line and "may already have left the HSM" in line
    assert "keys restrict" not in line and "create a new key" not in line
