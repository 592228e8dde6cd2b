"""`p11kms check` against the real plugin, and against a broken plugin it must catch."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from p11kms.kube.client import KmsClient
from p11kms.ops.preflight import run_checks
from tests.misbehaving import Behaviour, serve_misbehaving
from tests.support import PluginProcess


def test_the_real_plugin_passes_every_check(run_plugin: Callable[..., PluginProcess],
                                            new_key: Callable[[], tuple[str, str]]) -> None:
    plugin = run_plugin(new_key()[0])
    result = subprocess.run([sys.executable, "-m", "p11kms", "check", "--socket", str(plugin.socket)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
    assert not any(line.startswith("FAIL ") for line in result.stdout.splitlines())
    assert "PASS encrypt.key_id_matches_status" in result.stdout
    assert "PASS decrypt.refuses_unknown_key_id: refused with FAILED_PRECONDITION" in result.stdout


@pytest.mark.parametrize(("behaviour", "failing"), [
    (Behaviour(encrypt_key_id="key-b"), "encrypt.key_id_matches_status"),
    (Behaviour(versions=["v2", "v2beta1"]), "status.version_stable"),
    (Behaviour(healthz="degraded"), "status.fields"),
    (Behaviour(status_key_id="", encrypt_key_id=""), "status.fields"),
    (Behaviour(annotations={"kms.example.io/audit": b"1"}), "encrypt.response"),
    (Behaviour(constant_ciphertext=True), "encrypt.distinct_outputs"),
])
def test_a_broken_plugin_fails_the_matching_check(tmp_path: Path, behaviour: Behaviour, failing: str) -> None:
    socket = tmp_path / "bad.sock"
    with serve_misbehaving(socket, behaviour), KmsClient(socket) as client:
        checks = {check.name: check for check in run_checks(client)}
    assert not checks[failing].passed
    # The same check passes on the well-behaved variant of the fake, so the broken answer is what flips it.
    with serve_misbehaving(tmp_path / "good.sock", Behaviour()), KmsClient(tmp_path / "good.sock") as client:
        baseline = {check.name: check for check in run_checks(client)}
    assert baseline[failing].passed


def test_check_exit_code_on_a_broken_plugin(tmp_path: Path) -> None:
    socket = tmp_path / "bad.sock"
    with serve_misbehaving(socket, Behaviour(encrypt_key_id="key-b")):
        result = subprocess.run([sys.executable, "-m", "p11kms", "check", "--socket", str(socket)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "FAIL encrypt.key_id_matches_status: Encrypt key_id 'key-b' differs from Status key_id 'key-a'" \
        in result.stdout


def test_check_says_nothing_is_listening(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "p11kms", "check", "--socket", str(tmp_path / "none.sock"),
                             "--timeout", "0.5"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"FAIL status.call: nothing is listening on {tmp_path / 'none.sock'}: no such file" in result.stdout
    assert "UNAVAILABLE" not in result.stdout + result.stderr


def test_check_takes_the_encryption_configuration_endpoint(tmp_path: Path) -> None:
    socket = tmp_path / "k.sock"
    with serve_misbehaving(socket, Behaviour()):
        result = subprocess.run([sys.executable, "-m", "p11kms", "check", "--socket", f"unix://{socket}"],
                                capture_output=True, text=True, timeout=60)
    assert "PASS status.call: version=v2 key_id=key-a" in result.stdout, result.stdout + result.stderr
