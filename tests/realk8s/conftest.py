"""Fixtures of the real-apiserver tests: a p11kms plugin on the test token, then etcd and kube-apiserver
(built from Kubernetes' own source) with the plugin as their KMS v2 provider."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from p11kms.kube.envelope import Envelope, decode
from p11kms.kube.etcd import EtcdClient
from tests.controlplane import ControlPlane, encryption_config, k8s_binary, start_control_plane
from tests.support import HsmEnv, PluginProcess, start_plugin

Keys = Callable[[], tuple[str, str]]


def swap_labels(config: Path, old_label: str, new_label: str) -> None:
    """Step 2 of the vendor guide on one node's config: Secondary_key takes the old Primary_key, Primary_key
    a new label (the plugin's config watch loads it; a restart does too)."""
    text = config.read_text().replace(f"Primary_key = {old_label}", f"Primary_key = {new_label}")
    config.write_text(text + f"Secondary_key = {old_label}\n")


def p11kms(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p11kms", *args], capture_output=True, text=True, timeout=timeout)


@dataclass
class Cluster:
    """One node: a p11kms plugin and the real kube-apiserver that calls it, on their own etcd."""

    hsm_env: HsmEnv
    directory: Path
    config: Path
    plugin: PluginProcess
    plane: ControlPlane
    probes: list[str] = field(default_factory=list)

    plugin_env: dict[str, str] = field(default_factory=dict)

    def restart_plugin(self) -> None:
        """As the operator guide says: stop the plugin, start it again on the same config."""
        assert self.plugin.stop() == 0, self.plugin.log()
        self.plugin = start_plugin(self.hsm_env, self.config, extra_env=self.plugin_env)

    def plugin_metric(self, name: str, **labels: str) -> float:
        """One sample of the plugin's /metrics, summed over the series that carry ``labels``."""
        status, body = self.plugin.http_get("/metrics")
        assert status == 200, body[:500]
        return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
                   if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()))

    def kubectl(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.plane.kubectl(*args, stdin=stdin)

    def ok(self, *args: str) -> str:
        result = self.kubectl(*args)
        assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
        return result.stdout

    def etcdctl_get(self, key: str) -> bytes:
        """The stored value as the operator guide reads it: ``etcdctl get`` of the key."""
        result = subprocess.run([str(k8s_binary("etcdctl")), "--endpoints", self.plane.etcd_url, "get", key,
                                 "--print-value-only"], capture_output=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def stored(self, resource: str, namespace: str, name: str) -> Envelope:
        found = EtcdClient(self.plane.etcd_url.split(",")).get(f"/registry/{resource}/{namespace}/{name}".encode())
        assert found is not None, f"{resource}/{namespace}/{name} is not in etcd"
        return decode(found.value)

    def write_probe(self) -> str:
        """Creates a secret and returns the key_id kube-apiserver stored it under: the key it writes with now."""
        name = f"probe-{len(self.probes)}"
        self.ok("create", "secret", "generic", name, "--from-literal=probe=1")
        self.probes.append(name)
        return self.stored("secrets", "default", name).key_id

    def wait_until_writes_use(self, key_id: str, seconds: float = 150, every: float = 1.0) -> float:
        """Seconds until a new write is stored under ``key_id`` (kube-apiserver's Status poll at work)."""
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            if self.write_probe() == key_id:
                return time.monotonic() - started
            time.sleep(every)
        raise AssertionError(f"kube-apiserver did not write with key_id {key_id} within {seconds}s")

    def scan(self, *args: str) -> subprocess.CompletedProcess[str]:
        return p11kms("etcd", "scan", "--endpoints", self.plane.etcd_url, *args)

    def stop(self) -> None:
        self.plane.stop()
        self.plugin.stop()


@pytest.fixture
def start_cluster(hsm_env: HsmEnv, tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Starts a plugin with ``primary`` and a control plane that encrypts ``resources`` with it."""
    started: list[Cluster] = []

    def start(primary: str, resources: tuple[str, ...] = ("secrets",), *, plugin_env: dict[str, str] | None = None,
              **attributes: str) -> Cluster:
        directory = tmp_path / f"node-{len(started)}"
        directory.mkdir()
        config = hsm_env.write_config(directory / "cs_pkcs11_R3.cfg", primary, **attributes)
        plugin = start_plugin(hsm_env, config, extra_env=plugin_env)
        try:
            plane = start_control_plane(directory / "control-plane", encryption_config(plugin.socket, resources))
        except BaseException:
            plugin.stop()
            raise
        cluster = Cluster(hsm_env, directory, config, plugin, plane, plugin_env=dict(plugin_env or {}))
        started.append(cluster)
        return cluster

    yield start
    for cluster in started:
        cluster.stop()
