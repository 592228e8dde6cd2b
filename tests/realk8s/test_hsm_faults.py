"""HSM faults as the real kube-apiserver sees them, with the HSM a real remote one (`p11-kit server` in
front of the test token, reached through p11-kit-client.so) that the tests kill or freeze.

What kube-apiserver does (spec 2.3, 2.4, and its encryptionconfig/config.go read for v1.37.2): its KMS
check in /healthz and /readyz fails once a Status probe fails (a probe runs on such a request when its
cached answer is older than 20 s); reads of objects whose DEK seed it holds go on; every probe whose
Status carries the unchanged key_id extends the write window of the current seed to 3 minutes from
then, even when healthz is not ok; only when Status itself fails does the window run out; after a
failed probe it probes every 10 s.
"""

from __future__ import annotations

import base64
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from tests.realk8s.conftest import Cluster, Keys, swap_labels
from tests.support import HsmEnv, RemoteHsm, remote_hsm, start_plugin, wait_until

COAST_SECONDS = 180  # kube-apiserver's kmsv2PluginWriteDEKSourceMaxTTL
WATCH_DECODE_WORKERS = 10


def _start(hsm_env: HsmEnv, tmp_path: Path, new_key: Keys, start_cluster: Callable[..., Cluster]
           ) -> tuple[RemoteHsm, Cluster, str]:
    hsm = remote_hsm(hsm_env, tmp_path)
    hsm.start()
    label, key_id = new_key()
    cluster = start_cluster(label, plugin_env=hsm.client_env(), PKCS11_Module=str(hsm.client_module))
    return hsm, cluster, key_id


def _kms_unhealthy(cluster: Cluster) -> bool:
    return cluster.plane.kms_health()[0] != 200


def _writes(cluster: Cluster, name: str) -> tuple[bool, str]:
    result = cluster.kubectl("create", "secret", "generic", name, "--from-literal=n=1")
    return result.returncode == 0, result.stderr.strip()


def test_hsm_killed_then_plugin_stopped_as_kube_apiserver_sees_it(
        hsm_env: HsmEnv, tmp_path: Path, new_key: Keys, start_cluster: Callable[..., Cluster]) -> None:
    """Two outages in a row. While the HSM is dead the plugin still answers Status (healthz names the fault,
    key_id unchanged); kube-apiserver reports the provider unhealthy but, finding the key_id unchanged,
    extends its write window at every probe, so writes go on past 3 minutes. Once the plugin itself stops
    answering, the window is no longer extended: writes fail 3 minutes after the last answered probe, and
    resume within one 10 s unhealthy poll once kube-apiserver's gRPC channel has dialled the plugin again."""
    hsm, cluster, key_id = _start(hsm_env, tmp_path, new_key, start_cluster)
    written: list[str] = []
    try:
        for index in range(3):
            cluster.ok("create", "secret", "generic", f"before-{index}", "--from-literal=n=1")
        hsm.kill()
        killed = time.monotonic()
        wait_until(lambda: cluster.plugin.client().status().healthz != "ok", 10)
        reported = wait_until(lambda: _kms_unhealthy(cluster), 30)
        body = cluster.plane.kms_health()[1]
        print(f"\nkube-apiserver's /healthz/kms-providers failed {reported:.1f} s after the HSM was killed: {body!r}")
        assert "hsm token absent" in body
        assert cluster.plane.get("/readyz")[0] != 200
        assert cluster.plane.get("/livez")[0] == 200  # KMS is not a liveness check

        # The HSM stays dead past kube-apiserver's 3-minute write window: reads and writes go on.
        while time.monotonic() - killed < COAST_SECONDS + 15:
            assert cluster.ok("get", "secret", "before-0", "-o", "jsonpath={.data.n}") == "MQ=="
            ok, error = _writes(cluster, f"hsm-dead-{len(written)}")
            assert ok, f"a write failed {time.monotonic() - killed:.0f} s into the HSM outage: {error}"
            written.append(f"hsm-dead-{len(written)}")
            time.sleep(10)
        print(f"HSM dead {time.monotonic() - killed:.0f} s, Status answered: {len(written)} writes, none failed")

        # Now the plugin stops too: Status fails, the window runs out.
        cluster.plugin.stop()
        stopped = time.monotonic()
        failed_with = ""
        while time.monotonic() - stopped < COAST_SECONDS + 30:
            assert cluster.ok("get", "secret", "before-0", "-o", "jsonpath={.data.n}") == "MQ=="
            ok, failed_with = _writes(cluster, f"plugin-down-{len(written)}")
            if not ok:
                break
            written.append(f"plugin-down-{len(written)}")
            time.sleep(5)
        failed_after = time.monotonic() - stopped
        print(f"plugin stopped: writes failed {failed_after:.0f} s later with: {failed_with}")
        assert failed_with, "writes never failed while the plugin was down"
        # The last answered probe came at most 10 s (the unhealthy poll) before the stop.
        assert COAST_SECONDS - 15 <= failed_after <= COAST_SECONDS + 10, failed_after
        assert "expired" in failed_with, failed_with

        hsm.start()
        cluster.plugin = start_plugin(hsm_env, cluster.config, extra_env=cluster.plugin_env)
        back = time.monotonic()
        # kube-apiserver's gRPC channel redials on grpc-go's default backoff (1.6x per failed attempt, at most
        # 120 s): after minutes without a plugin its first call can come late. Its first Status is that call.
        def statuses() -> float:
            return cluster.plugin_metric("p11kms_grpc_requests_total", method="Status", code="OK")

        ours = statuses()  # the test's own call that saw the plugin serve
        reconnected = wait_until(lambda: statuses() > ours, 150)
        wait_until(lambda: _writes(cluster, f"after-{time.monotonic_ns()}")[0], 40)
        resumed_after = time.monotonic() - back
        print(f"kube-apiserver called the plugin again {reconnected:.1f} s after it served; writes resumed "
              f"{resumed_after:.1f} s after it served")
        assert resumed_after - reconnected <= 10 + 3, "kube-apiserver probes every 10 s while unhealthy"

        for name in ["before-0", "before-1", "before-2", *written]:
            assert cluster.ok("get", "secret", name, "-o", "jsonpath={.data.n}") == "MQ==", name
            assert cluster.stored("secrets", "default", name).key_id == key_id
    finally:
        if hsm.proc is not None:
            hsm.kill()


def test_hsm_frozen_is_reported_and_reads_go_on(hsm_env: HsmEnv, tmp_path: Path, new_key: Keys,
                                                  start_cluster: Callable[..., Cluster]) -> None:
    hsm, cluster, _ = _start(hsm_env, tmp_path, new_key, start_cluster)
    assert hsm.proc is not None
    try:
        cluster.ok("create", "secret", "generic", "before", "--from-literal=n=1")
        os.killpg(hsm.proc.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        reported = wait_until(lambda: _kms_unhealthy(cluster), 60)
        print(f"\nkube-apiserver's /healthz/kms-providers failed {reported:.1f} s after the HSM froze: "
              f"{cluster.plane.kms_health()[1]!r}")
        assert cluster.ok("get", "secret", "before", "-o", "jsonpath={.data.n}") == "MQ=="
        ok, error = _writes(cluster, "while-frozen")  # inside the 3-minute window: on the cached seed
        assert ok, error
        os.killpg(hsm.proc.pid, signal.SIGCONT)
        healthy = wait_until(lambda: not _kms_unhealthy(cluster), 60)
        print(f"healthy again {healthy:.1f} s after the HSM thawed; frozen {time.monotonic() - frozen:.0f} s")
        for name in ("before", "while-frozen"):
            assert cluster.ok("get", "secret", name, "-o", "jsonpath={.data.n}") == "MQ=="
    finally:
        os.killpg(hsm.proc.pid, signal.SIGCONT)
        hsm.kill()


def test_a_restarted_apiserver_reads_objects_of_several_seeds_and_two_keys(
        start_cluster: Callable[..., Cluster], new_key: Keys) -> None:
    """Each kube-apiserver start and each key_id change makes a new DEK seed; after a restart it decrypts
    the seeds as its watch cache fills, a few calls per seed, not one per object."""
    old_label, old_uuid = new_key()
    cluster = start_cluster(old_label)
    names = []

    def write(batch: str) -> None:
        for index in range(4):
            cluster.ok("create", "secret", "generic", f"{batch}-{index}", f"--from-literal=v={batch}{index}")
            names.append(f"{batch}-{index}")

    write("first")
    cluster.plane.restart_apiserver()
    write("second")
    new_label, new_uuid = new_key()
    swap_labels(cluster.config, old_label, new_label)
    cluster.wait_until_writes_use(new_uuid)
    write("third")
    stored = {name: cluster.stored("secrets", "default", name) for name in names + cluster.probes}
    seeds = {envelope.encrypted_dek_source for envelope in stored.values()}
    assert {envelope.key_id for envelope in stored.values()} == {old_uuid, new_uuid}
    assert len(seeds) >= 3

    decrypts_before = cluster.plugin_metric("p11kms_grpc_requests_total", method="Decrypt", code="OK")
    ready_after = cluster.plane.restart_apiserver()
    for name in names:
        expected = name.replace("-", "")
        assert base64.b64decode(cluster.ok("get", "secret", name, "-o", "jsonpath={.data.v}")).decode() == expected
    decrypts = cluster.plugin_metric("p11kms_grpc_requests_total", method="Decrypt", code="OK") - decrypts_before
    print(f"\nrestarted kube-apiserver: ready in {ready_after:.1f} s, {decrypts:.0f} Decrypt calls for "
          f"{len(stored)} objects under {len(seeds)} DEK seeds and 2 key_ids")
    # Its watch cache decodes with 10 workers (etcd3 watcher's processEventConcurrency) and the seed cache
    # has no single-flight: each seed costs one Decrypt per worker that misses it, never one per object.
    per_seed = Counter(envelope.encrypted_dek_source for envelope in stored.values())
    assert len(seeds) <= decrypts <= sum(min(count, WATCH_DECODE_WORKERS) for count in per_seed.values())
    assert decrypts < len(stored)
