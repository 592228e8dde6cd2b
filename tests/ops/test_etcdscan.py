"""`p11kms etcd scan` against a real etcd holding every kind of value kube-apiserver can store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable

import pytest

from p11kms.kube import envelope
from p11kms.kube.etcd import EtcdClient
from p11kms.ops.etcdscan import resource_of, scan

OLD, NEW = "11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"


def kms_value(key_id: str, key: bytes) -> bytes:
    return envelope.encode(envelope.Envelope(
        provider="p11kms", key_id=key_id, encrypted_dek_source=b"\x01" + os.urandom(60),
        dek_source_type=envelope.TYPE_HKDF_SEED, annotations={},
        encrypted_data=envelope.seal_with_seed(os.urandom(32), b"k8s\x00obj", key)))


@pytest.fixture
def keyspace(etcd: str) -> str:
    """A prefix holding secrets under two keys, clear objects, another provider and a corrupt value."""
    prefix = f"/registry-{uuid.uuid4().hex[:8]}/"
    client = EtcdClient([etcd])
    values: dict[str, Callable[[bytes], bytes]] = {
        "secrets/default/a": lambda k: kms_value(NEW, k),
        "secrets/default/b": lambda k: kms_value(OLD, k),
        "secrets/kube-system/c": lambda k: kms_value(OLD, k),
        "secrets/default/plain": lambda k: b"k8s\x00\n\x0c\n\x02v1\x12\x06Secret",
        "configmaps/default/cm": lambda k: b'{"kind":"ConfigMap"}',
        "configmaps/default/cbc": lambda k: b"k8s:enc:aescbc:v1:key1:" + os.urandom(32),
        "example.com/widgets/default/w": lambda k: kms_value(NEW, k),
        "secrets/default/broken": lambda k: b"k8s:enc:kms:v2:p11kms:\xff\xff",
    }
    for name, make in values.items():
        key = (prefix + name).encode()
        client.put_if(key, make(key), mod_revision=0)
    return prefix


def run_scan(etcd: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p11kms", "etcd", "scan", "--endpoints", etcd, *args],
                          capture_output=True, text=True, timeout=60)


def test_counts_per_provider_key_and_resource(etcd: str, keyspace: str) -> None:
    pages: list[int] = []
    report = scan(EtcdClient([etcd]), keyspace, page_size=3, progress=pages.append)
    assert report.scanned == 8 and pages == [3, 6, 8]
    assert report.key_ids() == {("p11kms", NEW): 2, ("p11kms", OLD): 2}
    assert report.kms[("p11kms", NEW, "example.com/widgets")] == 1
    assert report.other == {("identity", "secrets"): 1, ("identity", "configmaps"): 1, ("aescbc", "configmaps"): 1}
    assert [key for key, _ in report.corrupt] == [keyspace + "secrets/default/broken"]


def test_require_lists_every_object_not_on_the_key(etcd: str, keyspace: str) -> None:
    result = run_scan(etcd, "--prefix", keyspace, "--require", NEW, "--resource", "secrets")
    assert result.returncode == 1
    listed = [line.strip() for line in result.stdout.split("are not on key")[1].splitlines()[1:]]
    assert sorted(listed) == sorted(keyspace + name for name in (
        "secrets/default/b", "secrets/kube-system/c", "secrets/default/plain", "secrets/default/broken"))


def test_require_passes_when_everything_is_on_the_key(etcd: str) -> None:
    prefix = f"/registry-{uuid.uuid4().hex[:8]}/"
    client = EtcdClient([etcd])
    for name in ("secrets/default/x", "secrets/other/y"):
        key = (prefix + name).encode()
        client.put_if(key, kms_value(NEW, key), mod_revision=0)
    result = run_scan(etcd, "--prefix", prefix, "--require", NEW)
    assert result.returncode == 0
    assert f"OK: every object of secrets is on key {NEW}" in result.stdout


def test_show_prints_the_envelope_without_decrypting(etcd: str, keyspace: str) -> None:
    result = run_scan(etcd, "--show", keyspace + "secrets/default/b")
    assert result.returncode == 0
    assert f"key UUID (keyID):    {OLD}" in result.stdout
    assert "DEK source type:     HKDF_SHA256_XNONCE_AES_GCM_SEED (1)" in result.stdout
    broken = run_scan(etcd, "--show", keyspace + "secrets/default/broken")
    assert "corrupt:" in broken.stdout
    missing = run_scan(etcd, "--show", keyspace + "secrets/default/none")
    assert missing.returncode == 1 and "no key" in missing.stderr


def test_json_report(etcd: str, keyspace: str) -> None:
    result = run_scan(etcd, "--prefix", keyspace, "--json", "--page-size", "2")
    document = json.loads(result.stdout)
    assert document["scanned"] == 8
    assert {(e["key_id"], e["objects"]) for e in document["kms_v2"]} == {(NEW, 2), (OLD, 2)}
    assert len(document["corrupt"]) == 1


def test_scan_is_read_only(etcd: str, keyspace: str) -> None:
    client = EtcdClient([etcd])
    before = client.revision()
    run_scan(etcd, "--prefix", keyspace, "--require", NEW)
    assert client.revision() == before


def test_unreachable_etcd_is_a_clear_error() -> None:
    result = run_scan("http://127.0.0.1:1")
    assert result.returncode == 1 and "no etcd endpoint answered" in result.stderr


@pytest.mark.parametrize(("key", "resource"), [
    (b"/registry/secrets/ns/name", "secrets"),
    (b"/registry/namespaces/kube-system", "namespaces"),
    (b"/registry/apiextensions.k8s.io/customresourcedefinitions/x.example.com",
     "apiextensions.k8s.io/customresourcedefinitions"),
])
def test_resource_of(key: bytes, resource: str) -> None:
    assert resource_of(key, b"/registry/") == resource


def test_scan_over_client_certificate_tls(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A real etcd that requires client certificates, as on a kubeadm control plane."""
    from tests.support import start_etcd
    from tests.tls_certs import make_pki

    pki = make_pki(tmp_path_factory.mktemp("pki"))
    server = start_etcd(tmp_path_factory.mktemp("etcd-tls"), tls=pki)
    try:
        client = EtcdClient([server.url], cacert=str(pki["ca"]), cert=str(pki["client_cert"]),
                            key=str(pki["client_key"]))
        key = b"/registry/secrets/default/tls-secret"
        client.put_if(key, kms_value(NEW, key), mod_revision=0)
        tls_args = ["--cacert", str(pki["ca"]), "--cert", str(pki["client_cert"]), "--key", str(pki["client_key"])]
        result = run_scan(server.url, *tls_args, "--require", NEW)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"key={NEW} objects=1" in result.stdout
        refused = run_scan(server.url, "--cacert", str(pki["ca"]))  # no client certificate
        assert refused.returncode == 1 and "no etcd endpoint answered" in refused.stderr
    finally:
        server.proc.terminate()
        server.proc.wait(20)
