"""The container image, built from deploy/Dockerfile and run with the static pod's mounts and user.

No container registry is reachable here, so the base image is Debian bookworm from `debootstrap
--variant=minbase` against the Debian mirror, imported with `podman import` (cached in .cache/image).
podman uses private containers.conf and storage.conf files there: runc, vfs storage, and ulimits the
machine allows. The static pod's volumes become directories of the test; the HSM library mount
(/opt/utimaco in the pod) carries SoftHSM2 instead of the vendor library.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import p11kms
from p11kms.ops.devenv import DEV_TOKEN_LABEL, find_softhsm_module
from tests.support import free_port

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "image"
ROOTFS = CACHE / "rootfs-bookworm-minbase"
BASE = "localhost/p11kms-base:bookworm"
IMAGE = f"localhost/p11kms:{p11kms.__version__}-test"
UID = 65532

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap and podman with runc need root here")


def podman_env() -> dict[str, str]:
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "containers.conf").write_text(
        '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
        '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n')
    (CACHE / "storage.conf").write_text(
        f'[storage]\ndriver = "vfs"\nrunroot = "{CACHE / "run"}"\ngraphroot = "{CACHE / "storage"}"\n')
    return {**os.environ, "CONTAINERS_CONF": str(CACHE / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(CACHE / "storage.conf")}


def run(*command: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, env=podman_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def image() -> str:
    for tool in ("podman", "debootstrap", "runc"):
        assert shutil.which(tool), f"{tool} comes from Debian: scripts/setup.sh --dev installs it"
    if not (ROOTFS / "usr" / "bin" / "python3").exists():
        shutil.rmtree(ROOTFS, ignore_errors=True)
        run("debootstrap", "--variant=minbase", "--include=python3,python3-venv", "bookworm", str(ROOTFS),
            "http://deb.debian.org/debian", timeout=900)
    if run("podman", "image", "exists", BASE, check=False).returncode != 0:
        subprocess.run(f"tar -C {ROOTFS} -c . | podman import - {BASE}", shell=True, env=podman_env(),
                       check=True, capture_output=True, timeout=300)
    # pip inside the build must trust what the host trusts (a TLS-inspecting proxy, say).
    ca = Path(os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt")
    run("podman", "build", "--network", "host", "--build-arg", f"BASE={BASE}",
        "--volume", f"{ca}:/run/host-ca.crt:ro", "--build-arg", "PIP_CERT=/run/host-ca.crt",
        "-f", str(ROOT / "deploy" / "Dockerfile"), "-t", IMAGE, str(ROOT), timeout=900)
    run("podman", "image", "prune", "-f", check=False)  # earlier builds' layers (vfs keeps full copies)
    return IMAGE


def test_the_image_reports_its_version(image: str) -> None:
    result = run("podman", "run", "--rm", "--user", f"{UID}:{UID}", "--read-only", image, "--version")
    assert result.stdout.startswith(f"p11kms {p11kms.__version__} ")


class Node:
    """The host directories of one control-plane node, laid out as the static pod expects them."""

    def __init__(self, base: Path) -> None:
        pod: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "kms-plugin-v2.yaml").read_text())
        self.pod = pod
        self.container = pod["spec"]["containers"][0]
        self.init = pod["spec"]["initContainers"][0]
        self.host = {v["name"]: base / v["name"] for v in pod["spec"]["volumes"]}  # hostPath -> a test directory
        for directory in self.host.values():
            directory.mkdir()
        self.port = free_port()
        self.tokens = base / "tokens"

    def container_path(self, volume: str) -> str:
        return str(next(m["mountPath"] for m in self.container["volumeMounts"] if m["name"] == volume))

    def volumes(self, container: dict[str, Any]) -> list[str]:
        flags = []
        for mount in container["volumeMounts"]:
            flags += ["-v", f"{self.host[mount['name']]}:{mount['mountPath']}{':ro' if mount.get('readOnly') else ''}"]
        return flags

    def flags(self) -> list[str]:
        """podman run flags with the static pod's user, security context, env and mounts."""
        security = self.pod["spec"]["securityContext"]
        env = [f"{e['name']}={e['value']}" for e in self.container["env"]]
        flags = ["--network", "host", "--user", f"{security['runAsUser']}:{security['runAsGroup']}",
                 "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
        if self.container["securityContext"]["readOnlyRootFilesystem"]:
            flags.append("--read-only")
        for item in [*env, "SOFTHSM2_CONF=/etc/p11kms/softhsm2.conf"]:
            flags += ["-e", item]
        # SoftHSM's token store: the stand-in for the HSM itself, the one mount the pod does not have. Its
        # parent exists in the image: a parent podman has to create is 0700 root, closed to uid 65532.
        return [*flags, *self.volumes(self.container), "-v", f"{self.tokens}:/var/lib/softhsm-tokens"]


@pytest.fixture
def node(tmp_path: Path) -> Node:
    tmp_path.chmod(0o755)
    node = Node(tmp_path)
    # A token with a first key, made on the host by the project's own dev set-up.
    dev = tmp_path / "dev"
    made = subprocess.run([sys.executable, "-m", "p11kms", "doctor", "--dev", "--dev-dir", str(dev)],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stdout + made.stderr
    shutil.move(dev / "tokens", node.tokens)
    subprocess.run(["chown", "-R", f"{UID}:{UID}", str(node.tokens)], check=True)
    # The vendor library mount carries SoftHSM2's library.
    library = Path(find_softhsm_module())
    shutil.copy(library, node.host["hsm-library"] / library.name)
    # /etc/p11kms as the operator guide installs it: root:65532 0750, config 0640, PIN 65532 0600.
    etc = node.host["config"]
    config_path = node.container["command"][-1]
    (etc / Path(config_path).name).write_text(
        "[KMSPlugin]\nPrimary_key = kek-1\n"
        f"PKCS11_Module = {node.container_path('hsm-library')}/{library.name}\n"
        f"Token_Label = {DEV_TOKEN_LABEL}\nPIN_File = /etc/p11kms/user.pin\nSocket = /run/p11kms/kms.sock\n"
        f"Log_Format = json\nHTTP_Address = 127.0.0.1:{node.port}\n")
    (etc / "softhsm2.conf").write_text("directories.tokendir = /var/lib/softhsm-tokens\nlog.level = ERROR\n")
    shutil.copy(dev / "user.pin", etc / "user.pin")
    os.chown(etc, 0, UID)
    etc.chmod(0o750)
    for name, owner, mode in ((Path(config_path).name, 0, 0o640), ("softhsm2.conf", 0, 0o640),
                              ("user.pin", UID, 0o600)):
        os.chown(etc / name, owner, UID)
        (etc / name).chmod(mode)
    return node


@pytest.fixture
def init_container_ran(node: Node, image: str) -> Node:
    """The static pod's init container, as the kubelet runs it: root with CHOWN and FOWNER only."""
    command = node.init["command"]
    caps = node.init["securityContext"]["capabilities"]["add"]
    run("podman", "run", "--rm", "--user", "0:0", "--cap-drop", "ALL", *[f"--cap-add={c}" for c in caps],
        *node.volumes(node.init), "--entrypoint", command[0], image, *command[1:])
    for mount in node.init["volumeMounts"]:
        info = node.host[mount["name"]].stat()
        assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (UID, UID, 0o750)
    return node


def test_doctor_passes_in_the_image_with_the_static_pods_mounts_and_user(init_container_ran: Node,
                                                                         image: str) -> None:
    node = init_container_ran
    result = run("podman", "run", "--rm", *node.flags(), image, "doctor", "--config", node.container["command"][-1],
                 check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout and "WARN" not in result.stdout


@pytest.fixture
def served(init_container_ran: Node, image: str) -> Iterator[tuple[Node, str]]:
    node = init_container_ran
    name = f"p11kms-test-{os.getpid()}-{node.port}"
    run("podman", "run", "-d", "--name", name, *node.flags(), "--entrypoint", node.container["command"][0], image,
        *node.container["command"][1:])
    try:
        socket = node.host["socket"] / "kms.sock"
        deadline = time.monotonic() + 60
        while not socket.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert socket.exists(), run("podman", "logs", name, check=False).stderr
        yield node, name
    finally:
        run("podman", "rm", "-f", "-t", "5", name, check=False)


def test_serve_in_the_image_answers_check_probes_reload_and_stop(served: tuple[Node, str]) -> None:
    node, name = served
    socket = node.host["socket"] / "kms.sock"
    check = subprocess.run([sys.executable, "-m", "p11kms", "check", "--socket", str(socket)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    probe = node.container["readinessProbe"]["httpGet"]
    with urllib.request.urlopen(f"http://127.0.0.1:{node.port}{probe['path']}", timeout=5) as reply:
        assert reply.status == 200
    # reload as the operator guide does it: SIGHUP to PID 1 through the container's python
    run("podman", "exec", name, "python", "-c", "import os; os.kill(1, 1)")
    deadline = time.monotonic() + 20
    while '"keyring reloaded"' not in run("podman", "logs", name).stderr and time.monotonic() < deadline:
        time.sleep(0.2)
    run("podman", "stop", "-t", "20", name, timeout=60)
    state = json.loads(run("podman", "inspect", name).stdout)[0]["State"]
    assert state["ExitCode"] == 0
    log = run("podman", "logs", name).stderr
    records = [json.loads(line) for line in log.splitlines()]  # Log_Format = json: every line
    messages = [r["msg"] for r in records]
    assert "keyring reloaded" in messages and messages[-1] == "stopped"
    serving = next(r for r in records if r["msg"] == "serving KMS v2")
    assert serving["version"] == p11kms.__version__
    assert not socket.exists()
