"""``p11kms rotate``: the commands as an operator runs them, against the real test token, plugin and etcd."""

from __future__ import annotations

import fcntl
import http.server
import os
import stat
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from p11kms.hsm.keyident import fingerprint_uuid
from p11kms.hsm.token import Token
from p11kms.ops.rotate import edit_labels
from p11kms.plugin.keyring import Role, resolve_kek
from tests.ops.test_etcdscan import kms_value
from tests.standin.etcdwrites import WritableEtcd
from tests.support import TOKEN_LABEL, HsmEnv, PluginProcess, start_plugin, start_standin, unique_label, wait_until

Keys = Callable[[], tuple[str, str]]
Run = Callable[..., PluginProcess]

VENDOR_CONFIG = """\
# Utimaco R3 library and p11kms in one file
[Global]
Logpath = /var/log/utimaco   ; the library's own log
Logging = 0
[CryptoServer]
Device = 3001@10.0.0.10
# Primary_key = not-ours  (a comment in a vendor section)
[KMSPlugin]
; the plugin's part
Primary_key   =  {primary}   # the key that encrypts
PKCS11_Module = {module}
Token_Label = {token}
PIN_File = {pin}
Socket = kms.sock
HTTP_Address = off
"""


def p11kms(hsm_env: HsmEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p11kms", *args], capture_output=True, text=True, timeout=120,
                          env=hsm_env.process_env())


def vendor_config(hsm_env: HsmEnv, directory: Path, primary: str) -> Path:
    path = directory / "cs_pkcs11_R3.cfg"
    path.write_text(VENDOR_CONFIG.format(primary=primary, module=hsm_env.module, token=TOKEN_LABEL,
                                         pin=hsm_env.pin_file))
    path.chmod(0o640)
    return path


def changed_lines(before: str, after: str) -> list[tuple[str, str]]:
    old, new = before.splitlines(keepends=True), after.splitlines(keepends=True)
    return [(a, b) for a, b in zip(old, new, strict=False) if a != b]


def test_only_the_label_lines_change_byte_for_byte() -> None:
    text = VENDOR_CONFIG.format(primary="kek-a", module="/m.so", token="T", pin="/p").replace("\n", "\r\n")
    edited = edit_labels(text, "kek-a", ("kek-b",))
    lines = text.splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if line.startswith("Primary_key"))
    assert edited == "".join([*lines[:index + 1], "Secondary_key   =  kek-b\r\n", *lines[index + 1:]])
    promoted = edit_labels(edited, "kek-b", ("kek-a",))
    assert changed_lines(edited, promoted) == [
        ("Primary_key   =  kek-a   # the key that encrypts\r\n",
         "Primary_key   =  kek-b   # the key that encrypts\r\n"),
        ("Secondary_key   =  kek-b\r\n", "Secondary_key   =  kek-a\r\n")]
    assert "# Primary_key = not-ours" in promoted  # a vendor section's comment is never touched
    assert edit_labels(promoted, "kek-b", ()) == text.replace("kek-a   #", "kek-b   #")


def test_stage_keeps_the_file_and_its_mode_and_names_the_next_step(hsm_env: HsmEnv, tmp_path: Path,
                                                                    new_key: Keys) -> None:
    old_label, _ = new_key()
    config = vendor_config(hsm_env, tmp_path, old_label)
    before = config.read_text()
    inode = config.stat().st_ino
    new_label = unique_label()
    staged = p11kms(hsm_env, "rotate", "stage", new_label, "--create", "--config", str(config))
    assert staged.returncode == 0, staged.stderr
    after = config.read_text()
    assert changed_lines(before, after)[0][1] == f"Secondary_key   =  {new_label}\n"
    assert after.replace(f"Secondary_key   =  {new_label}\n", "") == before
    assert stat.S_IMODE(config.stat().st_mode) == 0o640 and config.stat().st_ino != inode  # renamed over
    assert f"created key label={new_label}" in staged.stdout
    assert f"Secondary_key: (none) -> {new_label}" in staged.stdout
    assert f"rotate promote {new_label}" in staged.stdout
    assert list(tmp_path.glob(".*rotate")) == []  # no staging file left behind
    again = p11kms(hsm_env, "rotate", "stage", new_label, "--config", str(config))
    assert again.returncode == 0 and "already staged" in again.stdout


def test_stage_of_a_key_that_is_not_in_the_hsm_is_refused(hsm_env: HsmEnv, tmp_path: Path, new_key: Keys) -> None:
    label, _ = new_key()
    config = vendor_config(hsm_env, tmp_path, label)
    before = config.read_bytes()
    refused = p11kms(hsm_env, "rotate", "stage", "no-such-kek", "--config", str(config))
    assert refused.returncode == 1
    assert "REFUSED" in refused.stderr and "is not in the HSM" in refused.stderr and "--create" in refused.stderr
    assert config.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [config.name]


def test_promote_before_stage_is_refused_and_one_step_is_the_single_node_swap(hsm_env: HsmEnv, tmp_path: Path,
                                                                               new_key: Keys) -> None:
    old_label, _ = new_key()
    new_label, new_uuid = new_key()
    config = vendor_config(hsm_env, tmp_path, old_label)
    before = config.read_bytes()
    refused = p11kms(hsm_env, "rotate", "promote", new_label, "--config", str(config))
    assert refused.returncode == 1
    assert "is not staged" in refused.stderr and f"rotate stage {new_label}" in refused.stderr
    assert config.read_bytes() == before
    swapped = p11kms(hsm_env, "rotate", "promote", new_label, "--one-step", "--config", str(config))
    assert swapped.returncode == 0, swapped.stderr
    assert f"Primary_key:   {old_label} -> {new_label}" in swapped.stdout and new_uuid in swapped.stdout
    text = config.read_text()
    assert f"Primary_key   =  {new_label}   # the key that encrypts\nSecondary_key   =  {old_label}\n" in text


def test_promote_requires_the_key_staged_on_the_nodes_given(hsm_env: HsmEnv, tmp_path: Path, run_plugin: Run,
                                                            new_key: Keys) -> None:
    old_label, _ = new_key()
    new_label, _ = new_key()
    other = run_plugin(old_label, config_name="other.cfg")  # another node, not staged yet
    config = vendor_config(hsm_env, tmp_path, old_label)
    assert p11kms(hsm_env, "rotate", "stage", new_label, "--config", str(config)).returncode == 0
    for endpoint in (other.http_url(), str(other.socket)):
        refused = p11kms(hsm_env, "rotate", "promote", new_label, "--config", str(config),
                         "--require-staged-on", endpoint)
        assert refused.returncode == 1, refused.stdout
        assert f"{new_label} is not staged on every node" in refused.stderr and endpoint in refused.stderr
    other_config = other.socket.parent / "other.cfg"
    assert p11kms(hsm_env, "rotate", "stage", new_label, "--config", str(other_config)).returncode == 0
    wait_until(lambda: any(k["label"] == new_label for k in other.healthz()["keys"]), 10)
    promoted = p11kms(hsm_env, "rotate", "promote", new_label, "--config", str(config),
                      "--require-staged-on", f"{other.http_url()},{other.socket}")
    assert promoted.returncode == 0, promoted.stderr


class EditingProxy:
    """Forwards HTTP requests to a real plugin; the first one runs another ``p11kms`` command before it is
    forwarded, as an operator on another terminal would while this node's promote waits on the network."""

    def __init__(self, target: str, edit: Callable[[], str]) -> None:
        edits: list[str] = []
        self.edits = edits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if not edits:
                    edits.append(edit())
                with urllib.request.urlopen(target + self.path, timeout=10) as answer:
                    body = answer.read()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("editor", ["rotate promote", "config management"])
def test_promote_refuses_when_the_keys_changed_during_its_network_checks(hsm_env: HsmEnv, tmp_path: Path,
                                                                        run_plugin: Run, new_key: Keys,
                                                                        editor: str) -> None:
    """promote used the old primary of its first read, before --require-staged-on's round trips: an edit made
    meanwhile was undone (config management's new primary vanished from the file, its data unreadable) or
    refused for a reason that had nothing to do with it (another promote: 'lists ... twice')."""
    old_label, new_label, other_label = new_key()[0], new_key()[0], new_key()[0]
    node = run_plugin(old_label, f"{new_label}, {other_label}", config_name="node.cfg")  # staged both
    config = vendor_config(hsm_env, tmp_path, old_label)
    assert p11kms(hsm_env, "rotate", "stage", new_label, "--config", str(config)).returncode == 0
    assert p11kms(hsm_env, "rotate", "stage", other_label, "--config", str(config)).returncode == 0

    def edit() -> str:
        if editor == "rotate promote":
            done = p11kms(hsm_env, "rotate", "promote", other_label, "--config", str(config))
            return f"exit {done.returncode} {done.stderr}"
        text = config.read_text().replace(f"=  {old_label}   #", f"=  {other_label}   #")
        staging = config.with_name("cm.tmp")
        staging.write_text(text.replace(f"{other_label}, {new_label}", new_label))  # a whole new file, renamed
        os.replace(staging, config)
        return "exit 0 "

    proxy = EditingProxy(node.http_url(), edit)
    try:
        promoted = p11kms(hsm_env, "rotate", "promote", new_label, "--config", str(config),
                          "--require-staged-on", proxy.url)
    finally:
        proxy.close()
    assert proxy.edits[0].startswith("exit 0 "), proxy.edits[0]
    after = config.read_text()
    assert f"Primary_key   =  {other_label}" in after and new_label in after, after  # the edit made meanwhile
    assert promoted.returncode == 1, (promoted.stdout, after)
    assert "changed while rotate ran" in promoted.stderr and "nothing was written" in promoted.stderr


def test_a_rotate_command_waits_for_the_one_editing_the_same_config(hsm_env: HsmEnv, tmp_path: Path,
                                                                    new_key: Keys) -> None:
    """Two rotate commands on one config take turns (an exclusive flock on the config's directory), so
    neither replaces the file between the other's last read and its rename."""
    old_label, new_label = new_key()[0], new_key()[0]
    config = vendor_config(hsm_env, tmp_path, old_label)
    before = config.read_bytes()
    holder = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # as another rotate command holds it while it edits
    try:
        waiting = subprocess.Popen([sys.executable, "-m", "p11kms", "rotate", "stage", new_label, "--config",
                                    str(config)], env=hsm_env.process_env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(3)
        assert config.read_bytes() == before
    finally:
        os.close(holder)
    _, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert f"Secondary_key   =  {new_label}" in config.read_text()


def test_retire_refuses_objects_left_and_an_empty_scan_then_passes(hsm_env: HsmEnv, etcd: str, tmp_path: Path,
                                                                   new_key: Keys) -> None:
    old_label, _ = new_key()
    new_label, new_uuid = new_key()
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", old_label, Log_Format="json")
    plugin = start_plugin(hsm_env, config)
    prefix = f"/registry-{uuid.uuid4().hex[:8]}"
    api = start_standin(etcd, plugin.socket, tmp_path / "operator", prefix=prefix)
    try:
        wait_until(lambda: api.health().get("status") == "ok", 20)
        assert api.kubectl("create", "secret", "generic", "old-one", "--from-literal=a=1").returncode == 0
        assert p11kms(hsm_env, "rotate", "stage", new_label, "--config", str(config)).returncode == 0
        assert p11kms(hsm_env, "rotate", "promote", new_label, "--config", str(config)).returncode == 0
        api.wait_for_key_id(new_uuid)
        retire = ("rotate", "retire", old_label, "--config", str(config), "--etcd-endpoints", etcd)

        left = p11kms(hsm_env, *retire, "--prefix", prefix)
        assert left.returncode == 1
        assert f"{prefix}/secrets/default/old-one" in left.stderr and "nothing was written" in left.stderr
        labelled = p11kms(hsm_env, "etcd", "scan", "--endpoints", etcd, "--prefix", prefix, "--config", str(config))
        assert labelled.returncode == 0 and f"label={old_label} objects=1" in labelled.stdout
        empty = p11kms(hsm_env, *retire, "--prefix", "/registry-empty-" + uuid.uuid4().hex[:6])
        assert empty.returncode == 1 and "NOTHING PROVEN" in empty.stderr
        assert old_label in config.read_text()

        rewrite = p11kms(hsm_env, "etcd", "scan", "--endpoints", etcd, "--prefix", prefix, "--require", new_uuid,
                         "--rewrite-commands")
        assert rewrite.returncode == 1
        command = "kubectl get secrets -n default old-one -o json | kubectl replace -f -"
        assert command in rewrite.stdout and "--force" not in rewrite.stdout.split("never --force")[1]
        assert api.shell(command.replace("replace -f", "replace --validate=false -f")).returncode == 0

        passed = p11kms(hsm_env, *retire, "--prefix", prefix)
        assert passed.returncode == 0, passed.stderr
        assert f"OK: every object of secrets is on key {new_uuid}" in passed.stdout
        assert "stays in the HSM" in passed.stdout and "backup" in passed.stdout and "--delete-object" in passed.stdout
        assert "Secondary_key" not in config.read_text()
    finally:
        api.stop()
        plugin.stop()


def test_retire_refuses_while_any_resource_holds_objects_on_the_retired_key(hsm_env: HsmEnv, etcd: str, token: Token,
                                                                        tmp_path: Path, new_key: Keys) -> None:
    """--resource secrets must not let configmaps still on the retired key (its UUID or an alias) go unread."""
    old_label, old_uuid = new_key()
    new_label, new_uuid = new_key()
    old_alias = str(fingerprint_uuid(token, token.key_attributes(token.find_one_secret_key(old_label)))[0])
    aliases = resolve_kek(token, old_label, Role.SECONDARY).aliases  # the fingerprint and the pre-issue-10 rule's
    assert old_alias in aliases
    config = hsm_env.write_config(tmp_path / "p11kms.cfg", new_label, old_label)
    prefix = f"/registry-{uuid.uuid4().hex[:8]}/"
    client = WritableEtcd([etcd])
    for name, key_id in (("secrets/default/a", new_uuid), ("configmaps/default/on-old", old_uuid),
                         ("configmaps/default/on-old-alias", old_alias)):
        key = (prefix + name).encode()
        client.put_if(key, kms_value(key_id, key), mod_revision=0)
    before = config.read_bytes()
    retire = ("rotate", "retire", old_label, "--config", str(config), "--etcd-endpoints", etcd, "--prefix", prefix)

    refused = p11kms(hsm_env, *retire, "--resource", "secrets")
    assert refused.returncode == 1, refused.stdout
    assert f"2 objects are still on {old_label} (UUID {old_uuid}, aliases {', '.join(aliases)})" in refused.stderr
    assert f"{prefix}configmaps/default/on-old: on another key UUID {old_uuid}" in refused.stderr
    assert f"{prefix}configmaps/default/on-old-alias: on another key UUID {old_alias}" in refused.stderr
    assert "nothing was written" in refused.stderr
    assert config.read_bytes() == before
    assert p11kms(hsm_env, *retire).returncode == 1  # and without --resource
    assert config.read_bytes() == before

    forced = p11kms(hsm_env, *retire, "--resource", "secrets", "--force")
    assert forced.returncode == 0, forced.stderr
    assert f"FORCED: {old_label} removed although 2 objects are still on it" in forced.stdout
    assert old_label not in config.read_text()


def test_rotate_status_shows_a_rejected_and_an_unloaded_config(hsm_env: HsmEnv, run_plugin: Run,
                                                               new_key: Keys) -> None:
    label, key_uuid = new_key()
    plugin = run_plugin(label)
    config = plugin.socket.parent / "p11kms.cfg"
    endpoint = plugin.http_url()
    in_sync = p11kms(hsm_env, "rotate", "status", "--config", str(config), "--endpoint", endpoint)
    assert in_sync.returncode == 0, in_sync.stdout
    assert "IN SYNC" in in_sync.stdout and f"{label} ({key_uuid})" in in_sync.stdout

    edited = config.with_name("edited.cfg")
    edited.write_text(config.read_text() + "# edited, not loaded by this plugin\n")
    pending = p11kms(hsm_env, "rotate", "status", "--config", str(edited), "--endpoint", endpoint)
    assert pending.returncode == 1 and "NOT LOADED YET" in pending.stdout

    staging = config.with_name("new.cfg")
    staging.write_text(config.read_text().replace(f"Primary_key = {label}", "Primary_key = no-such-kek"))
    os.replace(staging, config)
    wait_until(lambda: plugin.healthz()["config"]["reload_failed"], 10)
    rejected = p11kms(hsm_env, "rotate", "status", "--config", str(config), "--endpoint", endpoint)
    assert rejected.returncode == 1 and "REJECTED" in rejected.stdout and "no-such-kek" in rejected.stdout


@pytest.mark.parametrize("args", [["rotate", "stage", "x"], ["cluster", "status"]])
def test_missing_arguments_are_usage_errors(hsm_env: HsmEnv, args: list[str]) -> None:
    assert p11kms(hsm_env, *args).returncode == 2
