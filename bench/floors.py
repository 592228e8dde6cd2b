"""What a KMS v2 call costs in gRPC alone, for each way p11kms could serve it.

Drives no-op servicers (no HSM, no checks) with the client of bench/throughput.py and prints, per
server set-up, calls/s, p99 and server CPU per Decrypt at 1 and 16 callers:

- ``p11kms``: the plugin's own set-up (``grpc_serving``: grpcio's sync server, one handler thread per
  HSM session, Status on a thread of its own);
- ``sync-W``: grpcio's sync server on a ThreadPoolExecutor of W workers;
- ``aio``: the ``grpc.aio`` server answering on its event loop;
- ``aio-pool``: the ``grpc.aio`` server handing each call to a thread pool and back, as it would
  have to for a blocking PKCS#11 call.

    python bench/floors.py [--calls 5000] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from concurrent import futures
from dataclasses import asdict
from pathlib import Path
from typing import Any

from _env import NoopServicer
from throughput import run_phase, serve_noop, start_server

SETUPS = ("p11kms", "sync-2", "sync-16", "sync-64", "aio", "aio-pool")
CALLERS = (1, 16)
_POOL_THREADS = 16


def _async_noop(hop: futures.ThreadPoolExecutor | None) -> Any:
    """The floor servicer for grpc.aio; hands Decrypt to the thread pool ``hop`` and back when given."""
    from p11kms.kmsv2 import api_pb2_grpc

    plain = NoopServicer()

    class AsyncNoop(api_pb2_grpc.KeyManagementServiceServicer):
        async def Status(self, request: Any, context: Any) -> Any:  # noqa: N802 - named by the .proto
            return plain.Status(request, context)

        async def Encrypt(self, request: Any, context: Any) -> Any:  # noqa: N802
            return plain.Encrypt(request, context)

        async def Decrypt(self, request: Any, context: Any) -> Any:  # noqa: N802
            if hop is None:
                return plain.Decrypt(request, context)
            return await asyncio.get_running_loop().run_in_executor(hop, plain.Decrypt, request, context)

    return AsyncNoop()


def serve(setup: str, socket: str) -> None:
    import grpc

    from p11kms.kmsv2 import api_pb2_grpc

    if setup == "p11kms":
        serve_noop(socket, sessions=8, max_calls=1024)  # the floor bench/throughput.py measures beside p11kms
        return
    if setup.startswith("sync-"):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=int(setup.split("-")[1])),
                             maximum_concurrent_rpcs=1024)
        api_pb2_grpc.add_KeyManagementServiceServicer_to_server(NoopServicer(), server)  # type: ignore[no-untyped-call]
        server.add_insecure_port(f"unix:{socket}")
        server.start()
        server.wait_for_termination()
        return
    hop = futures.ThreadPoolExecutor(_POOL_THREADS) if setup == "aio-pool" else None
    servicer = _async_noop(hop)

    async def run() -> None:
        server = grpc.aio.server(maximum_concurrent_rpcs=1024)
        api_pb2_grpc.add_KeyManagementServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
        server.add_insecure_port(f"unix:{socket}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=5000, help="calls per phase (default 5000)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--serve", nargs=2, metavar=("SETUP", "SOCKET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(*args.serve)
        return
    directory = Path(tempfile.mkdtemp(prefix="p11kms-floors-"))
    phases = []
    for setup in SETUPS:
        socket = directory / f"{setup}.sock"
        process, _ = start_server([sys.executable, __file__, "--serve", setup, str(socket)], dict(os.environ),
                                  socket, directory / f"{setup}.log")
        try:
            for callers in CALLERS:
                phase = run_phase(setup, process.pid, socket, "Decrypt", callers, args.calls, 1)
                phases.append(asdict(phase))
                print(f"{setup:9} {callers:3} callers: {phase.calls_per_second:8.1f} calls/s  p99 "
                      f"{phase.p99_ms:6.2f} ms  server CPU {phase.server_cpu_us_per_call:6.1f} µs/call")
        finally:
            process.terminate()
            process.wait(30)
    if args.json:
        args.json.write_text(json.dumps({"calls_per_phase": args.calls, "phases": phases}, indent=2))


if __name__ == "__main__":
    main()
