"""The p11kms command line, run as real processes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.support import HsmEnv, PluginProcess, start_plugin, unique_label

Keys = Callable[[], tuple[str, str]]
Run = Callable[..., PluginProcess]


def p11kms(env: HsmEnv, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p11kms", *args], env=env.process_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=60)


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
    result = p11kms(hsm_env, "status", "--socket", str(plugin.socket))
    assert result.returncode == 0
    assert result.stdout.splitlines() == ["version: v2", "healthz: ok", f"key_id:  {key_uuid}"]


def test_status_on_a_dead_socket_fails_clearly(hsm_env: HsmEnv, tmp_path: Path) -> None:
    result = p11kms(hsm_env, "status", "--socket", str(tmp_path / "none.sock"), "--timeout", "0.5")
    assert result.returncode == 1 and "Status failed: " in result.stderr


def test_config_error_exits_2_with_the_line(hsm_env: HsmEnv, tmp_path: Path) -> None:
    config = tmp_path / "bad.cfg"
    config.write_text("Primary_key = a\nPrimery_key = b\n")
    result = p11kms(hsm_env, "serve", "--config", str(config))
    assert result.returncode == 2
    assert f"{config}:2: unknown plugin attribute 'Primery_key'; did you mean Primary_key?" in result.stderr


def test_serve_dev_creates_its_own_token_and_reuses_it(hsm_env: HsmEnv, tmp_path: Path) -> None:
    dev_dir = tmp_path / "dev"
    config = dev_dir / "p11kms.cfg"
    first = start_plugin(hsm_env, _dev_placeholder(dev_dir), args=["--dev", "--dev-dir", str(dev_dir)])
    first_uuid = first.client().status().key_id
    assert "DEVELOPMENT MODE" in first.log()
    assert first.stop() == 0
    assert config.exists() and (dev_dir / "user.pin").stat().st_mode & 0o077 == 0
    second = start_plugin(hsm_env, config, args=["--dev", "--dev-dir", str(dev_dir)])
    assert second.client().status().key_id == first_uuid  # same token, same key, same UUID
    second.stop()


def _dev_placeholder(dev_dir: Path) -> Path:
    """start_plugin reads the socket path from a config; the dev config does not exist yet."""
    dev_dir.mkdir(parents=True)
    placeholder = dev_dir.parent / "placeholder.cfg"
    placeholder.write_text(f"Socket = {dev_dir / 'kms.sock'}\n")
    return placeholder
