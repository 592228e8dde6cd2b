"""Set-up shared by the benchmark scripts: a private SoftHSM2 token, the fault module, plugin processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]  # the plugin, and the test harness the benchmarks share

from p11kms.hsm.keyident import create_kek  # noqa: E402
from p11kms.hsm.module import load_module  # noqa: E402
from p11kms.hsm.provision import init_token  # noqa: E402
from p11kms.hsm.token import open_token  # noqa: E402
from p11kms.kmsv2 import api_pb2, api_pb2_grpc  # noqa: E402
from p11kms.kube.client import KmsClient  # noqa: E402 - after the path set-up above
from p11kms.ops.devenv import find_softhsm_module, write_softhsm_conf  # noqa: E402
from tests.support import RemoteHsm, p11kit_remote  # noqa: E402

TOKEN, USER_PIN, SO_PIN = "p11kms-bench", "bench-user-pin-1", "bench-so-pin-1"


class NoopServicer(api_pb2_grpc.KeyManagementServiceServicer):
    """The floor: KMS v2 answered with no HSM and no checks (the "ciphertext" is the plaintext after a 0x01)."""

    def Status(self, request: Any, context: Any) -> Any:  # noqa: N802 - named by the .proto
        return api_pb2.StatusResponse(version="v2", healthz="ok", key_id="noop")

    def Encrypt(self, request: Any, context: Any) -> Any:  # noqa: N802
        return api_pb2.EncryptResponse(ciphertext=b"\x01" + request.plaintext, key_id="noop")

    def Decrypt(self, request: Any, context: Any) -> Any:  # noqa: N802
        return api_pb2.DecryptResponse(plaintext=request.ciphertext[1:])


def make_token(directory: Path, labels: tuple[str, ...]) -> tuple[dict[str, str], str, Path]:
    """Creates a token with one KEK per label; returns (process env, SoftHSM module path, PIN file)."""
    conf = write_softhsm_conf(directory)
    os.environ["SOFTHSM2_CONF"] = str(conf)
    softhsm = find_softhsm_module()
    module = load_module(softhsm)
    token = open_token(module, init_token(module, TOKEN, SO_PIN.encode(), USER_PIN.encode()), USER_PIN.encode(), 1)
    for label in labels:
        create_kek(token, label)
    token.close()
    pin = directory / "user.pin"
    pin.write_text(USER_PIN)
    pin.chmod(0o600)
    return dict(os.environ, SOFTHSM2_CONF=str(conf)), softhsm, pin


def remote_hsm(directory: Path, env: dict[str, str], softhsm: str) -> tuple[RemoteHsm, dict[str, str]]:
    """A `p11-kit server` for the bench token, and the plugin environment that reaches it."""
    hsm = p11kit_remote(directory, softhsm, TOKEN, env)
    return hsm, dict(hsm.env, **hsm.client_env())


def write_config(directory: Path, module: str | Path, pin: Path, **extra: str) -> Path:
    settings = {"Primary_key": "bench-kek-1", "PKCS11_Module": str(module), "Token_Label": TOKEN,
                "PIN_File": str(pin), "Socket": str(directory / "kms.sock"), "Health_Interval": "1",
                "HTTP_Address": "127.0.0.1:0", **extra}
    config = directory / "p11kms.cfg"
    config.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
    return config


def start_plugin(config: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    plugin = subprocess.Popen([sys.executable, "-m", "p11kms", "serve", "--config", str(config)], env=env,
                              stdout=subprocess.DEVNULL, stderr=log.open("w"))
    problem = wait_until_healthy(config.parent / "kms.sock", plugin, seconds=60)
    if problem is not None:
        plugin.kill()
        raise SystemExit(f"plugin {problem} after its start: {log.read_text()}")
    return plugin


def wait_until_healthy(socket: Path, process: subprocess.Popen[bytes] | None = None, *, seconds: float = 240.0,
                       poll: float = 0.05) -> str | None:
    """None once Status on ``socket`` says ok; else why not: ``process`` exited, or ``seconds`` passed."""
    give_up_at = time.monotonic() + seconds
    while (answer := healthz(socket)) != "ok":
        if process is not None and process.poll() is not None:
            return f"exited with {process.returncode}"
        if time.monotonic() > give_up_at:
            return f"not healthy within {seconds:g} s (healthz {answer!r})"
        time.sleep(poll)
    return None


def percentile(values: list[float], fraction: float) -> float:
    """The value below which ``fraction`` of ``values`` lie (0.0 for no values)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


def status_key_id(socket: Path) -> str:
    """The key_id Status reports, or "" when the call fails."""
    with KmsClient(socket, timeout=1.0) as client:
        try:
            return client.status().key_id
        except Exception:  # a figure for the report, not an error of the benchmark
            return ""


def healthz(socket: Path) -> str:
    with KmsClient(socket, timeout=1.0) as client:
        try:
            return client.status().healthz
        except Exception as exc:  # a figure for the report, not an error of the benchmark
            return f"status failed: {type(exc).__name__}"
