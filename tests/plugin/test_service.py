"""The KMS v2 service over a real Unix socket, served by a real plugin process on SoftHSM2."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial

import grpc
import pytest

from p11kms.plugin.keyring import MAX_CIPHERTEXT_BYTES, MAX_PLAINTEXT_BYTES
from tests.support import PluginProcess

Keys = Callable[[], tuple[str, str]]
Run = Callable[..., PluginProcess]


@pytest.fixture
def plugin(run_plugin: Run, new_key: Keys) -> PluginProcess:
    label, _ = new_key()
    return run_plugin(label)


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_status_reports_v2_ok_and_the_primary_uuid(run_plugin: Run, new_key: Keys) -> None:
    label, key_uuid = new_key()
    plugin = run_plugin(label)
    status = plugin.client().status()
    assert (status.version, status.healthz, status.key_id) == ("v2", "ok", key_uuid)


def test_round_trip_of_a_32_byte_seed_with_matching_key_ids(plugin: PluginProcess) -> None:
    client = plugin.client()
    seed = os.urandom(32)
    reply = client.encrypt(seed)
    assert reply.key_id == client.status().key_id
    assert dict(reply.annotations) == {}
    assert 0 < len(reply.ciphertext) <= MAX_CIPHERTEXT_BYTES
    assert seed not in reply.ciphertext
    assert client.decrypt(reply.ciphertext, reply.key_id) == seed


def test_encrypt_gives_distinct_ciphertexts_for_the_same_plaintext(plugin: PluginProcess) -> None:
    client = plugin.client()
    first, second = client.encrypt(b"s" * 32), client.encrypt(b"s" * 32)
    assert first.ciphertext != second.ciphertext


def test_unknown_key_id_is_refused_with_the_configured_uuids(plugin: PluginProcess) -> None:
    client = plugin.client()
    reply = client.encrypt(os.urandom(32))
    error = rpc_error(lambda: client.decrypt(reply.ciphertext, "0d9a3e43-0000-4000-8000-000000000000"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reply.key_id in (error.details() or "")
    assert "still present in the HSM" in (error.details() or "")


@pytest.mark.parametrize("position", [0, 1, 13, 20, -1])
def test_tampered_ciphertext_is_invalid_argument_never_a_wrong_plaintext(plugin: PluginProcess,
                                                                         position: int) -> None:
    client = plugin.client()
    reply = client.encrypt(os.urandom(32))
    tampered = bytearray(reply.ciphertext)
    tampered[position] ^= 0x40
    error = rpc_error(lambda: client.decrypt(bytes(tampered), reply.key_id))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.details() or ""
    assert "format byte" in details if position == 0 else "failed authentication" in details


@pytest.mark.parametrize("length", [0, 1, 13, 29, 60])
def test_truncated_ciphertext_is_invalid_argument(plugin: PluginProcess, length: int) -> None:
    client = plugin.client()
    reply = client.encrypt(os.urandom(32))
    error = rpc_error(lambda: client.decrypt(reply.ciphertext[:length], reply.key_id))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_ciphertext_is_bound_to_its_key_id(run_plugin: Run, new_key: Keys) -> None:
    """The same bytes presented with another configured key's id must not open."""
    old_label, old_uuid = new_key()
    new_label, new_uuid = new_key()
    client = run_plugin(new_label, old_label).client()
    reply = client.encrypt(os.urandom(32))
    assert reply.key_id == new_uuid
    error = rpc_error(lambda: client.decrypt(reply.ciphertext, old_uuid))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_plaintext_size_limits(plugin: PluginProcess) -> None:
    client = plugin.client()
    largest = client.encrypt(os.urandom(MAX_PLAINTEXT_BYTES))
    assert len(largest.ciphertext) == MAX_CIPHERTEXT_BYTES
    for bad in (b"", os.urandom(MAX_PLAINTEXT_BYTES + 1)):
        error = rpc_error(partial(client.encrypt, bad))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "plaintext" in (error.details() or "")


def test_oversized_ciphertext_and_empty_key_id_are_invalid_argument(plugin: PluginProcess) -> None:
    client = plugin.client()
    key_id = client.status().key_id
    oversized = rpc_error(lambda: client.decrypt(b"\x01" + os.urandom(MAX_CIPHERTEXT_BYTES), key_id))
    assert oversized.code() == grpc.StatusCode.INVALID_ARGUMENT
    empty_id = rpc_error(lambda: client.decrypt(client.encrypt(b"k" * 32).ciphertext, ""))
    assert empty_id.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "key_id is empty" in (empty_id.details() or "")


def test_annotations_on_decrypt_are_refused(plugin: PluginProcess) -> None:
    client = plugin.client()
    reply = client.encrypt(os.urandom(32))
    error = rpc_error(lambda: client.decrypt(reply.ciphertext, reply.key_id, {"a.example.io": b"1"}))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_payloads_and_pin_never_reach_the_log_even_at_debug(run_plugin: Run, new_key: Keys) -> None:
    from tests.support import USER_PIN

    label, _ = new_key()
    plugin = run_plugin(label, Log_Level="debug")
    client = plugin.client()
    secret = os.urandom(32)
    reply = client.encrypt(secret, uid="uid-encrypt-1")
    client.decrypt(reply.ciphertext, reply.key_id, uid="uid-decrypt-1")
    plugin.stop()
    log = plugin.log()
    assert "uid-encrypt-1" in log and "uid-decrypt-1" in log  # debug lines are there
    for forbidden in (secret.hex(), reply.ciphertext.hex(), USER_PIN):
        assert forbidden not in log
