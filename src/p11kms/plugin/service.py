"""The KMS v2 gRPC service: request validation and the one mapping from errors to gRPC codes."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
from p11kms.plugin.keyring import (
    InvalidPlaintext,
    Keyring,
    MalformedCiphertext,
    UnknownKeyId,
    check_ciphertext_size,
    check_plaintext_size,
)

API_VERSION = "v2"
MAX_KEY_ID_BYTES = 1024  # kube-apiserver refuses longer key_ids (spec 2.2)
# The largest valid request is a Decrypt with a 1 KiB ciphertext, a 1 KiB key_id and 32 KiB of
# annotations (spec 2.7); anything past this is refused by gRPC (RESOURCE_EXHAUSTED) before it is parsed.
MAX_MESSAGE_BYTES = 64 * 1024
_NO_DEADLINE = 86400.0  # gRPC reports "no deadline" as centuries left
# `p11kms check` sends one Decrypt with a key_id it made up, to see it refused. That refusal is counted
# in p11kms_check_probes_total and logged at INFO, never as the unknown-key_id error alerts watch for.
CHECK_PROBE_KEY_ID_PREFIX = "p11kms-check-unknown-"
CHECK_PROBE_CODE = grpc.StatusCode.FAILED_PRECONDITION.name  # the one code counted as a probe's answer
_Reply = TypeVar("_Reply")
_Result = TypeVar("_Result")


class ServiceObserver(Protocol):
    def rpc(self, method: str, code: str, seconds: float) -> None:
        """One RPC ended with gRPC status ``code`` after ``seconds``."""

    def decrypted(self, key_uuid: str, role: str) -> None:
        """A Decrypt succeeded with this key (kube-apiserver caches DEK seeds: not a measure of old data)."""

    def check_probe(self, code: str) -> None:
        """The deliberate unknown-key_id Decrypt of `p11kms check` ended with gRPC status ``code``."""


class NullServiceObserver:
    def rpc(self, method: str, code: str, seconds: float) -> None:
        pass

    def decrypted(self, key_uuid: str, role: str) -> None:
        pass

    def check_probe(self, code: str) -> None:
        pass


class KeyringAccess(Protocol):
    """How the service reaches the keys: ``run`` lends the current keyring for one operation."""

    @property
    def key_id(self) -> str: ...

    def run(self, work: Callable[[Keyring], _Result]) -> _Result: ...


class BadRequest(Exception):
    """The request itself is invalid (before any key is touched)."""


class PluginStopping(Exception):
    """The plugin got SIGTERM: calls already accepted are finished, new ones are refused."""


class DeadlineTooClose(Exception):
    """The caller's deadline has passed, or leaves less time than the HSM needs: refused before the HSM."""


class HsmAdmission:
    """Lets a call use the HSM only while it can still finish before its deadline.

    Calls beyond the handler threads (one per HSM session) wait in the handler pool's queue. A call
    whose caller's deadline can no longer be met when it gets its thread would still cost the HSM an
    operation and delay every call behind it: congestion collapse. So a call is admitted only if the
    time it has left covers one operation, estimated from the operations just finished; otherwise it
    is refused at once, in microseconds, while the caller may still hear why.
    """

    _SMOOTHING = 0.2  # weight of the newest operation in the running estimate
    _MARGIN = 1.25  # operations vary: a call that would end just at its deadline likely misses it

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._operation = 0.0  # seconds one HSM operation takes; learned from the calls served
        self._clock = clock
        self._lock = threading.Lock()

    @contextmanager
    def admitted(self, remaining: float | None) -> Iterator[None]:
        """Runs the block if ``remaining`` s (None: no deadline) cover an operation, else raises DeadlineTooClose."""
        if remaining is not None:
            self._refuse_hopeless(remaining, self._operation * self._MARGIN)
        started = self._clock()
        yield
        self._learn(self._clock() - started)  # failed operations say nothing about the pace of good ones

    def _refuse_hopeless(self, remaining: float, needed: float) -> None:
        if remaining <= 0:
            raise DeadlineTooClose("the caller's deadline passed before the call was started")
        if remaining <= needed:
            raise DeadlineTooClose(f"{remaining * 1000:.0f} ms left before the caller's deadline; an HSM "
                                   f"operation takes about {self._operation * 1000:.0f} ms; raise Sessions if "
                                   "the HSM has capacity, or the KMS timeout in the EncryptionConfiguration")

    def _learn(self, seconds: float) -> None:
        with self._lock:
            self._operation += self._SMOOTHING * (seconds - self._operation) if self._operation else seconds


METHODS = ("Status", "Encrypt", "Decrypt")
# Every code an RPC of this service ends with: OK and what status_for gives.
ANSWER_CODES = tuple(code.name for code in (
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL))


def status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """Maps every error the layers below raise to a gRPC status code and a message for the caller."""
    match exc:
        case BadRequest() | MalformedCiphertext() | InvalidPlaintext() | CiphertextRejected():
            return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        case DeadlineTooClose():
            return grpc.StatusCode.DEADLINE_EXCEEDED, f"refused before reaching the HSM: {exc}"
        case UnknownKeyId():
            return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
        case KeyNotUsable() | KeyNotFound():
            return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
        case LoginFailed() | HsmUnavailable() | TokenNotFound() | ModuleLoadError() | PluginStopping():
            return grpc.StatusCode.UNAVAILABLE, str(exc)
        case HsmError():
            return grpc.StatusCode.INTERNAL, f"hsm error: {exc}"
    return grpc.StatusCode.INTERNAL, "unexpected plugin error; see the plugin log"


class KmsService(api_pb2_grpc.KeyManagementServiceServicer):
    """Serves Status, Encrypt and Decrypt from whatever keyring ``keyring()`` returns at call time."""

    def __init__(self, keys: KeyringAccess, health: Callable[[], str], logger: logging.Logger,
                 observer: ServiceObserver | None = None, *, admission: HsmAdmission) -> None:
        self._keys = keys
        self._admission = admission
        self._health = health
        self._log = logger
        self._observer = observer or NullServiceObserver()
        self._is_new_call: Callable[[], bool] | None = None

    def refuse_new_calls(self, is_new_call: Callable[[], bool]) -> None:
        """From now on a call for which ``is_new_call()`` is true is refused with UNAVAILABLE; calls
        accepted before (running or still queued for a thread) are served."""
        self._is_new_call = is_new_call

    def Status(self, request: api_pb2.StatusRequest, context: grpc.ServicerContext) -> api_pb2.StatusResponse:
        return self._answer(context, "Status", "-", lambda: api_pb2.StatusResponse(
            version=API_VERSION, healthz=self._health(), key_id=self._keys.key_id,
        ))

    def Encrypt(self, request: api_pb2.EncryptRequest, context: grpc.ServicerContext) -> api_pb2.EncryptResponse:
        def encrypt() -> api_pb2.EncryptResponse:
            check_plaintext_size(request.plaintext)  # before the call takes an HSM slot
            with self._admission.admitted(_time_left(context)):
                # Ciphertext and key_id come from the same keyring, even if a reload swaps it meanwhile.
                ciphertext, key_id = self._keys.run(lambda keyring: (keyring.encrypt(request.plaintext),
                                                                     keyring.key_id))
            log_event(self._log, logging.DEBUG, "encrypt", uid=request.uid, key_uuid=key_id)
            return api_pb2.EncryptResponse(ciphertext=ciphertext, key_id=key_id)

        return self._answer(context, "Encrypt", request.uid, encrypt)

    def Decrypt(self, request: api_pb2.DecryptRequest, context: grpc.ServicerContext) -> api_pb2.DecryptResponse:
        def decrypt() -> api_pb2.DecryptResponse:
            _check_decrypt_request(request)
            with self._admission.admitted(_time_left(context)):
                plaintext, role = self._keys.run(lambda keyring: (keyring.decrypt(request.ciphertext, request.key_id),
                                                                  keyring.key_for(request.key_id).role.value))
            self._observer.decrypted(request.key_id, role)
            log_event(self._log, logging.DEBUG, "decrypt", uid=request.uid, key_uuid=request.key_id)
            return api_pb2.DecryptResponse(plaintext=plaintext)

        return self._answer(context, "Decrypt", request.uid, decrypt,
                            probe=request.key_id.startswith(CHECK_PROBE_KEY_ID_PREFIX))

    def _answer(self, context: grpc.ServicerContext, method: str, uid: str, work: Callable[[], _Reply],
                probe: bool = False) -> _Reply:
        started = time.perf_counter()
        try:
            if self._is_new_call is not None and self._is_new_call():
                raise PluginStopping("p11kms is stopping (SIGTERM) and takes no new calls; retry once it has "
                                     "restarted")
            reply = work()
        except Exception as exc:
            code, message = status_for(exc)
            if probe and code.name == CHECK_PROBE_CODE:
                self._observer.check_probe(code.name)
                log_event(self._log, logging.INFO, "refused the unknown key_id of a p11kms check probe, as expected",
                          uid=uid or "-", code=code.name)
                context.abort(code, message)
                raise  # unreachable: abort raises
            self._observer.rpc(method, code.name, time.perf_counter() - started)
            serious = code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE) and not isinstance(
                exc, PluginStopping)
            level = logging.ERROR if serious else logging.WARNING
            log_event(self._log, level, "request failed", method=method, uid=uid or "-",
                      code=code.name, error=message)
            if code is grpc.StatusCode.INTERNAL and not isinstance(exc, HsmError):
                self._log.exception("unexpected error in %s", method)
            context.abort(code, message)
            raise  # unreachable: abort raises
        self._observer.rpc(method, grpc.StatusCode.OK.name, time.perf_counter() - started)
        return reply


def _time_left(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE else remaining


def _check_decrypt_request(request: api_pb2.DecryptRequest) -> None:
    if not request.key_id:
        raise BadRequest("key_id is empty; send the key_id that Encrypt returned with this ciphertext")
    key_id_bytes = len(request.key_id.encode())
    if key_id_bytes > MAX_KEY_ID_BYTES:
        raise BadRequest(f"key_id is {key_id_bytes} bytes; KMS v2 key_ids are at most {MAX_KEY_ID_BYTES} bytes "
                         "and p11kms issues 36-byte UUIDs: send the key_id that Encrypt returned")
    check_ciphertext_size(request.ciphertext)
    if request.annotations:
        names = ", ".join(sorted(request.annotations))
        raise BadRequest(
            f"unexpected annotations ({names}): p11kms never returns annotations, so this ciphertext "
            "was not issued by p11kms"
        )
