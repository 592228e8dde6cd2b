"""Parsing and validation of the INI config file."""

from __future__ import annotations

from pathlib import Path

import pytest

from p11kms.config import ConfigError, PinError, load_config, read_pin

BASE = """\
Primary_key = kek-2
PKCS11_Module = /usr/lib/softhsm/libsofthsm2.so
Token_Label = tok
PIN_File = user.pin
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cs_pkcs11_R3.cfg"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    return str(caught.value)


def test_minimal_config_gets_safe_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE))
    assert config.primary_key == "kek-2" and config.secondary_keys == ()
    assert config.socket_mode == 0o600
    assert config.pin_file == tmp_path / "user.pin"  # relative to the config file
    assert (config.log_format, config.log_level, config.sessions) == ("text", "info", 8)


def test_vendor_file_with_sections_comments_and_case_insensitive_names(tmp_path: Path) -> None:
    text = """\
# Utimaco-style file shared with the vendor library
; another comment style
primary_KEY = kek-3      # inline comment
SECONDARY_key = kek-2, kek-1
[Global]
Logpath = /tmp
Logging = 0
[CryptoServer]
Device = { 3001@10.0.0.1
           3001@10.0.0.2 }
[KMSPlugin]
pkcs11_module = "/opt/utimaco/libcs_pkcs11_R3.so"
Token_Serial = 0001
PIN_Env = HSM_PIN
Socket = /run/p11kms/kms.sock
Log_Format = JSON
"""
    config = load_config(write(tmp_path, text))
    assert config.primary_key == "kek-3"
    assert config.secondary_keys == ("kek-2", "kek-1")
    assert config.module == "/opt/utimaco/libcs_pkcs11_R3.so"
    assert (config.token_serial, config.pin_env, config.log_format) == ("0001", "HSM_PIN", "json")


def test_misspelled_attribute_names_line_and_suggests_the_fix(tmp_path: Path) -> None:
    message = error_of(tmp_path, BASE + "Secondry_key = kek-1\n")
    assert ":5:" in message and "Secondry_key" in message and "did you mean Secondary_key?" in message


def test_duplicated_attribute_names_both_lines(tmp_path: Path) -> None:
    message = error_of(tmp_path, BASE + "primary_key = kek-9\n")
    assert ":5:" in message and "first on line 1" in message and "Primary_key" in message


def test_primary_also_listed_as_secondary_is_refused(tmp_path: Path) -> None:
    message = error_of(tmp_path, BASE + "Secondary_key = kek-1, kek-2\n")
    assert ":5:" in message and "'kek-2'" in message and "remove it from Secondary_key" in message


@pytest.mark.parametrize(("line", "expected"), [
    ("Secondary_key = kek-1, , kek-0", "empty label"),
    ("Secondary_key = kek-1, kek-1", "twice"),
    ("Secondary_key =", "empty value"),
])
def test_bad_secondary_lists(tmp_path: Path, line: str, expected: str) -> None:
    assert expected in error_of(tmp_path, BASE + line + "\n")


def test_missing_primary_key_says_what_to_set(tmp_path: Path) -> None:
    message = error_of(tmp_path, BASE.replace("Primary_key = kek-2\n", ""))
    assert "Primary_key is missing" in message


def test_plugin_attribute_inside_a_vendor_section_is_not_silently_ignored(tmp_path: Path) -> None:
    message = error_of(tmp_path, BASE + "[Global]\nSecondary_key = kek-1\n")
    assert ":6:" in message and "[Global]" in message and "[KMSPlugin]" in message


def test_a_pin_in_the_config_file_is_refused(tmp_path: Path) -> None:
    message = error_of(tmp_path, BASE + "PIN = 123456\n")
    assert "PIN_File" in message and "123456" not in message


@pytest.mark.parametrize(("line", "expected"), [
    ("Socket_Mode = 0666", "must not grant access to others"),
    ("Socket_Mode = rw", "octal"),
    ("Sessions = 0", "between 1 and 256"),
    ("Log_Level = loud", "one of debug, info, warning, error"),
    ("Health_Interval = soon", "must be a number"),
])
def test_bad_values_name_the_attribute_and_line(tmp_path: Path, line: str, expected: str) -> None:
    message = error_of(tmp_path, BASE + line + "\n")
    assert ":5:" in message and expected in message and line.split()[0] in message


def test_exactly_one_pin_source(tmp_path: Path) -> None:
    assert "exactly one of PIN_File" in error_of(tmp_path, BASE + "PIN_Env = X\n")
    assert "exactly one of PIN_File" in error_of(tmp_path, BASE.replace("PIN_File = user.pin\n", ""))


def test_no_token_selector(tmp_path: Path) -> None:
    assert "Token_Label, Token_Serial or Slot" in error_of(tmp_path, BASE.replace("Token_Label = tok\n", ""))


def test_read_pin_from_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "user.pin").write_text("1234\n")
    assert read_pin(load_config(write(tmp_path, BASE))) == b"1234"
    env_config = load_config(write(tmp_path, BASE.replace("PIN_File = user.pin", "PIN_Env = P11KMS_TEST_PIN")))
    monkeypatch.setenv("P11KMS_TEST_PIN", "9876")
    assert read_pin(env_config) == b"9876"
    monkeypatch.delenv("P11KMS_TEST_PIN")
    with pytest.raises(PinError, match=r"P11KMS_TEST_PIN .* is not set"):
        read_pin(env_config)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.cfg")


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.cfg"
    path.write_bytes(BASE.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(path)
