"""Turning KMS encryption on across several kube-apiservers, with the stand-in (seconds instead of the
real apiserver's minutes, since each phase restarts an apiserver with other providers).

Rotation on several nodes runs against real kube-apiservers: tests/realk8s/test_three_nodes.py.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

from tests.support import HsmEnv, Standin, start_plugin, start_standin, wait_until

Keys = Callable[[], tuple[str, str]]


def p11kms(hsm_env: HsmEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p11kms", *args], capture_output=True, text=True, timeout=120,
                          env=hsm_env.process_env())


def _request(api: Standin, method: str, path: str, body: dict[str, object] | None = None) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(api.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_first_enablement_in_phases_on_two_nodes(hsm_env: HsmEnv, etcd: str, tmp_path: Path, new_key: Keys) -> None:
    """Turning encryption on across several kube-apiservers: kms second everywhere, then first, then
    re-encrypt, then identity goes. Restarting a stand-in with other providers is kube-apiserver
    restarted with another EncryptionConfiguration."""
    label, key_uuid = new_key()
    prefix = f"/registry-{uuid.uuid4().hex[:8]}"
    plugins = [start_plugin(hsm_env, hsm_env.write_config(_mkdir(tmp_path / f"n{i}") / "p11kms.cfg", label))
               for i in range(2)]
    apis: list[Standin] = []
    written: dict[str, bytes] = {}

    def serve(index: int, providers: str) -> None:
        if len(apis) > index:
            apis[index].stop()
        api = start_standin(etcd, plugins[index].socket, tmp_path / f"n{index}" / f"api-{providers}", prefix=prefix,
                            providers=providers)
        wait_until(lambda: api.health().get("status") == "ok", 20)
        apis[index:index + 1] = [api]

    def write(index: int) -> None:
        name, value = f"s{len(written)}", uuid.uuid4().bytes
        body: dict[str, object] = {"metadata": {"name": name}, "data": {"v": base64.b64encode(value).decode()}}
        code, text = _request(apis[index], "POST", "/api/v1/namespaces/default/secrets", body)
        assert code == 201, text
        written[name] = value

    def unreadable() -> list[str]:
        failed = []
        for name, value in written.items():
            for index, api in enumerate(apis):
                code, text = _request(api, "GET", f"/api/v1/namespaces/default/secrets/{name}")
                if code != 200 or base64.b64decode(json.loads(text)["data"]["v"]) != value:
                    failed.append(f"{name} via node{index}: {text[:200]}")
        return failed

    try:
        for index in range(2):
            serve(index, "identity")  # before: nothing encrypted
            write(index)
        # The counter-example: kms first on one node while another has no kms provider yet.
        serve(0, "kms,identity")
        write(0)
        assert any("via node1" in f and "encrypted by a kms provider" in f for f in unreadable())
        stray = list(written)[-1]  # roll the counter-example back: remove what node1 cannot read, node0 as before
        assert _request(apis[0], "DELETE", f"/api/v1/namespaces/default/secrets/{stray}")[0] == 200
        del written[stray]
        serve(0, "identity")

        for phase, providers in ((1, "identity,kms"), (2, "kms,identity")):
            for index in range(2):  # node by node, reading everything through both nodes after each restart
                serve(index, providers)
                write(index)
                assert unreadable() == [], f"phase {phase}"
        scan = p11kms(hsm_env, "etcd", "scan", "--endpoints", etcd, "--prefix", prefix, "--require", key_uuid,
                      "--resource", "secrets", "--rewrite-commands")
        assert scan.returncode == 1 and "stored in clear" in scan.stdout
        for command in (line for line in scan.stdout.splitlines() if line.startswith("kubectl get ")):
            assert apis[0].shell(command.replace("replace -f", "replace --validate=false -f")).returncode == 0
        proven = p11kms(hsm_env, "etcd", "scan", "--endpoints", etcd, "--prefix", prefix, "--require", key_uuid,
                        "--resource", "secrets")
        assert proven.returncode == 0, proven.stdout
        for index in range(2):  # phase 3: identity removed, everything still reads
            serve(index, "kms")
            write(index)
            assert unreadable() == []
    finally:
        for api in apis:
            api.stop()
        for plugin in plugins:
            plugin.stop()


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path
