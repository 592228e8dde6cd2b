"""``p11kms cluster status`` over real plugin processes, by HTTP endpoint and by Unix socket."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import grpc
import pytest

from tests.support import HsmEnv, PluginProcess

Keys = Callable[[], tuple[str, str]]
Run = Callable[..., PluginProcess]


def cluster_status(hsm_env: HsmEnv, *endpoints: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p11kms", "cluster", "status", "--endpoints", ",".join(endpoints)],
                          capture_output=True, text=True, timeout=60, env=hsm_env.process_env())


def test_a_primary_another_node_cannot_decrypt_fails_and_names_the_fix(hsm_env: HsmEnv, run_plugin: Run,
                                                                       new_key: Keys) -> None:
    old_label, old_uuid = new_key()
    new_label, new_uuid = new_key()
    behind = run_plugin(old_label, config_name="behind.cfg")  # has not staged the new key
    ahead = run_plugin(new_label, old_label, config_name="ahead.cfg")  # promoted it already
    for endpoints in ((behind.http_url(), ahead.http_url()), (str(behind.socket), str(ahead.socket))):
        result = cluster_status(hsm_env, *endpoints)
        assert result.returncode == 1, result.stdout
        assert "WARNING: nodes disagree on the primary key" in result.stdout
        named = new_label if endpoints[0].startswith("http") else new_uuid  # a socket shows no labels
        assert f"FAIL: {endpoints[0]} cannot decrypt the primary key {named} ({new_uuid})" in result.stdout
        assert "stage that key there now (p11kms rotate stage" in result.stdout
        assert f"{endpoints[1]} cannot decrypt" not in result.stdout  # ahead still reads what behind writes
    http = cluster_status(hsm_env, behind.http_url(), ahead.http_url()).stdout
    assert f"primary {new_label} ({new_uuid})" in http and f"decrypt-only: {old_label} ({old_uuid})" in http
    assert "config generation" in http


def test_every_node_decrypting_every_primary_passes_with_a_warning(hsm_env: HsmEnv, run_plugin: Run,
                                                                   new_key: Keys) -> None:
    old_label, _ = new_key()
    new_label, _ = new_key()
    staged = run_plugin(old_label, new_label, config_name="staged.cfg")
    promoted = run_plugin(new_label, old_label, config_name="promoted.cfg")
    for endpoints in ((staged.http_url(), promoted.http_url()), (str(staged.socket), str(promoted.socket))):
        result = cluster_status(hsm_env, *endpoints)
        assert result.returncode == 0, result.stdout
        assert "WARNING: nodes disagree" in result.stdout and "OK: each of the 2 nodes" in result.stdout
    # A socket does not list its keys, and an HTTP endpoint cannot Encrypt: that pair proves nothing.
    mixed = cluster_status(hsm_env, str(staged.socket), promoted.http_url())
    assert mixed.returncode == 1 and f"UNPROVEN: whether {staged.socket} decrypts" in mixed.stdout


def test_an_unreachable_node_proves_nothing(hsm_env: HsmEnv, run_plugin: Run, new_key: Keys) -> None:
    label, _ = new_key()
    plugin = run_plugin(label)
    result = cluster_status(hsm_env, plugin.http_url(), "/nonexistent/kms.sock")
    assert result.returncode == 1
    assert "UNREACHABLE" in result.stdout and "nothing is proven" in result.stdout


def test_a_node_that_has_not_staged_the_key_says_so(run_plugin: Run, new_key: Keys) -> None:
    """A Decrypt under a key that is in the HSM but not in this node's config names the key and the fix."""
    old_label, _ = new_key()
    new_label, new_uuid = new_key()
    behind = run_plugin(old_label, config_name="behind.cfg")
    ahead = run_plugin(new_label, old_label, config_name="ahead.cfg")
    wrapped = ahead.client().encrypt(b"n" * 32)
    with pytest.raises(grpc.RpcError) as caught:
        behind.client().decrypt(wrapped.ciphertext, wrapped.key_id)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (f"key_id {new_uuid} is the key {new_label!r}, which exists in the HSM but is not in this node's config: "
            f"stage it (p11kms rotate stage {new_label}") in (caught.value.details() or "")
    with pytest.raises(grpc.RpcError) as unknown:  # a key_id no HSM key has: the old message
        behind.client().decrypt(wrapped.ciphertext, "00000000-0000-4000-8000-000000000000")
    assert "is not a configured key" in (unknown.value.details() or "")
