"""The supervisor in this process, on a private SoftHSM2 instance: races with reconnects, reloads
that must not adopt restart-only settings, and keys that go missing.

Each test loads its own copy of the SoftHSM2 library (tests.support.private_module_copy), so it can
finalise and initialise the module, as a reconnect does, without disturbing the token the rest of
the test session uses.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from p11kms.config import PluginConfig, load_config
from p11kms.hsm.errors import HsmUnavailable, KeyNotFound
from p11kms.hsm.token import Token
from p11kms.plugin.keyring import KeyMissing, Keyring, UnknownKeyId, build_keyring
from p11kms.plugin.supervisor import HsmState, KeyringSupervisor, UnconfiguredKey, _Gate
from tests.support import HsmEnv, RecordingObserver, private_module_copy, unique_label, wait_until

Keys = Callable[[], tuple[str, str]]


@pytest.fixture
def private_config(hsm_env: HsmEnv, tmp_path: Path) -> Callable[..., PluginConfig]:
    module = private_module_copy(tmp_path / "softhsm", hsm_env.module)

    def write(primary: str, secondary: str = "", name: str = "p11kms.cfg", **attributes: str) -> PluginConfig:
        path = hsm_env.write_config(tmp_path / name, primary, secondary, PKCS11_Module=str(module), **attributes)
        return load_config(path)

    return write


@pytest.fixture
def supervisors() -> Iterator[list[KeyringSupervisor]]:
    started: list[KeyringSupervisor] = []
    yield started
    for supervisor in started:
        supervisor.stop()


def start(config: PluginConfig, started: list[KeyringSupervisor],
          on_stuck: Callable[[str], None] | None = None) -> KeyringSupervisor:
    supervisor = KeyringSupervisor(config, logging.getLogger("test-supervisor"), retry_initial=0.05, pin_poll=0.2,
                                   on_stuck=on_stuck)
    supervisor.start()
    started.append(supervisor)
    return supervisor


def fail_like_a_dead_device(supervisor: KeyringSupervisor) -> None:
    """A request whose HSM call failed as a dead device fails: the supervisor starts a reconnect."""
    def dead(_keyring: Keyring) -> None:
        raise HsmUnavailable("C_Encrypt failed: CKR_DEVICE_ERROR (0x30)", ckr=0x30)

    with pytest.raises(HsmUnavailable):
        supervisor.run(dead)


class HeldBackGate:
    """Wraps the supervisor's gate and holds the next request back just before it enters.

    This forces the interleaving of the defect: a request has decided which keyring to use, a
    reconnect then closes that keyring's token and opens a new one, and only then does the
    request enter the gate.
    """

    def __init__(self, real: _Gate) -> None:
        self._real = real
        self.arrived = threading.Event()
        self.release = threading.Event()
        self._armed = True

    def shared(self, timeout: float | None = None) -> AbstractContextManager[bool]:
        if self._armed:
            self._armed = False
            self.arrived.set()
            self.release.wait(20)
        return self._real.shared(timeout) if timeout is not None else self._real.shared()

    def exclusive(self, timeout: float | None = None) -> AbstractContextManager[bool]:
        return self._real.exclusive(timeout) if timeout is not None else self._real.exclusive()


class HeldBackBuild:
    """Wraps the supervisor's keyring build and holds the first build made on the thread named ``thread``.

    The HSM stays real; this only forces the interleaving of a race: that thread has read the config it
    builds from, and another path (a reload) runs before its keyring is installed.
    """

    def __init__(self, supervisor: KeyringSupervisor, thread: str) -> None:
        self._real = supervisor._build_keyring
        self._thread = thread
        self.arrived = threading.Event()
        self.release = threading.Event()
        supervisor._build_keyring = self  # type: ignore[method-assign]

    def __call__(self, token: Token, config: PluginConfig) -> Keyring:
        if threading.current_thread().name == self._thread and not self.arrived.is_set():
            self.arrived.set()
            assert self.release.wait(20)
        return self._real(token, config)


def test_a_refresh_racing_a_reload_never_undoes_it(
        private_config: Callable[..., PluginConfig], new_key: Keys, token: Token,
        supervisors: list[KeyringSupervisor]) -> None:
    (primary, primary_uuid), (old_label, old_uuid), (new_label, new_uuid) = new_key(), new_key(), new_key()
    sealed_under_old = build_keyring(token, old_label, []).encrypt(b"o" * 32)
    supervisor = start(private_config(primary, old_label), supervisors)
    held = HeldBackBuild(supervisor, thread="refresh")
    token.destroy_object(token.find_one_secret_key(old_label))  # its handle goes stale: a Decrypt refreshes
    outcome: list[BaseException] = []

    def decrypt_under_the_deleted_key() -> None:
        try:
            supervisor.run(lambda k: k.decrypt(sealed_under_old, old_uuid))
        except KeyMissing as exc:  # the refresh found it gone, as it is
            outcome.append(exc)

    refresh = threading.Thread(target=decrypt_under_the_deleted_key, name="refresh", daemon=True)
    refresh.start()
    assert held.arrived.wait(10)
    # `rotate promote` while the refresh is under way: the new key encrypts, the old primary decrypts.
    promoted = private_config(new_label, primary, name="promoted.cfg")
    reload = threading.Thread(target=supervisor.reload, args=(promoted,), name="reload", daemon=True)
    reload.start()
    reload.join(2)  # the reload goes first, or waits for the refresh; either way it must be the one that stays
    held.release.set()
    for thread in (refresh, reload):
        thread.join(10)
        assert not thread.is_alive()
    assert len(outcome) == 1
    assert supervisor.key_id == new_uuid != primary_uuid
    keyring = supervisor.current_keyring()
    assert keyring is not None and keyring.primary.label == new_label
    assert [k.label for k in keyring.secondaries] == [primary]
    assert supervisor.run(lambda k: k.encrypt(b"n" * 32)) is not None
    assert supervisor.run(lambda k: k.key_id) == new_uuid


def test_a_reload_during_a_reconnect_is_applied_by_the_reconnect(
        private_config: Callable[..., PluginConfig], new_key: Keys, supervisors: list[KeyringSupervisor]) -> None:
    (old_label, _), (new_label, new_uuid) = new_key(), new_key()
    supervisor = start(private_config(old_label), supervisors)
    held = HeldBackBuild(supervisor, thread="hsm-recovery")
    fail_like_a_dead_device(supervisor)
    assert held.arrived.wait(10)  # the reconnect holds the gate and has read the config it builds from
    # Refused at the gate after GATE_WAIT_SECONDS, this reload used to be reported as failed, and the
    # config watch, having recorded the file, never tried it again.
    assert supervisor.reload(private_config(new_label, old_label, name="promoted.cfg")) is None
    held.release.set()
    wait_until(lambda: supervisor.state is HsmState.READY and supervisor.key_id == new_uuid)
    keyring = supervisor.current_keyring()
    assert keyring is not None and keyring.primary.label == new_label
    assert [k.label for k in keyring.secondaries] == [old_label]


def test_a_request_racing_a_reconnect_uses_the_new_token_and_never_blocks(
        private_config: Callable[..., PluginConfig], new_key: Keys, supervisors: list[KeyringSupervisor]) -> None:
    supervisor = start(private_config(new_key()[0]), supervisors)
    gate = HeldBackGate(supervisor._gate)
    supervisor._gate = gate  # type: ignore[assignment]
    outcome: list[object] = []

    def late_request() -> None:
        try:
            outcome.append(supervisor.run(lambda keyring: keyring.encrypt(b"r" * 32)))
        except Exception as exc:
            outcome.append(exc)

    request = threading.Thread(target=late_request, daemon=True)
    request.start()
    assert gate.arrived.wait(5)
    fail_like_a_dead_device(supervisor)
    wait_until(lambda: supervisor.reconnects >= 1 and supervisor.state is HsmState.READY)
    gate.release.set()
    request.join(10)
    assert not request.is_alive(), "the request blocked for ever on the closed token's session pool"
    assert len(outcome) == 1 and isinstance(outcome[0], bytes), outcome
    stopping = threading.Thread(target=supervisor.stop, daemon=True)
    stopping.start()
    stopping.join(10)
    assert not stopping.is_alive(), "stop() hung"


def test_a_reload_never_adopts_settings_that_need_a_restart(
        private_config: Callable[..., PluginConfig], new_key: Keys, supervisors: list[KeyringSupervisor],
        tmp_path: Path) -> None:
    label = new_key()[0]
    supervisor = start(private_config(label), supervisors)
    wrong_pin = tmp_path / "other.pin"
    wrong_pin.write_text("not-the-pin-7\n")
    wrong_pin.chmod(0o600)
    edited = private_config(label, name="edited.cfg", PIN_File=str(wrong_pin), Sessions="3")
    assert supervisor.reload(edited) is not None
    fail_like_a_dead_device(supervisor)
    wait_until(lambda: supervisor.reconnects >= 1 and supervisor.state is not HsmState.RECOVERING)
    # The reconnect used the PIN source the plugin started with, not the edited one.
    assert supervisor.state is HsmState.READY, supervisor.unready_reason()
    keyring = supervisor.current_keyring()
    assert keyring is not None
    assert keyring.decrypt(keyring.encrypt(b"k" * 32), keyring.key_id) == b"k" * 32


def test_a_missing_secondary_at_start_leaves_the_primary_serving(
        private_config: Callable[..., PluginConfig], new_key: Keys, supervisors: list[KeyringSupervisor]) -> None:
    absent = unique_label("restored-later")
    supervisor = start(private_config(new_key()[0], absent), supervisors)
    assert supervisor.state is HsmState.READY
    keyring = supervisor.current_keyring()
    assert keyring is not None and [m.label for m in keyring.missing] == [absent]
    assert supervisor.run(lambda k: k.decrypt(k.encrypt(b"p" * 32), k.key_id)) == b"p" * 32


def test_a_missing_primary_at_start_names_role_file_line_and_fix(
        private_config: Callable[..., PluginConfig], supervisors: list[KeyringSupervisor]) -> None:
    absent = unique_label("typo")
    config = private_config(absent)
    with pytest.raises(KeyNotFound) as caught:
        start(config, supervisors)
    message = str(caught.value)
    assert f"primary key {absent!r}" in message
    assert f"{config.path}:1" in message and "p11kms keys create" in message


def test_a_secondary_deleted_at_runtime_refuses_only_its_decrypts(
        private_config: Callable[..., PluginConfig], new_key: Keys, token: Token,
        supervisors: list[KeyringSupervisor]) -> None:
    primary, (old_label, old_uuid) = new_key()[0], new_key()
    sealed_under_old = build_keyring(token, old_label, []).encrypt(b"o" * 32)
    supervisor = start(private_config(primary, old_label), supervisors)
    assert supervisor.run(lambda k: k.decrypt(sealed_under_old, old_uuid)) == b"o" * 32
    token.destroy_object(token.find_one_secret_key(old_label))

    with pytest.raises(KeyMissing) as caught:
        supervisor.run(lambda k: k.decrypt(sealed_under_old, old_uuid))
    assert old_label in str(caught.value) and old_uuid in str(caught.value)
    assert "restore it from an HSM backup" in str(caught.value)
    for _ in range(20):
        assert supervisor.run(lambda k: k.decrypt(k.encrypt(b"n" * 32), k.key_id)) == b"n" * 32
    assert supervisor.state is HsmState.READY and supervisor.reconnects == 0


def request_that_never_leaves(supervisor: KeyringSupervisor) -> threading.Event:
    """A request that enters the gate and stays, as one stuck in a wedged library does; set the event to free it."""
    inside, release = threading.Event(), threading.Event()

    def stay(_keyring: Keyring) -> None:
        inside.set()
        release.wait(30)

    threading.Thread(target=supervisor.run, args=(stay,), daemon=True).start()
    assert inside.wait(5)
    return release


@pytest.mark.parametrize(("setting", "reported"), [("2", True), ("off", False)])
def test_a_reconnect_blocked_by_a_request_that_never_leaves_is_reported_after_stuck_call_exit(
        private_config: Callable[..., PluginConfig], supervisors: list[KeyringSupervisor], new_key: Keys,
        setting: str, reported: bool) -> None:
    reasons: list[str] = []
    supervisor = start(private_config(new_key()[0], Stuck_Call_Exit=setting), supervisors, on_stuck=reasons.append)
    release = request_that_never_leaves(supervisor)
    fail_like_a_dead_device(supervisor)
    try:
        if reported:
            assert 1.5 < wait_until(lambda: bool(reasons), seconds=10) < 4
            assert "over 2 s (Stuck_Call_Exit)" in reasons[0] and "wedged" in reasons[0]
        else:
            time.sleep(4)
            assert reasons == [] and supervisor.state is HsmState.RECOVERING
    finally:
        release.set()
    # Once the request leaves, the waiting reconnect (Stuck_Call_Exit = off) goes through.
    if not reported:
        wait_until(lambda: supervisor.state is HsmState.READY, seconds=10)


def test_a_configured_key_whose_uuid_changed_on_another_node_is_looked_up_again_not_called_unconfigured(
        private_config: Callable[..., PluginConfig], new_key: Keys, token: Token, hsm_env: HsmEnv,
        tmp_path: Path, supervisors: list[KeyringSupervisor]) -> None:
    foreign = unique_label("foreign")
    token.import_aes_key(foreign, os.urandom(32), b"\x0a")  # made by another tool: no UUID in CKA_ID
    supervisor = start(private_config(new_key()[0], foreign), supervisors)
    keyring = supervisor.current_keyring()
    assert keyring is not None
    fingerprint_uuid = keyring.secondaries[0].uuid
    # Another node runs `keys adopt` on the shared HSM and, restarted, encrypts under the stored UUID.
    other_node = hsm_env.write_config(tmp_path / "other-node.cfg", foreign)
    adopted = subprocess.run([sys.executable, "-m", "p11kms", "keys", "adopt", "--config", str(other_node),
                              "--label", foreign], env=hsm_env.process_env(), capture_output=True, text=True,
                             timeout=60)
    assert adopted.returncode == 0, adopted.stderr
    elsewhere = build_keyring(token, foreign, [])
    assert elsewhere.key_id != fingerprint_uuid
    sealed = elsewhere.encrypt(b"a" * 32)

    assert supervisor.run(lambda k: k.decrypt(sealed, elsewhere.key_id)) == b"a" * 32
    assert supervisor.run(lambda k: k.key_for(fingerprint_uuid).label) == foreign  # old data still opens
    assert supervisor.state is HsmState.READY and supervisor.reconnects == 0


def test_unknown_key_ids_search_the_hsm_at_most_once_whatever_their_number(
        private_config: Callable[..., PluginConfig], new_key: Keys, supervisors: list[KeyringSupervisor]) -> None:
    calls = RecordingObserver()
    supervisor = KeyringSupervisor(private_config(new_key()[0]), logging.getLogger("test-supervisor"),
                                   hsm_observer=calls)
    supervisor.start()
    supervisors.append(supervisor)
    sealed = supervisor.run(lambda k: k.encrypt(b"u" * 32))

    def searches() -> int:
        return calls.calls.count("C_FindObjectsInit")

    before = searches()
    for number in range(20):  # `p11kms check` probes: a key_id that is no UUID names no key
        with pytest.raises(UnknownKeyId) as caught:
            supervisor.run(lambda k, n=number: k.decrypt(sealed, f"p11kms-check-unknown-{n}"))  # type: ignore[misc]
        assert not isinstance(caught.value, UnconfiguredKey)
    assert searches() == before
    for _ in range(50):  # UUIDs of no key on the token, each new
        with pytest.raises(UnknownKeyId) as caught:
            supervisor.run(lambda k: k.decrypt(sealed, str(uuid.uuid4())))
        assert not isinstance(caught.value, UnconfiguredKey)
    assert searches() - before <= 1
