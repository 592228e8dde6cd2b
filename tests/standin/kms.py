"""The KMS v2 envelope as kube-apiserver runs it: Status polling, seed rotation, the DEK cache."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from p11kms.kube import envelope
from p11kms.kube.apiserver_rules import encrypted_object_problems, key_id_problems, status_problems
from p11kms.kube.client import KmsClient
from tests.standin.seedcrypto import open_data, seal_with_seed

WRITE_STATE_TTL = 180.0  # kube-apiserver's kmsv2PluginWriteDEKSourceMaxTTL: 3 minutes
HEALTHY_INTERVAL = 60.0  # kmsv2PluginHealthzPositiveInterval
UNHEALTHY_INTERVAL = 10.0  # kmsv2PluginHealthzNegativeInterval

log = logging.getLogger("tests.standin")


class KmsUnavailable(Exception):
    """The envelope cannot read or write now; the message is what kube-apiserver would say."""


@dataclass(frozen=True)
class WriteState:
    seed: bytes
    key_id: str
    encrypted_dek_source: bytes
    annotations: dict[str, bytes]
    uid: str
    expires_at: float


class KmsEnvelope:
    def __init__(self, client: KmsClient, provider: str, clock: Callable[[], float] = time.monotonic,
                 providers: tuple[str, ...] = ("kms", "identity")) -> None:
        self.client = client
        self.provider = provider
        # The EncryptionConfiguration's provider list, in order: the first writes, every one reads.
        self.providers = providers
        self._clock = clock
        self._lock = threading.Lock()
        self._state: WriteState | None = None
        self._first_version: str | None = None
        self._decrypted: dict[tuple[object, ...], bytes] = {}
        self.encrypt_calls = 0
        self.decrypt_calls = 0
        self.last_problems: list[str] = ["not probed yet"]

    @property
    def current_key_id(self) -> str | None:
        state = self._state
        return state.key_id if state else None

    def probe(self) -> list[str]:
        """One health probe: Status, then Encrypt of a new seed when the key_id changed."""
        try:
            status = self.client.status()
        except grpc.RpcError as exc:
            return self._record([f"Status failed: {exc.code().name}: {exc.details()}"])
        problems = status_problems(status.version, status.healthz, status.key_id, self._first_version)
        if self._first_version is None and status.version in ("v2", "v2beta1"):
            self._first_version = status.version
        if not key_id_problems(status.key_id):
            problems += self._rotate_if_key_id_changed(status.key_id)
        return self._record(problems)

    def _record(self, problems: list[str]) -> list[str]:
        self.last_problems = problems
        return problems

    def _rotate_if_key_id_changed(self, status_key_id: str) -> list[str]:
        started = self._clock()  # kube-apiserver starts the expiry timer before the network call
        with self._lock:
            state = self._state
            if state is not None and state.key_id == status_key_id and started < state.expires_at:
                self._state = dataclasses.replace(state, expires_at=started + WRITE_STATE_TTL)
                return []
        seed, uid = os.urandom(envelope.SEED_BYTES), str(uuid.uuid4())
        try:
            self.encrypt_calls += 1
            reply = self.client.encrypt(seed, uid=uid)
        except grpc.RpcError as exc:
            return [f"failed to rotate DEK: Encrypt failed: {exc.code().name}: {exc.details()}"]
        annotations = dict(reply.annotations)
        problems = encrypted_object_problems(reply.ciphertext, reply.key_id, annotations)
        if reply.key_id != status_key_id:
            problems.append(f"failed to rotate DEK: Status key_id {status_key_id!r} differs from "
                            f"Encrypt key_id {reply.key_id!r}")
        if problems:
            return problems  # the new seed is thrown away and the old state keeps coasting
        with self._lock:
            self._state = WriteState(seed, reply.key_id, reply.ciphertext, annotations, uid,
                                     started + WRITE_STATE_TTL)
        log.info("new DEK seed", extra={"fields": {"key_id": reply.key_id, "uid": uid}})
        return []

    def seal(self, plaintext: bytes, etcd_key: bytes) -> bytes:
        if self.providers[0] == "identity":
            return plaintext
        state = self._state
        if state is None:
            raise KmsUnavailable("got unexpected nil transformer: the KMS plugin has not answered Status+Encrypt yet")
        if self._clock() >= state.expires_at:
            raise KmsUnavailable(f"encryptedDEKSource with keyID {state.key_id!r} expired: "
                                 "the KMS plugin has been unhealthy for more than 3 minutes")
        return envelope.encode(envelope.Envelope(
            provider=self.provider, key_id=state.key_id, encrypted_dek_source=state.encrypted_dek_source,
            dek_source_type=envelope.TYPE_HKDF_SEED, annotations=state.annotations,
            encrypted_data=seal_with_seed(state.seed, plaintext, etcd_key),
        ))

    def open(self, value: bytes, etcd_key: bytes) -> tuple[bytes, bool]:
        """Returns (plaintext, stale). Stale values are rewritten by an update (spec 2.5, 4.4)."""
        if envelope.value_kind(value) != "kms-v2":
            if "identity" not in self.providers:
                raise KmsUnavailable("the value is stored in clear and no identity provider is configured")
            return value, self.providers[0] != "identity"  # read by a later provider: stale
        if "kms" not in self.providers:
            raise KmsUnavailable("the value is encrypted by a kms provider, and this server has none configured")
        state = self._state
        if state is None:
            raise KmsUnavailable("got unexpected nil transformer: the KMS plugin has not answered Status+Encrypt yet")
        sealed = envelope.decode(value)
        if sealed.provider != self.provider:
            raise KmsUnavailable(f"no KMS provider named {sealed.provider!r} is configured")
        dek_source = self._decrypted.get(sealed.cache_key)
        if dek_source is None:
            try:
                self.decrypt_calls += 1
                dek_source = self.client.decrypt(sealed.encrypted_dek_source, sealed.key_id, sealed.annotations)
            except grpc.RpcError as exc:
                raise KmsUnavailable(f"KMS Decrypt failed: {exc.code().name}: {exc.details()}") from exc
            self._decrypted[sealed.cache_key] = dek_source
        stale = (self.providers[0] != "kms" or sealed.key_id != state.key_id
                 or sealed.dek_source_type != envelope.TYPE_HKDF_SEED)
        return open_data(sealed, dek_source, etcd_key), stale


class StatusPoller(threading.Thread):
    """Probes every ``healthy_interval`` seconds, and every ``unhealthy_interval`` after a failure."""

    def __init__(self, kms: KmsEnvelope, healthy_interval: float = HEALTHY_INTERVAL,
                 unhealthy_interval: float = UNHEALTHY_INTERVAL) -> None:
        super().__init__(daemon=True, name="status-poller")
        self.kms = kms
        self.healthy_interval = healthy_interval
        self.unhealthy_interval = unhealthy_interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            problems = self.kms.probe()
            if problems:
                log.warning("KMS provider unhealthy", extra={"fields": {"problems": "; ".join(problems)}})
            self.stopped.wait(self.unhealthy_interval if problems else self.healthy_interval)
