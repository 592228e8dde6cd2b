"""A real Kubernetes control plane for tests: etcd and kube-apiserver built from their own source by
scripts/build-k8s.sh, started on free ports, with p11kms as a KMS v2 provider.

In the manner of controller-runtime's envtest: each process gets its own directory, its own ports, a
throwaway PKI, and is stopped (and waited for) when the test is done. Nothing is disabled that KMS
uses: kube-apiserver runs its health checks, its EncryptionConfiguration reload and its Status poller
exactly as on a node.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.support import ROOT, free_port
from tests.tls_certs import make_control_plane_pki

# scripts/build-k8s.sh links its newest build here; scripts/k8s-compat.sh points tests at other releases.
K8S_BIN = Path(os.environ.get("P11KMS_K8S_BIN") or ROOT / ".cache" / "k8s" / "bin")
PROVIDER = "p11kms"


def k8s_binary(name: str) -> Path:
    """A binary scripts/build-k8s.sh built; the real-apiserver tests fail, not skip, when it is missing."""
    path = K8S_BIN / name
    if not path.exists():
        raise AssertionError(f"{path} is missing: run scripts/build-k8s.sh (scripts/setup.sh --dev runs it)")
    return path


def encryption_config(socket: Path, resources: tuple[str, ...] = ("secrets",), *, first: str = "") -> str:
    """An EncryptionConfiguration naming p11kms as the KMS v2 provider of ``resources``; identity stays
    as the last provider so objects written before KMS stay readable (the documented set-up). ``first``
    is another provider entry (``identity: {}``, ``aesgcm: {...}``) put before KMS, to write with it."""
    providers = [first] if first else []
    providers += [f"kms: {{apiVersion: v2, name: {PROVIDER}, endpoint: 'unix://{socket}', timeout: 3s}}",
                  "identity: {}"]
    return ("apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n"
            f"  - resources: [{', '.join(resources)}]\n    providers:\n"
            + "".join(f"      - {provider}\n" for provider in providers))


@dataclass
class Process:
    """One control-plane process and the file its output goes to."""

    command: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            # A session of its own: stop() can signal the whole group and leave nothing behind.
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class EtcdCluster:
    """One or more etcd members on loopback; ``url`` lists every member's client URL, comma-separated."""

    members: list[Process]
    client_urls: list[str]

    @property
    def url(self) -> str:
        return ",".join(self.client_urls)

    def stop(self) -> None:
        for member in self.members:
            member.stop()


@dataclass
class ControlPlane:
    """kube-apiserver (with the etcd it owns, if any), and kubectl configured as a cluster admin."""

    directory: Path
    etcd_url: str
    url: str
    etcd: EtcdCluster | None
    apiserver: Process
    encryption_config_path: Path
    pki: dict[str, Path]

    @property
    def kubeconfig(self) -> Path:
        return self.directory / "kubeconfig"

    def env(self) -> dict[str, str]:
        path = f"{K8S_BIN}{os.pathsep}{os.environ.get('PATH', '')}"  # the kubectl of the same release
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "HOME": str(self.directory), "PATH": path}

    def kubectl(self, *args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(k8s_binary("kubectl")), *args], env=self.env(), input=stdin,
                              capture_output=True, text=True, timeout=timeout)

    def shell(self, pipeline: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Runs a command line exactly as an operator types it, pipes included."""
        return subprocess.run(pipeline, shell=True, env=self.env(), capture_output=True, text=True, timeout=timeout)

    @functools.cached_property
    def admin_tls(self) -> ssl.SSLContext:
        """The admin's client certificate and the cluster CA, made once for every request."""
        context = ssl.create_default_context(cafile=str(self.pki["ca"]))
        context.load_cert_chain(str(self.pki["admin_cert"]), str(self.pki["admin_key"]))
        return context

    def request(self, method: str, path: str, body: dict[str, object] | None = None,
                timeout: float = 10) -> tuple[int, str]:
        """One API request as the admin; returns the status code and the body (an HTTP error is an answer,
        a connection that fails raises OSError)."""
        request = urllib.request.Request(self.url + path, method=method,
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=self.admin_tls) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def get(self, path: str, timeout: float = 10) -> tuple[int, str]:
        return self.request("GET", path, timeout=timeout)

    def kms_health(self) -> tuple[int, str]:
        """kube-apiserver's own check of its KMS providers (one check while automatic reload is on)."""
        return self.get("/healthz/kms-providers")

    def wait_ready(self, seconds: float = 120) -> None:
        end = time.monotonic() + seconds
        last = "not asked"
        while time.monotonic() < end:
            if not self.apiserver.running():
                raise AssertionError(f"kube-apiserver exited:\n{self.apiserver.log()[-6000:]}")
            try:
                status, body = self.get("/readyz", timeout=5)
                if status == 200:
                    return
                last = body
            except (OSError, ssl.SSLError) as exc:
                last = str(exc)
            time.sleep(0.25)
        raise AssertionError(f"kube-apiserver not ready in {seconds}s: {last}\n{self.apiserver.log()[-6000:]}")

    def restart_apiserver(self) -> float:
        """Stops kube-apiserver and starts it again on the same etcd; returns seconds until ready."""
        self.apiserver.stop()
        started = time.monotonic()
        self.apiserver.start()
        self.wait_ready()
        return time.monotonic() - started

    def stop(self) -> None:
        self.apiserver.stop()
        if self.etcd is not None:
            self.etcd.stop()


def start_etcd(directory: Path, members: int = 1) -> EtcdCluster:
    """etcd of the release kube-apiserver supports (the Debian one is too old for its health checks):
    one member, or a cluster of ``members`` that elect a leader among themselves."""
    names = [f"p11kms-etcd-{index}" for index in range(members)]
    clients = [f"http://127.0.0.1:{free_port()}" for _ in names]
    peers = [f"http://127.0.0.1:{free_port()}" for _ in names]
    initial = ",".join(f"{name}={peer}" for name, peer in zip(names, peers, strict=True))
    cluster = EtcdCluster([], clients)
    for name, client, peer in zip(names, clients, peers, strict=True):
        member = Process([str(k8s_binary("etcd")), "--name", name, "--data-dir", str(directory / f"{name}-data"),
                          "--listen-client-urls", client, "--advertise-client-urls", client,
                          "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                          "--initial-cluster", initial, "--initial-cluster-state", "new", "--log-level", "warn"],
                         directory / f"{name}.log")
        member.start()
        cluster.members.append(member)
    return cluster


def start_control_plane(directory: Path, encryption: str, *, etcd: EtcdCluster | None = None,
                        pki: dict[str, Path] | None = None) -> ControlPlane:
    """Starts kube-apiserver with ``encryption`` as its EncryptionConfiguration (reloaded automatically
    when the file changes) and waits until /readyz passes. Without ``etcd`` it starts (and owns) an etcd
    of its own; several apiservers of one cluster share ``etcd`` and ``pki`` (one CA, one service-account
    key), as the control-plane nodes of a highly available cluster do."""
    directory.mkdir(parents=True, exist_ok=True)
    if pki is None:
        pki_dir = directory / "pki"
        pki_dir.mkdir(exist_ok=True)
        pki = make_control_plane_pki(pki_dir)
    config_path = directory / "encryption-config.yaml"
    config_path.write_text(encryption)
    owned = start_etcd(directory) if etcd is None else None
    etcd_url = etcd.url if etcd is not None else owned.url if owned is not None else ""
    port = free_port()
    apiserver = Process([
        str(k8s_binary("kube-apiserver")),
        "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={port}",
        f"--etcd-servers={etcd_url}",
        f"--tls-cert-file={pki['apiserver_cert']}", f"--tls-private-key-file={pki['apiserver_key']}",
        f"--client-ca-file={pki['ca']}",
        "--authorization-mode=RBAC",
        "--service-cluster-ip-range=10.0.0.0/24",
        # The loopback address may not be published as the `kubernetes` service's endpoint; a single test
        # apiserver has no peers to publish it to (envtest does the same).
        "--endpoint-reconciler-type=none",
        "--service-account-issuer=https://kubernetes.default.svc",
        f"--service-account-key-file={pki['service_account_pub']}",
        f"--service-account-signing-key-file={pki['service_account_key']}",
        f"--encryption-provider-config={config_path}",
        "--encryption-provider-config-automatic-reload",
        f"--cert-dir={directory / 'certs'}",
        "--v=2",
    ], directory / "kube-apiserver.log")
    plane = ControlPlane(directory, etcd_url, f"https://127.0.0.1:{port}", owned, apiserver, config_path, pki)
    plane.kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "p11kms", "cluster": {"server": plane.url, "certificate-authority": str(pki["ca"])}}],
        "users": [{"name": "admin", "user": {"client-certificate": str(pki["admin_cert"]),
                                             "client-key": str(pki["admin_key"])}}],
        "contexts": [{"name": "p11kms", "context": {"cluster": "p11kms", "user": "admin"}}],
        "current-context": "p11kms",
    }))
    apiserver.start()
    try:
        plane.wait_ready()
    except BaseException:
        plane.stop()
        raise
    return plane
