"""A KMS v2 client that dials the plugin the way kube-apiserver does (spec 2.1).

Used by ``p11kms status`` and by the tests: Unix socket, no TLS, ``:authority``
forced to ``localhost``, a deadline on every call and a fresh UUID as ``uid``.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from types import TracebackType

import grpc

from p11kms.kmsv2 import api_pb2, api_pb2_grpc

DEFAULT_TIMEOUT = 3.0  # kube-apiserver's default per-call timeout


class KmsClient:
    def __init__(self, socket_path: str | Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout
        self._channel = grpc.insecure_channel(
            f"unix:{socket_path}", options=[("grpc.default_authority", "localhost")]
        )
        self._stub = api_pb2_grpc.KeyManagementServiceStub(self._channel)  # type: ignore[no-untyped-call]

    def status(self) -> api_pb2.StatusResponse:
        response: api_pb2.StatusResponse = self._stub.Status(api_pb2.StatusRequest(), timeout=self.timeout)
        return response

    def encrypt(self, plaintext: bytes, uid: str | None = None) -> api_pb2.EncryptResponse:
        request = api_pb2.EncryptRequest(plaintext=plaintext, uid=uid or str(uuid.uuid4()))
        response: api_pb2.EncryptResponse = self._stub.Encrypt(request, timeout=self.timeout)
        return response

    def decrypt(self, ciphertext: bytes, key_id: str, annotations: dict[str, bytes] | None = None,
                uid: str | None = None) -> bytes:
        request = api_pb2.DecryptRequest(ciphertext=ciphertext, key_id=key_id, annotations=annotations or {},
                                         uid=uid or str(uuid.uuid4()))
        response: api_pb2.DecryptResponse = self._stub.Decrypt(request, timeout=self.timeout)
        return response.plaintext

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> KmsClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
