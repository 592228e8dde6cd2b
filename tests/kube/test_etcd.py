"""The etcd JSON-gateway client against a real etcd server."""

from __future__ import annotations

import contextlib
import socket
import threading
import uuid

import pytest

from p11kms.kube.etcd import EtcdClient, EtcdError, prefix_end
from tests.standin.etcdwrites import WritableEtcd


@pytest.fixture
def prefix() -> bytes:
    return f"/p11kms-test-{uuid.uuid4().hex[:8]}/".encode()


def test_prefix_end() -> None:
    assert prefix_end(b"/registry/") == b"/registry0"
    assert prefix_end(b"a\xff") == b"b"


def test_guarded_create_and_update(etcd: str, prefix: bytes) -> None:
    client = WritableEtcd([etcd])
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
    client = WritableEtcd([etcd])
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


def test_a_tls_handshake_closed_without_an_alert_and_no_client_certificate_says_to_pass_one() -> None:
    """etcd without a client certificate sometimes closes the TLS 1.3 connection before its alert is read
    (seen on CI: "EOF occurred in violation of protocol"). A listener that closes every connection at
    once produces that EOF on demand."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def close_each() -> None:
        with contextlib.suppress(OSError):
            while True:
                listener.accept()[0].close()

    threading.Thread(target=close_each, daemon=True).start()
    try:
        with pytest.raises(EtcdError) as caught:
            EtcdClient([f"https://127.0.0.1:{port}"], timeout=2).revision()
    finally:
        listener.close()
    message = str(caught.value)
    assert "requires a client certificate" in message and "--cert" in message and "--key" in message
    assert "closed the TLS connection" in message
