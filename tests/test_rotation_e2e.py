"""The vendor's rotation procedure (shared/seed/key-rotation.txt), step by step, with real processes:
a SoftHSM2-backed plugin, a real etcd, the kube-apiserver stand-in and the real kubectl binary.

Against the stand-in, `kubectl replace -f -` of a List needs `--validate=false`: kubectl validates a
List against the server's OpenAPI v2 schema, which the stand-in does not serve. Against a real
kube-apiserver the seed's command works as written.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from p11kms.kube.etcd import EtcdClient, KeyValue
from tests.support import HsmEnv, PluginProcess, Standin, start_plugin, start_standin

Keys = Callable[[], tuple[str, str]]
REENCRYPT = "kubectl get secrets --all-namespaces -o json | kubectl replace --validate=false -f -"


def p11kms(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p11kms", *args], capture_output=True, text=True, timeout=60)


def show(etcd: str, key: str) -> dict[str, str]:
    result = p11kms("etcd", "scan", "--endpoints", etcd, "--show", key)
    assert result.returncode == 0, result.stderr
    return {line[:21].strip().rstrip(":"): line[21:] for line in result.stdout.splitlines()}


class Cluster:
    """One plugin, one stand-in, one etcd prefix: the pieces a rotation touches."""

    def __init__(self, hsm_env: HsmEnv, etcd: str, directory: Path, primary: str) -> None:
        self.hsm_env, self.etcd, self.directory = hsm_env, etcd, directory
        self.config = hsm_env.write_config(directory / "cs_pkcs11_R3.cfg", primary)
        self.plugin: PluginProcess = start_plugin(hsm_env, self.config)
        self.prefix = f"/registry-{uuid.uuid4().hex[:8]}"
        self.api: Standin = start_standin(etcd, self.plugin.socket, directory / "operator", prefix=self.prefix)

    def restart_plugin(self) -> None:
        assert self.plugin.stop() == 0
        self.plugin = start_plugin(self.hsm_env, self.config)

    def secret_key(self, namespace: str, name: str) -> str:
        return f"{self.prefix}/secrets/{namespace}/{name}"

    def create_secret(self, name: str) -> KeyValue:
        """Creates a secret with kubectl and returns what etcd then holds for it."""
        created = self.api.kubectl("create", "secret", "generic", name, "--from-literal=a=1")
        assert created.returncode == 0, created.stderr
        stored = EtcdClient([self.etcd]).get(self.secret_key("default", name).encode())
        assert stored is not None
        return stored

    def scan(self, *args: str) -> subprocess.CompletedProcess[str]:
        return p11kms("etcd", "scan", "--endpoints", self.etcd, "--prefix", self.prefix + "/", *args)

    def stop(self) -> None:
        self.api.stop()
        self.plugin.stop()


@pytest.fixture
def cluster(hsm_env: HsmEnv, etcd: str, tmp_path: Path, new_key: Keys) -> Iterator[tuple[Cluster, str]]:
    label, key_uuid = new_key()
    running = Cluster(hsm_env, etcd, tmp_path, label)
    running.api.wait_for_key_id(key_uuid)
    yield running, label
    running.stop()


def test_rotation_by_the_seed_procedure(cluster: tuple[Cluster, str], new_key: Keys) -> None:
    env, old_label = cluster
    api = env.api
    old_uuid = api.health()["key_id"]

    # 1. Create a secret; its key UUID in etcd is the one the plugin logged.
    assert api.kubectl("create", "secret", "generic", "db-password", "--from-literal=password=s3cr3t").returncode == 0
    created = api.kubectl("create", "secret", "generic", "tls", "-n", "team-a", "--from-literal=key=k3y")
    assert created.returncode == 0, created.stderr
    envelope = show(env.etcd, env.secret_key("default", "db-password"))
    assert envelope["key UUID (keyID)"] == old_uuid
    assert envelope["provider"] == "p11kms"
    assert f"uuid={old_uuid}" in env.plugin.log()
    raw = EtcdClient([env.etcd]).get(env.secret_key("default", "db-password").encode())
    assert raw is not None and b"s3cr3t" not in raw.value and raw.value.startswith(b"k8s:enc:kms:v2:p11kms:")

    # 2. Secondary_key takes the old Primary_key; Primary_key gets a new label. 3. The old key stays.
    new_label, new_uuid = new_key()
    text = env.config.read_text().replace(f"Primary_key = {old_label}", f"Primary_key = {new_label}")
    env.config.write_text(text + f"Secondary_key = {old_label}\n")

    # 4. Restart the plugin; after the stand-in's next Status poll the old secrets still read.
    env.restart_plugin()
    api.wait_for_key_id(new_uuid)
    read = api.kubectl("get", "secret", "db-password", "-o", "jsonpath={.data.password}")
    assert base64.b64decode(read.stdout) == b"s3cr3t"
    before = env.scan("--require", new_uuid)
    assert before.returncode == 1
    assert env.secret_key("default", "db-password") in before.stdout
    assert env.secret_key("team-a", "tls") in before.stdout

    # 5. Re-encrypt every secret (the seed's command, without --force).
    uids_before = _uids(api)
    replaced = api.shell(REENCRYPT)
    assert replaced.returncode == 0, replaced.stderr
    assert replaced.stdout.count("replaced") == 2

    # 6. Verify: every secret in etcd carries the new UUID, the plugin log shows it, data and UIDs are intact.
    after = env.scan("--require", new_uuid)
    assert after.returncode == 0, after.stdout
    assert f"key={new_uuid} objects=2" in after.stdout and old_uuid not in after.stdout
    assert show(env.etcd, env.secret_key("team-a", "tls"))["key UUID (keyID)"] == new_uuid
    assert f"role=primary label={new_label} uuid={new_uuid}" in env.plugin.log()
    assert _uids(api) == uids_before
    read = api.kubectl("get", "secret", "tls", "-n", "team-a", "-o", "jsonpath={.data.key}")
    assert base64.b64decode(read.stdout) == b"k3y"


def test_replace_rewrites_only_stale_values(cluster: tuple[Cluster, str]) -> None:
    env, _ = cluster
    stored = env.create_secret("steady")
    assert env.api.shell(REENCRYPT).returncode == 0
    # Same key_id, same content: kube-apiserver (and the stand-in) skip the write (spec 4.4).
    assert EtcdClient([env.etcd]).get(stored.key) == stored


def test_force_deletes_and_recreates_every_object(cluster: tuple[Cluster, str]) -> None:
    """Why the project's guide leaves out the vendor's --force: objects get new UIDs."""
    env, _ = cluster
    api = env.api
    created_at = env.create_secret("forced")
    uids_before = _uids(api)
    forced = api.shell(REENCRYPT.replace("replace", "replace --force"))
    assert forced.returncode == 0, forced.stderr
    assert 'secret "forced" deleted' in forced.stdout
    uids_after = _uids(api)
    assert uids_after.keys() == uids_before.keys()
    assert all(uids_after[name] != uids_before[name] for name in uids_before)
    recreated = EtcdClient([env.etcd]).get(created_at.key)
    assert recreated is not None
    assert recreated.create_revision > created_at.create_revision  # a new object, not an update


def _uids(api: Standin) -> dict[str, str]:
    listing = api.kubectl("get", "secrets", "--all-namespaces", "-o", "json")
    assert listing.returncode == 0, listing.stderr
    return {f"{i['metadata']['namespace']}/{i['metadata']['name']}": i["metadata"]["uid"]
            for i in json.loads(listing.stdout)["items"]}
