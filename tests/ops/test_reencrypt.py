"""`p11kms reencrypt`: argument errors (exit 2, a message that says what to do) and what it reads from files.

Nothing here needs a cluster; tests/realk8s/test_reencrypt.py runs it against the real kube-apiserver.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from p11kms.cli import main
from p11kms.ops.reencrypt import UsageError, parse_resources, resources_from_encryption_config

UUID = "9c41d0f2-6b1e-4d0a-9a51-7d3c2e1f0a9b"


@pytest.fixture
def kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A kubeconfig that loads (nothing listens at its server) and an environment with no other credentials."""
    path = tmp_path / "kubeconfig"
    path.write_text("apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
                    "users: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\n"
                    "current-context: x\n")
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return path


def _usage(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Runs the command, expects exit 2 (from argparse or from the command), returns stderr."""
    try:
        code = main(["reencrypt", *args])
    except SystemExit as exc:
        code = int(exc.code or 0)
    assert code == 2, capsys.readouterr()
    return capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    ((), "one of the arguments --encryption-config --resources is required"),
    (("--resources", "secrets", "--encryption-config", "x.yaml"), "not allowed with argument"),
    (("--resources", "secrets,,configmaps"), "give resource names separated by commas"),
    (("--resources", "secrets/v1"), "'secrets/v1' is not a resource name"),
    (("--resources", "secrets", "--concurrency", "0"), "0 is not a positive whole number"),
    (("--resources", "secrets", "--max-rate", "-1"), "-1 is not a positive number"),
    (("--resources", "secrets", "--page-size", "ten"), "invalid literal"),
    (("--resources", "secrets", "--key-id", UUID), "--key-id only apply with --etcd-endpoints"),
    (("--resources", "secrets", "--cacert", "ca.pem"), "--cacert only apply with --etcd-endpoints"),
    (("--resources", "secrets", "--etcd-endpoints", "http://127.0.0.1:1"), "--key-id UUID, or --socket PATH"),
    (("--resources", "secrets", "--etcd-endpoints", "http://127.0.0.1:1", "--key-id", UUID, "--state", "s"),
     "--state only applies without --etcd-endpoints"),
    (("--resources", "secrets", "--etcd-endpoints", "http://127.0.0.1:1", "--key-id", "k8s-kek-2026-11"),
     "is not a key UUID"),
    (("--resources", "secrets", "--etcd-endpoints", "https://127.0.0.1:1", "--key-id", UUID, "--cert", "c.pem"),
     "--cert is given without --key"),
    (("--resources", "secrets", "--key-id", UUID, "--socket", "/run/p11kms.sock"), "not allowed with argument"),
])
def test_argument_errors_exit_2_with_a_message(args: tuple[str, ...], message: str, kubeconfig: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert message in _usage(capsys, *args, "--kubeconfig", str(kubeconfig))


def test_credentials_are_looked_for_as_kubectl_does(kubeconfig: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    assert "--kubeconfig /nowhere/config: no such file" in _usage(capsys, "--resources", "secrets",
                                                                  "--kubeconfig", "/nowhere/config")
    assert "no credentials: pass --kubeconfig FILE, set KUBECONFIG" in _usage(capsys, "--resources", "secrets")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    assert "cannot load Kubernetes credentials" in _usage(capsys, "--resources", "secrets", "--context", "nope")


def test_the_encryption_config_names_the_resources(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   kubeconfig: Path) -> None:
    config = tmp_path / "encryption.yaml"
    kms = "[{kms: {apiVersion: v2, name: p11kms, endpoint: 'unix:///run/p11kms/kms.sock'}}, {identity: {}}]"
    config.write_text("apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n"
                      f"  - resources: [secrets, widgets.example.com]\n    providers: {kms}\n"
                      f"  - resources: ['*.apps', secrets]\n    providers: {kms}\n")
    assert resources_from_encryption_config(config) == (["secrets", "widgets.example.com", "*.apps"], [])
    # Where identity comes first kube-apiserver writes in clear: nothing to move to a key. The first entry that
    # names a resource decides, as in kube-apiserver.
    config.write_text("kind: EncryptionConfiguration\nresources:\n"
                      "  - resources: [configmaps, events]\n    providers: [{identity: {}}, {aescbc: {keys: []}}]\n"
                      f"  - resources: [secrets, configmaps]\n    providers: {kms}\n")
    assert resources_from_encryption_config(config) == (["secrets"], ["configmaps", "events"])
    config.write_text("kind: EncryptionConfiguration\nresources:\n"
                      "  - resources: [secrets]\n    providers: [{identity: {}}]\n")
    with pytest.raises(UsageError, match=r"names no resource that kube-apiserver encrypts \(secrets: identity"):
        resources_from_encryption_config(config)
    config.write_text("apiVersion: v1\nkind: ConfigMap\n")
    assert "not an EncryptionConfiguration (kind: 'ConfigMap')" in _usage(
        capsys, "--encryption-config", str(config), "--kubeconfig", str(kubeconfig))
    assert "cannot read it" in _usage(capsys, "--encryption-config", str(tmp_path / "missing.yaml"),
                                      "--kubeconfig", str(kubeconfig))
    config.write_text("kind: EncryptionConfiguration\nresources: []\n")
    with pytest.raises(UsageError, match="names no resource"):
        resources_from_encryption_config(config)


def test_resource_names_are_read_as_the_encryption_config_spells_them() -> None:
    assert parse_resources("secrets, configmaps,widgets.example.com") == ["secrets", "configmaps",
                                                                         "widgets.example.com"]
    assert parse_resources("*.apps") == ["*.apps"]
    with pytest.raises(UsageError):
        parse_resources("*apps")


def test_the_serving_process_never_loads_the_kubernetes_client() -> None:
    """`p11kms serve` goes through cli: importing it (and the plugin) must not import the kubernetes client."""
    probe = ("import sys, p11kms.cli, p11kms.plugin.server; "
             "print(sorted(m for m in sys.modules if m == 'kubernetes' or m.startswith('kubernetes.')))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]"
