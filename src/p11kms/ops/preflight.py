"""``p11kms check``: call a plugin the way kube-apiserver does and apply every check it applies."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable

import grpc

from p11kms.kmsv2 import api_pb2
from p11kms.kube.apiserver_rules import encrypted_object_problems, status_problems
from p11kms.kube.client import KmsClient
from p11kms.ops.checks import Check, verdict
from p11kms.plugin.service import CHECK_PROBE_KEY_ID_PREFIX

# Latency targets from the Kubernetes KMS docs (spec 2.4); advisory, since load and network vary.
ENCRYPT_TARGET_S = 0.100
DECRYPT_TARGET_S = 0.010


def _timed(call: Callable[[], object]) -> tuple[object, float]:
    started = time.perf_counter()
    result = call()
    return result, time.perf_counter() - started


def run_checks(client: KmsClient) -> list[Check]:
    checks: list[Check] = []
    try:
        status = client.status()
        again = client.status()
    except grpc.RpcError as exc:
        return [Check("status.call", False, client.explain(exc))]
    checks.append(Check("status.call", True, f"version={status.version} key_id={status.key_id}"))
    checks.append(verdict("status.fields", status_problems(status.version, status.healthz, status.key_id),
                           "healthz 'ok', version accepted, key_id valid"))
    checks.append(verdict("status.version_stable",
                           status_problems(again.version, "ok", again.key_id, first_version=status.version),
                           "same version on a second call"))
    seed = os.urandom(32)
    try:
        reply, encrypt_s = _timed(lambda: client.encrypt(seed, uid=str(uuid.uuid4())))
        second = client.encrypt(os.urandom(32), uid=str(uuid.uuid4()))
    except grpc.RpcError as exc:
        return [*checks, Check("encrypt.call", False, client.explain(exc))]
    assert isinstance(reply, api_pb2.EncryptResponse)
    annotations = dict(reply.annotations)
    checks += [
        Check("encrypt.call", True, f"{len(reply.ciphertext)}-byte ciphertext in {encrypt_s * 1000:.1f} ms"),
        verdict("encrypt.response", encrypted_object_problems(reply.ciphertext, reply.key_id, annotations),
                 "ciphertext and key_id within 1 KiB, annotations valid"),
        verdict("encrypt.key_id_matches_status",
                 [] if reply.key_id == status.key_id else
                 [f"Encrypt key_id {reply.key_id!r} differs from Status key_id {status.key_id!r}: kube-apiserver "
                  "would throw the new DEK away and report the plugin unhealthy"],
                 "Encrypt key_id equals Status key_id"),
        verdict("encrypt.distinct_outputs",
                 [] if (reply.ciphertext, reply.key_id) != (second.ciphertext, second.key_id) else
                 ["two different plaintexts gave identical Encrypt output; kube-apiserver's DEK cache "
                  "needs distinct outputs for distinct plaintexts"],
                 "distinct plaintexts give distinct outputs"),
        Check("encrypt.latency", encrypt_s <= ENCRYPT_TARGET_S,
              f"{encrypt_s * 1000:.1f} ms (target under {ENCRYPT_TARGET_S * 1000:.0f} ms)", advisory=True),
    ]
    checks += _decrypt_checks(client, reply, annotations, seed)
    return checks


def _decrypt_checks(client: KmsClient, reply: api_pb2.EncryptResponse, annotations: dict[str, bytes],
                    seed: bytes) -> list[Check]:
    try:
        plaintext, decrypt_s = _timed(lambda: client.decrypt(reply.ciphertext, reply.key_id, annotations))
    except grpc.RpcError as exc:
        return [Check("decrypt.round_trip", False, client.explain(exc))]
    checks = [
        Check("decrypt.round_trip", plaintext == seed,
              "Decrypt returned the seed" if plaintext == seed else "Decrypt returned different bytes"),
        Check("decrypt.latency", decrypt_s <= DECRYPT_TARGET_S,
              f"{decrypt_s * 1000:.1f} ms (target under {DECRYPT_TARGET_S * 1000:.0f} ms)", advisory=True),
    ]
    unknown = CHECK_PROBE_KEY_ID_PREFIX + uuid.uuid4().hex  # counted apart from real requests by the plugin
    try:
        client.decrypt(reply.ciphertext, unknown, annotations)
        checks.append(Check("decrypt.refuses_unknown_key_id", False, "Decrypt accepted a key_id it never issued"))
    except grpc.RpcError as exc:
        checks.append(Check("decrypt.refuses_unknown_key_id", True, f"refused with {exc.code().name}"))
    return checks
