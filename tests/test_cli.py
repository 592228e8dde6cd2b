"""The p11kms command line, run as real processes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import HsmEnv, PluginProcess, start_plugin, unique_label

Keys = Callable[[], tuple[str, str]]
Run = Callable[..., PluginProcess]


def p11kms(env: HsmEnv, *args: str, cwd: Path | None = None,
           unprivileged: bool = False) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "p11kms", *args]
    if unprivileged and os.geteuid() == 0:
        # root passes every file mode check; without these two capabilities the modes apply to it too.
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a socket unreachable by mode")
        command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *command]
    return subprocess.run(command, env=env.process_env(), cwd=cwd, capture_output=True, text=True, timeout=60)


def test_keys_create_then_list_with_roles(hsm_env: HsmEnv, tmp_path: Path, new_key: Keys) -> None:
    old_label, old_uuid = new_key()
    label = unique_label("cli")
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", label, old_label)
    created = p11kms(hsm_env, "keys", "create", "--config", str(config), "--label", label)
    assert created.returncode == 0, created.stderr
    new_uuid = created.stdout.split("uuid=")[1].strip()
    listing = p11kms(hsm_env, "keys", "list", "--config", str(config))
    rows = {line.split()[0]: line.split()[1:] for line in listing.stdout.splitlines()[1:]}
    assert rows[label] == [new_uuid, "primary", "cka_id"]
    assert rows[old_label] == [old_uuid, "secondary", "cka_id"]
    again = p11kms(hsm_env, "keys", "create", "--config", str(config), "--label", label)
    assert again.returncode == 1 and "already exists" in again.stderr


def test_status_prints_what_kube_apiserver_sees(run_plugin: Run, hsm_env: HsmEnv, new_key: Keys) -> None:
    label, key_uuid = new_key()
    plugin = run_plugin(label)
    # A path, the endpoint as pasted from the EncryptionConfiguration, and gRPC's own spelling.
    for address in (str(plugin.socket), f"unix://{plugin.socket}", f"unix:{plugin.socket}"):
        result = p11kms(hsm_env, "status", "--socket", address)
        assert result.returncode == 0, (address, result.stderr)
        assert result.stdout.splitlines() == ["version: v2", "healthz: ok", f"key_id:  {key_uuid}"]


def test_status_says_why_nothing_answers(hsm_env: HsmEnv, tmp_path: Path) -> None:
    left_over = socket.socket(socket.AF_UNIX)
    left_over.bind(str(tmp_path / "stopped.sock"))  # a socket file nobody listens on, as a crashed plugin leaves
    (tmp_path / "p11kms.cfg").write_text("Socket = kms.sock\n")
    try:
        for name, said in (("none.sock", "no such file"), ("p11kms.cfg", "it is a regular file, not a socket"),
                           ("stopped.sock", "the socket file is left from a plugin that is no longer running")):
            result = p11kms(hsm_env, "status", "--socket", str(tmp_path / name), "--timeout", "0.5")
            assert result.returncode == 1
            assert f"p11kms: Status failed: nothing is listening on {tmp_path / name}: {said}" in result.stderr
            assert "-> fix: " in result.stderr and "start the plugin (p11kms serve" in result.stderr
            assert "UNAVAILABLE" not in result.stderr and "unix:" not in result.stderr
    finally:
        left_over.close()


def test_status_on_a_socket_it_may_not_use(hsm_env: HsmEnv, tmp_path: Path) -> None:
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(tmp_path / "kms.sock"))
    listening.listen(1)
    (tmp_path / "kms.sock").chmod(0)
    try:
        result = p11kms(hsm_env, "status", "--socket", str(tmp_path / "kms.sock"), "--timeout", "0.5",
                        unprivileged=True)
    finally:
        listening.close()
    assert result.returncode == 1
    assert f"cannot connect to {tmp_path / 'kms.sock'}: permission denied" in result.stderr
    assert "Socket_Group" in result.stderr


def test_status_refuses_an_address_kube_apiserver_would_misread(hsm_env: HsmEnv) -> None:
    result = p11kms(hsm_env, "status", "--socket", "unix://var/run/kmsplugin/kms.sock")
    assert result.returncode == 2
    assert "write unix:///var/run/kmsplugin/kms.sock" in result.stderr and "Traceback" not in result.stderr


def test_config_error_exits_2_with_the_line(hsm_env: HsmEnv, tmp_path: Path) -> None:
    config = tmp_path / "bad.cfg"
    config.write_text("Primary_key = a\nPrimery_key = b\n")
    result = p11kms(hsm_env, "serve", "--config", str(config))
    assert result.returncode == 2
    assert f"{config}:2: unknown plugin attribute 'Primery_key'; did you mean Primary_key?" in result.stderr


def test_serve_dev_creates_its_own_token_and_reuses_it(hsm_env: HsmEnv, tmp_path: Path) -> None:
    dev_dir = tmp_path / "dev"
    config = dev_dir / "p11kms.cfg"
    # `keys list --dev` creates the dev token, its first key and config without serving, so the test can move
    # the HTTP listener off the default port 8095 (another plugin, or another test run, may hold it).
    listing = p11kms(hsm_env, "keys", "list", "--dev", "--dev-dir", str(dev_dir))
    assert listing.returncode == 0, listing.stderr
    created_uuid = listing.stdout.splitlines()[1].split()[1]
    assert config.exists() and (dev_dir / "user.pin").stat().st_mode & 0o077 == 0
    config.write_text(config.read_text() + "HTTP_Address = 127.0.0.1:0\n")  # any free port
    first = start_plugin(hsm_env, config, args=["--dev", "--dev-dir", str(dev_dir)])
    assert first.client().status().key_id == created_uuid
    assert "DEVELOPMENT MODE" in first.log()
    assert first.stop() == 0
    second = start_plugin(hsm_env, config, args=["--dev", "--dev-dir", str(dev_dir)])
    assert second.client().status().key_id == created_uuid  # same token, same key, same UUID
    second.stop()
