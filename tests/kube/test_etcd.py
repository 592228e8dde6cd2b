"""The etcd JSON-gateway client against a real etcd server."""

from __future__ import annotations

import uuid

import pytest

from p11kms.kube.etcd import EtcdClient, EtcdError, prefix_end


@pytest.fixture
def prefix() -> bytes:
    return f"/p11kms-test-{uuid.uuid4().hex[:8]}/".encode()


def test_prefix_end() -> None:
    assert prefix_end(b"/registry/") == b"/registry0"
    assert prefix_end(b"a\xff") == b"b"


def test_guarded_create_and_update(etcd: str, prefix: bytes) -> None:
    client = EtcdClient([etcd])
    key = prefix + b"k"
    first = client.put_if(key, b"v1", mod_revision=0)
    assert first is not None
    assert client.put_if(key, b"again", mod_revision=0) is None  # already exists
    assert client.put_if(key, b"v2", mod_revision=first - 1) is None  # stale revision
    second = client.put_if(key, b"v2", mod_revision=first)
    assert second is not None
    stored = client.get(key)
    assert stored is not None and (stored.value, stored.mod_revision, stored.create_revision) == (b"v2", second, first)
    assert client.delete_if(key, mod_revision=second) and client.get(key) is None


def test_paged_scan_sees_one_consistent_revision(etcd: str, prefix: bytes) -> None:
    client = EtcdClient([etcd])
    for index in range(7):
        client.put_if(prefix + f"{index:02d}".encode(), b"x", mod_revision=0)
    revision = client.revision()
    client.put_if(prefix + b"99-after", b"x", mod_revision=0)  # written after the snapshot
    pages = list(client.scan_prefix(prefix, page_size=3, revision=revision))
    assert [len(page) for page in pages] == [3, 3, 1]
    assert [kv.key for page in pages for kv in page] == [prefix + f"{i:02d}".encode() for i in range(7)]


def test_unreachable_endpoints_are_named() -> None:
    with pytest.raises(EtcdError, match=r"127\.0\.0\.1:1"):
        EtcdClient(["http://127.0.0.1:1"], timeout=1).revision()
