"""Secrets in etcd, written and read through the KMS envelope the way kube-apiserver does."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

from p11kms.kube.etcd import KeyValue
from tests.standin.etcdwrites import WritableEtcd
from tests.standin.kms import KmsEnvelope

Obj = dict[str, Any]


class ApiError(Exception):
    """Becomes a Kubernetes Status object with this HTTP code and reason."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


def _canonical(obj: Obj) -> bytes:
    """The bytes stored for an object: its JSON without the resourceVersion, which etcd's revision carries."""
    stored = json.loads(json.dumps(obj))
    stored.get("metadata", {}).pop("resourceVersion", None)
    return json.dumps(stored, sort_keys=True, separators=(",", ":")).encode()


def _conflict(name: str) -> ApiError:
    return ApiError(409, "Conflict", f'Operation cannot be fulfilled on secrets "{name}": the object has been '
                    "modified; please apply your changes to the latest version and try again")


def _merge_string_data(obj: Obj) -> None:
    """kube-apiserver merges write-only stringData into data and never stores stringData."""
    for key, value in (obj.pop("stringData", None) or {}).items():
        obj.setdefault("data", {})[key] = base64.b64encode(value.encode()).decode()


def _with_version(plaintext: bytes, revision: int) -> Obj:
    obj: Obj = json.loads(plaintext)
    obj["metadata"]["resourceVersion"] = str(revision)
    return obj


class SecretStore:
    def __init__(self, etcd: WritableEtcd, kms: KmsEnvelope, prefix: str = "/registry") -> None:
        self.etcd = etcd
        self.kms = kms
        self.prefix = prefix.rstrip("/")
        self.writes = 0

    def key(self, namespace: str, name: str) -> bytes:
        return f"{self.prefix}/secrets/{namespace}/{name}".encode()

    def create(self, namespace: str, obj: Obj) -> Obj:
        metadata = obj.setdefault("metadata", {})
        name = metadata.get("name")
        if not name:
            raise ApiError(422, "Invalid", "metadata.name is required")
        metadata.update(namespace=namespace, uid=str(uuid.uuid4()),
                        creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        metadata.pop("resourceVersion", None)
        if not obj.get("type"):
            obj["type"] = "Opaque"  # kube-apiserver's default
        obj.update(apiVersion="v1", kind="Secret")
        _merge_string_data(obj)
        key = self.key(namespace, name)
        plaintext = _canonical(obj)
        revision = self.etcd.put_if(key, self.kms.seal(plaintext, key), mod_revision=0)
        if revision is None:
            raise ApiError(409, "AlreadyExists", f'secrets "{name}" already exists')
        self.writes += 1
        return _with_version(plaintext, revision)

    def _read(self, namespace: str, name: str) -> tuple[bytes, KeyValue, bytes, bool]:
        """The etcd key, the stored value, its decrypted bytes and whether it is stale."""
        key = self.key(namespace, name)
        stored = self.etcd.get(key)
        if stored is None:
            raise ApiError(404, "NotFound", f'secrets "{name}" not found')
        plaintext, stale = self.kms.open(stored.value, key)
        return key, stored, plaintext, stale

    def get(self, namespace: str, name: str) -> Obj:
        _, stored, plaintext, _ = self._read(namespace, name)
        return _with_version(plaintext, stored.mod_revision)

    def list(self, namespace: str | None) -> tuple[list[Obj], int]:
        prefix = f"{self.prefix}/secrets/" + (f"{namespace}/" if namespace else "")
        revision = self.etcd.revision()
        items = []
        for page in self.etcd.scan_prefix(prefix.encode(), revision=revision):
            for kv in page:
                plaintext, _ = self.kms.open(kv.value, kv.key)
                items.append(_with_version(plaintext, kv.mod_revision))
        return items, revision

    def replace(self, namespace: str, name: str, obj: Obj) -> Obj:
        key, stored, old_plaintext, stale = self._read(namespace, name)
        wanted = obj.get("metadata", {}).get("resourceVersion")
        if wanted and int(wanted) != stored.mod_revision:
            raise _conflict(name)
        old = json.loads(old_plaintext)
        # Server-owned fields keep their stored values, as in kube-apiserver.
        for field in ("uid", "creationTimestamp", "namespace", "name"):
            obj.setdefault("metadata", {})[field] = old["metadata"].get(field)
        obj.update(apiVersion="v1", kind="Secret")
        _merge_string_data(obj)
        plaintext = _canonical(obj)
        if plaintext == old_plaintext and not stale:
            return _with_version(old_plaintext, stored.mod_revision)  # nothing to rewrite (spec 4.4)
        revision = self.etcd.put_if(key, self.kms.seal(plaintext, key), mod_revision=stored.mod_revision)
        if revision is None:
            raise _conflict(name)
        self.writes += 1
        return _with_version(plaintext, revision)

    def delete(self, namespace: str, name: str) -> Obj:
        key, stored, plaintext, _ = self._read(namespace, name)
        if not self.etcd.delete_if(key, mod_revision=stored.mod_revision):
            raise _conflict(name)
        return _with_version(plaintext, stored.mod_revision)
