"""A deliberately broken KMS v2 plugin, served over real gRPC on a real Unix socket.

This is a fake on purpose: it produces answers p11kms itself can never give
(Encrypt's key_id differing from Status, a flipping version, annotations that
are not FQDNs, identical ciphertexts), so the tests can prove that `p11kms check`
and the kube-apiserver stand-in catch them as kube-apiserver would.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from p11kms.kmsv2 import api_pb2, api_pb2_grpc


@dataclass
class Behaviour:
    status_key_id: str = "key-a"
    encrypt_key_id: str = "key-a"
    versions: list[str] = field(default_factory=lambda: ["v2"])
    healthz: str = "ok"
    annotations: dict[str, bytes] = field(default_factory=dict)
    constant_ciphertext: bool = False
    status_calls: int = 0
    encrypt_calls: int = 0


class MisbehavingKms(api_pb2_grpc.KeyManagementServiceServicer):
    def __init__(self, behaviour: Behaviour) -> None:
        self.b = behaviour

    def Status(self, request: api_pb2.StatusRequest, context: grpc.ServicerContext) -> api_pb2.StatusResponse:
        version = self.b.versions[min(self.b.status_calls, len(self.b.versions) - 1)]
        self.b.status_calls += 1
        return api_pb2.StatusResponse(version=version, healthz=self.b.healthz, key_id=self.b.status_key_id)

    def Encrypt(self, request: api_pb2.EncryptRequest, context: grpc.ServicerContext) -> api_pb2.EncryptResponse:
        self.b.encrypt_calls += 1
        # "Wrapping" by reversal: no secrecy needed in a fake, only a reversible transform.
        body = request.plaintext[::-1] if not self.b.constant_ciphertext else b"same"
        return api_pb2.EncryptResponse(ciphertext=body, key_id=self.b.encrypt_key_id,
                                       annotations=self.b.annotations)

    def Decrypt(self, request: api_pb2.DecryptRequest, context: grpc.ServicerContext) -> api_pb2.DecryptResponse:
        return api_pb2.DecryptResponse(plaintext=request.ciphertext[::-1])


@contextmanager
def serve_misbehaving(socket: Path, behaviour: Behaviour) -> Iterator[Behaviour]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    api_pb2_grpc.add_KeyManagementServiceServicer_to_server(MisbehavingKms(behaviour), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"unix:{socket}")
    server.start()
    try:
        yield behaviour
    finally:
        server.stop(None)
