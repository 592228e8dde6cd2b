"""Server lifecycle with real processes, signals and Unix sockets: start, rotate, reload, stop."""

from __future__ import annotations

import contextlib
import json
import linecache
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any
from unittest import mock

import grpc
import pytest

from p11kms.plugin.server import HandlerPool
from p11kms.plugin.socketowner import SERVING, STOPPING, LockHolder, SocketLock
from tests.support import (
    AS_PID_1,
    FaultControl,
    HsmEnv,
    PluginProcess,
    inner_pid,
    start_fault_plugin,
    start_plugin,
    wait_until_serving,
)

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
    assert "keyring reloaded" in plugin.log()


def test_sigusr1_writes_every_threads_stack_to_the_log_and_serving_goes_on(run_plugin: Run, new_key: Keys) -> None:
    label, uuid = new_key()
    plugin = run_plugin(label)
    client = plugin.client()
    plugin.signal(signal.SIGUSR1)
    assert wait_for(lambda: "run_until_stopped" in plugin.log())
    log = plugin.log()
    assert log.count("Thread 0x") >= 3  # main, recovery, health probe, handler pools...: every thread
    assert plugin.proc.poll() is None
    assert client.status().key_id == uuid
    assert client.decrypt(client.encrypt(b"u" * 32).ciphertext, uuid) == b"u" * 32


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


def test_a_second_plugin_on_a_served_socket_is_refused_by_the_lock(run_plugin: Run, hsm_env: HsmEnv,
                                                                    new_key: Keys) -> None:
    label, key_uuid = new_key()
    first = run_plugin(label)
    second = start_plugin(hsm_env, first.socket.parent / "p11kms.cfg", wait=False)
    assert second.proc.wait(20) == 1
    assert "another p11kms (" in second.log() and "is already serving" in second.log()
    assert first.client().status().key_id == key_uuid


def test_a_live_socket_is_never_taken_over(hsm_env: HsmEnv, tmp_path: Path, new_key: Keys) -> None:
    """A socket some other program serves, with no p11kms lock file held: only the connect probe can tell."""
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", new_key()[0])
    path = tmp_path / "kms.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen(4)
        identity = path.stat().st_ino
        plugin = start_plugin(hsm_env, config, wait=False)
        assert plugin.proc.wait(20) == 1
        assert f"another process is already serving on {path}" in plugin.log()
        other.settimeout(5)
        probe, _ = other.accept()  # the plugin's connect probe reached this listener
        probe.close()
        assert path.stat().st_ino == identity  # still this program's socket, not unlinked or replaced


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


def wait_for_first_probe(faults: FaultControl) -> None:
    """The start-up health round trip has finished: later HSM calls are the test's own."""
    assert wait_for(lambda: faults.calls("C_Decrypt") >= 1), "the start-up health probe never ran"


def calls_held(plugin: PluginProcess) -> float:
    """The plugin's own count of the calls it holds (running or waiting for a handler thread)."""
    for line in plugin.http_get("/metrics")[1].splitlines():
        if line.startswith("p11kms_grpc_calls_held "):
            return float(line.split()[1])
    raise AssertionError("no p11kms_grpc_calls_held in /metrics")


def encrypt_in_background(plugin: PluginProcess, results: list[tuple[str, str]]) -> threading.Thread:
    """Starts one Encrypt with a long deadline; appends (code, key_id or details) when it ends."""
    def call() -> None:
        try:
            reply = plugin.client(timeout=30).encrypt(os.urandom(32))
            results.append(("OK", reply.key_id))
        except grpc.RpcError as exc:
            results.append((exc.code().name, exc.details() or ""))

    worker = threading.Thread(target=call)
    worker.start()
    return worker


def test_sigterm_lets_in_flight_calls_finish_ok_within_the_grace(hsm_env: HsmEnv, faults: FaultControl,
                                                                  tmp_path: Path, new_key: Keys) -> None:
    label, key_uuid = new_key()
    plugin = start_fault_plugin(hsm_env, faults, tmp_path / "p11kms.cfg", label, Sessions="4",
                                Shutdown_Grace="5", Health_Interval="300")
    try:
        wait_for_first_probe(faults)
        faults.set("latency_ms 400")  # an Encrypt (C_EncryptInit + C_Encrypt) now takes about 0.8 s
        inits = faults.calls("C_EncryptInit")
        results: list[tuple[str, str]] = []
        workers = [encrypt_in_background(plugin, results) for _ in range(4)]
        assert wait_for(lambda: faults.calls("C_EncryptInit") - inits == 4), "the calls never reached the HSM"
        plugin.signal(signal.SIGTERM)  # all four calls are inside the HSM right now
        sent = time.monotonic()
        assert plugin.proc.wait(20) == 0
        took = time.monotonic() - sent
        for worker in workers:
            worker.join(20)
    finally:
        plugin.stop()
    assert results == [("OK", key_uuid)] * 4
    assert took < 5, f"exit took {took:.1f}s, longer than Shutdown_Grace = 5"
    assert not plugin.socket.exists()
    assert "stopped" in plugin.log()


def test_a_call_arriving_during_the_stop_is_refused_while_accepted_calls_queued_ones_included_finish(
        hsm_env: HsmEnv, faults: FaultControl, tmp_path: Path, new_key: Keys) -> None:
    label, key_uuid = new_key()
    plugin = start_fault_plugin(hsm_env, faults, tmp_path / "p11kms.cfg", label, Sessions="2",
                                Shutdown_Grace="5", Health_Interval="300")
    try:
        wait_for_first_probe(faults)
        faults.set("latency_ms 400")
        inits = faults.calls("C_EncryptInit")
        results: list[tuple[str, str]] = []
        # Four calls on two handler threads (Sessions = 2): two reach the HSM, two wait for a thread.
        workers = [encrypt_in_background(plugin, results) for _ in range(4)]
        assert wait_for(lambda: faults.calls("C_EncryptInit") - inits == 2), "the calls never reached the HSM"
        assert wait_for(lambda: calls_held(plugin) == 4), "the other two were never accepted"
        plugin.signal(signal.SIGTERM)
        assert wait_for(lambda: "stopping; finishing in-flight calls" in plugin.log())
        late = rpc_error(lambda: plugin.client(timeout=5).encrypt(b"late" * 8))
        assert plugin.proc.wait(20) == 0
        for worker in workers:
            worker.join(20)
    finally:
        plugin.stop()
    assert late.code() == grpc.StatusCode.UNAVAILABLE
    assert "stopping (SIGTERM)" in (late.details() or "")
    assert results == [("OK", key_uuid)] * 4  # queued calls accepted before the stop are served too
    assert faults.calls("C_EncryptInit") - inits == 4  # the refused call never reached the HSM


def test_a_stop_waits_for_the_calls_accepted_before_it_queued_ones_included_and_no_later_ones() -> None:
    pool = HandlerPool(1, "test")
    release, later_release = threading.Event(), threading.Event()
    try:
        running = pool.submit(release.wait, 10)
        queued = pool.submit(lambda: "done")  # waits for the only thread
        assert not pool.finish_accepted_calls(0.2)
        later = pool.submit(later_release.wait, 10)  # handed over once the stop began: refused by the service
        release.set()
        assert pool.finish_accepted_calls(5)
        assert running.result() is True and queued.result() == "done" and not later.done()
    finally:
        release.set()
        later_release.set()
        pool.shutdown()


def blocked_calls(pool: HandlerPool, count: int, release: threading.Event) -> list[threading.Event]:
    """Hands ``count`` calls to ``pool`` that each report when they start and then wait for ``release``."""
    started = [threading.Event() for _ in range(count)]
    for event in started:
        pool.submit(lambda e=event: (e.set(), release.wait(10)))
    return started


def pool_threads(name: str) -> int:
    return sum(thread.name.startswith(f"{name}_") for thread in threading.enumerate())


def test_the_handler_pool_runs_as_many_calls_as_it_has_threads_and_queues_the_rest() -> None:
    pool = HandlerPool(2, "pool-under-test")
    release = threading.Event()
    try:
        started = blocked_calls(pool, 5, release)
        assert wait_for(lambda: sum(e.is_set() for e in started) == 2, 5)
        assert pool.calls_held == 5 and pool_threads("pool-under-test") == 2  # three calls wait for a thread
        release.set()
        assert wait_for(lambda: all(e.is_set() for e in started), 5)
        assert wait_for(lambda: pool.calls_held == 0, 5)
        assert [pool.submit(lambda: "served").result(5) for _ in range(3)] == ["served"] * 3
        assert pool_threads("pool-under-test") == 2
    finally:
        release.set()
        pool.shutdown()


def refused_thread_start() -> mock._patch[mock.MagicMock]:
    """A fake, for a failure a real part cannot produce here: the system refusing one more thread
    (RLIMIT_NPROC, memory). The tests run as root, whom RLIMIT_NPROC does not bind, so Thread.start
    raises as CPython's does then."""
    return mock.patch.object(threading.Thread, "start", side_effect=RuntimeError("can't start new thread"))


def test_a_refused_thread_start_keeps_the_pools_counts_and_its_calls_are_served_by_the_running_threads() -> None:
    pool = HandlerPool(8, "test")
    release = threading.Event()
    try:
        started = blocked_calls(pool, 2, release)
        assert wait_for(lambda: all(e.is_set() for e in started), 5)
        with refused_thread_start():
            queued = pool.submit(lambda: "done")  # no thread is free and none can be started: it queues
        release.set()
        assert queued.result(5) == "done"
        assert pool.finish_accepted_calls(5)  # every call counted in was counted out
        assert pool.submit(lambda: "later").result(5) == "later"
    finally:
        release.set()
        pool.shutdown()


def test_a_pool_that_cannot_start_any_thread_refuses_the_call_instead_of_queueing_it_for_nobody() -> None:
    pool = HandlerPool(8, "test")
    try:
        with refused_thread_start(), pytest.raises(RuntimeError, match="could not start a thread"):
            pool.submit(lambda: "never")
        assert pool.finish_accepted_calls(0.5)  # the refused call is not waited for
        assert pool.submit(lambda: "done").result(5) == "done"  # threads start again once the system allows
    finally:
        pool.shutdown()


def test_the_serving_process_does_not_load_the_operator_tools_libraries(hsm_env: HsmEnv, tmp_path: Path,
                                                                       new_key: Keys) -> None:
    """`p11kms serve` starts through the same CLI as the operator tools; what only they use (the
    cryptography package for etcd scans, ~7 MiB resident) must not be loaded into the plugin."""
    label, _ = new_key()
    plugin = start_plugin(hsm_env, hsm_env.write_config(tmp_path / "p11kms.cfg", label))
    try:
        plugin.client().encrypt(b"m" * 32)
        mapped = Path(f"/proc/{plugin.proc.pid}/maps").read_text()
    finally:
        plugin.stop()
    assert "libsofthsm2" in mapped  # the check sees the plugin's own libraries
    assert "cryptography" not in mapped


def any_exited(plugins: list[PluginProcess]) -> bool:
    return any(plugin.proc.poll() is not None for plugin in plugins)


def test_two_plugins_started_together_leave_exactly_one_serving(hsm_env: HsmEnv, tmp_path: Path,
                                                                 new_key: Keys) -> None:
    label, key_uuid = new_key()
    shared = tmp_path / "kms.sock"
    configs: dict[str, Path] = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        configs[name] = hsm_env.write_config(tmp_path / name / "p11kms.cfg", label, Socket=str(shared))
    wins = dict.fromkeys(configs, 0)
    for _ in range(20):
        pair = [start_plugin(hsm_env, config, wait=False) for config in configs.values()]
        try:
            assert wait_for(partial(any_exited, pair), 20), "neither plugin exited: both claim to serve one socket"
            loser, winner = sorted(pair, key=lambda p: p.proc.poll() is None)
            assert loser.proc.returncode == 1, loser.log()
            assert f"already serving on {shared}" in loser.log()
            assert f"pid {winner.proc.pid}" in loser.log()
            assert "keyring loaded" not in loser.log()  # refused before it touched the HSM
            wait_until_serving(winner)
            identity = os.stat(shared).st_ino
            assert winner.client().status().key_id == key_uuid
            assert os.stat(shared).st_ino == identity  # the loser never replaced or removed it
            wins[winner.log_path.parent.name] += 1
            assert winner.stop() == 0
            assert not shared.exists()
        finally:
            for plugin in pair:
                plugin.stop()
    print(f"rounds won: {wins}")


def test_a_plugin_that_is_pid_1_never_takes_the_staging_name_of_another_pid_1_in_its_socket_directory(
        hsm_env: HsmEnv, tmp_path: Path, new_key: Keys) -> None:
    """Two containers (each plugin PID 1) with different sockets in one hostPath directory, started together."""
    label, key_uuid = new_key()
    directory = tmp_path / "run-p11kms"
    directory.mkdir()
    # The other plugin, PID 1 in its own container, has bound its socket under the private name the
    # pid gave it and has not yet published it: a live listening socket.
    other_staging = directory / ".1"
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(other_staging))
    other.listen(1)
    other_inode = os.lstat(other_staging).st_ino
    config = hsm_env.write_config(tmp_path / "b.cfg", label, Socket=str(directory / "b.sock"))
    plugin = start_plugin(hsm_env, config, wrapper=AS_PID_1)
    try:
        ns_pids = Path(f"/proc/{inner_pid(plugin)}/status").read_text().split("NSpid:")[1].split("\n")[0].split()
        assert ns_pids[-1] == "1", ns_pids  # the plugin is PID 1 in its namespace
        assert plugin.client().status().key_id == key_uuid
        assert other_staging.exists() and os.lstat(other_staging).st_ino == other_inode, \
            "the plugin bound, and then removed, the other plugin's socket"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(other_staging))
        assert sorted(p.name for p in directory.iterdir()) == [".1", "b.sock", "b.sock.lock"]
    finally:
        with contextlib.suppress(ProcessLookupError, FileNotFoundError, IndexError):
            os.kill(inner_pid(plugin), signal.SIGTERM)
        assert plugin.proc.wait(20) == 0, plugin.log()
        other.close()


def test_a_plugin_started_right_after_sigterm_ends_up_serving(hsm_env: HsmEnv, faults: FaultControl,
                                                               tmp_path: Path, new_key: Keys) -> None:
    label, key_uuid = new_key()
    first = start_fault_plugin(hsm_env, faults, tmp_path / "first.cfg", label, Health_Interval="300")
    second: PluginProcess | None = None
    try:
        wait_for_first_probe(faults)
        faults.set("latency_ms 1500")  # the in-flight Encrypt keeps the first plugin stopping for about 3 s
        inits = faults.calls("C_EncryptInit")
        results: list[tuple[str, str]] = []
        worker = encrypt_in_background(first, results)
        assert wait_for(lambda: faults.calls("C_EncryptInit") > inits), "the call never reached the HSM"
        first.signal(signal.SIGTERM)
        second = start_plugin(hsm_env, hsm_env.write_config(tmp_path / "second.cfg", label), wait=False)
        assert first.proc.wait(20) == 0
        worker.join(20)
        wait_until_serving(second)
        assert results == [("OK", key_uuid)]
        assert second.socket.exists()
        assert second.client().status().key_id == key_uuid
        assert f"waiting for pid {first.proc.pid}" in second.log()
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_stop_leaves_a_socket_that_is_no_longer_its_own(run_plugin: Run, new_key: Keys) -> None:
    plugin = run_plugin(new_key()[0])
    plugin.socket.unlink()
    successor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        successor.bind(str(plugin.socket))
        successor.listen()
        identity = os.stat(plugin.socket).st_ino
        assert plugin.stop() == 0
        assert plugin.socket.exists() and os.stat(plugin.socket).st_ino == identity
        assert "left in place" in plugin.log()
    finally:
        successor.close()


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
    assert "primary key 'absent-label' is not on token" in result.stderr
    assert f"(Primary_key, {config}:1)" in result.stderr and "p11kms keys create --label absent-label" in result.stderr
    assert "Traceback" not in result.stderr


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
    keys = [r for r in records if r["msg"] == "keyring loaded"]
    assert keys == [{"ts": keys[0]["ts"], "level": "info", "msg": "keyring loaded", "role": "primary",
                     "label": label, "uuid": key_uuid, "uuid_source": "cka_id"}]
    assert {r["msg"] for r in records} >= {"serving KMS v2", "stopped"}


def test_sigterm_inside_marking_serving_leaves_stopping_in_the_lock_file(tmp_path: Path) -> None:
    """A successor reads the lock file to decide whether to wait; SIGTERM must win over a start finishing.

    A real SIGTERM is raised in this process at the moment the mark(SERVING) write begins (a line
    tracer picks the moment; a signal's timing cannot be chosen otherwise), and the handler marks
    STOPPING, as the plugin's does.
    """
    lock = SocketLock(tmp_path / "kms.sock")
    lock.acquire(patience=0, logger=logging.getLogger("test-lock"))
    previous = signal.signal(signal.SIGTERM, lambda _s, _f: lock.mark(STOPPING))
    raised: list[bool] = []

    def tracer(frame: FrameType, event: str, _arg: Any) -> Any:
        if frame.f_code is not SocketLock.mark.__code__ or frame.f_locals.get("state") != SERVING:
            return None
        if event == "line" and not raised and "self._state = state" in linecache.getline(
                frame.f_code.co_filename, frame.f_lineno):
            raised.append(True)
            signal.raise_signal(signal.SIGTERM)
        return tracer

    sys.settrace(tracer)
    try:
        lock.mark(SERVING)
    finally:
        sys.settrace(None)
        signal.signal(signal.SIGTERM, previous)
    assert raised, "the tracer never saw the write begin"
    assert LockHolder.read(lock.path).state == STOPPING
