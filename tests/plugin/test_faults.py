"""Recovery from HSM faults, one test per path.

Most faults are injected by tests/faultmodule/p11fault.c, a pass-through PKCS#11 module in front of
the real SoftHSM2 token, because a real token cannot be made to lose a session or a device on demand.
The wrong-PIN test uses a real wrong PIN; the remote-HSM test kills a real `p11-kit server`.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from p11kms.hsm.token import Token
from p11kms.plugin.configwatch import file_generation
from p11kms.plugin.keyring import build_keyring
from tests.support import (
    FaultControl,
    HsmEnv,
    PluginProcess,
    ReplyCutter,
    remote_hsm,
    start_and_join,
    start_plugin,
    stock_p11kit_client,
    wait_until,
)

Keys = Callable[[], tuple[str, str]]
StartFaulty = Callable[..., PluginProcess]


@pytest.fixture
def start_faulty(hsm_env: HsmEnv, faults: FaultControl, tmp_path: Path) -> Iterator[StartFaulty]:
    started: list[PluginProcess] = []

    def start(primary: str, **attributes: str) -> PluginProcess:
        config = hsm_env.write_config(tmp_path / "p11kms.cfg", primary, PKCS11_Module=str(faults.module),
                                      **attributes)
        plugin = start_plugin(hsm_env, config, extra_env=faults.env(hsm_env.module))
        started.append(plugin)
        return plugin

    yield start
    for plugin in started:
        plugin.stop()


def timed_error(call: Callable[[], object]) -> tuple[grpc.RpcError, float]:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value, time.monotonic() - started


def test_a_lost_session_is_replaced_without_failing_the_request(start_faulty: StartFaulty, faults: FaultControl,
                                                                 new_key: Keys) -> None:
    plugin = start_faulty(new_key()[0])
    client = plugin.client()
    sessions_before = faults.calls("C_OpenSession")
    faults.set("fail C_EncryptInit 0xB3 1")  # CKR_SESSION_HANDLE_INVALID, once
    reply = client.encrypt(b"s" * 32)
    assert client.decrypt(reply.ciphertext, reply.key_id) == b"s" * 32
    assert faults.calls("C_OpenSession") > sessions_before
    assert "reconnecting" not in plugin.log()


def test_a_lost_login_is_restored_without_failing_the_request(start_faulty: StartFaulty, faults: FaultControl,
                                                               new_key: Keys) -> None:
    plugin = start_faulty(new_key()[0])
    logins_before = faults.calls("C_Login")
    faults.set("fail C_DecryptInit 0x101 1")  # CKR_USER_NOT_LOGGED_IN, once
    client = plugin.client()
    reply = client.encrypt(b"l" * 32)
    assert client.decrypt(reply.ciphertext, reply.key_id) == b"l" * 32
    assert faults.calls("C_Login") == logins_before + 1
    assert "reconnecting" not in plugin.log()


@pytest.mark.parametrize(("ckr", "name"), [(0x30, "CKR_DEVICE_ERROR"), (0x32, "CKR_DEVICE_REMOVED"),
                                           (0xE0, "CKR_TOKEN_NOT_PRESENT")])
def test_device_faults_fail_fast_then_recover_by_themselves(start_faulty: StartFaulty, faults: FaultControl,
                                                            new_key: Keys, ckr: int, name: str) -> None:
    plugin = start_faulty(new_key()[0])
    client = plugin.client()
    before = client.encrypt(b"d" * 32)
    everything = ("C_GetSlotList", "C_GetTokenInfo", "C_OpenSession", "C_Login", "C_FindObjectsInit",
                  "C_EncryptInit", "C_DecryptInit")
    faults.set(*(f"fail {function} {ckr:#x} -1" for function in everything))
    error, seconds = timed_error(lambda: client.encrypt(b"x" * 32))
    assert error.code() == grpc.StatusCode.UNAVAILABLE and name in (error.details() or "")
    assert seconds < 0.5
    status = client.status()
    assert status.healthz != "ok" and name in status.healthz
    assert status.key_id == before.key_id  # unchanged while down: kube-apiserver sees no rotation
    error, seconds = timed_error(lambda: client.decrypt(before.ciphertext, before.key_id))
    assert error.code() == grpc.StatusCode.UNAVAILABLE and seconds < 0.5

    faults.set()  # the HSM is back
    wait_until(lambda: client.status().healthz == "ok")
    assert client.decrypt(before.ciphertext, before.key_id) == b"d" * 32
    assert plugin.proc.poll() is None
    assert "hsm reconnected" in plugin.log()


def test_wrong_pin_is_tried_once_then_only_on_sighup_or_a_changed_pin(hsm_env: HsmEnv, faults: FaultControl,
                                                                       tmp_path: Path, new_key: Keys) -> None:
    pin_file = tmp_path / "wrong.pin"
    pin_file.write_text("not-the-pin-1\n")
    pin_file.chmod(0o600)
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", new_key()[0], PKCS11_Module=str(faults.module),
                                  PIN_File=str(pin_file))
    plugin = start_plugin(hsm_env, config, extra_env=faults.env(hsm_env.module))
    try:
        client = plugin.client()
        assert client.status().healthz == "hsm login refused (CKR_PIN_INCORRECT): check the PIN source"
        time.sleep(5)  # longer than the PIN poll and several back-off rounds
        assert faults.calls("C_Login") == 1
        assert plugin.proc.poll() is None

        plugin.signal(signal.SIGHUP)
        wait_until(lambda: faults.calls("C_Login") == 2)
        time.sleep(3)
        assert faults.calls("C_Login") == 2

        pin_file.write_text(hsm_env.pin_file.read_text())  # the operator fixes the PIN source
        wait_until(lambda: client.status().healthz == "ok")
        assert faults.calls("C_Login") == 3
        assert client.decrypt(client.encrypt(b"p" * 32).ciphertext, client.status().key_id) == b"p" * 32
        assert "not-the-pin-1" not in plugin.log()
    finally:
        plugin.stop()


def test_operations_overlap_inside_the_hsm(start_faulty: StartFaulty, faults: FaultControl, new_key: Keys) -> None:
    """With 200 ms added to C_EncryptInit and to C_Encrypt, one Encrypt spends 400 ms in the HSM;
    8 concurrent Encrypts take about 400 ms, not 3.2 s: the plugin really keeps several HSM
    operations in flight (ctypes releases the GIL)."""
    plugin = start_faulty(new_key()[0], Sessions="8")
    clients = [plugin.client() for _ in range(8)]
    for client in clients:
        client.encrypt(b"w" * 32)  # connect every channel first
    faults.set("latency_ms 200")
    barrier = threading.Barrier(8)
    elapsed: list[float] = []

    def call(client_index: int) -> None:
        barrier.wait()
        started = time.monotonic()
        clients[client_index].encrypt(b"c" * 32)
        elapsed.append(time.monotonic() - started)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    started = time.monotonic()
    start_and_join(threads)
    total = time.monotonic() - started
    faults.set()
    assert len(elapsed) == 8
    assert total < 1.2, f"8 concurrent 400 ms Encrypts took {total:.2f}s: HSM calls were serialised"


def test_sigterm_lets_an_in_flight_call_finish(start_faulty: StartFaulty, faults: FaultControl, new_key: Keys) -> None:
    plugin = start_faulty(new_key()[0], Health_Interval="300")  # no probe of its own in the HSM meanwhile
    client = plugin.client()
    client.encrypt(b"0" * 32)
    faults.set("latency_ms 800")  # C_EncryptInit and C_Encrypt: 1.6 s in the HSM, inside the 3 s deadline
    inits = faults.calls("C_EncryptInit")
    result: dict[str, object] = {}

    def slow_call() -> None:
        try:
            reply = client.encrypt(b"f" * 32)
            result["key_id"] = reply.key_id
        except grpc.RpcError as exc:
            result["error"] = exc.code()

    worker = threading.Thread(target=slow_call)
    worker.start()
    wait_until(lambda: faults.calls("C_EncryptInit") > inits)  # the call is now inside the HSM
    plugin.signal(signal.SIGTERM)
    worker.join(10)
    assert "key_id" in result, result
    assert plugin.proc.wait(20) == 0
    assert not plugin.socket.exists()


def test_remote_hsm_killed_and_restarted(hsm_env: HsmEnv, tmp_path: Path, new_key: Keys) -> None:
    """A real remote HSM: the test token served by `p11-kit server`, used through p11-kit-client.so."""
    hsm = remote_hsm(hsm_env, tmp_path)
    hsm.start()
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", new_key()[0], PKCS11_Module=str(hsm.client_module))
    plugin = start_plugin(hsm_env, config, extra_env=hsm.client_env())
    try:
        client = plugin.client()
        key_id = client.status().key_id
        wrapped = client.encrypt(b"r" * 32)
        outcomes = {"ok": 0, "wrong": 0}
        failures: list[tuple[grpc.StatusCode, float]] = []
        stop = threading.Event()

        def traffic() -> None:
            caller = plugin.client()
            while not stop.is_set():
                started = time.monotonic()
                try:
                    right = caller.decrypt(wrapped.ciphertext, wrapped.key_id) == b"r" * 32
                    outcomes["ok" if right else "wrong"] += 1
                except grpc.RpcError as exc:
                    failures.append((exc.code(), time.monotonic() - started))
                    time.sleep(0.05)

        workers = [threading.Thread(target=traffic) for _ in range(4)]
        for worker in workers:
            worker.start()
        time.sleep(0.5)
        hsm.kill()
        down_after = wait_until(lambda: client.status().healthz != "ok", seconds=5)
        assert down_after < 1.5  # the health cache interval is 1 s in these configs
        assert plugin.proc.poll() is None
        time.sleep(1.0)
        hsm.start()
        back_after = wait_until(lambda: client.status().healthz == "ok", seconds=20)
        time.sleep(0.5)
        stop.set()
        for worker in workers:
            worker.join(10)
        assert outcomes["wrong"] == 0 and outcomes["ok"] > 0
        assert failures and {code for code, _ in failures} == {grpc.StatusCode.UNAVAILABLE}
        assert max(seconds for _, seconds in failures) < 1.0  # well inside kube-apiserver's 3 s
        assert client.status().key_id == key_id
        assert client.decrypt(wrapped.ciphertext, wrapped.key_id) == b"r" * 32
        print(f"\nremote HSM: unhealthy after {down_after:.2f}s, healthy {back_after:.2f}s after restart, "
              f"{outcomes['ok']} good calls, {len(failures)} UNAVAILABLE")
    finally:
        plugin.stop()
        if hsm.proc is not None:
            hsm.kill()


def test_a_library_wedged_by_a_connection_cut_mid_reply_makes_the_plugin_exit_to_be_restarted(
        hsm_env: HsmEnv, tmp_path: Path, new_key: Keys) -> None:
    """The stock p11-kit client, its connection to `p11-kit server` cut after a reply's header while other
    calls wait (a network failure mid-message): those calls never come back from the library (a p11-kit
    defect, see scripts/p11kit-wake-readers.py), so the reconnect, which must wait until no call is
    inside the module, can never run. The plugin exits with status 1 after Stuck_Call_Exit so that
    kubelet or systemd restarts it, and the new process, loading the library afresh, serves."""
    hsm = remote_hsm(hsm_env, tmp_path)
    hsm.start()
    relay = ReplyCutter(tmp_path / "relay.sock", hsm.socket)
    label, key_id = new_key()
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", label, PKCS11_Module=str(stock_p11kit_client()),
                                  Stuck_Call_Exit="3", Shutdown_Grace="1")
    through_relay = {"P11_KIT_SERVER_ADDRESS": f"unix:path={relay.listen}"}
    plugins = [start_plugin(hsm_env, config, extra_env=through_relay)]
    stop = threading.Event()

    def traffic() -> None:
        caller = plugins[0].client()
        while not stop.is_set():
            try:
                caller.encrypt(b"w" * 32)
            except grpc.RpcError:
                time.sleep(0.05)

    workers = [threading.Thread(target=traffic, daemon=True) for _ in range(6)]
    try:
        for worker in workers:
            worker.start()
        time.sleep(0.3)
        relay.cut_next_reply()
        assert relay.cut.wait(10), "no reply was cut"
        cut_at = time.monotonic()
        exit_code = plugins[0].proc.wait(30)
        exited_after = time.monotonic() - cut_at
        stop.set()
        log = plugins[0].log()
        assert exit_code == 1, log[-3000:]
        stuck = re.search(r"hsm calls stuck.*calls_in_module=(\d+)", log)
        assert stuck and int(stuck.group(1)) >= 1, log[-3000:]
        assert exited_after < 3 + 1 + 2 + 2  # Stuck_Call_Exit + Shutdown_Grace + the hsm's stop + slack
        # What kubelet or systemd does next: a new process, which loads the library afresh.
        plugins.append(start_plugin(hsm_env, config, extra_env=through_relay))
        client = plugins[1].client()
        assert client.status().healthz == "ok" and client.status().key_id == key_id
        reply = client.encrypt(b"v" * 32)
        assert client.decrypt(reply.ciphertext, reply.key_id) == b"v" * 32
        print(f"\nwedged library: {stuck.group(1)} calls stuck, plugin exited {exited_after:.1f} s after the cut")
    finally:
        stop.set()
        for plugin in plugins:
            plugin.stop()
        relay.close()
        hsm.kill()


def test_pin_never_leaks(hsm_env: HsmEnv, faults: FaultControl, tmp_path: Path, new_key: Keys) -> None:
    """The PIN appears in no argv, log line, health text or error message, even on a refused login."""
    from tests.support import USER_PIN

    wrong = "leak-canary-pin-5150"
    pin_file = tmp_path / "user.pin"
    pin_file.write_text(wrong)
    pin_file.chmod(0o600)
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", new_key()[0], PIN_File=str(pin_file),
                                  Log_Level="debug")
    plugin = start_plugin(hsm_env, config)
    try:
        client = plugin.client()
        texts = [client.status().healthz]
        with pytest.raises(grpc.RpcError) as caught:
            client.encrypt(b"z" * 32)
        texts.append(caught.value.details() or "")
        texts.append(Path(f"/proc/{plugin.proc.pid}/cmdline").read_bytes().decode(errors="replace"))
        pin_file.write_text(USER_PIN)
        wait_until(lambda: client.status().healthz == "ok")
        reply = client.encrypt(b"z" * 32)
        client.decrypt(reply.ciphertext, reply.key_id)
        with pytest.raises(grpc.RpcError) as caught:
            client.decrypt(reply.ciphertext[:-1] + b"\x00", reply.key_id)
        texts.append(caught.value.details() or "")
    finally:
        plugin.stop()
    texts.append(plugin.log())
    for text in texts:
        assert wrong not in text and USER_PIN not in text


def test_a_refused_relogin_is_tried_once_whatever_the_number_of_threads(
        start_faulty: StartFaulty, faults: FaultControl, new_key: Keys) -> None:
    """The HSM drops the login and its PIN was changed: 16 requests in flight all see
    CKR_USER_NOT_LOGGED_IN, yet the wrong PIN is presented once (a Luna partition locks after 10)."""
    plugin = start_faulty(new_key()[0], Sessions="16")
    clients = [plugin.client() for _ in range(16)]
    for client in clients:
        client.encrypt(b"w" * 32)  # every channel connected, sessions opened
    logins_before = faults.calls("C_Login")
    faults.set("latency_ms 50", f"fail C_Encrypt {0x101:#x} -1", f"fail C_Login {0xA0:#x} -1")
    barrier = threading.Barrier(16)

    def call(client_index: int) -> None:
        barrier.wait()
        with contextlib.suppress(grpc.RpcError):
            clients[client_index].encrypt(b"l" * 32)

    start_and_join([threading.Thread(target=call, args=(i,)) for i in range(16)], 20)
    time.sleep(4)  # two PIN polls and several back-off rounds
    assert faults.calls("C_Login") - logins_before == 1
    assert clients[0].status().healthz == "hsm login refused (CKR_PIN_INCORRECT): check the PIN source"


def test_a_hung_hsm_is_reported_unhealthy_with_no_traffic_at_all(start_faulty: StartFaulty, faults: FaultControl,
                                                                 new_key: Keys) -> None:
    """Nothing calls the plugin while the HSM stops answering; the first Status afterwards must
    already know, and must answer at once instead of waiting on the HSM itself."""
    plugin = start_faulty(new_key()[0], Health_Interval="1")
    client = plugin.client(timeout=2.0)
    wait_until(lambda: client.status().healthz == "ok")
    faults.set("latency_ms 3000")  # a self-test round trip now takes 12 s
    time.sleep(1 + 5 + 2)  # Health_Interval + the 5 s probe timeout + margin, without a single call
    started = time.monotonic()
    status = client.status()
    answered_in = time.monotonic() - started
    assert status.healthz.startswith("hsm probe overdue"), status.healthz
    assert answered_in < 0.5
    faults.set()
    recovered_in = wait_until(lambda: client.status().healthz == "ok", seconds=30)
    print(f"\nhung HSM: Status answered in {answered_in * 1000:.1f} ms; healthy {recovered_in:.1f}s after it answered")


def flowing_since(tally: collections.Counter[str], ok_before: int) -> bool:
    """True once traffic has succeeded again since ``ok_before`` successes."""
    return tally["ok"] > ok_before


def test_repeated_outages_under_load_then_sigterm_within_the_grace(start_faulty: StartFaulty, faults: FaultControl,
                                                                   new_key: Keys) -> None:
    plugin = start_faulty(new_key()[0], Shutdown_Grace="3")
    client = plugin.client()
    wrapped = client.encrypt(b"d" * 32)
    stop = threading.Event()
    tally: collections.Counter[str] = collections.Counter()

    def traffic() -> None:
        caller = plugin.client()
        while not stop.is_set():
            try:
                sealed = caller.encrypt(b"t" * 32)
                right = caller.decrypt(sealed.ciphertext, sealed.key_id) == b"t" * 32
                right = right and caller.decrypt(wrapped.ciphertext, wrapped.key_id) == b"d" * 32
                tally["ok" if right else "wrong"] += 1
            except grpc.RpcError as exc:
                tally[exc.code().name] += 1
                time.sleep(0.02)

    workers = [threading.Thread(target=traffic) for _ in range(4)]
    for worker in workers:
        worker.start()
    everything = ("C_GetSlotList", "C_GetTokenInfo", "C_OpenSession", "C_Login", "C_FindObjectsInit",
                  "C_EncryptInit", "C_DecryptInit")
    recoveries = []
    for _ in range(5):
        faults.set(*(f"fail {function} 0x30 -1" for function in everything))
        wait_until(lambda: client.status().healthz != "ok", seconds=5)
        time.sleep(0.5)
        faults.set()
        recoveries.append(wait_until(lambda: client.status().healthz == "ok", seconds=20))
        wait_until(functools.partial(flowing_since, tally, tally["ok"]), seconds=5)
    started = time.monotonic()
    plugin.signal(signal.SIGTERM)
    exit_code = plugin.proc.wait(15)
    stopped_in = time.monotonic() - started
    stop.set()
    for worker in workers:
        worker.join(10)
    assert exit_code == 0
    assert stopped_in < 3 + 1.5
    assert tally["wrong"] == 0 and tally["ok"] > 0
    assert set(tally) <= {"ok", "UNAVAILABLE", "CANCELLED"}, tally
    print(f"\n5 outages under load: recovered in {', '.join(f'{s:.2f}' for s in recoveries)} s; "
          f"{dict(tally)}; SIGTERM to exit {stopped_in:.2f} s")


def test_a_deleted_secondary_never_takes_the_primary_down(run_plugin: Callable[..., PluginProcess], token: Token,
                                                          new_key: Keys) -> None:
    primary, (old_label, old_uuid) = new_key()[0], new_key()
    sealed = build_keyring(token, old_label, []).encrypt(b"o" * 32)
    plugin = run_plugin(primary, old_label)
    client = plugin.client()
    assert client.decrypt(sealed, old_uuid) == b"o" * 32
    token.destroy_object(token.find_one_secret_key(old_label))

    error, _ = timed_error(lambda: client.decrypt(sealed, old_uuid))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert old_label in (error.details() or "") and old_uuid in (error.details() or "")
    for _ in range(20):
        reply = client.encrypt(b"n" * 32)
        assert client.decrypt(reply.ciphertext, reply.key_id) == b"n" * 32
    assert client.status().healthz == "ok"
    assert "reconnecting" not in plugin.log()
    assert "configured key missing from the hsm" in plugin.log()
    plugin.stop()

    restarted = run_plugin(primary, old_label, config_name="restarted.cfg")  # still missing at start
    reply = restarted.client().encrypt(b"s" * 32)
    assert restarted.client().decrypt(reply.ciphertext, reply.key_id) == b"s" * 32
    assert "configured key missing from the hsm" in restarted.log()


def test_a_reload_whose_build_meets_a_dead_hsm_is_applied_by_the_reconnect_and_never_reported_rejected(
        start_faulty: StartFaulty, faults: FaultControl, new_key: Keys) -> None:
    (old_label, _), (new_label, new_uuid) = new_key(), new_key()
    plugin = start_faulty(old_label)
    client = plugin.client()
    config = plugin.socket.parent / "p11kms.cfg"
    # The next key lookup (the reload's) meets a dead device; the reconnect after it finds the HSM back.
    faults.set("fail C_FindObjectsInit 0x30 1")
    config.write_text(config.read_text().replace(f"Primary_key = {old_label}",
                                                 f"Primary_key = {new_label}\nSecondary_key = {old_label}"))
    wait_until(lambda: client.status().key_id == new_uuid and client.status().healthz == "ok")
    assert client.encrypt(b"r" * 32).key_id == new_uuid
    details = plugin.healthz()["config"]
    assert details["generation"] == file_generation(config) and details["reload_failed"] is False, details
    log = plugin.log()
    assert "reload failed" not in log and "still serving the previous keyring" not in log
    assert "the new keys apply on reconnect" in log
    assert "p11kms_config_reload_failed 0.0" in plugin.http_get("/metrics")[1]
