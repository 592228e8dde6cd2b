"""Key rotation on a three-node control plane, with real processes only.

Three "nodes", each a p11kms plugin process with its own config file and socket and a kube-apiserver
stand-in in front of it, share one etcd and one SoftHSM2 token, as three control-plane nodes share
their etcd cluster and HSM. Writers and readers run through all three stand-ins the whole time.
Every config change is made by ``p11kms rotate`` on that node's file and picked up by the plugin's
file watch (no signal, no restart).
"""

from __future__ import annotations

import base64
import json
import random
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import HsmEnv, PluginProcess, Standin, start_plugin, start_standin, wait_until

Keys = Callable[[], tuple[str, str]]
NODES = 3
WRITE_PAUSE = 0.15  # seconds between one writer's creates: ~20 writes/s over three nodes, on two cores
READ_PAUSE = 0.02


def p11kms(hsm_env: HsmEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p11kms", *args], capture_output=True, text=True, timeout=120,
                          env=hsm_env.process_env())


@dataclass
class Node:
    name: str
    config: Path
    plugin: PluginProcess
    api: Standin

    def rotate(self, hsm_env: HsmEnv, *args: str) -> subprocess.CompletedProcess[str]:
        result = p11kms(hsm_env, "rotate", *args, "--config", str(self.config))
        return result

    def serves_file(self, hsm_env: HsmEnv) -> bool:
        """`p11kms rotate status`: the running plugin serves exactly what the file on disk says."""
        return p11kms(hsm_env, "rotate", "status", "--config", str(self.config),
                      "--endpoint", self.plugin.http_url()).returncode == 0


def _request(api: Standin, method: str, path: str, body: dict[str, object] | None = None) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(api.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@dataclass
class Traffic:
    """Writers create secrets through every node; readers read every written secret through every node."""

    nodes: list[Node]
    written: dict[str, bytes] = field(default_factory=dict)  # name -> value
    failures: list[str] = field(default_factory=list)
    writes: int = 0
    reads: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for index in range(NODES):
            self.threads.append(threading.Thread(target=self._writer, args=(index,), daemon=True))
            self.threads.append(threading.Thread(target=self._reader, args=(index,), daemon=True))
        for thread in self.threads:
            thread.start()

    def _writer(self, index: int) -> None:
        node, serial = self.nodes[index], 0
        while not self.stop.is_set():
            serial += 1
            name, value = f"w{index}-{serial}", uuid.uuid4().bytes
            body: dict[str, object] = {"metadata": {"name": name}, "data": {"v": base64.b64encode(value).decode()}}
            code, text = _request(node.api, "POST", "/api/v1/namespaces/load/secrets", body)
            with self.lock:
                if code == 201:
                    self.written[name] = value
                    self.writes += 1
                else:
                    self.failures.append(f"write {name} via {node.name}: {code} {text[:300]}")
            time.sleep(WRITE_PAUSE)

    def _reader(self, index: int) -> None:
        rng = random.Random(index)
        while not self.stop.is_set():
            with self.lock:
                if not self.written:
                    time.sleep(0.02)
                    continue
                name = rng.choice(list(self.written))
                value = self.written[name]
            for node in self.nodes:  # every object through every node
                code, text = _request(node.api, "GET", f"/api/v1/namespaces/load/secrets/{name}")
                ok = code == 200 and base64.b64decode(json.loads(text)["data"]["v"]) == value
                with self.lock:
                    self.reads += 1
                    if not ok:
                        self.failures.append(f"read {name} via {node.name}: {code} {text[:300]}")
            time.sleep(READ_PAUSE)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def read_everything_everywhere(self) -> None:
        for name, value in list(self.written.items()):
            for node in self.nodes:
                code, text = _request(node.api, "GET", f"/api/v1/namespaces/load/secrets/{name}")
                assert code == 200 and base64.b64decode(json.loads(text)["data"]["v"]) == value, (node.name, text)


@pytest.fixture
def cluster(hsm_env: HsmEnv, etcd: str, tmp_path: Path, new_key: Keys) -> Iterator[tuple[list[Node], str, str]]:
    label, key_uuid = new_key()
    prefix = f"/registry-{uuid.uuid4().hex[:8]}"
    nodes: list[Node] = []
    try:
        for index in range(NODES):
            directory = tmp_path / f"node{index}"
            directory.mkdir()
            # One node logs JSON, as the shipped static pod does; the checks must work with both formats.
            config = hsm_env.write_config(directory / "cs_pkcs11_R3.cfg", label,
                                          Log_Format="json" if index == 1 else "text")
            plugin = start_plugin(hsm_env, config)
            api = start_standin(etcd, plugin.socket, directory / "operator", prefix=prefix, status_interval=0.3)
            nodes.append(Node(f"node{index}", config, plugin, api))
        for node in nodes:
            node.api.wait_for_key_id(key_uuid)
        yield nodes, label, prefix
    finally:
        for node in nodes:
            node.api.stop()
            node.plugin.stop()


def cluster_status(hsm_env: HsmEnv, nodes: list[Node]) -> subprocess.CompletedProcess[str]:
    return p11kms(hsm_env, "cluster", "status", "--endpoints", ",".join(n.plugin.http_url() for n in nodes))


def test_two_phase_rolling_rotation_on_three_nodes(hsm_env: HsmEnv, etcd: str, new_key: Keys,
                                                   cluster: tuple[list[Node], str, str]) -> None:
    nodes, old_label, prefix = cluster
    new_label = f"kek-new-{uuid.uuid4().hex[:8]}"
    traffic = Traffic(nodes)
    started = time.monotonic()
    traffic.start()
    try:
        wait_until(lambda: traffic.writes >= 30, 30)

        # Phase 1: stage on every node, one after the other (the first creates the key in the HSM).
        for index, node in enumerate(nodes):
            staged = node.rotate(hsm_env, "stage", new_label, *(["--create"] if index == 0 else []))
            assert staged.returncode == 0, staged.stderr
            wait_until(lambda node=node: node.serves_file(hsm_env), 15)  # type: ignore[misc]
            time.sleep(0.5)  # traffic keeps running between the steps of the rollout
        new_uuid = next(k["uuid"] for k in nodes[0].plugin.healthz()["keys"] if k["label"] == new_label)
        staged_everywhere = cluster_status(hsm_env, nodes)
        assert staged_everywhere.returncode == 0, staged_everywhere.stdout

        # Phase 2: promote on every node; each refuses unless every node decrypts under the new key.
        everyone = ",".join(n.plugin.http_url() for n in nodes)
        for index, node in enumerate(nodes):
            promoted = node.rotate(hsm_env, "promote", new_label, "--require-staged-on", everyone)
            assert promoted.returncode == 0, promoted.stderr
            node.api.wait_for_key_id(new_uuid)
            if index < NODES - 1:
                mid = cluster_status(hsm_env, nodes)
                assert mid.returncode == 0 and "WARNING: nodes disagree" in mid.stdout, mid.stdout
            time.sleep(0.5)
        assert cluster_status(hsm_env, nodes).returncode == 0
        wait_until(lambda: traffic.writes >= 200, 30)

        # Re-encryption: only the objects the scan lists, by the commands it prints.
        scan = p11kms(hsm_env, "etcd", "scan", "--endpoints", etcd, "--prefix", prefix, "--require", new_uuid,
                      "--rewrite-commands")
        assert scan.returncode == 1, scan.stdout
        commands = [line for line in scan.stdout.splitlines() if line.startswith("kubectl get ")]
        assert commands and all("--force" not in c for c in commands)
        for command in commands:  # the stand-in serves no OpenAPI v2, so kubectl replace of a List needs this
            rewritten = nodes[2].api.shell(command.replace("replace -f", "replace --validate=false -f"))
            assert rewritten.returncode == 0, rewritten.stderr

        # Retire the old key on every node: the scan gate passes now.
        for node in nodes:
            retired = node.rotate(hsm_env, "retire", old_label, "--etcd-endpoints", etcd, "--prefix", prefix)
            assert retired.returncode == 0, retired.stderr + retired.stdout
            assert "stays in the HSM" in retired.stdout
            wait_until(lambda node=node: node.serves_file(hsm_env), 15)  # type: ignore[misc]
        wait_until(lambda: traffic.reads >= traffic.writes, 30)
    finally:
        traffic.finish()
    duration = time.monotonic() - started
    print(f"\nmulti-node rotation: {traffic.writes} writes, {traffic.reads} reads, "
          f"{len(traffic.failures)} failures, {duration:.1f}s")
    assert traffic.failures == []
    traffic.read_everything_everywhere()
    final = p11kms(hsm_env, "etcd", "scan", "--endpoints", etcd, "--prefix", prefix, "--require", new_uuid)
    assert final.returncode == 0, final.stdout
    assert f"key={new_uuid} objects={len(traffic.written)}" in final.stdout
    for node in nodes:  # the key lines of the plugin log, in text and in JSON
        log = node.plugin.log()
        assert new_uuid in log and "keyring reloaded" in log and "config reloaded" in log
        assert node.plugin.proc.poll() is None  # never restarted


def test_one_step_swap_rolled_node_by_node_breaks_reads(hsm_env: HsmEnv, cluster: tuple[list[Node], str, str]
                                                        ) -> None:
    """The seed's swap on several nodes: why the two-phase path exists."""
    nodes, _, _ = cluster
    new_label = f"kek-new-{uuid.uuid4().hex[:8]}"
    traffic = Traffic(nodes)
    traffic.start()
    try:
        wait_until(lambda: traffic.writes >= 15, 30)
        refused = nodes[0].rotate(hsm_env, "promote", new_label)
        assert refused.returncode == 1 and "is not staged" in refused.stderr
        created = p11kms(hsm_env, "keys", "create", "--config", str(nodes[0].config), "--label", new_label)
        assert created.returncode == 0, created.stderr
        new_uuid = created.stdout.split("uuid=")[1].strip()
        swapped = nodes[0].rotate(hsm_env, "promote", new_label, "--one-step")
        assert swapped.returncode == 0, swapped.stderr
        nodes[0].api.wait_for_key_id(new_uuid)
        wait_until(lambda: any(f.startswith("read ") and "node1" in f for f in traffic.failures), 30)

        broken = cluster_status(hsm_env, nodes)
        assert broken.returncode == 1
        assert f"FAIL: {nodes[1].plugin.http_url()} cannot decrypt the primary key {new_label}" in broken.stdout
        message = next(f for f in traffic.failures if "node1" in f)
        assert "FAILED_PRECONDITION" in message
        assert f"is the key '{new_label}', which exists in the HSM but is not in this node's config" in message

        for node in nodes[1:]:
            assert node.rotate(hsm_env, "promote", new_label, "--one-step").returncode == 0
            node.api.wait_for_key_id(new_uuid)
        assert cluster_status(hsm_env, nodes).returncode == 0
        failed_before = len(traffic.failures)
        time.sleep(2)
    finally:
        traffic.finish()
    print(f"\none-step swap rolled node by node: {len(traffic.failures)} failed calls of "
          f"{traffic.reads} reads and {traffic.writes} writes")
    assert len(traffic.failures) == failed_before  # once every node has the key, reads work again
    traffic.read_everything_everywhere()


def test_first_enablement_in_phases_on_two_nodes(hsm_env: HsmEnv, etcd: str, tmp_path: Path, new_key: Keys) -> None:
    """Turning encryption on across several kube-apiservers: kms second everywhere, then first, then
    re-encrypt, then identity goes. Restarting a stand-in with other providers is kube-apiserver
    restarted with another EncryptionConfiguration."""
    label, key_uuid = new_key()
    prefix = f"/registry-{uuid.uuid4().hex[:8]}"
    plugins = [start_plugin(hsm_env, hsm_env.write_config(_mkdir(tmp_path / f"n{i}") / "p11kms.cfg", label))
               for i in range(2)]
    apis: list[Standin] = []
    written: dict[str, bytes] = {}

    def serve(index: int, providers: str) -> None:
        if len(apis) > index:
            apis[index].stop()
        api = start_standin(etcd, plugins[index].socket, tmp_path / f"n{index}" / f"api-{providers}", prefix=prefix,
                            providers=providers)
        wait_until(lambda: api.health().get("status") == "ok", 20)
        apis[index:index + 1] = [api]

    def write(index: int) -> None:
        name, value = f"s{len(written)}", uuid.uuid4().bytes
        body: dict[str, object] = {"metadata": {"name": name}, "data": {"v": base64.b64encode(value).decode()}}
        code, text = _request(apis[index], "POST", "/api/v1/namespaces/default/secrets", body)
        assert code == 201, text
        written[name] = value

    def unreadable() -> list[str]:
        failed = []
        for name, value in written.items():
            for index, api in enumerate(apis):
                code, text = _request(api, "GET", f"/api/v1/namespaces/default/secrets/{name}")
                if code != 200 or base64.b64decode(json.loads(text)["data"]["v"]) != value:
                    failed.append(f"{name} via node{index}: {text[:200]}")
        return failed

    try:
        for index in range(2):
            serve(index, "identity")  # before: nothing encrypted
            write(index)
        # The counter-example: kms first on one node while another has no kms provider yet.
        serve(0, "kms,identity")
        write(0)
        assert any("via node1" in f and "encrypted by a kms provider" in f for f in unreadable())
        stray = list(written)[-1]  # roll the counter-example back: remove what node1 cannot read, node0 as before
        assert _request(apis[0], "DELETE", f"/api/v1/namespaces/default/secrets/{stray}")[0] == 200
        del written[stray]
        serve(0, "identity")

        for phase, providers in ((1, "identity,kms"), (2, "kms,identity")):
            for index in range(2):  # node by node, reading everything through both nodes after each restart
                serve(index, providers)
                write(index)
                assert unreadable() == [], f"phase {phase}"
        scan = p11kms(hsm_env, "etcd", "scan", "--endpoints", etcd, "--prefix", prefix, "--require", key_uuid,
                      "--resource", "secrets", "--rewrite-commands")
        assert scan.returncode == 1 and "stored in clear" in scan.stdout
        for command in (line for line in scan.stdout.splitlines() if line.startswith("kubectl get ")):
            assert apis[0].shell(command.replace("replace -f", "replace --validate=false -f")).returncode == 0
        proven = p11kms(hsm_env, "etcd", "scan", "--endpoints", etcd, "--prefix", prefix, "--require", key_uuid,
                        "--resource", "secrets")
        assert proven.returncode == 0, proven.stdout
        for index in range(2):  # phase 3: identity removed, everything still reads
            serve(index, "kms")
            write(index)
            assert unreadable() == []
    finally:
        for api in apis:
            api.stop()
        for plugin in plugins:
            plugin.stop()


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path
