"""The KMS v2 gRPC service: request validation and the one mapping from errors to gRPC codes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

import grpc

from p11kms.hsm.errors import (
    CiphertextRejected,
    HsmError,
    HsmUnavailable,
    KeyNotFound,
    KeyNotUsable,
    LoginFailed,
    ModuleLoadError,
    TokenNotFound,
)
from p11kms.kmsv2 import api_pb2, api_pb2_grpc
from p11kms.observability import log_event
from p11kms.plugin.keyring import InvalidPlaintext, Keyring, MalformedCiphertext, UnknownKeyId

API_VERSION = "v2"
_Reply = TypeVar("_Reply")
_Result = TypeVar("_Result")


class ServiceObserver(Protocol):
    def rpc(self, method: str, code: str, seconds: float) -> None:
        """One RPC ended with gRPC status ``code`` after ``seconds``."""

    def decrypted(self, key_uuid: str, role: str) -> None:
        """A Decrypt succeeded with this key: shows how much data still uses old keys."""


class NullServiceObserver:
    def rpc(self, method: str, code: str, seconds: float) -> None:
        pass

    def decrypted(self, key_uuid: str, role: str) -> None:
        pass


class KeyringAccess(Protocol):
    """How the service reaches the keys: ``run`` lends the current keyring for one operation."""

    @property
    def key_id(self) -> str: ...

    def run(self, work: Callable[[Keyring], _Result]) -> _Result: ...


class BadRequest(Exception):
    """The request itself is invalid (before any key is touched)."""


def status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """Maps every error the layers below raise to a gRPC status code and a message for the caller."""
    match exc:
        case BadRequest() | MalformedCiphertext() | InvalidPlaintext() | CiphertextRejected():
            return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        case UnknownKeyId():
            return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
        case KeyNotUsable() | KeyNotFound():
            return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
        case LoginFailed() | HsmUnavailable() | TokenNotFound() | ModuleLoadError():
            return grpc.StatusCode.UNAVAILABLE, str(exc)
        case HsmError():
            return grpc.StatusCode.INTERNAL, f"hsm error: {exc}"
    return grpc.StatusCode.INTERNAL, "unexpected plugin error; see the plugin log"


class KmsService(api_pb2_grpc.KeyManagementServiceServicer):
    """Serves Status, Encrypt and Decrypt from whatever keyring ``keyring()`` returns at call time."""

    def __init__(self, keys: KeyringAccess, health: Callable[[], str], logger: logging.Logger,
                 observer: ServiceObserver | None = None) -> None:
        self._keys = keys
        self._health = health
        self._log = logger
        self._observer = observer or NullServiceObserver()

    def Status(self, request: api_pb2.StatusRequest, context: grpc.ServicerContext) -> api_pb2.StatusResponse:
        return self._answer(context, "Status", "-", lambda: api_pb2.StatusResponse(
            version=API_VERSION, healthz=self._health(), key_id=self._keys.key_id,
        ))

    def Encrypt(self, request: api_pb2.EncryptRequest, context: grpc.ServicerContext) -> api_pb2.EncryptResponse:
        def encrypt() -> api_pb2.EncryptResponse:
            # Ciphertext and key_id come from the same keyring, even if a reload swaps it meanwhile.
            ciphertext, key_id = self._keys.run(lambda keyring: (keyring.encrypt(request.plaintext), keyring.key_id))
            log_event(self._log, logging.DEBUG, "encrypt", uid=request.uid, key_uuid=key_id)
            return api_pb2.EncryptResponse(ciphertext=ciphertext, key_id=key_id)

        return self._answer(context, "Encrypt", request.uid, encrypt)

    def Decrypt(self, request: api_pb2.DecryptRequest, context: grpc.ServicerContext) -> api_pb2.DecryptResponse:
        def decrypt() -> api_pb2.DecryptResponse:
            _check_decrypt_request(request)
            plaintext, role = self._keys.run(lambda keyring: (keyring.decrypt(request.ciphertext, request.key_id),
                                                              keyring.key_for(request.key_id).role.value))
            self._observer.decrypted(request.key_id, role)
            log_event(self._log, logging.DEBUG, "decrypt", uid=request.uid, key_uuid=request.key_id)
            return api_pb2.DecryptResponse(plaintext=plaintext)

        return self._answer(context, "Decrypt", request.uid, decrypt)

    def _answer(self, context: grpc.ServicerContext, method: str, uid: str, work: Callable[[], _Reply]) -> _Reply:
        started = time.perf_counter()
        try:
            reply = work()
        except Exception as exc:
            code, message = status_for(exc)
            self._observer.rpc(method, code.name, time.perf_counter() - started)
            serious = code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE)
            level = logging.ERROR if serious else logging.WARNING
            log_event(self._log, level, "request failed", method=method, uid=uid or "-",
                      code=code.name, error=message)
            if code is grpc.StatusCode.INTERNAL and not isinstance(exc, HsmError):
                self._log.exception("unexpected error in %s", method)
            context.abort(code, message)
            raise  # unreachable: abort raises
        self._observer.rpc(method, grpc.StatusCode.OK.name, time.perf_counter() - started)
        return reply


def _check_decrypt_request(request: api_pb2.DecryptRequest) -> None:
    if not request.key_id:
        raise BadRequest("key_id is empty; send the key_id that Encrypt returned with this ciphertext")
    if request.annotations:
        names = ", ".join(sorted(request.annotations))
        raise BadRequest(
            f"unexpected annotations ({names}): p11kms never returns annotations, so this ciphertext "
            "was not issued by p11kms"
        )
