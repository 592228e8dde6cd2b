"""``p11kms rotate``: the two-phase key rotation as edits of this node's config file.

Each command changes only the ``Primary_key`` / ``Secondary_key`` lines of the plugin's part of the
file (before the first section, or ``[KMSPlugin]``); every other byte, the vendor library's
sections and every comment included, stays as it was. The new file is written beside the old one,
checked (parsed as the plugin parses it, and its keys looked up in the HSM), fsynced and renamed
over the old one with the old mode and owner, so the plugin's file watch sees either the old or
the new file, never half of one. Commands take turns (an exclusive flock on the file's directory) and,
under that lock, read the file again: one whose key lines changed since it read and checked them
(another command, an editor, config management) writes nothing.

- ``stage LABEL``: LABEL joins the decrypt-only keys (phase 1, on every node).
- ``promote LABEL``: LABEL encrypts, the old primary joins the decrypt-only keys (phase 2, on every
  node, only once every node has staged it).
- ``retire LABEL``: LABEL leaves the config, only when an etcd scan proves nothing needs it.
- ``status``: this node's config beside what its running plugin serves.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from p11kms.config import ConfigError, PluginConfig, load_config, parse_settings
from p11kms.hsm.errors import KeyNotFound
from p11kms.ops import cluster
from p11kms.ops.etcdscan import OffKey, ScanReport, require_key
from p11kms.ops.keys import create_key
from p11kms.plugin.configwatch import generation_of
from p11kms.plugin.keyring import Keyring, Role, build_keyring, resolve_kek
from p11kms.plugin.supervisor import open_configured_token

EXIT_OK = 0
EXIT_REFUSED = 1
LOCK_WAIT_SECONDS = 60.0  # how long a rotate command waits for another one editing a config in the same directory

_SETTING = re.compile(r"^(?P<indent>\s*)(?P<name>[^=\s]+)(?P<sep>\s*=\s*)(?P<value>.*?)"
                      r"(?P<comment>\s+[#;].*)?(?P<eol>\r?\n)?$", re.DOTALL)


class RotateRefused(Exception):
    """The change would lose data or cannot be made; the message says why and what to do instead."""


@dataclass
class Outcome:
    """What a rotate command did (or would do), for the CLI to print."""

    lines: list[str] = field(default_factory=list)
    exit_code: int = EXIT_OK


# -- the config file as text ----------------------------------------------------------------------
def _label_lines(text: str) -> tuple[int | None, int | None]:
    """Indexes (in ``text.splitlines()``) of the plugin's Primary_key and Secondary_key lines, found by
    the config parser itself, so the edit and the plugin agree on which lines are the plugin's."""
    settings = parse_settings(text.removeprefix("\ufeff"), Path("<config being edited>"))

    def index(key: str) -> int | None:
        return settings[key].line - 1 if key in settings else None

    return index("primary_key"), index("secondary_key")


def _with_value(line: str, value: str) -> str:
    match = _SETTING.match(line)
    assert match is not None  # only lines the config parser read as settings get here
    return (f"{match['indent']}{match['name']}{match['sep']}{value}{match['comment'] or ''}"
            f"{match['eol'] or ''}")


def edit_labels(text: str, primary: str, secondaries: tuple[str, ...]) -> str:
    """``text`` with the plugin's Primary_key and Secondary_key set; nothing else changes.

    A missing Secondary_key line is added right after Primary_key, in its style; an empty list
    removes the line (an empty value is a config error).
    """
    primary_line, secondary_line = _label_lines(text)
    if primary_line is None:
        raise ConfigError("the config has no Primary_key line in the plugin's part of the file; add one first")
    lines = text.splitlines(keepends=True)
    lines[primary_line] = _with_value(lines[primary_line], primary)
    joined = ", ".join(secondaries)
    if secondary_line is not None:
        if secondaries:
            lines[secondary_line] = _with_value(lines[secondary_line], joined)
        else:
            del lines[secondary_line]
    elif secondaries:
        template = lines[primary_line]
        match = _SETTING.match(template)
        assert match is not None
        eol = match["eol"] or ("\r\n" if "\r\n" in text else "\n")
        if not template.endswith(("\n", "\r")):
            lines[primary_line] = template + eol
        lines.insert(primary_line + 1, f"{match['indent']}Secondary_key{match['sep']}{joined}{eol}")
    return "".join(lines)


def _editable_path(path: Path) -> Path:
    """The regular file to rewrite: a symbolic link is followed; a Kubernetes volume is refused."""
    try:
        link = os.readlink(path)
    except OSError:
        link = ""
    if link == f"..data/{path.name}":
        raise RotateRefused(f"{path} is a Kubernetes ConfigMap or Secret volume file, which the kubelet owns and "
                            "replaces: change the ConfigMap (or Secret) itself; the plugin's watch picks the "
                            "kubelet's update up")
    return Path(os.path.realpath(path))


@contextlib.contextmanager
def _config_lock(path: Path, wait: float = LOCK_WAIT_SECONDS) -> Iterator[None]:
    """Rotate commands editing a config take turns: an exclusive ``flock`` on the directory that holds the file.

    The directory, not a lock file, so nothing is left beside the config; the kernel drops the lock of a
    process that dies. A command waits up to ``wait`` seconds for another one, then refuses.
    """
    directory = _editable_path(path).parent
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RotateRefused(f"another command has held the lock on {directory} for {wait:.0f} s (another "
                                        "p11kms rotate editing a config there); nothing was written: run the command "
                                        "again when it has finished") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def _labels(config: PluginConfig) -> tuple[str, tuple[str, ...]]:
    return config.primary_key, config.secondary_keys


@dataclass
class Edit:
    """A change of this node's config, checked before it is written."""

    path: Path  # the file the operator named
    before: PluginConfig
    original: bytes
    new_text: str

    @classmethod
    def of(cls, path: Path, change: Callable[[PluginConfig], tuple[str, tuple[str, ...]]],
           read: PluginConfig | None = None) -> Edit:
        """The edit of the file as it is now; refused when its keys are no longer those of ``read``, the config
        the command checked (the staged keys on other nodes, the etcd scan) before it got here."""
        before = load_config(path)
        original = _editable_path(path).read_bytes()
        if read is not None and _labels(before) != _labels(read):
            raise RotateRefused(
                f"{path} changed while rotate ran: Primary_key {read.primary_key} -> {before.primary_key}, "
                f"Secondary_key {', '.join(read.secondary_keys) or '(none)'} -> "
                f"{', '.join(before.secondary_keys) or '(none)'}; nothing was written: check the file and run the "
                "command again")
        primary, secondaries = change(before)
        return cls(path, before, original, edit_labels(original.decode("utf-8"), primary, secondaries))

    @classmethod
    def apply(cls, path: Path, read: PluginConfig, change: Callable[[PluginConfig], tuple[str, tuple[str, ...]]],
              check: Callable[[PluginConfig], None]) -> tuple[Edit, PluginConfig]:
        """Under the config lock: reads the file again, refuses if its keys changed since ``read``, edits,
        checks and writes it. Returns the edit and the config as the plugin will read it."""
        with _config_lock(path):
            edit = cls.of(path, change, read)
            return edit, edit.write(check)

    def write(self, check: Callable[[PluginConfig], None]) -> PluginConfig:
        """Writes the new file beside the old one, checks it with ``check``, then renames it over the old one.

        Mode and owner are the old file's. Returns the config as the plugin will read it.
        """
        target = _editable_path(self.path)
        info = target.stat()
        fd, staging_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".rotate", dir=target.parent)
        staging = Path(staging_name)
        try:
            with os.fdopen(fd, "wb") as staged:
                staged.write(self.new_text.encode("utf-8"))
                staged.flush()
                os.fchmod(staged.fileno(), info.st_mode & 0o7777)
                if (info.st_uid, info.st_gid) != (os.geteuid(), os.getegid()):
                    try:
                        os.fchown(staged.fileno(), info.st_uid, info.st_gid)
                    except PermissionError:
                        raise RotateRefused(f"{target} belongs to uid {info.st_uid} gid {info.st_gid}; the new file "
                                            "could not keep that owner: run as root or as the file's owner") from None
                os.fsync(staged.fileno())
            try:
                after = load_config(staging)
            except ConfigError as exc:
                raise RotateRefused(f"the edited config would not load, nothing was written: {exc}") from exc
            check(after)
            if target.read_bytes() != self.original:
                raise RotateRefused(f"{target} changed while rotate ran; nothing was written: run the command again")
            os.replace(staging, target)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
        directory = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)
        return load_config(self.path)


def _describe(before: PluginConfig, after: PluginConfig) -> list[str]:
    lines = [f"changed {before.path}:"]
    if before.primary_key != after.primary_key:
        lines.append(f"  Primary_key:   {before.primary_key} -> {after.primary_key}")
    if before.secondary_keys != after.secondary_keys:
        lines.append(f"  Secondary_key: {', '.join(before.secondary_keys) or '(none)'} -> "
                     f"{', '.join(after.secondary_keys) or '(none)'}")
    return lines


def _keyring_of(config: PluginConfig, check: Callable[[Keyring], None]) -> None:
    token = open_configured_token(config)
    try:
        check(build_keyring(token, config.primary_key, config.secondary_keys))
    except KeyNotFound as exc:
        raise RotateRefused(f"{exc}; nothing was written") from exc
    finally:
        token.close()


def _uuid_of(keyring: Keyring, label: str) -> str:
    return next(k.uuid for k in keyring.keys if k.label == label)


# -- stage -----------------------------------------------------------------------------------------
def stage(path: Path, label: str, *, create: bool = False) -> Outcome:
    """LABEL joins Secondary_key (first in the list): every node must decrypt it before any node encrypts with it."""
    current = load_config(path)
    if label == current.primary_key:
        raise RotateRefused(f"{label!r} is already the Primary_key of {path}: nothing to stage")
    if label in current.secondary_keys:
        return Outcome([f"{label!r} is already staged in {path} (Secondary_key); nothing changed",
                        *_next_after_stage(label)])
    outcome = Outcome()
    if create:
        created = create_key(current, label)
        outcome.lines.append(f"created key label={label} uuid={created} in the HSM")
    staged_uuid: list[str] = []

    def check(config: PluginConfig) -> None:
        def keys_present(keyring: Keyring) -> None:
            if any(m.label == label for m in keyring.missing):
                raise RotateRefused(f"key {label!r} is not in the HSM: create it with `p11kms rotate stage {label} "
                                    f"--create` (or `p11kms keys create`), or copy it to this HSM; nothing was "
                                    "written")
            staged_uuid.append(_uuid_of(keyring, label))
        _keyring_of(config, keys_present)

    edit, after = Edit.apply(path, current, lambda c: (c.primary_key, (label, *c.secondary_keys)), check)
    outcome.lines += _describe(edit.before, after)
    outcome.lines.append(f"staged {label} (uuid {staged_uuid[0]}) as a decrypt-only key; the plugin's watch loads "
                         "it within seconds")
    outcome.lines += _next_after_stage(label)
    return outcome


def _next_after_stage(label: str) -> list[str]:
    return [f"next: stage {label} on every other control-plane node; check with `p11kms cluster status "
            f"--endpoints ...`; then on each node `p11kms rotate promote {label} --require-staged-on ...`"]


# -- promote ---------------------------------------------------------------------------------------
def promote(path: Path, label: str, *, one_step: bool = False, require_staged_on: list[str] | None = None,
            timeout: float = 3.0) -> Outcome:
    """LABEL becomes Primary_key; the old primary becomes the first Secondary_key."""
    current = load_config(path)
    if label == current.primary_key:
        return Outcome([f"{label!r} is already the Primary_key of {path}; nothing changed"])
    if label not in current.secondary_keys and not one_step:
        raise RotateRefused(
            f"{label!r} is not staged in {path} (Secondary_key: {', '.join(current.secondary_keys) or 'none'}). "
            "Promoting it now would make this node encrypt with a key the other nodes cannot decrypt yet, and "
            f"reads through them would fail: first run `p11kms rotate stage {label}` on every node. On a single "
            "control-plane node, --one-step does the swap in one edit")
    if require_staged_on:
        _require_staged(current, label, require_staged_on, timeout)
    old = current.primary_key
    promoted_uuid: list[str] = []

    def check(config: PluginConfig) -> None:
        _keyring_of(config, lambda keyring: promoted_uuid.append(keyring.primary.uuid))

    # Under the lock the file is read again and must still have the keys `current` had: the round trips of
    # --require-staged-on took time, and `old` is the primary they were checked against.
    edit, after = Edit.apply(path, current, lambda c: (label, (old, *(s for s in c.secondary_keys if s != label))),
                             check)
    lines = _describe(edit.before, after)
    lines.append(f"promoted {label} (uuid {promoted_uuid[0]}); {old} decrypts only. The plugin's watch loads it "
                 "within seconds; kube-apiserver uses the new key after its next Status poll (at most a minute)")
    lines.append(f"next: promote {label} on every other node; when `p11kms cluster status` shows one primary "
                 f"everywhere, re-encrypt (`p11kms reencrypt --encryption-config FILE --etcd-endpoints ETCD "
                 f"--key-id {promoted_uuid[0]}`), then `p11kms rotate retire "
                 f"{old} --etcd-endpoints ETCD` on every node")
    return Outcome(lines)


def _require_staged(config: PluginConfig, label: str, endpoints: list[str], timeout: float) -> None:
    """Refuses unless every endpoint's plugin decrypts under LABEL now."""
    token = open_configured_token(config)
    try:
        try:
            kek = resolve_kek(token, label, Role.PRIMARY)
        except KeyNotFound as exc:
            raise RotateRefused(f"{exc}: it cannot be promoted") from exc
        probe = Keyring(token, kek, ()).encrypt(os.urandom(32))  # a ciphertext under LABEL, as a node would write
    finally:
        token.close()
    problems = []
    for endpoint in endpoints:
        node = cluster.read_node(endpoint, timeout)
        if node.error is not None:
            problems.append(f"{endpoint}: {node.error}")
        elif node.decrypts is not None:
            if kek.uuid not in node.decrypts:
                problems.append(f"{endpoint}: {label} ({kek.uuid}) is not in its keyring")
        else:
            why = cluster.socket_decrypts(endpoint, probe, kek.uuid, timeout)
            if why is not None:
                problems.append(f"{endpoint}: cannot decrypt under {label}: {why}")
    if problems:
        raise RotateRefused(f"{label} is not staged on every node given with --require-staged-on; nothing was "
                            f"written: {'; '.join(problems)}. Run `p11kms rotate stage {label}` there and let its "
                            "plugin load it (`p11kms rotate status` on that node)")


# -- retire ----------------------------------------------------------------------------------------
def retire(path: Path, label: str, report: ScanReport | None, *, resources: set[str] | None = None,
           force: bool = False) -> Outcome:
    """LABEL leaves Secondary_key once the scan proves that no object, of any resource, is on LABEL's key
    (its UUID or a decrypt-only alias) and every checked object is on the primary key.

    ``report`` must have been scanned with ``require=`` the primary's UUID (see :func:`primary_uuid`).
    ``resources`` adds resources to the primary's gate (see :func:`require_key`); it never narrows the
    question whether anything is still on LABEL.
    """
    current = load_config(path)
    if label == current.primary_key:
        raise RotateRefused(f"{label!r} is the Primary_key of {path}: it encrypts; promote another key first")
    if label not in current.secondary_keys:
        return Outcome([f"{label!r} is not in Secondary_key of {path}; nothing changed"])
    lines: list[str] = []
    if report is None:
        if not force:
            raise RotateRefused("retire needs an etcd scan (--etcd-endpoints) that proves no object needs the key")
        lines.append(f"FORCED: {label} removed from the config WITHOUT an etcd scan")
    else:
        assert report.required is not None
        names = _names_of(current, label)
        stranded = report.objects_under(set(names)) if names else []
        gate = require_key(report, report.required, resources)
        on_retired = _on_retired_lines(label, names, stranded)
        if stranded or not gate.passed:
            if not force:
                if stranded:
                    head = (f"{label} is still needed: {on_retired[0].removeprefix('FAIL: ')} They could no longer "
                            "be read once it leaves the config; nothing was written.")
                    explain = [*on_retired[1:], *(gate.lines if not gate.passed else [])]
                else:
                    reason = ("the scan proved nothing (no object checked)" if gate.verdict == "nothing_proven" else
                              "objects are not yet on the primary key, and some may be under this key")
                    head = f"{label} is still needed or nothing was proven: {reason}; nothing was written."
                    explain = [*on_retired, *gate.lines]
                raise RotateRefused("\n".join([
                    head, *explain,
                    "Re-encrypt what is listed (p11kms reencrypt --encryption-config FILE --etcd-endpoints "
                    "ETCD --socket SOCKET rewrites exactly those objects), then run retire again. "
                    "--force removes it anyway and makes those objects unreadable"]))
            why = (f"{_objects(len(stranded))} {'is' if len(stranded) == 1 else 'are'} still on it" if stranded
                   else "the etcd scan did not pass")
            lines += [f"FORCED: {label} removed although {why}:", *on_retired, *gate.lines]
        else:
            lines += [*on_retired, *gate.lines]
    edit, after = Edit.apply(path, current, lambda c: (c.primary_key, tuple(s for s in c.secondary_keys if s != label)),
                             lambda config: _keyring_of(config, lambda _: None))
    lines += _describe(edit.before, after)
    lines += [f"retired {label} from this node's config; the key itself stays in the HSM.",
              "It is still needed to read every etcd snapshot or backup taken before the re-encryption, and "
              "every HSM backup that may be restored together with such a snapshot must keep it. Delete it only "
              "when no such snapshot will ever be restored, with your HSM vendor's tool (for example "
              f"`pkcs11-tool --module MODULE --login --delete-object --type secrkey --label {label}`; "
              "Utimaco: its administration tool, on every HSM of the cluster).",
              f"next: retire {label} on every other node (`p11kms cluster status` shows what each still decrypts)"]
    return Outcome(lines)


def _names_of(config: PluginConfig, label: str) -> tuple[str, ...]:
    """The UUID and decrypt-only aliases of ``label``'s key, as this config's HSM computes them (empty when the
    key is not in the HSM)."""
    found: list[tuple[str, ...]] = []

    def look(keyring: Keyring) -> None:
        found.extend((k.uuid, *k.aliases) for k in keyring.keys if k.label == label)
        found.extend((m.uuid,) for m in keyring.missing if m.label == label and m.uuid is not None)

    _keyring_of(config, look)
    return found[0] if found else ()


def _on_retired_lines(label: str, names: tuple[str, ...], stranded: list[OffKey]) -> list[str]:
    if not names:
        return [f"NOTE: {label} is not in this HSM, so its UUID is unknown here; only the primary's gate below "
                "applies (objects under a key no HSM holds are unreadable already)"]
    aliases = f", alias{'es' if len(names) > 2 else ''} {', '.join(names[1:])}" if names[1:] else ""
    where = f"{label} (UUID {names[0]}{aliases})"
    if not stranded:
        return [f"OK: no object of any resource is on {where}"]
    count = len(stranded)
    return [f"FAIL: {_objects(count)} {'is' if count == 1 else 'are'} still on {where}:",
            *(f"  {item.key}: {item.reason}" for item in stranded)]


def _objects(count: int) -> str:
    return f"{count} object" if count == 1 else f"{count} objects"


def primary_uuid(path: Path) -> str:
    """The UUID of this config's primary key, as the HSM computes it."""
    config = load_config(path)
    found: list[str] = []
    _keyring_of(config, lambda keyring: found.append(keyring.primary.uuid))
    return found[0]


# -- status ----------------------------------------------------------------------------------------
def status(path: Path, endpoint: str | None = None, timeout: float = 3.0) -> Outcome:
    """This node's config on disk beside what the running plugin serves."""
    config = load_config(path)
    generation = generation_of(Path(path).read_bytes())
    lines = [f"config {path} (generation {generation}):",
             f"  primary       {config.primary_key}",
             f"  decrypt-only  {', '.join(config.secondary_keys) or 'none'}"]
    if endpoint is None:
        if config.http_address is None or config.http_address[1] == 0:
            endpoint = str(config.socket)
        else:
            host, port = config.http_address
            endpoint = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    node = cluster.read_node(endpoint, timeout)
    if node.error is not None:
        return Outcome([*lines, f"plugin {endpoint}: UNREACHABLE: {node.error}"], EXIT_REFUSED)
    lines.append(f"plugin {endpoint} (generation {node.generation or 'not shown over a socket'}), "
                 f"health {node.health}:")
    ok = node.health == "ok"
    if node.decrypts is not None:
        by_label = {lab: uuid for uuid, lab in node.decrypts.items()}
        lines.append(f"  primary       {node.primary_label} ({node.primary_uuid})")
        others = [f"{lab} ({uuid})" for lab, uuid in by_label.items() if lab != node.primary_label]
        lines.append(f"  decrypt-only  {', '.join(others) or 'none'}")
        in_sync = (node.primary_label == config.primary_key
                   and set(by_label) | set(node.missing) == {config.primary_key, *config.secondary_keys})
    else:
        lines.append(f"  primary       {node.primary_uuid} (a socket shows the UUID only)")
        in_sync = True
    if node.config_error is not None:
        lines.append(f"REJECTED: the plugin refused the file on disk and serves the previous keyring: "
                     f"{node.config_error}")
        ok = False
    elif node.generation is not None and node.generation != generation:
        lines.append(f"NOT LOADED YET: the file (generation {generation}) was edited after the plugin loaded "
                     f"generation {node.generation}; the watch loads it within seconds")
        ok = False
    elif not in_sync:
        lines.append("DIFFERENT: the running keyring does not match the file; the plugin was started with another "
                     "config, or a reload is pending")
        ok = False
    else:
        lines.append("IN SYNC: the plugin serves this file")
    if node.health != "ok":
        lines.append(f"UNHEALTHY: {node.health}")
    return Outcome(lines, EXIT_OK if ok else EXIT_REFUSED)
