"""Shared test helpers: a real SoftHSM2 token and real plugin processes on real Unix sockets."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from p11kms.kube.client import KmsClient
from p11kms.kube.etcd import EtcdClient, EtcdError

USER_PIN = "test-user-pin-7391"
SO_PIN = "test-so-pin-2204"
TOKEN_LABEL = "p11kms-test"


def unique_label(prefix: str = "kek") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class HsmEnv:
    """Where the test token lives and how a plugin process reaches it."""

    directory: Path
    module: str
    softhsm_conf: Path
    pin_file: Path

    def process_env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["SOFTHSM2_CONF"] = str(self.softhsm_conf)
        env.update(extra)
        return env

    def write_config(self, path: Path, primary: str, secondary: str = "", **attributes: str) -> Path:
        """Writes a plugin config for the test token; ``attributes`` add to or override the defaults."""
        settings = {
            "Primary_key": primary,
            "PKCS11_Module": self.module,
            "Token_Label": TOKEN_LABEL,
            "PIN_File": str(self.pin_file),
            "Socket": str(path.parent / "kms.sock"),
            "Health_Interval": "1",
            "HTTP_Address": "127.0.0.1:0",  # any free port: tests run many plugins at once
        }
        if secondary:
            settings["Secondary_key"] = secondary
        settings.update(attributes)
        path.write_text("".join(f"{name} = {value}\n" for name, value in settings.items()))
        return path


def pkcs11_tool_keygen(env: HsmEnv, label: str, key_type: str = "AES:32", cka_id: str | None = None) -> None:
    """Makes a key with OpenSC's pkcs11-tool, a foreign tool, on the test token.

    pkcs11-tool only takes the PIN as an argument; that is the foreign tool's way, not p11kms's.
    """
    command = ["pkcs11-tool", "--module", env.module, "--token-label", TOKEN_LABEL, "--login", "--pin", USER_PIN,
               "--keygen", "--key-type", key_type, "--label", label]
    if cka_id is not None:
        command += ["--id", cka_id]
    subprocess.run(command, env=env.process_env(), check=True, capture_output=True, timeout=30)


@dataclass
class PluginProcess:
    """A ``p11kms serve`` OS process and the socket it serves on."""

    proc: subprocess.Popen[bytes]
    socket: Path
    log_path: Path
    clients: list[KmsClient] = field(default_factory=list)

    def client(self, timeout: float = 3.0) -> KmsClient:
        client = KmsClient(self.socket, timeout)
        self.clients.append(client)
        return client

    def log(self) -> str:
        return self.log_path.read_text()

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def http_url(self) -> str:
        """``http://HOST:PORT`` of the plugin's HTTP listener, as its start log line says."""
        found = re.search(r'http listening .*?address"?[=:] ?"?([0-9.:]+)', self.log())
        assert found, f"no http listener in the log:\n{self.log()}"
        return f"http://{found.group(1)}"

    def http_get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.http_url() + path, timeout=5) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def healthz(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.http_get("/healthz")[1])
        return document

    def stop(self, timeout: float = 20.0) -> int:
        for client in self.clients:
            client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def start_plugin(env: HsmEnv, config: Path, *, wait: bool = True, cwd: Path | None = None,
                 args: list[str] | None = None, extra_env: dict[str, str] | None = None,
                 wrapper: list[str] | None = None) -> PluginProcess:
    """Starts ``p11kms serve``; ``wrapper`` is a command it runs under (e.g. AS_PID_1)."""
    socket_path = _configured_socket(config)
    log_path = config.parent / f"plugin-{uuid.uuid4().hex[:6]}.log"
    command = [*(wrapper or []), sys.executable, "-m", "p11kms", "serve", *(args or ["--config", str(config)])]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                env=env.process_env(**(extra_env or {})), cwd=cwd)
    plugin = PluginProcess(proc, socket_path, log_path)
    if wait:
        wait_until_serving(plugin)
    return plugin


# Runs the command as PID 1 of a new PID namespace, as in a container (root only). unshare waits for it and
# exits with its status; a signal to unshare is not passed on: signal the plugin itself (inner_pid).
AS_PID_1 = ["unshare", "--pid", "--fork", "--kill-child=SIGTERM"]


def inner_pid(plugin: PluginProcess) -> int:
    """The host pid of the process a wrapper such as AS_PID_1 started (its only child)."""
    pid = plugin.proc.pid
    return int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])


def _configured_socket(config: Path) -> Path:
    for line in config.read_text().splitlines():
        name, _, value = line.partition("=")
        if name.strip().lower() == "socket":
            return config.parent / value.strip()  # relative paths are relative to the config file
    raise AssertionError(f"no Socket in {config}")


def wait_until_serving(plugin: PluginProcess, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    last: grpc.RpcError | None = None
    while time.monotonic() < end:
        if plugin.proc.poll() is not None:
            raise AssertionError(f"plugin exited with {plugin.proc.returncode}:\n{plugin.log()}")
        if plugin.socket.exists():
            try:
                with KmsClient(plugin.socket, 1.0) as client:
                    client.status()
                return
            except grpc.RpcError as exc:
                last = exc
        time.sleep(0.05)
    raise AssertionError(f"plugin did not serve within {deadline}s (last error {last}):\n{plugin.log()}")


def wait_until(condition: Callable[[], bool], seconds: float = 15.0) -> float:
    """Returns how long ``condition`` took to hold; fails the test if it never does."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if condition():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {seconds}s")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class EtcdServer:
    url: str
    proc: subprocess.Popen[bytes]


@contextlib.contextmanager
def running_etcd(directory: Path) -> Iterator[str]:
    """A real etcd server for the block; yields its client URL."""
    server = start_etcd(directory)
    try:
        yield server.url
    finally:
        server.proc.terminate()
        server.proc.wait(20)


def start_etcd(directory: Path, tls: dict[str, Path] | None = None) -> EtcdServer:
    """A real etcd (Debian etcd-server) on loopback with its own data directory; with ``tls``
    (paths from tests.tls_certs.make_pki) it serves HTTPS and requires client certificates."""
    scheme = "https" if tls else "http"
    client, peer = f"{scheme}://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    tls_flags = ["--cert-file", str(tls["server_cert"]), "--key-file", str(tls["server_key"]),
                 "--client-cert-auth", "--trusted-ca-file", str(tls["ca"])] if tls else []
    with (directory / "etcd.log").open("wb") as log:
        proc = subprocess.Popen(
            ["etcd", "--name", "p11kms-test", "--data-dir", str(directory / "data"),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"p11kms-test={peer}", *tls_flags],
            stdout=log, stderr=subprocess.STDOUT)
    credentials = ({"cacert": str(tls["ca"]), "cert": str(tls["client_cert"]), "key": str(tls["client_key"])}
                   if tls else {})
    end = time.monotonic() + 30
    while time.monotonic() < end:
        try:
            EtcdClient([client], timeout=1, **credentials).revision()
            return EtcdServer(client, proc)
        except EtcdError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"etcd did not start:\n{(directory / 'etcd.log').read_text()}")


@dataclass
class Standin:
    """The kube-apiserver stand-in as an OS process, and kubectl pointed at it."""

    proc: subprocess.Popen[str]
    url: str
    home: Path
    prefix: str

    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.home / "kubeconfig"), "HOME": str(self.home)}

    def kubectl(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["kubectl", *args], env=self.env(), input=stdin, capture_output=True,
                              text=True, timeout=60)

    def shell(self, pipeline: str) -> subprocess.CompletedProcess[str]:
        """Runs a command line exactly as an operator types it, pipes included."""
        return subprocess.run(pipeline, shell=True, env=self.env(), capture_output=True, text=True, timeout=120)

    def health(self) -> dict[str, object]:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz/kms-providers", timeout=5) as reply:
                answer: dict[str, object] = json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            answer = json.loads(exc.read())
        return answer

    def wait_for_key_id(self, key_id: str, seconds: float = 20.0) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.health() == {"status": "ok", "key_id": key_id}:
                return
            time.sleep(0.1)
        raise AssertionError(f"stand-in never reached key_id {key_id}: {self.health()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(10)


def start_standin(etcd_url: str, kms_socket: Path, home: Path, *, prefix: str = "/registry",
                  status_interval: float = 0.3, providers: str = "kms,identity") -> Standin:
    home.mkdir(parents=True, exist_ok=True)
    log = (home / "standin.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.standin", "--etcd", etcd_url, "--kms-socket", str(kms_socket),
         "--etcd-prefix", prefix, "--status-interval", str(status_interval),
         "--status-retry-interval", str(status_interval), "--providers", providers],
        stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)  # `-m tests.standin` from the checkout
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    assert url.startswith("http://"), f"stand-in did not start: {(home / 'standin.log').read_text()}"
    (home / "kubeconfig").write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: standin\n  cluster: {{server: \"{url}\"}}\n"
        "users:\n- name: operator\n  user: {}\n"
        "contexts:\n- name: standin\n  context: {cluster: standin, user: operator}\n"
        "current-context: standin\n")
    return Standin(proc, url, home, prefix)


ROOT = Path(__file__).resolve().parent.parent


def build_fault_module(directory: Path) -> Path:
    """Compiles tests/faultmodule/p11fault.c, the fault- and latency-injecting PKCS#11 pass-through."""
    target = directory / "p11fault.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-I/usr/include/p11-kit-1",
                    "-o", str(target), str(ROOT / "tests" / "faultmodule" / "p11fault.c"), "-ldl", "-lpthread"],
                   check=True, capture_output=True, timeout=120)
    return target


def private_module_copy(directory: Path, library: str | Path) -> Path:
    """A copy of a PKCS#11 library at a path of its own.

    dlopen treats it as another library, with its own global state, so a test can finalise and
    initialise it again without touching the module the rest of the test process uses.
    """
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / Path(library).name
    shutil.copy2(library, target)
    return target


class RecordingObserver:
    """An HsmObserver that keeps the name of every PKCS#11 call."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pkcs11_call(self, function: str, seconds: float, rv: int) -> None:
        self.calls.append(function)

    def in_flight(self, delta: int) -> None:
        pass


@dataclass
class FaultControl:
    """Drives a running p11fault module: what it injects, and which calls it saw."""

    module: Path
    control: Path
    calllog: Path

    def env(self, real_module: str) -> dict[str, str]:
        return {"P11FAULT_MODULE": real_module, "P11FAULT_CONTROL": str(self.control),
                "P11FAULT_CALLLOG": str(self.calllog)}

    def set(self, *lines: str) -> None:
        # A new file (not an in-place write) so the module sees a new modification time at once.
        staging = self.control.with_suffix(".new")
        staging.write_text("".join(line + "\n" for line in lines))
        os.replace(staging, self.control)

    def calls(self, function: str) -> int:
        return self.calllog.read_text().split().count(function) if self.calllog.exists() else 0

    def initialize_args(self) -> list[str]:
        """What each C_Initialize was given: "flags=0x..." or "args=NULL", in call order."""
        lines = self.calllog.read_text().split() if self.calllog.exists() else []
        return [line.split(":", 1)[1] for line in lines if line.startswith("C_Initialize:")]


def p11kit_prefix() -> Path:
    """Where scripts/build-p11kit.sh installs p11-kit 0.25 (GCM-capable RPC)."""
    return ROOT / ".cache" / "p11kit"


@dataclass
class RemoteHsm:
    """A `p11-kit server` process exporting a SoftHSM2 token over a Unix socket: a real remote HSM."""

    socket: Path
    client_module: Path
    softhsm_module: str
    token_label: str
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.socket.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [str(p11kit_prefix() / "bin" / "p11-kit"), "server", "-f", "-n", str(self.socket), "--provider",
             self.softhsm_module, f"pkcs11:token={self.token_label}"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)  # its per-client helpers join this process group
        end = time.monotonic() + 10
        while not self.socket.exists() and time.monotonic() < end:
            time.sleep(0.02)
        assert self.socket.exists(), "p11-kit server did not create its socket"

    def kill(self) -> None:
        """Kills the server and every per-connection helper, as a crash of the HSM would."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def client_env(self) -> dict[str, str]:
        return {"P11_KIT_SERVER_ADDRESS": f"unix:path={self.socket}"}


def p11kit_remote(directory: Path, softhsm_module: str, token_label: str, base_env: dict[str, str]) -> RemoteHsm:
    """A remote HSM for ``token_label``, served from ``directory/hsm.sock`` by p11-kit 0.25."""
    clients = sorted(p11kit_prefix().glob("lib*/**/pkcs11/p11-kit-client.so"))
    assert clients, "p11-kit 0.25 is missing: run scripts/build-p11kit.sh (scripts/setup.sh --dev does)"
    server_env = dict(base_env, LD_LIBRARY_PATH=":".join(str(p.parent.parent) for p in clients))
    return RemoteHsm(directory / "hsm.sock", clients[0], softhsm_module, token_label, server_env)


def stock_p11kit_client() -> Path:
    """p11-kit-client.so as released, without the wake-readers fix (see scripts/build-p11kit.sh)."""
    path = p11kit_prefix() / "stock" / "p11-kit-client.so"
    assert path.exists(), "no stock p11-kit client: run scripts/build-p11kit.sh (scripts/setup.sh --dev does)"
    return path


def _receive_exactly(connection: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = connection.recv(count - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


class ReplyCutter:
    """The network between p11-kit-client and `p11-kit server`, able to break in the middle of a reply.

    Relays each client connection to the server's socket. p11-kit's RPC stream is one handshake byte
    each way, then messages of a 12-byte header (code, options length, data length) and their bytes.
    ``cut_next_reply`` makes the relay forward only the header of the next reply that arrives while
    at least one more request of the same connection waits for its reply, then close both sides: a
    connection lost mid-reply with calls in flight, the case that wedges the stock p11-kit client.
    """

    def __init__(self, listen: Path, server: Path) -> None:
        self.listen, self.server = listen, server
        self.cut = threading.Event()
        self._cut_wanted = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(listen))
        self._listener.listen(16)
        threading.Thread(target=self._accept, daemon=True, name="relay").start()

    def cut_next_reply(self) -> None:
        self._cut_wanted.set()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(str(self.server))
            waiting = [0]  # requests relayed that have no reply yet
            lock = threading.Lock()
            threading.Thread(target=self._relay, args=(client, upstream, waiting, lock, False), daemon=True).start()
            threading.Thread(target=self._relay, args=(upstream, client, waiting, lock, True), daemon=True).start()

    def _relay(self, source: socket.socket, sink: socket.socket, waiting: list[int], lock: threading.Lock,
               replies: bool) -> None:
        cut = False
        try:
            sink.sendall(_receive_exactly(source, 1))  # the handshake (protocol version) byte
            while not cut:
                header = _receive_exactly(source, 12)
                options, data = int.from_bytes(header[4:8], "big"), int.from_bytes(header[8:12], "big")
                with lock:
                    waiting[0] += -1 if replies else 1
                    cut = replies and waiting[0] >= 1 and self._cut_wanted.is_set()
                if cut:
                    sink.sendall(header)
                    self._cut_wanted.clear()
                else:
                    sink.sendall(header + _receive_exactly(source, options + data))
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()
        if cut:
            self.cut.set()


def remote_hsm(env: HsmEnv, directory: Path) -> RemoteHsm:
    return p11kit_remote(directory, env.module, TOKEN_LABEL, env.process_env())


def start_fault_plugin(env: HsmEnv, faults: FaultControl, config: Path, primary: str, **attributes: str
                       ) -> PluginProcess:
    """Writes ``config`` for the fault module in front of the test token and starts a plugin on it."""
    env.write_config(config, primary, PKCS11_Module=str(faults.module), **attributes)
    return start_plugin(env, config, extra_env=faults.env(env.module))


def proc_status(pid: int, field: str) -> int:
    """One number from /proc/PID/status (``Threads``, ``VmRSS`` and ``VmHWM`` in KiB, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} line for pid {pid}")


def start_and_join(threads: list[threading.Thread], timeout: float | None = None) -> None:
    """Starts every thread, then waits for each (at most ``timeout`` s apiece): the callers run at once."""
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)


class SetClock:
    """A reading the test sets by hand (a clock, a process's CPU seconds): for rules under test, not the machine."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def thread_count(pid: int) -> int:
    """The number of threads of a process, as the kernel counts them."""
    return proc_status(pid, "Threads")
