"""A small etcd v3 client over etcd's JSON gateway (``/v3/kv/...``), with optional client TLS.

etcd serves this gateway on its client URLs by default (3.4 and later), so the
scanner can read a real cluster's etcd with the same endpoints and certificates
etcdctl uses. Only what p11kms needs is here: paged range reads at one revision,
and guarded writes for the kube-apiserver stand-in.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


class EtcdError(Exception):
    """etcd could not be reached or refused the request."""


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key that starts with ``prefix``."""
    trimmed = prefix.rstrip(b"\xff")
    return trimmed[:-1] + bytes([trimmed[-1] + 1]) if trimmed else b"\x00"


def _kv(raw: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=base64.b64decode(raw["key"]),
        value=base64.b64decode(raw.get("value", "")),
        mod_revision=int(raw.get("mod_revision", 0)),
        create_revision=int(raw.get("create_revision", 0)),
    )


class EtcdClient:
    def __init__(self, endpoints: list[str], *, cacert: str | None = None, cert: str | None = None,
                 key: str | None = None, timeout: float = 10.0) -> None:
        if not endpoints:
            raise EtcdError("no etcd endpoint given")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self._tls: ssl.SSLContext | None = None
        if any(e.startswith("https://") for e in self.endpoints):
            self._tls = ssl.create_default_context(cafile=cacert)
            if cert:
                self._tls.load_cert_chain(cert, key)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        failures = []
        for endpoint in self.endpoints:
            request = urllib.request.Request(f"{endpoint}/v3/{path}", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout, context=self._tls) as reply:
                    answer: dict[str, Any] = json.loads(reply.read())
                    return answer
            except urllib.error.HTTPError as exc:
                raise EtcdError(f"etcd {endpoint} refused {path}: {exc.code} {exc.read()[:300]!r}") from exc
            except (urllib.error.URLError, OSError) as exc:
                failures.append(f"{endpoint}: {getattr(exc, 'reason', exc)}")
        raise EtcdError("no etcd endpoint answered: " + "; ".join(failures))

    def get(self, key: bytes) -> KeyValue | None:
        kvs = self._post("kv/range", {"key": _b64(key)}).get("kvs", [])
        return _kv(kvs[0]) if kvs else None

    def revision(self) -> int:
        return int(self._post("kv/range", {"key": _b64(b"\x00"), "limit": 1})["header"]["revision"])

    def scan_prefix(self, prefix: bytes, page_size: int = 500, revision: int | None = None,
                    keys_only: bool = False) -> Iterator[list[KeyValue]]:
        """Yields pages of keys under ``prefix``, all read at one revision (a consistent snapshot)."""
        end = prefix_end(prefix)
        start = prefix
        revision = revision or self.revision()
        while True:
            body: dict[str, Any] = {"key": _b64(start), "range_end": _b64(end), "limit": page_size,
                                    "revision": revision}
            if keys_only:
                body["keys_only"] = True
            answer = self._post("kv/range", body)
            page = [_kv(raw) for raw in answer.get("kvs", [])]
            if page:
                yield page
            if not answer.get("more") or not page:
                return
            start = page[-1].key + b"\x00"

    def put_if(self, key: bytes, value: bytes, *, mod_revision: int) -> int | None:
        """Writes ``value`` if the key's mod revision is still ``mod_revision`` (0: must not exist).

        Returns the new revision, or None when the guard failed (someone else wrote first).
        """
        if mod_revision == 0:
            compare = {"key": _b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": "0"}
        else:
            compare = {"key": _b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": str(mod_revision)}
        answer = self._post("kv/txn", {
            "compare": [compare],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(value)}}],
        })
        return int(answer["header"]["revision"]) if answer.get("succeeded") else None

    def delete_if(self, key: bytes, *, mod_revision: int) -> bool:
        answer = self._post("kv/txn", {
            "compare": [{"key": _b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": str(mod_revision)}],
            "success": [{"request_delete_range": {"key": _b64(key)}}],
        })
        return bool(answer.get("succeeded"))
