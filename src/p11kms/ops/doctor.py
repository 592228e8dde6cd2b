"""``p11kms doctor``: a pre-flight of everything on the node, each check with a one-line fix.

It runs without the plugin: loads the module, finds the token, logs in once (a refused PIN is
never tried again), inspects every configured key, runs one AES-GCM round trip, and checks the
socket directory and, when given, kube-apiserver's EncryptionConfiguration.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from p11kms.config import (
    SOCKET_DIRECTORY_MODE,
    ConfigError,
    PinError,
    PluginConfig,
    load_config,
    pin_source_warnings,
    read_pin,
    socket_directory_problem,
)
from p11kms.hsm.errors import HsmError, KeyNotUsable, LoginFailed, TokenNotFound
from p11kms.hsm.keyident import key_uuid
from p11kms.hsm.module import Pkcs11Module, load_module
from p11kms.hsm.token import SecretKeyAttributes, Token, open_token, policy_problems
from p11kms.ops.checks import Check, verdict
from p11kms.plugin.keyring import KeyringError, Role, build_keyring, usage_problems


def run_doctor(config_path: Path, encryption_config: Path | None = None) -> list[Check]:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return [Check("config", False, str(exc), _config_fix(Path(config_path)))]
    checks = [Check("config", True, f"{config_path}: primary {config.primary_key!r}, "
                                    f"{len(config.secondary_keys)} secondary key(s)")]
    checks += _pin_file_checks(config) + _socket_directory_checks(config) + _hsm_checks(config)
    if encryption_config is not None:
        checks += encryption_config_checks(encryption_config, config.socket)
    return checks


def _config_fix(path: Path) -> str:
    """An unreadable file needs permissions, not an edit (as uid 65532 in the image, say). os.access, not
    Path.exists: that raises PermissionError in a directory the user may not enter."""
    user = f"the plugin's user (uid {os.geteuid()})"
    closed = next((d for d in reversed(path.absolute().parents) if not os.access(d, os.X_OK)), None)
    if closed is not None:
        return f"let {user} enter {closed}: chgrp p11kms {closed} && chmod 0750 {closed}"
    if os.access(path, os.F_OK) and not os.access(path, os.R_OK):
        return (f"let {user} read it: chgrp p11kms {path} && chmod 0640 {path} "
                "(docs/operator-guide.md, section 1)")
    return "correct the attribute on the line named" if os.access(path, os.F_OK) else "pass the config file's path"


def _pin_file_checks(config: PluginConfig) -> list[Check]:
    if config.pin_file is None:
        return [Check("pin.source", True, f"environment variable {config.pin_env}")]
    warnings = pin_source_warnings(config)
    if not warnings:
        return [Check("pin.source", True, f"{config.pin_file}: a regular file (or a Secret volume file), owned by "
                                          "the plugin's user or root, readable by its owner only")]
    # Each warning ends with its own fix after the last "; ": shown once, after "-> fix:".
    problems, fixes = zip(*(warning.rpartition("; ")[::2] for warning in warnings), strict=True)
    return [Check("pin.source", False, "; ".join(problems), "; ".join(f.removeprefix("run: ") for f in fixes))]


def _socket_directory_checks(config: PluginConfig) -> list[Check]:
    """The same rule as serve (config.prepare_socket_directory): one missing level is created."""
    directory = config.socket.parent
    problem = socket_directory_problem(config.socket)
    if problem is not None:
        return [Check("socket.directory", False, problem,
                      f"mkdir -p -m {SOCKET_DIRECTORY_MODE:04o} {directory} (and mount it into kube-apiserver), "
                      f"or correct Socket ({config.where('socket')})")]
    if not directory.is_dir():
        group = f", group {config.socket_group}" if config.socket_group is not None else ""
        return [Check("socket.directory", False,
                      f"{directory} does not exist; serve creates it with mode {SOCKET_DIRECTORY_MODE:04o}{group}",
                      "make sure kube-apiserver sees the same directory (a hostPath mount in both pods)",
                      advisory=True)]
    mode = directory.stat().st_mode & 0o777
    if mode & 0o002:
        return [Check("socket.directory", False, f"{directory} has mode {mode:04o}: anyone can replace the socket",
                      f"chmod o-w {directory}")]
    return [Check("socket.directory", True, f"{directory} exists, mode {mode:04o}")]


def _hsm_checks(config: PluginConfig) -> list[Check]:
    try:
        module = load_module(config.module, init_args=config.module_init_args)
    except HsmError as exc:
        return [Check("hsm.module", False, str(exc), "set PKCS11_Module to the vendor PKCS#11 library")]
    locking = "serialised (the module cannot lock)" if module.serialized else "initialised with OS locking"
    checks = [Check("hsm.module", True, f"{config.module} loaded, {locking}")]
    try:
        info = module.find_token(label=config.token_label, serial=config.token_serial, slot=config.slot)
    except (TokenNotFound, HsmError) as exc:
        return [*checks, Check("hsm.token", False, str(exc), "set Token_Label, Token_Serial or Slot to a token listed")]
    checks.append(Check("hsm.token", True, f"slot {info.slot}: label {info.label!r}, serial {info.serial!r}, "
                                           f"{info.manufacturer} {info.model}"))
    checks.append(Check("hsm.mechanism", module.supports_gcm(info.slot), "CKM_AES_GCM for encrypt and decrypt",
                        "use an HSM (or firmware/licence) that offers CKM_AES_GCM"))
    try:
        token = open_token(module, info, read_pin(config), pool_size=1, gcm_iv=config.gcm_iv)
    except PinError as exc:
        return [*checks, Check("hsm.login", False, str(exc), exc.fix)]
    except LoginFailed as exc:
        return [*checks, Check("hsm.login", False, str(exc),
                               "fix the PIN source; doctor tried it once and will not try again")]
    except HsmError as exc:
        return [*checks, Check("hsm.login", False, str(exc), "check the HSM connection")]
    checks.append(Check("hsm.login", True, "user login accepted"))
    try:
        return checks + _key_checks(token, module, config)
    finally:
        token.close()


def _key_checks(token: Token, module: Pkcs11Module, config: PluginConfig) -> list[Check]:
    primary, primary_uuid = _key_check(token, config, config.primary_key, Role.PRIMARY)
    # The primary's UUID is what `etcd scan --require` needs before a lost secondary can be dropped.
    checks = [primary] + [_key_check(token, config, label, Role.SECONDARY, primary_uuid or "<primary uuid>")[0]
                          for label in config.secondary_keys]
    if all(c.passed for c in checks):
        try:
            build_keyring(token, config.primary_key, config.secondary_keys).self_test()
            checks.append(Check("aes_gcm.round_trip", True, f"encrypt and decrypt with {config.primary_key!r} (GCM IV "
                                                             f"chosen by {token.gcm_iv_used}: {token.gcm_iv_reason})"))
        except (HsmError, KeyringError) as exc:
            checks.append(Check("aes_gcm.round_trip", False, str(exc), "check the key's usage flags, the mechanism and "
                                                                        "GCM_IV (docs/your-hsm.md)"))
    return checks


def _missing_key_fix(config: PluginConfig, label: str, role: Role, primary_uuid: str) -> str:
    if role is Role.PRIMARY:
        return (f"create it (p11kms keys create --config {config.path} --label {label}) or correct the label; "
                "never delete an old key that still protects data")
    # New material under an old label can never decrypt what the old key wrapped: only a restore helps.
    return (f"restore it from an HSM backup or replica (a new key under this label cannot decrypt old data; never "
            f"delete an old key that still protects data), or remove {label!r} from Secondary_key "
            f"({config.where('secondary_key')}) once `p11kms etcd scan --require {primary_uuid}` passes")


def _key_check(token: Token, config: PluginConfig, label: str, role: Role,
               primary_uuid: str = "") -> tuple[Check, str | None]:
    """The check of one configured key, and its UUID when it has one."""
    name = f"key.{role.value}[{label}]"
    handles = token.find_secret_keys(label)
    if not handles:
        fix = _missing_key_fix(config, label, role, primary_uuid)
        return Check(name, False, f"no secret key labelled {label!r}", fix), None
    if len(handles) > 1:
        found = f"{len(handles)} keys share the label {label!r}"
        return Check(name, False, found, "relabel or remove the extras"), None
    attrs = token.key_attributes(handles[0])
    problems = _attribute_problems(attrs, role)
    if problems:
        return verdict(name, problems, "", _attribute_fix(config, label, role, attrs, primary_uuid)), None
    try:
        uuid_value, source = key_uuid(token, attrs)
    except HsmError as exc:
        return _no_uuid_check(name, label, attrs.can_encrypt, exc, primary_uuid), None
    return Check(name, True, f"AES-{(attrs.value_len or 0) * 8}, sensitive, not extractable, uuid {uuid_value} "
                             f"(from {source})"), str(uuid_value)


def _attribute_fix(config: PluginConfig, label: str, role: Role, attrs: SecretKeyAttributes,
                   primary_uuid: str) -> str:
    """How to fix a configured key that may already protect data: never a new key under its label (it could
    not decrypt what this one wrapped), but the attribute cleared in place where PKCS#11 and the HSM allow it,
    or a rotation to a key made by ``keys create``."""
    rotate = ("rotate to a key made by p11kms keys create (p11kms rotate stage NEW --create, then promote and "
              "retire: docs/rotating-the-kek.md)")
    if usage_problems(attrs, role):  # serve refuses it
        if role is Role.PRIMARY:
            return f"make another key the primary: {rotate}"
        return ("set CKA_DECRYPT back to true with the HSM vendor's tool (a new key cannot decrypt what this one "
                f"wrapped), or remove {label!r} from Secondary_key once `p11kms etcd scan --require {primary_uuid}` "
                "passes")
    in_place = bool(attrs.can_wrap or attrs.can_derive)
    lasting = []  # what no change in place repairs
    if attrs.extractable is not False or attrs.sensitive is not True:
        lasting.append("it may already have left the HSM (clearing CKA_EXTRACTABLE now takes no copy back)")
    if attrs.value_len is not None and attrs.value_len < 32:
        lasting.append("a key's length cannot change")
    fixes = []
    if in_place:
        fixes.append(f"clear CKA_WRAP/CKA_DERIVE in place where the HSM allows it (p11kms keys restrict --config "
                     f"{config.path} --label {label}; its UUID stays, so what it wrapped stays readable)")
    if role is Role.PRIMARY:
        why = f" ({'; '.join(lasting)}: only a rotation repairs that)" if lasting else ""
        fixes.append(("or " if in_place and not lasting else "") + rotate + why)
    elif lasting:
        fixes.append(f"it only decrypts: once `p11kms etcd scan --require {primary_uuid}` passes, retire it "
                     f"(p11kms rotate retire {label}; {'; '.join(lasting)})")
    return "; ".join(fixes) + "; never a new key under this label: it cannot decrypt what this one wrapped"


def _attribute_problems(attrs: SecretKeyAttributes, role: Role) -> list[str]:
    """Why the key cannot serve as this role's KEK: its type and usage, then the policy serve warns about."""
    return usage_problems(attrs, role) + policy_problems(attrs)


def _no_uuid_check(name: str, label: str, can_encrypt: bool | None, exc: HsmError, primary_uuid: str) -> Check:
    """A key without a UUID in CKA_ID gets one from a fingerprint (AES-ECB, AES-CMAC); a key that allows none,
    or whose fingerprint is not deterministic, has none."""
    if isinstance(exc, KeyNotUsable):
        return Check(name, False, f"no UUID: {exc}; serve refuses this key",
                     f"give it a stored UUID on the primary HSM (p11kms keys adopt --label {label}), or, once "
                     f"`p11kms etcd scan --require {primary_uuid}` passes, remove {label!r} from Secondary_key")
    return Check(name, False, f"no UUID: the fingerprint encryption failed ({exc})",
                 "check the HSM connection and the key's attributes (p11kms keys list shows the same error)")


def encryption_config_checks(path: Path, socket: Path) -> list[Check]:
    """Checks kube-apiserver's EncryptionConfiguration against the plugin's socket (spec 4.1)."""
    import yaml  # here, not at the top: `p11kms serve` starts through the same CLI and never needs it

    try:
        document: Any = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        return [Check("encryption_config", False, f"cannot read {path}: {exc}", "pass the file kube-apiserver uses")]
    if not isinstance(document, dict) or document.get("kind") != "EncryptionConfiguration":
        return [Check("encryption_config", False, f"{path} is not an EncryptionConfiguration",
                      "pass the file named by kube-apiserver's --encryption-provider-config")]
    endpoint = f"unix://{socket}"
    entries = _provider_lists(document)
    ours = [(resources, index, kms) for resources, providers in entries for index, provider in enumerate(providers)
            if isinstance(kms := provider.get("kms"), dict) and kms.get("endpoint") == endpoint]
    if not ours:
        found = sorted({str(kms.get("endpoint")) for _, providers in entries for provider in providers
                        if isinstance(kms := provider.get("kms"), dict)})
        return [Check("encryption_config.endpoint", False,
                      f"no kms provider has endpoint {endpoint} (found: {', '.join(found) or 'no kms provider'})",
                      f"set endpoint: {endpoint}")]
    checks = [Check("encryption_config.endpoint", True, f"kms provider with endpoint {endpoint}")]
    for resources, index, kms in ours:
        where = f"[{','.join(resources)}]"
        name = str(kms.get("name", ""))
        checks += [
            verdict(f"encryption_config.api_version{where}",
                    [] if kms.get("apiVersion") == "v2" else [f"apiVersion is {kms.get('apiVersion', 'absent (v1)')}"],
                    "apiVersion: v2", "add apiVersion: v2 (the default is v1)"),
            verdict(f"encryption_config.name{where}",
                    [] if name and ":" not in name else [f"name {name!r} is empty or contains ':'"],
                    f"name {name!r}", "choose a name without ':' and never change it afterwards"),
            verdict(f"encryption_config.cachesize{where}",
                    ["cachesize is set; kube-apiserver rejects it for v2"] if "cachesize" in kms else [],
                    "no cachesize", "remove cachesize"),
            Check(f"encryption_config.order{where}", index == 0,
                  "the kms provider is first, so new writes are encrypted" if index == 0 else
                  f"the kms provider is number {index + 1}; writes use the first provider",
                  "move the kms provider first", advisory=True),
            _enablement_phase(where, providers_of(entries, resources), index),
        ]
    covered = {r for resources, _, _ in ours for r in resources}
    if not covered & {"secrets", "*.*", "*."}:
        checks.append(Check("encryption_config.secrets", False,
                            f"the p11kms provider lists cover {', '.join(sorted(covered)) or 'no resource'}, not "
                            "secrets: Secrets are stored as before", "add secrets to the resources of the list "
                            "that has the p11kms provider"))
    return checks


def providers_of(entries: list[tuple[list[str], list[dict[str, Any]]]], resources: list[str]) -> list[dict[str, Any]]:
    return next(providers for names, providers in entries if names == resources)


def _enablement_phase(where: str, providers: list[dict[str, Any]], index: int) -> Check:
    """Which step of the first enablement (or of a migration from another provider) the list is at.

    On several nodes kms is added second everywhere (every server can read what any other writes),
    then moved first everywhere, then data is re-encrypted, then identity goes. A list whose first
    provider is identity encrypts nothing: correct only while that first step rolls out.
    """
    name = f"encryption_config.phase{where}"
    kinds = [next(iter(p), "?") for p in providers]
    if index > 0:
        first = kinds[0]
        if first == "identity":
            return Check(name, False, "phase 1 of the enablement: identity is first, so this list encrypts "
                         "nothing; p11kms only decrypts", "once every node has this file, move the p11kms provider "
                         "first on every node (phase 2)")
        return Check(name, False, f"migration: the {first} provider writes and p11kms only decrypts",
                     "put p11kms first on every node, re-encrypt, prove it with `p11kms etcd scan --require UUID`, "
                     f"then remove the {first} provider")
    later = kinds[1:]
    if "identity" in later:
        return Check(name, True, "phase 2: p11kms encrypts new writes; identity still reads data stored in clear; "
                     "next: re-encrypt, prove it with `p11kms etcd scan --require UUID --resource secrets` "
                     "(exit 0), then remove identity (phase 3)")
    if later:
        return Check(name, True, f"p11kms encrypts; {', '.join(later)} only decrypt(s) older data (a migration): "
                     "remove them once the scan shows nothing under them")
    return Check(name, True, "phase 3: p11kms is the only provider; data stored in clear or under another "
                 "provider can no longer be read, so run the scan before reaching this phase")


def _provider_lists(document: dict[str, Any]) -> list[tuple[list[str], list[dict[str, Any]]]]:
    lists = []
    for entry in document.get("resources") or []:
        if isinstance(entry, dict):
            providers = [p for p in entry.get("providers") or [] if isinstance(p, dict)]
            lists.append(([str(r) for r in entry.get("resources") or []], providers))
    return lists
