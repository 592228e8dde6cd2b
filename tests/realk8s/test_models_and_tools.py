"""The stand-in and the project's tools beside the real kube-apiserver: one scenario through both
apiservers, the stored values compared field by field; `check`, `doctor --encryption-config` and
`etcd scan` on what the real control plane uses."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from p11kms.kube.client import KmsClient
from p11kms.kube.envelope import INFO_BYTES, NONCE_BYTES, TYPE_HKDF_SEED, decode
from p11kms.kube.etcd import EtcdClient
from tests.realk8s.conftest import Cluster, Keys, p11kms
from tests.standin.seedcrypto import open_data
from tests.support import start_standin

GCM_TAG_BYTES = 16


def test_the_stand_in_stores_what_kube_apiserver_stores(start_cluster: Callable[..., Cluster], new_key: Keys,
                                                         etcd: str, tmp_path: Path) -> None:
    label, key_id = new_key()
    cluster = start_cluster(label)
    standin = start_standin(etcd, cluster.plugin.socket, tmp_path / "standin", prefix="/registry-model")
    try:
        standin.wait_for_key_id(key_id)
        for name, create in (("real", cluster.kubectl), ("standin", standin.kubectl)):
            made = create("create", "secret", "generic", "same", "--from-literal=password=s3cr3t")
            assert made.returncode == 0, f"{name}: {made.stderr}"
        real_key, model_key = b"/registry/secrets/default/same", b"/registry-model/secrets/default/same"
        real_kv = EtcdClient([cluster.plane.etcd_url]).get(real_key)
        model_kv = EtcdClient([etcd]).get(model_key)
    finally:
        standin.stop()
    assert real_kv is not None and model_kv is not None
    real, model = decode(real_kv.value), decode(model_kv.value)

    assert real_kv.value[:len(b"k8s:enc:kms:v2:p11kms:")] == model_kv.value[:len(b"k8s:enc:kms:v2:p11kms:")]
    assert (real.provider, real.key_id, real.dek_source_type) == (model.provider, model.key_id, model.dek_source_type)
    assert real.dek_source_type == TYPE_HKDF_SEED
    assert real.annotations.keys() == model.annotations.keys()
    assert len(real.encrypted_dek_source) == len(model.encrypted_dek_source)
    overhead = INFO_BYTES + NONCE_BYTES + GCM_TAG_BYTES
    with KmsClient(cluster.plugin.socket) as client:
        real_seed = client.decrypt(real.encrypted_dek_source, real.key_id, real.annotations)
        model_seed = client.decrypt(model.encrypted_dek_source, model.key_id, model.annotations)
    real_plain = open_data(real, real_seed, real_key)
    model_plain = open_data(model, model_seed, model_key)
    assert len(real.encrypted_data) - len(real_plain) == overhead == len(model.encrypted_data) - len(model_plain)
    # What is inside differs in encoding only: kube-apiserver stores Kubernetes protobuf, the stand-in JSON.
    assert real_plain.startswith(b"k8s\x00") and b"s3cr3t" in real_plain
    assert model_plain.startswith(b"{") and b"czNjcjN0" in model_plain  # base64 of s3cr3t, as JSON carries it


def test_check_doctor_and_scan_on_the_real_control_plane(start_cluster: Callable[..., Cluster],
                                                         new_key: Keys) -> None:
    label, key_id = new_key()
    cluster = start_cluster(label)
    cluster.ok("create", "secret", "generic", "scanned", "--from-literal=a=1")

    checked = p11kms("check", "--socket", f"unix://{cluster.plugin.socket}")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert not [line for line in checked.stdout.splitlines() if line.startswith("FAIL")], checked.stdout

    doctor = p11kms("doctor", "--config", str(cluster.config),
                    "--encryption-config", str(cluster.plane.encryption_config_path))
    assert "encryption" in doctor.stdout.lower(), doctor.stdout
    encryption_lines = [line for line in doctor.stdout.splitlines() if "encryption" in line.lower()]
    assert encryption_lines and not any("FAIL" in line for line in encryption_lines), doctor.stdout

    scan = cluster.scan("--require", key_id)
    assert scan.returncode == 0, scan.stdout + scan.stderr
    assert "secrets" in scan.stdout
