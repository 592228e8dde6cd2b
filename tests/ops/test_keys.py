"""`p11kms keys create` against the real SoftHSM2 token: careless labels and old labels are refused."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from p11kms.config import ConfigError, load_config
from p11kms.hsm.token import Token
from p11kms.ops.keys import create_key
from tests.support import HsmEnv, unique_label

Keys = Callable[[], tuple[str, str]]


def keys_create(hsm_env: HsmEnv, config: Path, label: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p11kms", "keys", "create", "--config", str(config), "--label", label],
                          env=hsm_env.process_env(), capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("make_label", "expected"), [
    (lambda good: "", "is empty"),
    (lambda good: " " + good, "whitespace"),
    (lambda good: good + " ", "whitespace"),
    (lambda good: good.replace("-", ",", 1), "comma"),
    (lambda good: good.replace("-", "\t", 1), "control character U+0009"),
])
def test_careless_labels_are_refused_before_any_key_is_made(hsm_env: HsmEnv, tmp_path: Path, token: Token,
                                                            new_key: Keys, make_label: Callable[[str], str],
                                                            expected: str) -> None:
    label = make_label(unique_label("careless"))
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", new_key()[0])
    result = keys_create(hsm_env, config, label)
    assert result.returncode == 2, result.stderr
    assert f"--label {label!r}" in result.stderr and expected in result.stderr
    assert "Traceback" not in result.stderr
    assert token.find_secret_keys(label) == []


def test_a_label_the_config_names_as_secondary_is_a_restore_not_a_new_key(hsm_env: HsmEnv, tmp_path: Path,
                                                                          token: Token, new_key: Keys) -> None:
    lost = unique_label("lost")
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", new_key()[0], f"{new_key()[0]}, {lost}")
    result = keys_create(hsm_env, config, lost)
    assert result.returncode == 2, result.stderr
    assert f"{config}:8" in result.stderr and "Secondary_key" in result.stderr
    assert "restore" in result.stderr and "HSM backup or replica" in result.stderr
    assert token.find_secret_keys(lost) == []


def test_the_primary_label_and_a_new_label_can_still_be_created(hsm_env: HsmEnv, tmp_path: Path,
                                                                token: Token) -> None:
    primary, fresh = unique_label("first"), unique_label("next")
    config = load_config(hsm_env.write_config(tmp_path / "p11kms.cfg", primary))
    assert str(create_key(config, primary)) and str(create_key(config, fresh))
    assert len(token.find_secret_keys(primary)) == len(token.find_secret_keys(fresh)) == 1
    with pytest.raises(ConfigError, match="comment"):
        create_key(config, "kek #2")
