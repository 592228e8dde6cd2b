"""Server lifecycle with real processes, signals and Unix sockets: start, rotate, reload, stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from tests.support import HsmEnv, PluginProcess, start_plugin

Keys = Callable[[], tuple[str, str]]
Run = Callable[..., PluginProcess]


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_the_seeds_rotation_by_config_edit_and_restart(hsm_env: HsmEnv, tmp_path: Path, new_key: Keys) -> None:
    old_label, old_uuid = new_key()
    config = hsm_env.write_config(tmp_path / "cs_pkcs11_R3.cfg", old_label)
    plugin = start_plugin(hsm_env, config)
    client = plugin.client()
    wrapped = client.encrypt(b"d" * 32)
    assert wrapped.key_id == old_uuid
    assert f"uuid={old_uuid}" in plugin.log()
    assert plugin.stop() == 0

    # Seed step 2: Secondary_key takes the old Primary_key; Primary_key gets a new label.
    new_label, new_uuid = new_key()
    text = config.read_text().replace(f"Primary_key = {old_label}", f"Primary_key = {new_label}")
    config.write_text(text + f"Secondary_key = {old_label}\n")
    restarted = start_plugin(hsm_env, config)
    client = restarted.client()
    assert client.status().key_id == new_uuid
    assert client.decrypt(wrapped.ciphertext, wrapped.key_id) == b"d" * 32
    assert client.encrypt(b"e" * 32).key_id == new_uuid
    log = restarted.log()
    assert f"role=primary label={new_label} uuid={new_uuid}" in log
    assert f"role=secondary label={old_label} uuid={old_uuid}" in log
    restarted.stop()


def test_sighup_swaps_the_keyring_without_restart(run_plugin: Run, new_key: Keys) -> None:
    old_label, old_uuid = new_key()
    plugin = run_plugin(old_label)
    client = plugin.client()
    wrapped = client.encrypt(b"h" * 32)
    new_label, new_uuid = new_key()
    config = plugin.socket.parent / "p11kms.cfg"
    text = config.read_text().replace(f"Primary_key = {old_label}", f"Primary_key = {new_label}")
    config.write_text(text + f"Secondary_key = {old_label}\n")
    pid = plugin.proc.pid
    plugin.signal(signal.SIGHUP)
    assert wait_for(lambda: client.status().key_id == new_uuid)
    assert plugin.proc.pid == pid and plugin.proc.poll() is None
    assert client.decrypt(wrapped.ciphertext, old_uuid) == b"h" * 32
    assert "keyring reloaded: key" in plugin.log()


def test_a_bad_reload_keeps_the_previous_keyring(run_plugin: Run, new_key: Keys) -> None:
    label, key_uuid = new_key()
    plugin = run_plugin(label)
    config = plugin.socket.parent / "p11kms.cfg"
    config.write_text(config.read_text().replace(f"Primary_key = {label}", "Primary_key = no-such-key"))
    plugin.signal(signal.SIGHUP)
    assert wait_for(lambda: "reload failed" in plugin.log())
    assert "no-such-key" in plugin.log()
    assert plugin.client().status().key_id == key_uuid
    assert plugin.client().status().healthz == "ok"


def test_stale_socket_from_a_crash_is_removed(hsm_env: HsmEnv, tmp_path: Path, new_key: Keys) -> None:
    label, _ = new_key()
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", label)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "kms.sock"))
    stale.close()  # the file stays, with nobody listening: what a killed process leaves behind
    plugin = start_plugin(hsm_env, config)
    assert "removed stale socket" in plugin.log()
    assert plugin.client().status().healthz == "ok"
    plugin.stop()


def test_a_live_socket_is_never_taken_over(run_plugin: Run, hsm_env: HsmEnv, new_key: Keys) -> None:
    label, key_uuid = new_key()
    first = run_plugin(label)
    second = start_plugin(hsm_env, first.socket.parent / "p11kms.cfg", wait=False)
    assert second.proc.wait(20) == 1
    assert "already serving" in second.log()
    assert first.client().status().key_id == key_uuid


def test_a_file_that_is_not_a_socket_is_left_alone(hsm_env: HsmEnv, tmp_path: Path, new_key: Keys) -> None:
    label, _ = new_key()
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", label)
    (tmp_path / "kms.sock").write_text("operator notes")
    plugin = start_plugin(hsm_env, config, wait=False)
    assert plugin.proc.wait(20) == 1
    assert "is not a socket" in plugin.log()
    assert (tmp_path / "kms.sock").read_text() == "operator notes"


def test_socket_mode_defaults_to_0600_and_follows_config(run_plugin: Run, new_key: Keys) -> None:
    label, _ = new_key()
    default = run_plugin(label)
    assert stat.S_IMODE(default.socket.stat().st_mode) == 0o600
    shared = run_plugin(label, config_name="shared.cfg", Socket_Mode="0660", Socket_Group=str(os.getgid()))
    info = shared.socket.stat()
    assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == os.getgid()


def test_sigterm_during_traffic_finishes_calls_and_removes_the_socket(run_plugin: Run, new_key: Keys) -> None:
    label, _ = new_key()
    plugin = run_plugin(label)
    outcomes: dict[str, int] = {"ok": 0, "wrong": 0}
    failures: list[grpc.StatusCode] = []
    stop = threading.Event()

    def traffic() -> None:
        client = plugin.client()
        while not stop.is_set():
            seed = os.urandom(32)
            try:
                reply = client.encrypt(seed)
                outcomes["ok" if client.decrypt(reply.ciphertext, reply.key_id) == seed else "wrong"] += 1
            except grpc.RpcError as exc:
                failures.append(exc.code())
                return

    workers = [threading.Thread(target=traffic) for _ in range(8)]
    for worker in workers:
        worker.start()
    time.sleep(1.0)
    plugin.signal(signal.SIGTERM)
    assert plugin.proc.wait(20) == 0
    stop.set()
    for worker in workers:
        worker.join(10)
    assert outcomes["ok"] > 100 and outcomes["wrong"] == 0
    # Calls that reach the server after shutdown began are refused by gRPC itself, before any
    # handler runs: UNAVAILABLE for a new connection, CANCELLED for a call queued on an old one.
    assert set(failures) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    assert not plugin.socket.exists()
    assert "stopped" in plugin.log()


def test_two_processes_on_one_token_report_the_same_uuids(run_plugin: Run, new_key: Keys) -> None:
    primary, primary_uuid = new_key()
    secondary, secondary_uuid = new_key()
    first = run_plugin(primary, secondary)
    second = run_plugin(primary, secondary, config_name="second.cfg")
    assert first.client().status().key_id == second.client().status().key_id == primary_uuid
    for plugin in (first, second):
        assert f"uuid={secondary_uuid}" in plugin.log()
    wrapped = first.client().encrypt(b"x" * 32)
    assert second.client().decrypt(wrapped.ciphertext, wrapped.key_id) == b"x" * 32


def test_start_fails_clearly_on_a_missing_key(hsm_env: HsmEnv, tmp_path: Path) -> None:
    """A key that is not there is the operator's to fix: the plugin refuses to start."""
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", "absent-label")
    result = subprocess.run([sys.executable, "-m", "p11kms", "serve", "--config", str(config)],
                            env=hsm_env.process_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "no secret key labelled 'absent-label'" in result.stderr


def test_an_absent_token_at_start_is_served_as_unhealthy(run_plugin: Run, new_key: Keys) -> None:
    """An HSM that is not there yet (boot order) is trouble to ride out, not a reason to exit."""
    plugin = run_plugin(new_key()[0], Token_Label="no-such-token")
    status = plugin.client().status()
    assert (status.healthz, status.key_id) == ("hsm token absent", "p11kms-keyring-not-loaded")
    assert "no token with label='no-such-token'" in plugin.log()
    error = rpc_error(lambda: plugin.client().encrypt(b"k" * 32))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert plugin.proc.poll() is None


@pytest.mark.parametrize(("mode", "warned"), [(0o644, True), (0o640, True), (0o600, False)])
def test_a_pin_file_others_can_read_is_warned_about(run_plugin: Run, hsm_env: HsmEnv, tmp_path: Path,
                                                     new_key: Keys, mode: int, warned: bool) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(hsm_env.pin_file.read_text())
    pin_file.chmod(mode)
    plugin = run_plugin(new_key()[0], PIN_File=str(pin_file))
    assert plugin.client().status().healthz == "ok"
    assert (f"has mode {mode:04o}" in plugin.log()) is warned
    if warned:
        assert f"chmod 600 {pin_file}" in plugin.log()


def test_json_logs_carry_the_key_lines(run_plugin: Run, new_key: Keys) -> None:
    label, key_uuid = new_key()
    plugin = run_plugin(label, Log_Format="json")
    plugin.client().status()
    plugin.stop()
    records = [json.loads(line) for line in plugin.log().splitlines() if line.strip()]
    keys = [r for r in records if r["msg"] == "keyring loaded: key"]
    assert keys == [{"ts": keys[0]["ts"], "level": "info", "msg": "keyring loaded: key", "role": "primary",
                     "label": label, "uuid": key_uuid, "uuid_source": "cka_id"}]
    assert {r["msg"] for r in records} >= {"serving KMS v2", "stopped"}
