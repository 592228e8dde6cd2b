"""The stand-in's KMS envelope behaves like kube-apiserver's (spec 2.2-2.5)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from p11kms.kube import envelope
from p11kms.kube.client import KmsClient
from tests.misbehaving import Behaviour, serve_misbehaving
from tests.standin.kms import WRITE_STATE_TTL, KmsEnvelope, KmsUnavailable
from tests.support import PluginProcess, SetClock

KEY = b"/registry/secrets/default/s"



def test_encrypt_is_called_only_when_the_key_id_changes(tmp_path: Path) -> None:
    behaviour = Behaviour()
    with serve_misbehaving(tmp_path / "k.sock", behaviour), KmsClient(tmp_path / "k.sock") as client:
        kms = KmsEnvelope(client, "p11kms")
        for _ in range(5):
            assert kms.probe() == []
        assert behaviour.encrypt_calls == 1
        behaviour.status_key_id = behaviour.encrypt_key_id = "key-2"
        assert kms.probe() == []
        assert behaviour.encrypt_calls == 2 and kms.current_key_id == "key-2"


def test_mismatched_encrypt_key_id_is_thrown_away_and_the_old_state_coasts(tmp_path: Path) -> None:
    behaviour = Behaviour()
    with serve_misbehaving(tmp_path / "k.sock", behaviour), KmsClient(tmp_path / "k.sock") as client:
        kms = KmsEnvelope(client, "p11kms")
        assert kms.probe() == []
        written = kms.seal(b"obj", KEY)
        behaviour.status_key_id, behaviour.encrypt_key_id = "key-2", "key-3"
        problems = kms.probe()
        assert any("differs from Encrypt key_id" in p for p in problems)
        assert kms.current_key_id == "key-a"  # coasting on the old seed
        assert kms.open(written, KEY) == (b"obj", False)


def test_writes_expire_three_minutes_after_the_last_good_probe(tmp_path: Path) -> None:
    behaviour, clock = Behaviour(), SetClock(1000.0)
    with serve_misbehaving(tmp_path / "k.sock", behaviour), KmsClient(tmp_path / "k.sock") as client:
        kms = KmsEnvelope(client, "p11kms", clock=clock)
        with pytest.raises(KmsUnavailable, match="nil transformer"):
            kms.open(b"k8s:enc:kms:v2:p11kms:x", KEY)  # before the first probe even reads fail
        kms.probe()
        clock.now += WRITE_STATE_TTL - 1
        stored = kms.seal(b"obj", KEY)
        clock.now += 1
        with pytest.raises(KmsUnavailable, match="expired"):
            kms.seal(b"obj", KEY)
        assert kms.open(stored, KEY)[0] == b"obj"  # reads keep working


def test_decrypt_is_cached_per_encrypted_dek_source(run_plugin: Callable[..., PluginProcess],
                                                    new_key: Callable[[], tuple[str, str]]) -> None:
    plugin = run_plugin(new_key()[0])
    with KmsClient(plugin.socket) as client:
        writer = KmsEnvelope(client, "p11kms")
        writer.probe()
        values = [writer.seal(os.urandom(20), KEY) for _ in range(10)]
        reader = KmsEnvelope(client, "p11kms")  # a second apiserver replica, cold cache
        reader.probe()
        for value in values:
            reader.open(value, KEY)
        assert reader.decrypt_calls == 1  # one seed for all ten objects
        other_replica_value = reader.seal(b"x", KEY)
        writer.open(other_replica_value, KEY)
        assert writer.decrypt_calls == 1


def test_stale_when_written_under_another_key_id(tmp_path: Path) -> None:
    behaviour = Behaviour()
    with serve_misbehaving(tmp_path / "k.sock", behaviour), KmsClient(tmp_path / "k.sock") as client:
        kms = KmsEnvelope(client, "p11kms")
        kms.probe()
        old = kms.seal(b"obj", KEY)
        behaviour.status_key_id = behaviour.encrypt_key_id = "key-2"
        kms.probe()
        assert kms.open(old, KEY) == (b"obj", True)
        assert kms.open(kms.seal(b"obj", KEY), KEY) == (b"obj", False)
        assert kms.open(b"k8s\x00plain", KEY) == (b"k8s\x00plain", True)  # identity is always stale
        assert envelope.decode(old).key_id == "key-a"
