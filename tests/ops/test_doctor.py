"""`p11kms doctor` against the real SoftHSM2 token, and against EncryptionConfiguration mistakes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from p11kms.ops.doctor import encryption_config_checks
from tests.support import FaultControl, HsmEnv

Keys = Callable[[], tuple[str, str]]


def doctor(hsm_env: HsmEnv, config: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = subprocess.run([sys.executable, "-m", "p11kms", "doctor", "--config", str(config), *extra],
                            env=hsm_env.process_env(**(env or {})), capture_output=True, text=True, timeout=60)
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
    assert "FAIL pin.source" in out and f"chmod 600 {pin}" in out
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
