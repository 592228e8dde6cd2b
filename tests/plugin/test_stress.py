"""64 concurrent callers x 1,000 calls against one plugin process: no error, no wrong answer, no crash.

Callers run in 4 client processes of 16 threads each, so the client side's GIL does
not limit how many calls the plugin sees at once.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from p11kms.kube.client import KmsClient
from tests.support import PluginProcess, start_and_join

CALLER_PROCESSES = 4
CALLERS_PER_PROCESS = 16
CALLS_PER_CALLER = 1000  # alternating Encrypt and Decrypt


@dataclass
class Tally:
    ok: int = 0
    wrong: int = 0
    errors: list[str] = field(default_factory=list)


def _caller_process(socket: str, key_id: str, results: Any) -> None:
    tally = Tally()
    lock = threading.Lock()

    def caller() -> None:
        with KmsClient(socket, timeout=10) as client:
            for _ in range(CALLS_PER_CALLER // 2):
                seed = os.urandom(32)
                try:
                    reply = client.encrypt(seed)
                    right = reply.key_id == key_id and client.decrypt(reply.ciphertext, reply.key_id) == seed
                except Exception as exc:  # counted and reported, never swallowed
                    with lock:
                        tally.errors.append(repr(exc)[:200])
                    continue
                with lock:
                    if right:
                        tally.ok += 2
                    else:
                        tally.wrong += 2

    start_and_join([threading.Thread(target=caller) for _ in range(CALLERS_PER_PROCESS)])
    results.put(tally)


def test_64_callers_x_1000_calls(run_plugin: Callable[..., PluginProcess],
                                 new_key: Callable[[], tuple[str, str]]) -> None:
    label, key_uuid = new_key()
    plugin = run_plugin(label, Sessions="16")
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    started = time.monotonic()
    processes = [context.Process(target=_caller_process, args=(str(plugin.socket), key_uuid, results))
                 for _ in range(CALLER_PROCESSES)]
    for process in processes:
        process.start()
    tallies = [results.get(timeout=600) for _ in processes]
    for process in processes:
        process.join(30)
    elapsed = time.monotonic() - started
    ok = sum(t.ok for t in tallies)
    wrong = sum(t.wrong for t in tallies)
    errors = [e for t in tallies for e in t.errors]
    total = CALLER_PROCESSES * CALLERS_PER_PROCESS * CALLS_PER_CALLER
    print(f"\nstress: {total} calls in {elapsed:.1f}s = {total / elapsed:.0f} calls/s (memory: bench/soak.py)")
    assert errors == [] and wrong == 0 and ok == total
    assert plugin.proc.poll() is None
    assert plugin.client().status().healthz == "ok"
