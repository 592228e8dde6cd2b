"""Parsing and validation of the INI config file."""

from __future__ import annotations

import grp
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from p11kms.config import (
    SOCKET_DIRECTORY_MODE,
    ConfigError,
    PinError,
    label_problem,
    load_config,
    pin_source_warnings,
    prepare_socket_directory,
    read_pin,
    socket_directory_problem,
)
from tests.support import USER_PIN, HsmEnv, start_plugin

Keys = Callable[[], tuple[str, str]]

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


def test_vendor_file_with_sections_comments_and_case_insensitive_names(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HSM_PIN", "1234")  # PIN_Env must name a variable that is set
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
    ("Stuck_Call_Exit = 0", "between 1 and 3600, or off"),
    ("Stuck_Call_Exit = never", "must be a number of seconds between 1 and 3600, or off"),
])
def test_bad_values_name_the_attribute_and_line(tmp_path: Path, line: str, expected: str) -> None:
    message = error_of(tmp_path, BASE + line + "\n")
    assert ":5:" in message and expected in message and line.split()[0] in message


def test_stuck_call_exit_defaults_to_60_s_and_can_be_switched_off(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, BASE)).stuck_call_exit == 60.0
    assert load_config(write(tmp_path, BASE + "Stuck_Call_Exit = 5\n")).stuck_call_exit == 5.0
    assert load_config(write(tmp_path, BASE + "Stuck_Call_Exit = OFF\n")).stuck_call_exit is None


def test_exactly_one_pin_source(tmp_path: Path) -> None:
    assert "exactly one of PIN_File" in error_of(tmp_path, BASE + "PIN_Env = X\n")
    assert "exactly one of PIN_File" in error_of(tmp_path, BASE.replace("PIN_File = user.pin\n", ""))


def test_no_token_selector(tmp_path: Path) -> None:
    assert "Token_Label, Token_Serial or Slot" in error_of(tmp_path, BASE.replace("Token_Label = tok\n", ""))


def test_read_pin_from_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "user.pin").write_text("1234\n")
    assert read_pin(load_config(write(tmp_path, BASE))) == b"1234"
    monkeypatch.setenv("P11KMS_TEST_PIN", "9876")
    env_config = load_config(write(tmp_path, BASE.replace("PIN_File = user.pin", "PIN_Env = P11KMS_TEST_PIN")))
    assert read_pin(env_config) == b"9876"


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.cfg")


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.cfg"
    path.write_bytes(BASE.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(path)


# -- careless input (issue 9) ------------------------------------------------------------------

@pytest.mark.parametrize(("line", "expected"), [
    ("Primary_key = k8s,kek", "contains a comma"),
    ('Primary_key = " k8s-kek-3"', "begins or ends with whitespace"),
    ("Primary_key = k8s\x07kek", "control character U+0007"),
    ("Secondary_key = kek-1, kek\u200b-0", "U+200B"),
])
def test_labels_follow_the_same_rule_as_keys_create(tmp_path: Path, line: str, expected: str) -> None:
    primary = line.startswith("Primary_key")
    text = BASE.replace("Primary_key = kek-2", line) if primary else BASE + line + "\n"
    message = error_of(tmp_path, text)
    assert (":1:" if primary else ":5:") in message and line.split()[0] in message and expected in message


@pytest.mark.parametrize(("label", "problem"), [
    ("", "is empty"), (" a", "whitespace"), ("a\n", "whitespace"), ("a,b", "comma"), ("a\x00b", "U+0000"),
    ("a #b", "comment"), ("a ;b", "comment"),
])
def test_label_problem_names_what_is_wrong(label: str, problem: str) -> None:
    found = label_problem(label)
    assert found is not None and problem in found


def test_good_labels_have_no_problem() -> None:
    assert [label_problem(x) for x in ("k8s-kek-2026-11", "kek_1.a", "clé#1", "a;b")] == [None] * 4


def test_socket_group_is_resolved_when_the_config_is_loaded(tmp_path: Path) -> None:
    own = grp.getgrgid(os.getgid()).gr_name
    assert load_config(write(tmp_path, BASE + f"Socket_Group = {own}\n")).socket_gid == os.getgid()
    assert load_config(write(tmp_path, BASE + "Socket_Group = 4242\n")).socket_gid == 4242
    assert load_config(write(tmp_path, BASE)).socket_gid is None


def test_a_misspelled_socket_group_is_a_config_error(tmp_path: Path) -> None:
    existing = grp.getgrgid(os.getgid()).gr_name
    typo = existing[:-1] + ("x" if existing[-1] != "x" else "y")
    message = error_of(tmp_path, BASE + f"Socket_Group = {typo}\n")
    assert ":5:" in message and f"no group {typo!r}" in message and f"did you mean {existing}?" in message


def test_a_socket_path_over_the_unix_limit_is_refused(tmp_path: Path) -> None:
    at_limit = "/run/" + "s" * (107 - len("/run/"))
    assert str(load_config(write(tmp_path, BASE + f"Socket = {at_limit}\n")).socket) == at_limit
    message = error_of(tmp_path, BASE + f"Socket = {at_limit}x\n")
    assert ":5:" in message and "108 bytes" in message and "107" in message


def test_socket_directory_rule_one_missing_level(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    config = load_config(write(tmp_path, BASE + f"Socket = run/p11kms/kms.sock\nSocket_Group = {group}\n"))
    assert socket_directory_problem(config.socket) is not None  # run/ is missing too: two levels
    (tmp_path / "run").mkdir()
    assert socket_directory_problem(config.socket) is None
    assert prepare_socket_directory(config) == tmp_path / "run" / "p11kms"
    info = (tmp_path / "run" / "p11kms").stat()
    assert stat.S_IMODE(info.st_mode) == SOCKET_DIRECTORY_MODE == 0o750 and info.st_gid == os.getgid()
    assert prepare_socket_directory(config) is None  # exists now: left alone


def test_a_socket_directory_two_levels_deep_is_refused_with_the_line(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE + "Socket = a/b/kms.sock\n"))
    with pytest.raises(ConfigError) as caught:
        prepare_socket_directory(config)
    assert f"{config.path}:5" in str(caught.value) and "mkdir" in str(caught.value)
    assert not (tmp_path / "a").exists()


def test_pin_env_naming_an_unset_variable_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = BASE.replace("PIN_File = user.pin", "PIN_Env = P11KMS_TEST_UNSET_PIN")
    monkeypatch.delenv("P11KMS_TEST_UNSET_PIN", raising=False)
    message = error_of(tmp_path, text)
    assert ":4:" in message and "P11KMS_TEST_UNSET_PIN" in message and "not set" in message
    monkeypatch.setenv("P11KMS_TEST_UNSET_PIN", "")
    assert "is empty" in error_of(tmp_path, text)


def test_the_pin_leaves_the_environment_once_read_and_stays_for_relogins(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    name = "P11KMS_TEST_TAKEN_PIN"
    monkeypatch.setenv(name, "5150")
    config = load_config(write(tmp_path, BASE.replace("PIN_File = user.pin", f"PIN_Env = {name}")))
    assert read_pin(config) == b"5150"
    assert name not in os.environ
    child = subprocess.run([sys.executable, "-c", f"import os; print(os.environ.get({name!r}))"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "None"
    assert read_pin(config) == b"5150"  # a reconnect logs in again
    assert read_pin(load_config(config.path)) == b"5150"  # and a reload still loads


def test_an_empty_pin_file_says_it_is_empty(tmp_path: Path) -> None:
    (tmp_path / "user.pin").write_text("\n")
    with pytest.raises(PinError) as caught:
        read_pin(load_config(write(tmp_path, BASE)))
    assert "is empty" in str(caught.value) and "write the user PIN" in caught.value.fix


@pytest.mark.parametrize("content", [b"1234 \n", b" 1234", b"1234\t", b"\n1234\n", b"1234 "])
def test_whitespace_around_the_pin_is_refused_before_a_login_is_spent(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "user.pin").write_bytes(content)
    with pytest.raises(PinError) as caught:
        read_pin(load_config(write(tmp_path, BASE)))
    assert "whitespace" in str(caught.value) and "1234" not in str(caught.value) + caught.value.fix


@pytest.mark.parametrize("content", [b"1234\n", b"1234\r\n", b"1234"])
def test_one_line_ending_is_normal(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "user.pin").write_bytes(content)
    assert read_pin(load_config(write(tmp_path, BASE))) == b"1234"


def test_a_symlinked_pin_file_warns_unless_it_is_a_kubernetes_secret_volume(tmp_path: Path) -> None:
    real = tmp_path / "real.pin"
    real.write_text("1234\n")
    real.chmod(0o600)
    (tmp_path / "user.pin").symlink_to(real)
    warnings = pin_source_warnings(load_config(write(tmp_path, BASE)))
    assert len(warnings) == 1 and "symbolic link" in warnings[0] and str(real) in warnings[0]
    # A Secret volume: name -> ..data/name, ..data -> ..<timestamp>/ (an atomic swap on update).
    volume = tmp_path / "secret"
    (volume / "..2026_01_01_00_00_00.1").mkdir(parents=True)
    (volume / "..2026_01_01_00_00_00.1" / "user.pin").write_text("1234\n")
    (volume / "..2026_01_01_00_00_00.1" / "user.pin").chmod(0o400)
    (volume / "..data").symlink_to("..2026_01_01_00_00_00.1")
    (volume / "user.pin").symlink_to("..data/user.pin")
    secret = load_config(write(tmp_path, BASE.replace("PIN_File = user.pin", "PIN_File = secret/user.pin")))
    assert pin_source_warnings(secret) == []


def test_a_pin_file_owned_by_another_user_warns(tmp_path: Path) -> None:
    pin = tmp_path / "user.pin"
    pin.write_text("1234\n")
    pin.chmod(0o600)
    if os.geteuid() != 0:
        pytest.skip("only root can give a file away")
    os.chown(pin, 65534, -1)
    warnings = pin_source_warnings(load_config(write(tmp_path, BASE)))
    assert len(warnings) == 1 and "uid 65534" in warnings[0] and f"chown {os.geteuid()} {pin}" in warnings[0]


# -- the same mistakes through a real `p11kms serve` --------------------------------------------

def serve_refuses(hsm_env: HsmEnv, config: Path) -> str:
    plugin = start_plugin(hsm_env, config, wait=False)
    assert plugin.proc.wait(30) == 2, plugin.log()
    log = plugin.log()
    assert "Traceback" not in log and not plugin.socket.exists()
    return log


def test_serve_refuses_a_misspelled_socket_group_before_creating_the_socket(hsm_env: HsmEnv, tmp_path: Path,
                                                                          new_key: Keys) -> None:
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", new_key()[0], Socket_Mode="0660",
                                  Socket_Group="kube-apiservr-typo")
    assert "no group 'kube-apiservr-typo'" in serve_refuses(hsm_env, config)


def test_serve_refuses_a_socket_path_over_the_unix_limit(hsm_env: HsmEnv, tmp_path: Path, new_key: Keys) -> None:
    long_name = "s" * 150 + ".sock"
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", new_key()[0], Socket=long_name)
    assert "at most 107 bytes" in serve_refuses(hsm_env, config)


def test_serve_refuses_pin_env_naming_an_unset_variable(hsm_env: HsmEnv, tmp_path: Path, new_key: Keys) -> None:
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", new_key()[0], PIN_File="", PIN_Env="P11KMS_NOT_SET_PIN")
    config.write_text(config.read_text().replace("PIN_File = \n", ""))
    log = serve_refuses(hsm_env, config)
    assert f"{config}:" in log and "P11KMS_NOT_SET_PIN" in log and "not set" in log


@pytest.mark.parametrize(("line", "expected"), [
    ("Socket_Group = a\0b", "no group"),
    ("Socket = /run/a\0b.sock", "NUL"),
])
def test_a_nul_in_a_host_name_is_a_config_error_not_a_crash(tmp_path: Path, line: str, expected: str) -> None:
    assert expected in error_of(tmp_path, BASE + line + "\n")


def test_serve_gives_the_socket_the_group_resolved_at_load(hsm_env: HsmEnv, tmp_path: Path, new_key: Keys) -> None:
    name = grp.getgrgid(os.getgid()).gr_name
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", new_key()[0], Socket_Mode="0660", Socket_Group=name)
    plugin = start_plugin(hsm_env, config)
    try:
        info = plugin.socket.stat()
        assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == os.getgid()
    finally:
        assert plugin.stop() == 0


def test_serve_with_pin_env_takes_the_pin_once_and_still_reloads(hsm_env: HsmEnv, tmp_path: Path,
                                                                 new_key: Keys) -> None:
    name = "P11KMS_SERVE_TEST_PIN"
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", new_key()[0], PIN_Env=name)
    config.write_text("".join(x for x in config.read_text().splitlines(keepends=True) if not x.startswith("PIN_File")))
    plugin = start_plugin(hsm_env, config, extra_env={name: USER_PIN})
    try:
        plugin.signal(signal.SIGHUP)  # load_config again, after the variable left the environment
        deadline = time.monotonic() + 20
        while "keyring reloaded" not in plugin.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "keyring reloaded" in plugin.log() and "reload failed" not in plugin.log()
        # The kernel's copy of the initial environment is not rewritten by unsetenv (see README).
        assert f"{name}=".encode() in Path(f"/proc/{plugin.proc.pid}/environ").read_bytes()
    finally:
        assert plugin.stop() == 0
    assert USER_PIN not in plugin.log()
