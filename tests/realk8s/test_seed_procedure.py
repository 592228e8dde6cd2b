"""The vendor's rotation procedure (shared/seed/key-rotation.txt), verbatim, against a real kube-apiserver.

kube-apiserver learns a new key_id only at its next Status poll (every minute while healthy), and
writes with the old DEK seed until then; the tests wait for what it does (a new write stored under the
new key_id), never for a fixed time, and print how long it took.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

from tests.realk8s.conftest import Cluster, Keys, p11kms, swap_labels
from tests.support import wait_until

REENCRYPT = "kubectl get secrets --all-namespaces -o json | kubectl replace -f -"
PROVIDER_PREFIX = b"k8s:enc:kms:v2:p11kms:"


def _secrets(cluster: Cluster) -> dict[str, tuple[str, str, dict[str, str]]]:
    """namespace/name -> (uid, resourceVersion, data) of every secret, as the API serves them."""
    listing = json.loads(cluster.ok("get", "secrets", "--all-namespaces", "-o", "json"))
    return {f"{i['metadata']['namespace']}/{i['metadata']['name']}":
            (i["metadata"]["uid"], i["metadata"]["resourceVersion"], i.get("data", {})) for i in listing["items"]}


def test_seed_procedure_with_a_plugin_restart(start_cluster: Callable[..., Cluster], new_key: Keys) -> None:
    old_label, old_uuid = new_key()
    cluster = start_cluster(old_label)

    # 1. Create secrets; the plugin log names the key UUID, and etcd holds it in clear beside the provider.
    cluster.ok("create", "namespace", "team-a")
    cluster.ok("create", "secret", "generic", "db-password", "--from-literal=password=s3cr3t")
    cluster.ok("create", "secret", "generic", "tls", "-n", "team-a", "--from-literal=key=k3y")
    assert f"role=primary label={old_label} uuid={old_uuid}" in cluster.plugin.log()
    raw = cluster.etcdctl_get("/registry/secrets/default/db-password")
    assert raw.startswith(PROVIDER_PREFIX)
    assert old_uuid.encode() in raw and b"s3cr3t" not in raw
    assert cluster.stored("secrets", "team-a", "tls").key_id == old_uuid
    before = _secrets(cluster)

    # 2. Swap the labels; 3. the old key stays in the HSM; 4. restart the plugin.
    new_label, new_uuid = new_key()
    swap_labels(cluster.config, old_label, new_label)
    cluster.restart_plugin()
    assert f"role=primary label={new_label} uuid={new_uuid}" in cluster.plugin.log()
    assert f"role=secondary label={old_label} uuid={old_uuid}" in cluster.plugin.log()
    # Old secrets read at once: kube-apiserver still holds their DEK seed, and the plugin decrypts old_uuid.
    assert base64.b64decode(cluster.ok("get", "secret", "db-password", "-o", "jsonpath={.data.password}")) == b"s3cr3t"

    # kube-apiserver writes with the new key only after its next Status poll.
    delay = cluster.wait_until_writes_use(new_uuid)
    print(f"kube-apiserver wrote with the new key_id {delay:.1f} s after the plugin restart")
    assert delay <= 75, "kube-apiserver polls Status every minute while healthy"

    # 5. Re-encrypt every secret with the guide's command (without --force).
    gate = cluster.scan("--require", new_uuid, "--resource", "secrets")
    assert gate.returncode == 1 and "/registry/secrets/default/db-password" in gate.stdout, gate.stdout
    replaced = cluster.plane.shell(REENCRYPT)
    assert replaced.returncode == 0, replaced.stderr
    assert 'secret/db-password replaced' in replaced.stdout and 'secret/tls replaced' in replaced.stdout

    # 6. Verify: every secret on the new key UUID, data and UIDs unchanged, the new UUID in the log.
    gate = cluster.scan("--require", new_uuid)
    assert gate.returncode == 0, gate.stdout + gate.stderr
    assert cluster.stored("secrets", "team-a", "tls").key_id == new_uuid
    assert new_uuid.encode() in cluster.etcdctl_get("/registry/secrets/default/db-password")
    after = _secrets(cluster)
    for name, (uid, version, data) in before.items():
        assert after[name][0] == uid and after[name][2] == data, name
        assert after[name][1] != version, f"{name} was not rewritten"


def test_the_guides_force_variant_gives_every_secret_a_new_uid(start_cluster: Callable[..., Cluster],
                                                                 new_key: Keys) -> None:
    """The vendor's command adds --force: kubectl deletes and re-creates each object (the record)."""
    old_label, _ = new_key()
    cluster = start_cluster(old_label)
    cluster.ok("create", "secret", "generic", "forced", "--from-literal=a=1")
    new_label, new_uuid = new_key()
    swap_labels(cluster.config, old_label, new_label)
    cluster.restart_plugin()
    cluster.wait_until_writes_use(new_uuid)
    before = _secrets(cluster)
    forced = cluster.plane.shell(REENCRYPT.replace("replace", "replace --force"))
    assert forced.returncode == 0, forced.stderr
    assert 'secret "forced" deleted' in forced.stdout and "secret/forced replaced" in forced.stdout
    after = _secrets(cluster)
    assert after.keys() == before.keys()
    changed = [name for name in before if after[name][0] != before[name][0]]
    print(f"--force: {len(changed)} of {len(before)} secrets got a new UID")
    assert changed == list(before)
    assert cluster.stored("secrets", "default", "forced").key_id == new_uuid


def test_hot_rotation_through_the_config_watch(start_cluster: Callable[..., Cluster], new_key: Keys) -> None:
    """The same swap without a restart: the plugin reloads on the file change, kube-apiserver follows."""
    old_label, old_uuid = new_key()
    cluster = start_cluster(old_label, resources=("secrets", "configmaps"))
    cluster.ok("create", "secret", "generic", "kept", "--from-literal=a=1")
    cluster.ok("create", "configmap", "settings", "--from-literal=b=2")
    assert cluster.stored("configmaps", "default", "settings").key_id == old_uuid
    new_label, new_uuid = new_key()
    swap_labels(cluster.config, old_label, new_label)
    wait_until(lambda: "config reloaded" in cluster.plugin.log(), 20)
    delay = cluster.wait_until_writes_use(new_uuid)
    print(f"kube-apiserver wrote with the new key_id {delay:.1f} s after the config file changed")
    for resource in ("secrets", "configmaps"):
        listed = cluster.plane.shell(f"kubectl get {resource} --all-namespaces -o json | kubectl replace -f -")
        assert listed.returncode == 0, listed.stderr
    gate = cluster.scan("--require", new_uuid)
    assert gate.returncode == 0, gate.stdout
    assert cluster.stored("configmaps", "default", "settings").key_id == new_uuid
    assert cluster.ok("get", "configmap", "settings", "-o", "jsonpath={.data.b}") == "2"


def test_two_phase_rotation_on_one_node(start_cluster: Callable[..., Cluster], new_key: Keys) -> None:
    """`rotate stage`, `rotate promote`, re-encryption, `rotate retire`: no restart, the config watch applies each."""
    old_label, old_uuid = new_key()
    cluster = start_cluster(old_label)
    cluster.ok("create", "secret", "generic", "rotated", "--from-literal=a=1")
    new_label, new_uuid = new_key()
    config = str(cluster.config)

    staged = p11kms("rotate", "stage", new_label, "--config", config)
    assert staged.returncode == 0, staged.stderr
    wait_until(lambda: cluster.plugin.log().count("config reloaded") >= 1, 20)
    # Staged: the plugin can decrypt the new key but kube-apiserver still writes with the old one.
    assert cluster.write_probe() == old_uuid

    promoted = p11kms("rotate", "promote", new_label, "--config", config,
                      "--require-staged-on", f"unix://{cluster.plugin.socket}")
    assert promoted.returncode == 0, promoted.stderr
    cluster.wait_until_writes_use(new_uuid)

    early = p11kms("rotate", "retire", old_label, "--config", config, "--etcd-endpoints", cluster.plane.etcd_url)
    assert early.returncode != 0 and "rotated" in early.stdout + early.stderr, early.stdout + early.stderr

    replaced = cluster.plane.shell(REENCRYPT)
    assert replaced.returncode == 0, replaced.stderr
    retired = p11kms("rotate", "retire", old_label, "--config", config, "--etcd-endpoints", cluster.plane.etcd_url)
    assert retired.returncode == 0, retired.stdout + retired.stderr
    assert old_label not in cluster.config.read_text()
    wait_until(lambda: cluster.plugin.log().count("config reloaded") >= 3, 20)
    assert cluster.ok("get", "secret", "rotated", "-o", "jsonpath={.data.a}") == "MQ=="
