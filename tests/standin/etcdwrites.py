"""Guarded etcd writes, for the kube-apiserver stand-in and the tests that store values as kube-apiserver does.

p11kms itself only reads etcd, so the writes are not in the shipped client.
"""

from __future__ import annotations

from p11kms.kube.etcd import EtcdClient, _b64


class WritableEtcd(EtcdClient):
    """The read-only client plus compare-and-swap puts and deletes (etcd transactions)."""

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
