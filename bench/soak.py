"""Load and soak: many concurrent callers against one plugin on a remote HSM that restarts mid-run.

Sets everything up in a temporary directory: a SoftHSM2 token served by `p11-kit server` (a real
remote HSM), a p11kms plugin process using it through p11-kit-client.so, and caller processes
(threads inside) that Encrypt fresh seeds and Decrypt them back. One third of the way in, the
plugin is rotated with SIGHUP (new primary, old key as secondary); two thirds in, the HSM server
is killed and restarted. Prints a table of figures and, last, one JSON line for scripts.

    python bench/soak.py [--callers 256] [--calls 100000] [--processes 4]

Needs scripts/setup.sh --dev (SoftHSM2, and p11-kit 0.25 in .cache/p11kit).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _env import (
    healthz,
    make_token,
    percentile,
    remote_hsm,
    start_plugin,
    status_key_id,
    wait_until_healthy,
    write_config,
)

from tests.support import RemoteHsm, proc_status

PHASE_SECONDS = 240.0  # a third of the calls, or the HSM coming back, takes ~20 s here: beyond this, it is stuck
RESULTS_SECONDS = 60.0  # for the caller processes to report once every call was made


class Stuck(SystemExit):
    """A phase of the soak did not finish in time: a hang to diagnose, not a slow machine."""


def stuck(phase: str, plugin: subprocess.Popen[bytes], log: Path, socket: Path, workers: list[Any],
          hsm: RemoteHsm) -> Stuck:
    """Collects what shows where the plugin hangs (healthz, every thread's stack via SIGUSR1, the log's
    tail), ends every process of the soak, and returns the error to raise."""
    health, exit_code = healthz(socket), plugin.poll()
    if exit_code is None:
        plugin.send_signal(signal.SIGUSR1)  # the plugin writes every thread's stack to its log
        time.sleep(1.0)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-400:])
    for worker in workers:
        worker.kill()
    plugin.kill()
    if hsm.proc is not None:
        hsm.kill()
    return Stuck(f"soak stuck: {phase} (not done within its time); Status healthz: {health!r}; "
                 f"plugin exit code: {exit_code}; plugin log, last lines:\n{tail}")


@dataclass
class Tally:
    """What one caller process saw; sent back to the controller through a queue."""

    ok: int = 0
    wrong: int = 0
    errors: list[tuple[float, str]] = field(default_factory=list)  # (wall-clock time, gRPC code)
    encrypt_ms: list[float] = field(default_factory=list)
    decrypt_ms: list[float] = field(default_factory=list)


def _caller_process(socket: str, threads: int, total: int, counter: Any, results: Any) -> None:
    import grpc

    from p11kms.kube.client import KmsClient

    tally = Tally()
    lock = threading.Lock()

    def caller() -> None:
        def count(n: int) -> None:
            with counter.get_lock():
                counter.value += n

        with KmsClient(socket, timeout=3.0) as client:
            while counter.value < total:
                seed = os.urandom(32)
                try:
                    started = time.perf_counter()
                    reply = client.encrypt(seed)
                    middle = time.perf_counter()
                    plain = client.decrypt(reply.ciphertext, reply.key_id)
                    ended = time.perf_counter()
                except grpc.RpcError as exc:
                    with lock:
                        tally.errors.append((time.time(), exc.code().name))
                    count(1)
                    time.sleep(0.02)
                    continue
                with lock:
                    if plain == seed:
                        tally.ok += 2
                    else:
                        tally.wrong += 2
                    tally.encrypt_ms.append((middle - started) * 1000)
                    tally.decrypt_ms.append((ended - middle) * 1000)
                count(2)

    workers = [threading.Thread(target=caller) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    results.put(tally)


def run(callers: int, calls: int, processes: int) -> dict[str, object]:
    directory = Path(tempfile.mkdtemp(prefix="p11kms-soak-"))
    env, softhsm, pin = make_token(directory, ("bench-kek-1", "bench-kek-2"))
    hsm, env = remote_hsm(directory, env, softhsm)
    hsm.start()
    config = write_config(directory, hsm.client_module, pin, Sessions="16")
    plugin = start_plugin(config, env, directory / "plugin.log")
    rss_before = proc_status(plugin.pid, "VmRSS")
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    counter = context.Value("q", 0)
    threads_per_process = callers // processes
    started = time.time()
    workers = [context.Process(target=_caller_process, args=(str(directory / "kms.sock"), threads_per_process,
                                                             calls, counter, results)) for _ in range(processes)]
    for worker in workers:
        worker.start()

    rss_samples: list[int] = []
    plugin_log = directory / "plugin.log"

    def give_up(phase: str) -> Stuck:
        return stuck(phase, plugin, plugin_log, directory / "kms.sock", workers, hsm)

    def wait_for_calls(done: int) -> None:
        give_up_at = time.monotonic() + PHASE_SECONDS
        while counter.value < done:
            if time.monotonic() > give_up_at:
                raise give_up(f"waiting for {done} calls, {counter.value} made")
            rss_samples.append(proc_status(plugin.pid, "VmRSS"))
            time.sleep(0.05)

    wait_for_calls(calls // 3)
    key_id_before = status_key_id(directory / "kms.sock")
    config.write_text(config.read_text().replace("Primary_key = bench-kek-1",
                                                 "Primary_key = bench-kek-2\nSecondary_key = bench-kek-1"))
    plugin.send_signal(signal.SIGHUP)
    reload_at = time.time()
    wait_for_calls(2 * calls // 3)
    key_id_after = status_key_id(directory / "kms.sock")
    down_at = time.time()
    hsm.kill()
    time.sleep(1.0)
    hsm.start()
    problem = wait_until_healthy(directory / "kms.sock", plugin, seconds=PHASE_SECONDS)
    if problem is not None:
        raise give_up(f"waiting for the plugin to be healthy again after the HSM restart: {problem}")
    up_at = time.time()
    wait_for_calls(calls)
    try:
        tallies = [results.get(timeout=RESULTS_SECONDS) for _ in workers]
    except queue.Empty:
        raise give_up("waiting for every caller process to report") from None
    for worker in workers:
        worker.join()
    elapsed = time.time() - started
    rss_after = proc_status(plugin.pid, "VmRSS")
    alive = plugin.poll() is None
    plugin.send_signal(signal.SIGTERM)
    plugin.wait(30)
    hsm.kill()
    errors = [e for t in tallies for e in t.errors]
    # An error counts as "while down" from the kill until Status was ok again, plus one deadline (3 s)
    # for calls that were already waiting when the HSM came back.
    outside = [e for e in errors if not down_at <= e[0] <= up_at + 3.0]
    encrypt_ms = [v for t in tallies for v in t.encrypt_ms]
    decrypt_ms = [v for t in tallies for v in t.decrypt_ms]
    ok, wrong = sum(t.ok for t in tallies), sum(t.wrong for t in tallies)
    return {
        "callers": callers, "calls": ok + wrong + len(errors), "seconds": round(elapsed, 1),
        "ok": ok, "wrong": wrong, "errors": len(errors), "error_codes": sorted({code for _, code in errors}),
        "errors_outside_hsm_outage": len(outside),
        "reload_at_s": round(reload_at - started, 1),
        "key_id_before_reload": key_id_before, "key_id_after_reload": key_id_after,
        "hsm_down_at_s": round(down_at - started, 1),
        "hsm_outage_s": round(up_at - down_at, 2),
        "encrypt_ms_p50": round(percentile(encrypt_ms, 0.5), 2),
        "encrypt_ms_p99": round(percentile(encrypt_ms, 0.99), 2),
        "decrypt_ms_p50": round(percentile(decrypt_ms, 0.5), 2),
        "decrypt_ms_p99": round(percentile(decrypt_ms, 0.99), 2),
        "rss_kib_before": rss_before, "rss_kib_after": rss_after,
        "rss_kib_first_half_max": max(rss_samples[: len(rss_samples) // 2]),
        "rss_kib_second_half_max": max(rss_samples[len(rss_samples) // 2 :]), "plugin_alive": alive,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--callers", type=int, default=256)
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--processes", type=int, default=4)
    args = parser.parse_args()
    figures = run(args.callers, args.calls, args.processes)
    for name, value in figures.items():
        print(f"{name:<28} {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
