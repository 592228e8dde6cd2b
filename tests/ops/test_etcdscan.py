"""`p11kms etcd scan` against a real etcd holding every kind of value kube-apiserver can store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from p11kms.kube import envelope
from p11kms.kube.etcd import EtcdClient, KeyValue
from p11kms.ops.etcdscan import (
    EXIT_NOT_ON_KEY,
    EXIT_NOTHING_PROVEN,
    EXIT_PASSED,
    GateResult,
    OffKey,
    ScanReport,
    normalise_prefix,
    parse_key_uuid,
    require_key,
    resource_of,
    scan,
)
from p11kms.ops.etcdscan_report import rewrite_commands
from tests.standin.etcdwrites import WritableEtcd
from tests.standin.seedcrypto import seal_with_seed
from tests.support import EtcdServer, running_etcd, start_etcd
from tests.tls_certs import make_pki

OLD, NEW = "11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"
LETTERED = "9c41e0d2-5b7a-4c3e-9f1d-2a6b8c0d4e5f"  # has hex letters, so case matters
CLEAR_SECRET = b"k8s\x00\n\x0c\n\x02v1\x12\x06Secret"


def kms_value(key_id: str, key: bytes) -> bytes:
    return envelope.encode(envelope.Envelope(
        provider="p11kms", key_id=key_id, encrypted_dek_source=b"\x01" + os.urandom(60),
        dek_source_type=envelope.TYPE_HKDF_SEED, annotations={},
        encrypted_data=seal_with_seed(os.urandom(32), b"k8s\x00obj", key)))


@pytest.fixture
def keyspace(etcd: str) -> str:
    """A prefix holding secrets under two keys, clear objects, another provider and a corrupt value."""
    prefix = f"/registry-{uuid.uuid4().hex[:8]}/"
    client = WritableEtcd([etcd])
    values: dict[str, Callable[[bytes], bytes]] = {
        "secrets/default/a": lambda k: kms_value(NEW, k),
        "secrets/default/b": lambda k: kms_value(OLD, k),
        "secrets/kube-system/c": lambda k: kms_value(OLD, k),
        "secrets/default/plain": lambda k: CLEAR_SECRET,
        "configmaps/default/cm": lambda k: b'{"kind":"ConfigMap"}',
        "configmaps/default/cbc": lambda k: b"k8s:enc:aescbc:v1:key1:" + os.urandom(32),
        "example.com/widgets/default/w": lambda k: kms_value(NEW, k),
        "secrets/default/broken": lambda k: b"k8s:enc:kms:v2:p11kms:\xff\xff",
    }
    for name, make in values.items():
        key = (prefix + name).encode()
        client.put_if(key, make(key), mod_revision=0)
    return prefix


def fill(etcd: str, prefix: str, values: dict[str, bytes | None]) -> None:
    """Stores each name under ``prefix``; a None value becomes a KMS v2 value on key NEW."""
    client = WritableEtcd([etcd])
    for name, value in values.items():
        key = (prefix + name).encode()
        client.put_if(key, kms_value(NEW, key) if value is None else value, mod_revision=0)


def fresh_prefix() -> str:
    return f"/registry-{uuid.uuid4().hex[:8]}/"


def run_scan(etcd: str, *args: str, unprivileged: bool = False) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "p11kms", "etcd", "scan", "--endpoints", etcd, *args]
    if unprivileged and os.geteuid() == 0:
        # root reads any file; without these two capabilities, file modes apply to it as to anyone.
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a file unreadable")
        command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def listed(output: str) -> dict[str, str]:
    """The objects a failed gate lists, each with the reason it gives."""
    gate = output[output.index("FAIL: "):]
    rows = [line.strip() for line in gate.splitlines() if line.startswith("  /")]
    return dict(row.split(": ", 1) for row in rows)


def test_counts_per_provider_key_and_resource(etcd: str, keyspace: str) -> None:
    pages: list[int] = []
    report = scan(EtcdClient([etcd]), keyspace, page_size=3, progress=pages.append)
    assert report.scanned == 8 and pages == [3, 6, 8]
    assert report.key_ids() == {("p11kms", NEW): 2, ("p11kms", OLD): 2}
    assert report.kms[("p11kms", NEW, "example.com/widgets")] == 1
    assert report.other == {("identity", "secrets"): 1, ("identity", "configmaps"): 1, ("aescbc", "configmaps"): 1}
    assert [(c.key, c.resource) for c in report.corrupt] == [(keyspace + "secrets/default/broken", "secrets")]


def test_require_lists_every_object_not_on_the_key_and_why(etcd: str, keyspace: str) -> None:
    result = run_scan(etcd, "--prefix", keyspace, "--require", NEW, "--resource", "secrets")
    assert result.returncode == EXIT_NOT_ON_KEY
    reasons = listed(result.stdout)
    assert set(reasons) == {keyspace + name for name in (
        "secrets/default/b", "secrets/kube-system/c", "secrets/default/plain", "secrets/default/broken")}
    assert reasons[keyspace + "secrets/default/b"] == f"on another key UUID {OLD} (provider p11kms)"
    assert reasons[keyspace + "secrets/default/plain"] == "stored in clear (identity)"
    assert reasons[keyspace + "secrets/default/broken"].startswith("corrupt KMS v2 value: ")
    assert f"FAIL: secrets: 4 of 5 objects are not on key {NEW}:" in result.stdout


def test_require_passes_when_everything_is_on_the_key(etcd: str) -> None:
    prefix = fresh_prefix()
    fill(etcd, prefix, {"secrets/default/x": None, "secrets/other/y": None, "configmaps/default/z": None})
    result = run_scan(etcd, "--prefix", prefix, "--require", NEW)
    assert result.returncode == EXIT_PASSED, result.stdout
    assert f"OK: secrets: 2 objects, all on key {NEW}" in result.stdout
    assert f"OK: configmaps: 1 object, all on key {NEW}" in result.stdout
    assert f"OK: every object of configmaps, secrets is on key {NEW} (3 objects checked)" in result.stdout


@pytest.fixture(scope="module")
def empty_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_etcd(tmp_path_factory.mktemp("etcd-empty")) as url:
        yield url


def test_require_on_an_empty_etcd_proves_nothing(empty_etcd: str) -> None:
    result = run_scan(empty_etcd, "--require", NEW)
    assert result.returncode == EXIT_NOTHING_PROVEN, result.stdout
    assert "NOTHING PROVEN: no key under prefix /registry/" in result.stdout
    assert "--etcd-prefix" in result.stdout  # says what --prefix must be
    assert "OK" not in result.stdout


def test_require_with_a_wrong_prefix_proves_nothing(etcd: str) -> None:
    prefix = fresh_prefix()
    fill(etcd, prefix, {"secrets/default/x": None})
    result = run_scan(etcd, "--prefix", prefix.replace("registry", "registyr"), "--require", NEW)
    assert result.returncode == EXIT_NOTHING_PROVEN, result.stdout
    assert "NOTHING PROVEN: no key under prefix" in result.stdout and "0 keys scanned" in result.stdout


def test_prefix_without_trailing_slash_is_read_as_kube_apiserver_stores_it(etcd: str) -> None:
    """kube-apiserver's --etcd-prefix is '/registry'; it stores under '/registry/'."""
    prefix = fresh_prefix()
    fill(etcd, prefix, {f"secrets/default/s{n}": CLEAR_SECRET for n in range(3)})
    fill(etcd, prefix.rstrip("/") + "-other/", {"secrets/default/elsewhere": None})  # must not be read
    bare = prefix.rstrip("/")
    unnamed = run_scan(etcd, "--prefix", bare, "--require", NEW)
    assert unnamed.returncode == EXIT_NOTHING_PROVEN, unnamed.stdout
    assert f"prefix {prefix}: 3 keys scanned" in unnamed.stdout
    assert "stored in clear: secrets=3" in unnamed.stdout
    named = run_scan(etcd, "--prefix", bare.lstrip("/") + "/", "--require", NEW, "--resource", "secrets")
    assert named.returncode == EXIT_NOT_ON_KEY, named.stdout
    assert set(listed(named.stdout).values()) == {"stored in clear (identity)"}
    assert len(listed(named.stdout)) == 3


def test_nothing_encrypted_and_no_resource_named_proves_nothing(etcd: str) -> None:
    prefix = fresh_prefix()
    fill(etcd, prefix, {"secrets/a/1": CLEAR_SECRET, "secrets/a/2": CLEAR_SECRET, "secrets/b/3": CLEAR_SECRET,
                        "configmaps/a/cm": b'{"kind":"ConfigMap"}'})
    result = run_scan(etcd, "--prefix", prefix, "--require", NEW)
    assert result.returncode == EXIT_NOTHING_PROVEN, result.stdout
    assert "no object under" in result.stdout and "is KMS v2" in result.stdout
    assert "--resource secrets" in result.stdout  # says how to make the gate check something


def test_a_misspelt_resource_proves_nothing_and_names_the_close_one(etcd: str) -> None:
    prefix = fresh_prefix()
    fill(etcd, prefix, {"secrets/default/x": None, "configmaps/default/c": CLEAR_SECRET})
    result = run_scan(etcd, "--prefix", prefix, "--require", NEW, "--resource", "secret")
    assert result.returncode == EXIT_NOTHING_PROVEN, result.stdout
    assert "NOTHING PROVEN: no object of resource 'secret'" in result.stdout
    assert "did you mean secrets?" in result.stdout


def test_require_takes_a_uuid_not_a_label(etcd: str, keyspace: str) -> None:
    result = run_scan(etcd, "--prefix", keyspace, "--require", "k8s-kek-1")
    assert result.returncode == 2
    assert "'k8s-kek-1' is not a key UUID" in result.stderr
    assert "p11kms keys list" in result.stderr and "keyring loaded role=primary" in result.stderr
    assert "Traceback" not in result.stderr
    upper = run_scan(etcd, "--prefix", keyspace, "--require", LETTERED.upper())
    assert upper.returncode == 2 and f"write it as {LETTERED}" in upper.stderr


def test_resource_without_require_is_a_usage_error(etcd: str, keyspace: str) -> None:
    result = run_scan(etcd, "--prefix", keyspace, "--resource", "secrets")
    assert result.returncode == 2 and "--resource only applies with --require" in result.stderr


def test_json_report_carries_the_gate(etcd: str, keyspace: str) -> None:
    result = run_scan(etcd, "--prefix", keyspace, "--json", "--require", NEW, "--resource", "secrets")
    assert result.returncode == EXIT_NOT_ON_KEY
    gate = json.loads(result.stdout)["gate"]  # stdout is one JSON document, gate included
    assert (gate["required_key"], gate["exit_code"], gate["verdict"]) == (NEW, 1, "not_on_key")
    assert gate["checked"] == {"example.com/widgets": 1, "secrets": 5}  # --resource adds, never leaves one out
    assert {row["reason"] for row in gate["not_on_key"]} >= {"stored in clear (identity)"}


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
    client = WritableEtcd([etcd])
    before = client.revision()
    result = run_scan(etcd, "--prefix", keyspace, "--require", NEW)
    assert result.returncode == EXIT_NOT_ON_KEY, result.stdout + result.stderr  # it did scan, and judged
    assert "keys scanned" in result.stdout
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


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EtcdServer, dict[str, Path]]]:
    """A real etcd that requires client certificates, as on a kubeadm control plane."""
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    server = start_etcd(tmp_path_factory.mktemp("etcd-tls"), tls=pki)
    yield server, pki
    server.proc.terminate()
    server.proc.wait(20)


def test_scan_over_client_certificate_tls(tls_etcd: tuple[EtcdServer, dict[str, Path]]) -> None:
    server, pki = tls_etcd
    client = WritableEtcd([server.url], cacert=str(pki["ca"]), cert=str(pki["client_cert"]), key=str(pki["client_key"]))
    key = b"/registry/secrets/default/tls-secret"
    client.put_if(key, kms_value(NEW, key), mod_revision=0)
    tls_args = ["--cacert", str(pki["ca"]), "--cert", str(pki["client_cert"]), "--key", str(pki["client_key"])]
    result = run_scan(server.url, *tls_args, "--require", NEW)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"key={NEW} objects=1" in result.stdout


def _unreadable_copy(path: Path) -> str:
    copy = path.with_name("unreadable-" + path.name)
    shutil.copy(path, copy)
    copy.chmod(0)
    return str(copy)


# Each TLS mistake: the options given, then what stderr must say (the file or option, and the fix).
TLS_MISTAKES: dict[str, tuple[Callable[[dict[str, Path]], list[str]], list[str]]] = {
    "cert without key": (lambda p: ["--cacert", str(p["ca"]), "--cert", str(p["client_cert"])],
                         ["--cert is given without --key", "pass --key"]),
    "key without cert": (lambda p: ["--cacert", str(p["ca"]), "--key", str(p["client_key"])],
                         ["--key is given without --cert", "pass --cert"]),
    "mismatched key": (lambda p: ["--cacert", str(p["ca"]), "--cert", str(p["client_cert"]),
                                  "--key", str(p["server_key"])],
                       ["does not match the certificate", "server.key", "client.crt"]),
    "unreadable key": (lambda p: ["--cacert", str(p["ca"]), "--cert", str(p["client_cert"]),
                                  "--key", _unreadable_copy(p["client_key"])],
                       ["cannot read --key", "unreadable-client.key", "permission denied"]),
    "missing cacert": (lambda p: ["--cacert", str(p["ca"]) + ".missing", "--cert", str(p["client_cert"]),
                                  "--key", str(p["client_key"])],
                       ["cannot read --cacert", "ca.crt.missing", "no such file"]),
    "no client certificate": (lambda p: ["--cacert", str(p["ca"])],
                              ["requires a client certificate", "--cert", "--key"]),
    "unknown CA": (lambda p: ["--cert", str(p["client_cert"]), "--key", str(p["client_key"])],
                   ["cannot verify", "--cacert"]),
    "cacert not a certificate": (lambda p: ["--cacert", str(p["client_key"])],
                                 ["--cacert", "client.key holds no PEM CA certificate"]),
    "client certificate of another CA": (lambda p: ["--cacert", str(p["ca"]), *_foreign_client(p)],
                                         ["refused the client certificate", "foreign/client.crt", "--trusted-ca-file"]),
}


def _foreign_client(pki: dict[str, Path]) -> list[str]:
    """A client certificate and key from a second CA, one etcd does not trust."""
    directory = pki["ca"].parent / "foreign"
    directory.mkdir(exist_ok=True)
    other = make_pki(directory)
    return ["--cert", str(other["client_cert"]), "--key", str(other["client_key"])]


@pytest.mark.parametrize("mistake", list(TLS_MISTAKES))
def test_tls_mistakes_are_named_with_their_fix(tls_etcd: tuple[EtcdServer, dict[str, Path]], mistake: str) -> None:
    server, pki = tls_etcd
    options, expected = TLS_MISTAKES[mistake]
    result = run_scan(server.url, *options(pki), unprivileged=mistake == "unreadable key")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr


def report_of(values: dict[str, bytes | None], require: str | None = NEW, prefix: str = "/registry/") -> ScanReport:
    """A scan report built from values in hand, without etcd: None stands for a KMS v2 value on key NEW."""
    report = ScanReport(prefix=prefix, required=require)
    for name, value in values.items():
        key = (prefix + name).encode()
        report.add(KeyValue(key, kms_value(NEW, key) if value is None else value, 1, 1))
    return report


def test_gate_passes_and_counts_per_resource() -> None:
    gate = require_key(report_of({"secrets/a/1": None, "secrets/a/2": None, "configmaps/a/c": CLEAR_SECRET}), NEW)
    assert (gate.passed, gate.exit_code, gate.checked) == (True, EXIT_PASSED, {"secrets": 2})
    assert f"OK: secrets: 2 objects, all on key {NEW}" in gate.lines
    assert any("not checked (no KMS v2 object): configmaps" in line for line in gate.lines)


def test_gate_on_nothing_scanned_proves_nothing() -> None:
    gate = require_key(report_of({}), NEW)
    assert (gate.passed, gate.exit_code) == (False, EXIT_NOTHING_PROVEN)
    assert gate.lines[0].startswith("NOTHING PROVEN: no key under prefix /registry/")


def test_gate_with_nothing_kms_encrypted_and_no_resource_proves_nothing() -> None:
    gate = require_key(report_of({"secrets/a/1": CLEAR_SECRET, "configmaps/a/c": b"{}"}), NEW)
    assert gate.exit_code == EXIT_NOTHING_PROVEN and gate.checked == {}
    assert "stored in clear: configmaps=1, secrets=1" in "\n".join(gate.lines)


def test_gate_on_a_named_resource_without_objects_suggests_close_names() -> None:
    report = report_of({"secrets/a/1": None, "example.com/widgets/a/w": None})
    assert "did you mean secrets?" in require_key(report, NEW, {"secret"}).lines[0]
    assert "did you mean example.com/widgets?" in require_key(report, NEW, {"widgets"}).lines[0]
    assert require_key(report, NEW, {"secret"}).exit_code == EXIT_NOTHING_PROVEN


def test_gate_lists_each_object_off_the_key_with_its_reason() -> None:
    report = report_of({"secrets/a/on": None, "secrets/a/clear": CLEAR_SECRET,
                        "secrets/a/cbc": b"k8s:enc:aescbc:v1:key1:xx",
                        "secrets/a/old": kms_value(OLD, b"/registry/secrets/a/old"),
                        "secrets/a/broken": b"k8s:enc:kms:v2:p11kms:\xff\xff",
                        "configmaps/a/broken": b"k8s:enc:kms:v2:p11kms:\xff\xff"})
    gate = require_key(report, NEW, {"secrets"})
    # --resource adds a resource to the check, it never removes one that holds KMS v2 values:
    # configmaps was not named but claims to be KMS v2, so it is checked too.
    assert (gate.exit_code, gate.checked) == (EXIT_NOT_ON_KEY, {"configmaps": 1, "secrets": 5})
    assert gate.lines[0] == f"FAIL: configmaps: 1 of 1 object is not on key {NEW}:"
    assert f"FAIL: secrets: 4 of 5 objects are not on key {NEW}:" in gate.lines
    reasons = listed("\n".join(gate.lines))
    assert reasons["/registry/secrets/a/clear"] == "stored in clear (identity)"
    assert reasons["/registry/secrets/a/cbc"] == "encrypted by the aescbc provider, not KMS v2"
    assert reasons["/registry/secrets/a/old"] == f"on another key UUID {OLD} (provider p11kms)"
    assert reasons["/registry/secrets/a/broken"].startswith("corrupt KMS v2 value")
    assert reasons["/registry/configmaps/a/broken"].startswith("corrupt KMS v2 value")


def test_a_named_resource_never_hides_kms_objects_of_other_resources_on_another_key() -> None:
    report = report_of({"secrets/a/on": None, "configmaps/a/old": kms_value(OLD, b"/registry/configmaps/a/old"),
                        "configmaps/a/clear": CLEAR_SECRET, "events/a/e": b"{}"})
    gate = require_key(report, NEW, {"secrets"})
    assert gate.exit_code == EXIT_NOT_ON_KEY, gate.lines
    assert listed("\n".join(gate.lines)) == {
        "/registry/configmaps/a/old": f"on another key UUID {OLD} (provider p11kms)",
        "/registry/configmaps/a/clear": "stored in clear (identity)"}
    assert gate.checked == {"configmaps": 2, "secrets": 1}  # events: no KMS v2 object and not named


def test_gate_reports_objects_off_the_key_before_an_empty_resource() -> None:
    report = report_of({"secrets/a/old": kms_value(OLD, b"/registry/secrets/a/old")})
    gate = require_key(report, NEW, {"secrets", "configmaps"})
    assert gate.exit_code == EXIT_NOT_ON_KEY
    assert any(line.startswith("NOTHING PROVEN: no object of resource 'configmaps'") for line in gate.lines)


def test_gate_refuses_a_report_scanned_for_another_key() -> None:
    with pytest.raises(ValueError, match="scanned for key None"):
        require_key(report_of({"secrets/a/1": None}, require=None), NEW)


@pytest.mark.parametrize(("given", "normal"), [
    ("/registry", "/registry/"), ("registry/", "/registry/"), ("/registry/", "/registry/"),
    ("registry", "/registry/"), ("/", "/"), ("", "/"), ("//a//b/", "/a/b/"),
])
def test_prefix_normalised_as_kube_apiserver_joins_it(given: str, normal: str) -> None:
    assert normalise_prefix(given) == normal


def test_key_uuid_must_be_canonical() -> None:
    assert parse_key_uuid(LETTERED) == LETTERED
    for text, hint in (("k8s-kek-1", "p11kms keys list"), ("", "p11kms keys list"),
                       (LETTERED.upper(), f"write it as {LETTERED}"), ("{" + LETTERED + "}", f"write it as {LETTERED}"),
                       (LETTERED.replace("-", ""), f"write it as {LETTERED}")):
        with pytest.raises(ValueError, match="not a key UUID") as caught:
            parse_key_uuid(text)
        assert hint in str(caught.value)


def test_rewrite_commands_name_only_the_objects_off_the_key_per_namespace_and_resource() -> None:
    gate = GateResult(1, [], "9c41", not_on_key={
        "secrets": [OffKey("/registry/secrets/team-a/tls", "on another key UUID x"),
                    OffKey("/registry/secrets/default/db", "stored in clear (identity)"),
                    OffKey("/registry/secrets/team-a/api token", "on another key UUID x"),
                    OffKey("/registry/secrets/default/broken", "corrupt KMS v2 value: truncated")],
        "apiregistration.k8s.io/apiservices": [OffKey("/registry/apiregistration.k8s.io/apiservices/v1.apps",
                                                      "stored in clear (identity)")],
    })
    assert rewrite_commands(gate, "/registry/") == [
        "kubectl get apiservices.apiregistration.k8s.io v1.apps -o json | kubectl replace -f -",
        "kubectl get secrets -n default db -o json | kubectl replace -f -",
        "kubectl get secrets -n team-a 'api token' tls -o json | kubectl replace -f -",
        "# /registry/secrets/default/broken: corrupt, cannot be read or rewritten; restore it from a backup or "
        "delete it",
    ]
