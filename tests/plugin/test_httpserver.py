"""The HTTP listener of a real plugin process: probes and Prometheus metrics."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import grpc
import pytest

from tests.support import (
    USER_PIN,
    FaultControl,
    HsmEnv,
    PluginProcess,
    start_plugin,
    thread_count,
    unique_label,
    wait_until,
)

Keys = Callable[[], tuple[str, str]]
Run = Callable[..., PluginProcess]


def http_address(plugin: PluginProcess) -> str:
    match = re.search(r"http listening .* address=(\S+)", plugin.log())
    assert match, plugin.log()
    return match.group(1)


def get(plugin: PluginProcess, path: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{http_address(plugin)}{path}", timeout=timeout) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_probes_on_a_healthy_plugin(run_plugin: Run, new_key: Keys) -> None:
    label, key_uuid = new_key()
    plugin = run_plugin(label)
    assert get(plugin, "/livez") == (200, "ok\n")
    assert get(plugin, "/readyz") == (200, "ok\n")
    code, body = get(plugin, "/healthz")
    details = json.loads(body)
    assert code == 200 and details["status"] == "ok" and details["hsm"] == "ready"
    assert details["keys"] == [{"role": "primary", "label": label, "uuid": key_uuid, "state": "loaded"}]
    assert get(plugin, "/nothing")[0] == 404


def test_a_missing_secondary_shows_in_health_detail_and_metrics(run_plugin: Run, new_key: Keys) -> None:
    label, _ = new_key()
    absent = unique_label("absent")
    plugin = run_plugin(label, absent)
    code, body = get(plugin, "/healthz")
    assert code == 200 and json.loads(body)["status"] == "ok"  # the primary serves
    assert {"role": "secondary", "label": absent, "uuid": None, "state": "missing from the hsm"} in (
        json.loads(body)["keys"])
    _, text = get(plugin, "/metrics")
    assert metric(text, "p11kms_keyring_missing_key", label=absent, role="secondary") == 1


def test_metrics_count_rpcs_hsm_calls_and_decrypts_per_key(run_plugin: Run, new_key: Keys) -> None:
    (old, old_uuid), (new, new_uuid) = new_key(), new_key()
    plugin = run_plugin(new, old)
    client = plugin.client()
    reply = client.encrypt(b"m" * 32)
    client.decrypt(reply.ciphertext, reply.key_id)
    with pytest.raises(grpc.RpcError):
        client.decrypt(reply.ciphertext[:-1] + bytes([reply.ciphertext[-1] ^ 1]), reply.key_id)
    _, text = get(plugin, "/metrics")
    assert metric(text, "p11kms_primary_key_info", uuid=new_uuid, label=new) == 1
    assert metric(text, "p11kms_keyring_keys", role="secondary") == 1
    assert metric(text, "p11kms_grpc_requests_total", method="Encrypt", code="OK") == 1
    assert metric(text, "p11kms_grpc_requests_total", method="Decrypt", code="INVALID_ARGUMENT") == 1
    assert metric(text, "p11kms_decrypt_total", key_uuid=new_uuid, role="primary") == 1
    assert metric(text, "p11kms_decrypt_total", key_uuid=old_uuid, role="secondary") == 0
    assert metric(text, "p11kms_hsm_call_duration_seconds_count", function="C_Encrypt") >= 1
    # SoftHSM answers a bad GCM tag with CKR_GENERAL_ERROR: visible by return code, twice (the call
    # and its retry after the self-test).
    assert metric(text, "p11kms_hsm_call_errors_total", function="C_Decrypt", ckr="CKR_GENERAL_ERROR") == 2
    assert metric(text, "p11kms_hsm_up") == 1
    assert metric(text, "p11kms_hsm_operations_in_flight") == 0
    assert USER_PIN not in text


def test_status_polling_reaches_the_hsm_once_per_interval(run_plugin: Run, new_key: Keys) -> None:
    interval = 3.0
    plugin = run_plugin(new_key()[0], Health_Interval=str(interval))
    client = plugin.client()

    def probes() -> float:  # each health probe is one C_Encrypt; this test sends no Encrypt of its own
        return metric(get(plugin, "/metrics")[1], "p11kms_hsm_call_duration_seconds_count", function="C_Encrypt")

    def poll_status(times: int = 50) -> None:
        for _ in range(times):
            assert client.status().healthz == "ok"

    time.sleep(interval + 0.5)  # the answer from the start is stale now
    before = probes()
    poll_status()
    wait_until(lambda: probes() > before)  # a probe did run for this interval
    first = probes()
    poll_status()  # still within the interval of that probe
    assert (first - before, probes()) == (1, first)
    time.sleep(interval + 0.5)
    poll_status()
    wait_until(lambda: probes() > first)  # and one for the next
    assert probes() == first + 1


def test_reloads_are_counted(run_plugin: Run, new_key: Keys) -> None:
    label, _ = new_key()
    plugin = run_plugin(label)
    config = plugin.socket.parent / "p11kms.cfg"

    def reloads(result: str) -> float:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            count = metric(get(plugin, "/metrics")[1], "p11kms_keyring_reloads_total", result=result)
            if count:
                return count
            time.sleep(0.1)
        return 0.0

    plugin.signal(signal.SIGHUP)
    assert reloads("success") == 1
    config.write_text(config.read_text().replace(f"Primary_key = {label}", "Primary_key = missing-key"))
    plugin.signal(signal.SIGHUP)
    assert reloads("failure") == 1
    assert reloads("success") == 1


def test_an_hsm_outage_fails_readiness_but_never_liveness(hsm_env: HsmEnv, faults: FaultControl,
                                                          tmp_path: object, new_key: Keys) -> None:
    from pathlib import Path

    directory = Path(str(tmp_path))
    config = hsm_env.write_config(directory / "p11kms.cfg", new_key()[0], PKCS11_Module=str(faults.module))
    plugin = start_plugin(hsm_env, config, extra_env=faults.env(hsm_env.module))
    try:
        faults.set(*(f"fail {f} 0x32 -1" for f in ("C_GetSlotList", "C_OpenSession", "C_EncryptInit",
                                                    "C_DecryptInit", "C_FindObjectsInit")))
        with pytest.raises(grpc.RpcError):
            plugin.client().encrypt(b"o" * 32)
        assert get(plugin, "/livez") == (200, "ok\n")
        code, body = get(plugin, "/readyz")
        assert code == 503 and "CKR_DEVICE_REMOVED" in body
        _, text = get(plugin, "/metrics")
        assert metric(text, "p11kms_hsm_up") == 0
        assert metric(text, "p11kms_hsm_call_errors_total", function="C_EncryptInit", ckr="CKR_DEVICE_REMOVED") >= 1
        faults.set()
        deadline = time.monotonic() + 15
        while get(plugin, "/readyz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert get(plugin, "/readyz") == (200, "ok\n")
        assert metric(get(plugin, "/metrics")[1], "p11kms_hsm_reconnect_attempts_total", result="success") >= 1
    finally:
        plugin.stop()


def test_http_can_be_turned_off(run_plugin: Run, new_key: Keys) -> None:
    plugin = run_plugin(new_key()[0], HTTP_Address="off")
    assert plugin.client().status().healthz == "ok"
    assert "http listening" not in plugin.log()


def test_a_busy_http_port_stops_the_start_clearly(run_plugin: Run, hsm_env: HsmEnv, new_key: Keys) -> None:
    label, _ = new_key()
    first = run_plugin(label)
    taken = http_address(first)
    second_config = hsm_env.write_config(first.socket.parent.parent / "second.cfg", label,
                                         HTTP_Address=taken, Socket=str(first.socket.parent.parent / "second.sock"))
    second = start_plugin(hsm_env, second_config, wait=False)
    assert second.proc.wait(20) == 1
    assert f"cannot listen on HTTP_Address {taken}" in second.log()
    assert not (first.socket.parent.parent / "second.sock").exists()


IDLE_WAIT = 20.0  # far beyond the listener's read timeout of a few seconds


def closed_by_peer(connection: socket.socket) -> bool:
    """Blocks until the listener closes the connection (True) or IDLE_WAIT passes (False)."""
    connection.settimeout(IDLE_WAIT)
    try:
        return connection.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def trickle(connection: socket.socket, closed: list[bool]) -> None:
    """Sends a request one byte a second, as a slow-loris client does, until the listener hangs up."""
    try:
        for byte in b"GET /livez HTTP/1.1\r\nX-Padding: " + b"a" * 60:
            connection.send(bytes([byte]))
            time.sleep(1.0)
    except OSError:
        closed.append(True)


def test_idle_connections_cannot_exhaust_the_http_listener(run_plugin: Run, new_key: Keys) -> None:
    plugin = run_plugin(new_key()[0])
    host, port = http_address(plugin).rsplit(":", 1)
    assert get(plugin, "/livez") == (200, "ok\n")
    threads_before = thread_count(plugin.proc.pid)
    idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(300)]
    slow = socket.create_connection((host, int(port)), timeout=5)
    slow_closed: list[bool] = []
    slow_sender = threading.Thread(target=trickle, args=(slow, slow_closed), daemon=True)
    slow_sender.start()
    try:
        assert get(plugin, "/livez", timeout=1.0) == (200, "ok\n")  # accepted after the 300 before it
        assert get(plugin, "/readyz", timeout=1.0) == (200, "ok\n")
        threads_during = thread_count(plugin.proc.pid)
        assert threads_during <= threads_before + 2, (threads_before, threads_during)
        assert all(closed_by_peer(connection) for connection in idle)
        slow_sender.join(IDLE_WAIT)
        assert slow_closed == [True], "a request sent one byte a second held its connection"
    finally:
        for connection in [*idle, slow]:
            connection.close()
    assert get(plugin, "/livez", timeout=1.0) == (200, "ok\n")
    print(f"plugin threads: {threads_before} before, {threads_during} with 301 connections open")
