"""Throughput beside its own floor: p11kms against a no-op servicer on the same gRPC server set-up.

Starts the plugin on a fresh SoftHSM2 token and, in the same run, a no-op KMS v2 servicer built with
exactly the plugin's gRPC server factory (same server class, executor and options), then drives both
with the same client: one HTTP/2 connection per client process, a 3 s deadline and a UUID uid per
call, at 1, 16 and 64 callers, Encrypt then Decrypt (every Decrypt's plaintext is checked). For each
phase it reports calls/s, p50/p99/max latency and server CPU per call (from /proc/PID/stat), each with
its ratio to the floor. A third server, the same set-up answering straight from a keyring on the token,
splits each call's server CPU into the gRPC floor, the HSM operation as it costs inside a busy serving
process, and p11kms's own layers. Then peak RSS, time from process start to the first good Status, Status p99
while Decrypt runs at 16 callers, and the raw in-process HSM operation cost (no gRPC).

    python bench/throughput.py [--calls 10000] [--hsm-latency-ms N] [--client-processes P] [--json FILE]

With --hsm-latency-ms the plugin reaches SoftHSM2 through the fault module, which adds N ms to every
PKCS#11 call it wraps, as a network HSM would. The client's own CPU per call is printed too: if the
client saturates first, give it more processes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _env import TOKEN, USER_PIN, NoopServicer, make_token, percentile, wait_until_healthy, write_config

from tests.support import proc_status, start_and_join

if TYPE_CHECKING:
    from p11kms.plugin.keyring import Keyring

CALLERS = (1, 16, 64)
SEED = bytes(range(32))
_TICKS = os.sysconf("SC_CLK_TCK")


def open_bench_keyring(module_path: str, sessions: int) -> Keyring:
    """The keyring the plugin builds on the bench token (its one key as primary), with ``sessions`` work sessions."""
    from p11kms.hsm.module import load_module
    from p11kms.hsm.token import open_token
    from p11kms.plugin.keyring import build_keyring

    module = load_module(module_path)
    token = open_token(module, module.find_token(label=TOKEN, serial=None, slot=None), USER_PIN.encode(), sessions)
    return build_keyring(token, "bench-kek-1", [])


# -- the floor: a servicer that does no work ----------------------------------------------------
def serve_on_plugin_set_up(servicer: Any, socket: str, sessions: int, max_calls: int) -> None:
    """Serves ``servicer`` the way `p11kms serve` does: with its gRPC server factory."""
    from p11kms.plugin.server import grpc_serving

    serving = grpc_serving(servicer, sessions, max_calls)
    serving.server.add_insecure_port(f"unix:{socket}")
    serving.server.start()
    serving.server.wait_for_termination()


def serve_noop(socket: str, sessions: int, max_calls: int) -> None:
    """Serves KMS v2 with no HSM and no checks, on the plugin's own gRPC server set-up."""
    serve_on_plugin_set_up(NoopServicer(), socket, sessions, max_calls)


def serve_keyring(socket: str, module_path: str, sessions: int, max_calls: int) -> None:
    """The floor plus the HSM: each call goes straight to a keyring on the bench token, on the plugin's own
    gRPC server factory, with none of the plugin's layers (admission, supervisor, metrics, logging, checks).
    What p11kms costs above this server is what its own layers cost; what this server costs above the
    no-op one is the HSM operation as it costs inside a busy serving process."""
    from p11kms.kmsv2 import api_pb2, api_pb2_grpc

    keyring = open_bench_keyring(module_path, sessions)

    class KeyringServicer(api_pb2_grpc.KeyManagementServiceServicer):
        def Status(self, request: Any, context: Any) -> Any:  # noqa: N802 - named by the .proto
            return api_pb2.StatusResponse(version="v2", healthz="ok", key_id=keyring.key_id)

        def Encrypt(self, request: Any, context: Any) -> Any:  # noqa: N802
            return api_pb2.EncryptResponse(ciphertext=keyring.encrypt(request.plaintext), key_id=keyring.key_id)

        def Decrypt(self, request: Any, context: Any) -> Any:  # noqa: N802
            return api_pb2.DecryptResponse(plaintext=keyring.decrypt(request.ciphertext, request.key_id))

    serve_on_plugin_set_up(KeyringServicer(), socket, sessions, max_calls)


# -- the client -------------------------------------------------------------------------------------
def _drive(socket: str, method: str, threads: int, calls: int, results: Any) -> None:
    """One client process: ``threads`` callers over one connection, ``calls`` calls in all."""
    import grpc

    from p11kms.kube.client import KmsClient

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    with KmsClient(Path(socket), timeout=3.0) as client:
        sealed = client.encrypt(SEED)
        ciphertext, key_id = sealed.ciphertext, sealed.key_id
        counter = iter(range(calls))
        cpu_before, began = time.process_time(), time.time()

        def caller() -> None:
            mine: list[float] = []
            for _ in counter:
                started = time.perf_counter()
                try:
                    if method == "Encrypt":
                        client.encrypt(SEED)  # the client sends a fresh UUID uid per call
                    elif client.decrypt(ciphertext, key_id) != SEED:
                        errors.append("wrong plaintext")
                except grpc.RpcError as exc:
                    errors.append(exc.code().name)
                mine.append(time.perf_counter() - started)
            with lock:
                latencies.extend(mine)

        start_and_join([threading.Thread(target=caller) for _ in range(threads)])
        results.put((latencies, errors, time.process_time() - cpu_before, began, time.time()))


@dataclass
class Phase:
    server: str
    method: str
    callers: int
    calls: int
    seconds: float
    calls_per_second: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_us_per_call: float
    client_cpu_us_per_call: float
    errors: int


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime


def run_phase(server: str, pid: int, socket: Path, method: str, callers: int, calls: int,
              processes: int) -> Phase:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = min(processes, callers)
    cpu_before = _cpu_seconds(pid)
    workers = [context.Process(target=_drive, args=(str(socket), method, callers // processes,
                                                    calls // processes, results)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    collected = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
    # From the first call to the last answer: process start-up and connecting are not the server's time.
    seconds = max(part[4] for part in collected) - min(part[3] for part in collected)
    server_cpu = _cpu_seconds(pid) - cpu_before
    latencies = [value for part in collected for value in part[0]]
    done = len(latencies)
    return Phase(server, method, callers, done, round(seconds, 2), round(done / seconds, 1),
                 round(percentile(latencies, 0.5) * 1000, 2), round(percentile(latencies, 0.99) * 1000, 2),
                 round(max(latencies) * 1000, 2), round(server_cpu / done * 1e6, 1),
                 round(sum(part[2] for part in collected) / done * 1e6, 1),
                 sum(len(part[1]) for part in collected))


def status_p99_during_decrypts(pid: int, socket: Path, calls: int, processes: int) -> float:
    """Status latency p99 (ms) sampled every 10 ms while Decrypt runs at 16 callers."""
    from p11kms.kube.client import KmsClient

    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        with KmsClient(socket, timeout=3.0) as client:
            while not stop.is_set():
                started = time.perf_counter()
                client.status()
                samples.append(time.perf_counter() - started)
                time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    run_phase("status-probe", pid, socket, "Decrypt", 16, calls, processes)
    stop.set()
    sampler.join()
    return round(percentile(samples, 0.99) * 1000, 2)


# -- servers -----------------------------------------------------------------------------------------
def _wait_ready(process: subprocess.Popen[bytes], socket: Path, started: float) -> float:
    problem = wait_until_healthy(socket, process, poll=0.005)
    if problem is not None:
        raise SystemExit(f"server {problem}")
    return time.monotonic() - started


def start_server(command: list[str], env: dict[str, str], socket: Path, log: Path) -> tuple[subprocess.Popen[bytes],
                                                                                             float]:
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    return process, _wait_ready(process, socket, started)


def hsm_operation_cost(env: dict[str, str], softhsm: str, rounds: int = 2000) -> dict[str, float]:
    """CPU microseconds per Encrypt and per Decrypt of the keyring in this process: no gRPC, one thread."""
    os.environ["SOFTHSM2_CONF"] = env["SOFTHSM2_CONF"]
    keyring = open_bench_keyring(softhsm, 1)
    sealed = keyring.encrypt(SEED)
    started = time.process_time()
    for _ in range(rounds):
        keyring.encrypt(SEED)
    encrypt = (time.process_time() - started) / rounds
    started = time.process_time()
    for _ in range(rounds):
        keyring.decrypt(sealed, keyring.key_id)
    decrypt = (time.process_time() - started) / rounds
    keyring.token.close()
    return {"encrypt_us": round(encrypt * 1e6, 1), "decrypt_us": round(decrypt * 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=10_000, help="calls per phase (default 10000)")
    parser.add_argument("--hsm-latency-ms", type=int, default=0, help="added to every PKCS#11 call (fault module)")
    parser.add_argument("--client-processes", type=int, default=1, help="client processes, one connection each")
    parser.add_argument("--sessions", type=int, default=8, help="plugin Sessions (the floor uses the same)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--serve-noop", metavar="SOCKET", help=argparse.SUPPRESS)
    parser.add_argument("--serve-keyring", nargs=2, metavar=("SOCKET", "MODULE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_noop:
        serve_noop(args.serve_noop, args.sessions, 1024)
        return
    if args.serve_keyring:
        keyring_socket, module_path = args.serve_keyring
        serve_keyring(keyring_socket, module_path, args.sessions, 1024)
        return
    report = measure(args.calls, args.hsm_latency_ms, args.client_processes, args.sessions)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


def measure(calls: int, latency_ms: int, processes: int, sessions: int) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(prefix="p11kms-throughput-"))
    env, softhsm, pin = make_token(directory, ("bench-kek-1",))
    module: str = softhsm
    if latency_ms:
        from tests.support import FaultControl, build_fault_module

        faults = FaultControl(build_fault_module(directory), directory / "fault.control", directory / "fault.calls")
        # No call log: appending a line per call would cost more than the latency being measured.
        env = dict(env, P11FAULT_MODULE=softhsm, P11FAULT_CONTROL=str(faults.control))
        module = str(faults.module)
    config = write_config(directory, module, pin, Sessions=str(sessions), Health_Interval="10")
    noop_socket = directory / "noop.sock"
    plugin, plugin_ready = start_server([sys.executable, "-m", "p11kms", "serve", "--config", str(config)], env,
                                        directory / "kms.sock", directory / "plugin.log")
    noop, noop_ready = start_server([sys.executable, __file__, "--serve-noop", str(noop_socket),
                                     "--sessions", str(sessions)], env, noop_socket, directory / "noop.log")
    keyring_socket = directory / "keyring.sock"
    keyring, _ = start_server([sys.executable, __file__, "--serve-keyring", str(keyring_socket), module,
                               "--sessions", str(sessions)], env, keyring_socket, directory / "keyring.log")
    if latency_ms:
        faults.set(f"latency_ms {latency_ms}")
    servers = (("noop", noop, noop_socket), ("keyring", keyring, keyring_socket),
               ("p11kms", plugin, directory / "kms.sock"))
    try:
        phases = [asdict(run_phase(name, server.pid, socket, method, callers, calls, processes))
                  for callers in CALLERS for method in ("Encrypt", "Decrypt") for name, server, socket in servers]
        status_p99 = {"p11kms": status_p99_during_decrypts(plugin.pid, directory / "kms.sock", calls, processes),
                      "noop": status_p99_during_decrypts(noop.pid, noop_socket, calls, processes)}
        rss = {"p11kms": proc_status(plugin.pid, "VmHWM"), "noop": proc_status(noop.pid, "VmHWM")}
    finally:
        for server in (plugin, noop, keyring):
            server.terminate()
            server.wait(30)
    report = {
        "calls_per_phase": calls, "hsm_latency_ms": latency_ms, "client_processes": processes,
        "sessions": sessions, "cpu_count": os.cpu_count(), "phases": phases,
        "ready_seconds": {"p11kms": round(plugin_ready, 3), "noop": round(noop_ready, 3)},
        "status_p99_ms_during_16_caller_decrypts": status_p99, "peak_rss_kib": rss,
        "hsm_operation_cpu": hsm_operation_cost(env, softhsm),
        "bench_process_max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    report["cost_split"] = cost_split(report)
    return report


def _cell(phase: dict[str, Any], base: dict[str, Any], name: str, width: int) -> str:
    """A figure with its ratio to the floor's."""
    ratio = phase[name] / base[name] if base[name] else float("nan")
    return f"{phase[name]} ({ratio:.2f}x)".rjust(width)


def cost_split(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Server CPU per call split three ways, per method and callers: the gRPC floor (no-op servicer), the
    HSM operation inside a serving process (keyring-only server minus the floor), and p11kms's own
    layers (p11kms minus the keyring-only server)."""
    cpu = {(p["server"], p["method"], p["callers"]): p["server_cpu_us_per_call"] for p in report["phases"]}
    return [{"method": method, "callers": callers, "grpc_floor_us": cpu[("noop", method, callers)],
             "hsm_in_server_us": round(cpu[("keyring", method, callers)] - cpu[("noop", method, callers)], 1),
             "p11kms_layers_us": round(cpu[("p11kms", method, callers)] - cpu[("keyring", method, callers)], 1)}
            for server, method, callers in cpu if server == "p11kms"]


def print_report(report: dict[str, Any]) -> None:
    floor = {(p["method"], p["callers"]): p for p in report["phases"] if p["server"] == "noop"}
    print(f"{'method':<8} {'callers':>7} {'calls/s':>16} {'p50 ms':>14} {'p99 ms':>14} {'max ms':>9} "
          f"{'server CPU/call µs':>22} {'client CPU µs':>13} {'errors':>6}")
    for phase in (p for p in report["phases"] if p["server"] == "p11kms"):
        base = floor[(phase["method"], phase["callers"])]
        print(f"{phase['method']:<8} {phase['callers']:>7} {_cell(phase, base, 'calls_per_second', 16)} "
              f"{_cell(phase, base, 'p50_ms', 14)} {_cell(phase, base, 'p99_ms', 14)} {phase['max_ms']:>9} "
              f"{_cell(phase, base, 'server_cpu_us_per_call', 22)} "
              f"{phase['client_cpu_us_per_call']:>13} {phase['errors']:>6}")
    for server, title in (("noop", "floor (no-op servicer, same gRPC server set-up)"),
                          ("keyring", "floor + HSM (keyring called straight from the handler, same set-up)")):
        print(f"{title}:")
        for base in (p for p in report["phases"] if p["server"] == server):
            print(f"  {base['method']:<8} {base['callers']:>3} callers: {base['calls_per_second']} calls/s, "
                  f"p99 {base['p99_ms']} ms, server CPU {base['server_cpu_us_per_call']} µs/call, "
                  f"errors {base['errors']}")
    print("server CPU per call, split (µs): gRPC floor + HSM operation in a serving process + p11kms's own layers")
    for part in report["cost_split"]:
        print(f"  {part['method']:<8} {part['callers']:>3} callers: {part['grpc_floor_us']} + "
              f"{part['hsm_in_server_us']} + {part['p11kms_layers_us']}")
    print(f"ready after start: {report['ready_seconds']}; peak RSS KiB: {report['peak_rss_kib']}; "
          f"Status p99 during 16-caller Decrypts (ms): {report['status_p99_ms_during_16_caller_decrypts']}; "
          f"in-process HSM CPU per operation (one thread, no gRPC): {report['hsm_operation_cpu']}")


if __name__ == "__main__":
    main()
