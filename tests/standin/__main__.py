"""``python -m tests.standin``: run the kube-apiserver stand-in (tests and demos only)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from p11kms.kube.client import KmsClient
from p11kms.observability import build_logger, log_event
from tests.standin.etcdwrites import WritableEtcd
from tests.standin.http import StandinHttpServer
from tests.standin.kms import HEALTHY_INTERVAL, UNHEALTHY_INTERVAL, KmsEnvelope, StatusPoller
from tests.standin.store import SecretStore


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.standin",
                                     description="kube-apiserver stand-in for KMS v2 tests (not a Kubernetes server)")
    parser.add_argument("--etcd", required=True, help="etcd client URL(s), comma-separated")
    parser.add_argument("--kms-socket", required=True, help="the plugin's Unix socket")
    parser.add_argument("--provider-name", default="p11kms", help="the kms provider name in EncryptionConfiguration")
    parser.add_argument("--etcd-prefix", default="/registry", help="as kube-apiserver's --etcd-prefix")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT for the REST API (port 0: any free)")
    parser.add_argument("--kms-timeout", type=float, default=3.0, help="per-call deadline (kube-apiserver: 3s)")
    parser.add_argument("--status-interval", type=float, default=HEALTHY_INTERVAL)
    parser.add_argument("--status-retry-interval", type=float, default=UNHEALTHY_INTERVAL)
    parser.add_argument("--providers", default="kms,identity",
                        help="the EncryptionConfiguration's providers for secrets, in order: kms and/or identity")
    args = parser.parse_args(argv)
    logger = build_logger("text", "info")

    providers = tuple(p.strip() for p in args.providers.split(","))
    if not providers or not set(providers) <= {"kms", "identity"}:
        parser.error("--providers lists kms and/or identity, e.g. identity,kms")
    kms = KmsEnvelope(KmsClient(args.kms_socket, args.kms_timeout), args.provider_name, providers=providers)
    poller = StatusPoller(kms, args.status_interval, args.status_retry_interval)
    poller.start()
    host, _, port = args.listen.rpartition(":")
    store = SecretStore(WritableEtcd(args.etcd.split(",")), kms, args.etcd_prefix)
    server = StandinHttpServer((host, int(port)), store)
    # shutdown() waits for serve_forever() to return, so it must not run on serve_forever's thread.
    signal.signal(signal.SIGTERM, lambda _s, _f: threading.Thread(target=server.shutdown).start())
    # The first line on stdout is the URL, so a test or script can find the port it got.
    bound_host, bound_port = server.server_address[:2]
    print(f"http://{bound_host!s}:{bound_port}", flush=True)
    log_event(logger, logging.INFO, "kube-apiserver stand-in serving", provider=args.provider_name)
    try:
        server.serve_forever()
    finally:
        poller.stopped.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
