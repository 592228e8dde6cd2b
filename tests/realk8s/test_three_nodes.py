"""Rotation on a real three-node control plane: three kube-apiservers on one three-member etcd cluster,
each with its own p11kms (own socket, own config file), all reloading their EncryptionConfiguration and
their plugin config automatically.

Writers and readers go through all three apiservers for the whole rotation. The two-phase rotation
(`rotate stage` everywhere, `cluster status`, `rotate promote` everywhere, re-encryption, `rotate
retire` everywhere) must cost no request; the seed's one-step swap rolled node by node is the negative
control: an apiserver whose plugin does not know the new key yet cannot read what another apiserver
already wrote with it.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from p11kms.kube.envelope import decode
from p11kms.kube.etcd import EtcdClient
from p11kms.ops.devenv import write_softhsm_conf
from tests.controlplane import ControlPlane, EtcdCluster, encryption_config, start_control_plane, start_etcd
from tests.realk8s.conftest import Keys, swap_labels
from tests.support import HsmEnv, PluginProcess, start_plugin, wait_until
from tests.tls_certs import make_control_plane_pki

NODES = 3


@dataclass
class Node:
    name: str
    config: Path
    env: dict[str, str]  # the plugin's and the operator commands' environment (which token replica)
    plugin: PluginProcess
    plane: ControlPlane

    def p11kms(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "p11kms", *args], capture_output=True, text=True,
                              timeout=120, env={**os.environ, **self.env})

    def endpoint(self) -> str:
        return f"unix://{self.plugin.socket}"


@dataclass
class Load:
    """Writers and readers through every apiserver; each request that fails is recorded with its phase."""

    nodes: list[Node]
    phase: str = "start"
    names: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    requests: int = 0
    paused: set[str] = field(default_factory=set)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def _call(self, node: Node, method: str, path: str, body: dict[str, object] | None = None) -> int:
        try:
            status, text = node.plane.request(method, path, body, timeout=15)
        except OSError as exc:
            self._fail(f"{self.phase}: {method} {path} on {node.name}: {exc}")
            return 0
        if status >= 400:
            self._fail(f"{self.phase}: {method} {path} on {node.name}: HTTP {status} {text[:300]}")
        return status

    def _fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)

    def _writer(self, node: Node) -> None:
        count = 0
        while not self.stop.is_set():
            if node.name in self.paused:
                time.sleep(0.1)
                continue
            name = f"load-{node.name}-{count}"
            count += 1
            data = {"v": base64.b64encode(name.encode()).decode()}
            status = self._call(node, "POST", "/api/v1/namespaces/default/secrets",
                                {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": data})
            with self.lock:
                self.requests += 1
                if status == 201:
                    self.names.append(name)
            time.sleep(0.3)

    def _reader(self, node: Node) -> None:
        while not self.stop.is_set():
            with self.lock:
                name = random.choice(self.names) if self.names and node.name not in self.paused else None
            if name is not None:
                self._call(node, "GET", f"/api/v1/namespaces/default/secrets/{name}")
                with self.lock:
                    self.requests += 1
            time.sleep(0.1)

    def start(self) -> None:
        for node in self.nodes:
            self.threads += [threading.Thread(target=self._writer, args=(node,), daemon=True),
                             threading.Thread(target=self._reader, args=(node,), daemon=True)]
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


@dataclass
class ThreeNodes:
    etcd: EtcdCluster
    nodes: list[Node]

    def scan(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.nodes[0].p11kms("etcd", "scan", "--endpoints", self.etcd.url, *args)

    def key_id_of_a_new_write(self, node: Node, name: str) -> str:
        made = node.plane.kubectl("create", "secret", "generic", name, "--from-literal=probe=1")
        assert made.returncode == 0, made.stderr
        stored = EtcdClient(self.etcd.client_urls).get(f"/registry/secrets/default/{name}".encode())
        assert stored is not None
        return decode(stored.value).key_id

    def wait_until_every_apiserver_writes_with(self, key_id: str, seconds: float = 150) -> float:
        started, waiting = time.monotonic(), list(self.nodes)
        while waiting and time.monotonic() - started < seconds:
            waiting = [node for node in waiting
                       if self.key_id_of_a_new_write(node, f"poll-{node.name}-{time.monotonic_ns()}") != key_id]
            time.sleep(1)
        assert not waiting, f"{[node.name for node in waiting]} still write with another key after {seconds}s"
        return time.monotonic() - started

    def reencrypt(self, key_id: str) -> int:
        """The documented re-encryption through one apiserver, run again while the gate lists objects
        (an object a writer changed meanwhile answers with a conflict); returns the passes it took."""
        for attempt in range(1, 4):
            self.nodes[0].plane.shell("kubectl get secrets --all-namespaces -o json | kubectl replace -f -")
            if self.scan("--require", key_id).returncode == 0:
                return attempt
        raise AssertionError(self.scan("--require", key_id).stdout)


def _token_replicas(hsm_env: HsmEnv, directory: Path) -> list[dict[str, str]]:
    """Three copies of the test token's files, each behind a SoftHSM2 config of its own: the same key
    material in three HSMs, as a replicated HSM cluster or restored HSM backups give it."""
    replicas = []
    for index in range(NODES):
        replica = directory / f"hsm-replica-{index}"
        shutil.copytree(hsm_env.directory / "tokens", replica / "tokens")
        replicas.append({"SOFTHSM2_CONF": str(write_softhsm_conf(replica))})
    return replicas


@pytest.fixture
def three_nodes(hsm_env: HsmEnv, tmp_path: Path) -> Iterator[Callable[[str, bool], ThreeNodes]]:
    started: list[ThreeNodes] = []

    def start(primary: str, replicas: bool) -> ThreeNodes:
        etcd = start_etcd(tmp_path, members=3)
        pki_dir = tmp_path / "pki"
        pki_dir.mkdir()
        pki = make_control_plane_pki(pki_dir)
        envs = _token_replicas(hsm_env, tmp_path) if replicas else [{} for _ in range(NODES)]
        cluster = ThreeNodes(etcd, [])
        started.append(cluster)
        for index, env in enumerate(envs):
            directory = tmp_path / f"node-{index}"
            directory.mkdir()
            config = hsm_env.write_config(directory / "p11kms.cfg", primary)
            plugin = start_plugin(hsm_env, config, extra_env=env)
            try:
                plane = start_control_plane(directory / "control-plane", encryption_config(plugin.socket),
                                            etcd=etcd, pki=pki)
            except BaseException:
                plugin.stop()
                raise
            cluster.nodes.append(Node(f"n{index}", config, env, plugin, plane))
        return cluster

    yield start
    for cluster in started:
        for node in cluster.nodes:
            node.plane.stop()
            node.plugin.stop()
        cluster.etcd.stop()


def _reloaded(node: Node, times: int) -> Callable[[], bool]:
    return lambda: node.plugin.log().count("config reloaded") >= times


@pytest.mark.parametrize("replicas", [False, True], ids=["one shared token", "three token replicas"])
def test_two_phase_rotation_under_load_costs_no_request(three_nodes: Callable[[str, bool], ThreeNodes],
                                                        new_key: Keys, replicas: bool) -> None:
    old_label, old_uuid = new_key()
    new_label, new_uuid = new_key()  # made before the replicas are copied: every HSM holds both keys
    cluster = three_nodes(old_label, replicas)
    load = Load(cluster.nodes)
    load.start()
    try:
        wait_until(lambda: len(load.names) >= 6, 30)
        endpoints = ",".join(node.endpoint() for node in cluster.nodes)

        load.phase = "stage"
        for node in cluster.nodes:
            staged = node.p11kms("rotate", "stage", new_label, "--config", str(node.config))
            assert staged.returncode == 0, staged.stdout + staged.stderr
            wait_until(_reloaded(node, 1), 20)
        status = cluster.nodes[0].p11kms("cluster", "status", "--endpoints", endpoints)
        assert status.returncode == 0, status.stdout + status.stderr

        load.phase = "promote"
        for node in cluster.nodes:
            promoted = node.p11kms("rotate", "promote", new_label, "--config", str(node.config),
                                   "--require-staged-on", endpoints)
            assert promoted.returncode == 0, promoted.stdout + promoted.stderr
            wait_until(_reloaded(node, 2), 20)
        took = cluster.wait_until_every_apiserver_writes_with(new_uuid)
        print(f"\nall three kube-apiservers wrote with the new key {took:.0f} s after the last promote")

        load.phase = "apiserver restart"
        restarted = cluster.nodes[1]
        load.paused.add(restarted.name)  # a load balancer drains a node it restarts
        ready = restarted.plane.restart_apiserver()
        load.paused.discard(restarted.name)
        assert cluster.key_id_of_a_new_write(restarted, "after-restart") == new_uuid

        load.phase = "re-encryption"
        passes = cluster.reencrypt(new_uuid)

        load.phase = "retire"
        for node in cluster.nodes:
            retired = node.p11kms("rotate", "retire", old_label, "--config", str(node.config),
                                  "--etcd-endpoints", cluster.etcd.url)
            assert retired.returncode == 0, retired.stdout + retired.stderr
            wait_until(_reloaded(node, 3), 20)
        time.sleep(3)  # a little load after the last retire
    finally:
        load.finish()

    print(f"{load.requests} requests through 3 apiservers, {len(load.failures)} failed; restarted apiserver "
          f"ready in {ready:.1f} s; re-encryption took {passes} pass(es)")
    assert load.failures == [], "\n".join(load.failures[:20])
    assert load.requests > 100
    for node in cluster.nodes:
        assert old_label not in node.config.read_text()
        assert f"role=primary label={new_label} uuid={new_uuid}" in node.plugin.log()
    final = cluster.scan("--require", new_uuid)
    assert final.returncode == 0, final.stdout
    assert old_uuid not in final.stdout
    for name in random.sample(load.names, min(30, len(load.names))):
        for node in cluster.nodes:
            read = node.plane.kubectl("get", "secret", name, "-o", "jsonpath={.data.v}")
            assert read.returncode == 0 and base64.b64decode(read.stdout).decode() == name, read.stderr


def test_the_one_step_swap_rolled_node_by_node_fails_reads(three_nodes: Callable[[str, bool], ThreeNodes],
                                                           new_key: Keys) -> None:
    """The negative control: the seed's swap (new Primary_key, old key as Secondary_key) on one node while
    the others have not got it yet. Once that node's apiserver writes with the new key, the other nodes'
    apiservers cannot read those objects until their own plugin is swapped too."""
    old_label, _ = new_key()
    new_label, new_uuid = new_key()
    cluster = three_nodes(old_label, False)
    load = Load(cluster.nodes)
    load.start()
    try:
        wait_until(lambda: len(load.names) >= 6, 30)
        load.phase = "one-step swap on n0 only"
        first = cluster.nodes[0]
        swap_labels(first.config, old_label, new_label)
        wait_until(_reloaded(first, 1), 20)
        end = time.monotonic() + 150
        while time.monotonic() < end and cluster.key_id_of_a_new_write(first, f"p-{time.monotonic_ns()}") != new_uuid:
            time.sleep(1)
        time.sleep(10)  # reads through n1 and n2 of what n0 now writes
        failed_while_mixed = len(load.failures)
        load.phase = "swap rolled to n1 and n2"
        for node in cluster.nodes[1:]:
            swap_labels(node.config, old_label, new_label)
            wait_until(_reloaded(node, 1), 20)
        settled = len(load.failures)
        time.sleep(10)
    finally:
        load.finish()
    mixed = [failure for failure in load.failures if failure.startswith("one-step swap on n0 only")]
    print(f"\none-step swap, mixed nodes: {failed_while_mixed} of {load.requests} requests failed; "
          f"{len(load.failures) - settled} after every node was swapped; first: {mixed[:1]}")
    assert failed_while_mixed > 0
    assert all(" on n0:" not in failure for failure in mixed), "n0 knows both keys and reads everything"
    assert any("GET" in failure and ("n1" in failure or "n2" in failure) for failure in mixed)
    assert len(load.failures) == settled, "reads recover once every node has both keys"
