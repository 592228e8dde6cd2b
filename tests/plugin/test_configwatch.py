"""The config file watch, with real plugin processes: no SIGHUP is sent in any of these tests."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from p11kms.plugin.configwatch import ConfigWatch, file_generation, generation_of
from tests.support import HsmEnv, PluginProcess, start_plugin, wait_until

Keys = Callable[[], tuple[str, str]]


def replace_by_rename(path: Path, text: str) -> None:
    """What editors, `install` and Ansible do: write a new file beside, then rename it over the old one."""
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(text)
    os.replace(staging, path)


def metric(plugin: PluginProcess, name: str) -> float:
    for line in plugin.http_get("/metrics")[1].splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


def test_a_config_replaced_by_rename_is_loaded_without_a_signal(hsm_env: HsmEnv, tmp_path: Path,
                                                                 new_key: Keys) -> None:
    old_label, old_uuid = new_key()
    new_label, new_uuid = new_key()
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", old_label)
    plugin = start_plugin(hsm_env, config)
    try:
        client = plugin.client()
        wrapped = client.encrypt(b"r" * 32)
        assert plugin.healthz()["config"]["generation"] == file_generation(config)
        text = config.read_text().replace(f"Primary_key = {old_label}", f"Primary_key = {new_label}")
        replace_by_rename(config, text + f"Secondary_key = {old_label}\n")
        took = wait_until(lambda: client.status().key_id == new_uuid, 10)
        assert took < 5  # polled about once a second
        assert client.decrypt(wrapped.ciphertext, old_uuid) == b"r" * 32
        details = plugin.healthz()["config"]
        assert details == {"path": str(config), "generation": generation_of(config.read_bytes()),
                           "reload_failed": False}
        assert "config reloaded" in plugin.log() and "trigger=" in plugin.log()
        assert metric(plugin, "p11kms_config_reload_failed") == 0
    finally:
        plugin.stop()


def test_a_kubernetes_data_symlink_swap_is_loaded(hsm_env: HsmEnv, tmp_path: Path, new_key: Keys) -> None:
    """A ConfigMap-style volume: cfg -> ..data/cfg, and the kubelet swaps ..data atomically."""
    old_label, _ = new_key()
    new_label, new_uuid = new_key()
    volume = tmp_path / "volume"
    first, second = volume / "..2026_11_01", volume / "..2026_11_02"
    first.mkdir(parents=True)
    second.mkdir()
    hsm_env.write_config(first / "p11kms.cfg", old_label, Socket=str(tmp_path / "kms.sock"))
    hsm_env.write_config(second / "p11kms.cfg", new_label, old_label, Socket=str(tmp_path / "kms.sock"))
    (volume / "..data").symlink_to(first.name)
    config = volume / "p11kms.cfg"
    config.symlink_to("..data/p11kms.cfg")
    plugin = start_plugin(hsm_env, config)
    try:
        client = plugin.client()
        link = volume / "..data_tmp"
        link.symlink_to(second.name)
        os.replace(link, volume / "..data")  # the path and its first link stay; only ..data changes
        wait_until(lambda: client.status().key_id == new_uuid, 10)
        assert plugin.healthz()["config"]["generation"] == file_generation(second / "p11kms.cfg")
    finally:
        plugin.stop()


def test_a_bad_config_is_rejected_counted_and_shown_until_a_good_one_arrives(
        hsm_env: HsmEnv, tmp_path: Path, new_key: Keys) -> None:
    label, key_uuid = new_key()
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", label)
    good = config.read_text()
    plugin = start_plugin(hsm_env, config)
    try:
        client = plugin.client()
        loaded_at = metric(plugin, "p11kms_config_last_reload_success_timestamp_seconds")
        assert loaded_at > 0
        serving = plugin.healthz()["config"]["generation"]
        for bad, reason in ((good + "Primary_kee = x\n", "unknown plugin attribute 'Primary_kee'"),
                            (good.replace("Primary_key", "# Primary_key"), "Primary_key is missing"),
                            (good.replace(f"Primary_key = {label}", "Primary_key = no-such-key"), "no-such-key")):
            replace_by_rename(config, bad)
            wait_until(lambda bad=bad: plugin.healthz()["config"].get("rejected_generation")  # type: ignore[misc]
                       == generation_of(bad.encode()), 10)
            details = plugin.healthz()["config"]
            assert details["reload_failed"] is True and details["generation"] == serving
            assert reason in details["error"]
            assert client.status().key_id == key_uuid and client.status().healthz == "ok"
            assert metric(plugin, "p11kms_config_reload_failed") == 1
        assert metric(plugin, 'p11kms_keyring_reloads_total{result="failure"}') == 3
        log = plugin.log()
        assert log.count("reload failed; still serving the previous keyring") == 3  # once per bad file, not per poll
        time.sleep(0.01)
        replace_by_rename(config, good + "# a comment changes the generation\n")
        wait_until(lambda: plugin.healthz()["config"]["reload_failed"] is False, 10)
        assert metric(plugin, "p11kms_config_reload_failed") == 0
        assert metric(plugin, "p11kms_config_last_reload_success_timestamp_seconds") > loaded_at
    finally:
        plugin.stop()


def test_no_call_fails_while_the_config_flips_between_keys(hsm_env: HsmEnv, tmp_path: Path, new_key: Keys) -> None:
    a_label, a_uuid = new_key()
    b_label, b_uuid = new_key()
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", a_label, b_label)
    texts = [config.read_text(), hsm_env.write_config(tmp_path / "b.cfg", b_label, a_label,
                                                     Socket=str(tmp_path / "kms.sock")).read_text()]
    plugin = start_plugin(hsm_env, config)
    failures: list[str] = []
    done = [0]
    stop = threading.Event()

    def caller() -> None:
        client = plugin.client()
        while not stop.is_set():
            try:
                wrapped = client.encrypt(b"c" * 32)
                assert client.decrypt(wrapped.ciphertext, wrapped.key_id) == b"c" * 32
                done[0] += 1
            except grpc.RpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")

    threads = [threading.Thread(target=caller) for _ in range(4)]
    try:
        for thread in threads:
            thread.start()
        client = plugin.client()
        for flip in range(6):
            replace_by_rename(config, texts[(flip + 1) % 2])
            wait_until(lambda flip=flip: client.status().key_id  # type: ignore[misc]
                       == (b_uuid if flip % 2 == 0 else a_uuid), 10)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        plugin.stop()
    assert failures == []
    assert done[0] > 100
    assert plugin.log().count("config reloaded") >= 6


def test_the_watch_reports_only_content_changes(tmp_path: Path) -> None:
    config = tmp_path / "p11kms.cfg"
    config.write_text("Primary_key = a\n")
    watch = ConfigWatch(config, file_generation(config))
    assert watch.poll() is None
    os.utime(config, (1, 1))  # touched: same bytes
    assert watch.poll() is None
    replace_by_rename(config, "Primary_key = b\n")
    changed = watch.poll()
    assert changed is not None and changed.generation == generation_of(b"Primary_key = b\n")
    watch.settle(changed.generation)
    assert watch.poll() is None
    config.unlink()
    gone = watch.poll()
    assert gone is not None and gone.generation is None
