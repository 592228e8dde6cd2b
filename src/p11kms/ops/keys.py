"""Key management for operators: create a KEK, adopt a foreign one, restrict one in place, list the token's keys
with their UUIDs and roles."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from p11kms.config import ConfigError, PluginConfig, label_problem
from p11kms.hsm import ckdefs as ck
from p11kms.hsm.errors import HsmError
from p11kms.hsm.keyident import adopt_key, alias_uuids, create_kek, fingerprint_uuid, key_uuid
from p11kms.hsm.token import SecretKeyAttributes, Token
from p11kms.plugin.supervisor import open_configured_token


@dataclass(frozen=True, order=True)
class KeyRow:
    label: str
    uuid: str  # "-" when no UUID can be computed
    role: str  # "primary", "secondary" or "-" (not in the config)
    uuid_source: str
    # Decrypt-only UUIDs from the rule before issue 10, listed for keys without a stored UUID (where data
    # may carry them). Keys with a stored UUID answer to theirs too (after `keys adopt`), unlisted: every
    # key `keys create` made would otherwise show two UUIDs nothing was ever stored under.
    aliases: tuple[str, ...] = ()


def create_key(config: PluginConfig, label: str) -> uuid.UUID:
    """Creates a new KEK; a careless or old label is refused before the HSM is touched."""
    check_new_label(config, label)
    token = open_configured_token(config)
    try:
        return create_kek(token, label)
    finally:
        token.close()


@dataclass(frozen=True)
class Adopted:
    label: str
    uuid: str  # now stored in CKA_ID
    previous: str  # the fingerprint UUID the key had until now (kept as a decrypt-only alias), or "-"
    previous_cka_id: str  # hex of the CKA_ID that was replaced, or ""


def adopt(config: PluginConfig, label: str) -> Adopted:
    """Writes a fresh UUID into CKA_ID of a key made by another tool (refuses a key that has one).

    Run it once, on the primary HSM, before replicas or backups of the key are made: a replica made
    earlier keeps the old CKA_ID, and serves the key under its fingerprint UUID instead.
    """
    token = open_configured_token(config)
    try:
        attrs = token.key_attributes(token.find_one_secret_key(label))
        if attrs.key_type != ck.CKK_AES:
            raise ConfigError(f"key {label!r} is not an AES key; only AES keys can be KEKs")
        try:
            previous = str(fingerprint_uuid(token, attrs)[0])
        except HsmError:
            previous = "-"
        new = adopt_key(token, attrs)
    finally:
        token.close()
    return Adopted(label, str(new), previous, attrs.cka_id.hex())


@dataclass(frozen=True)
class Restricted:
    label: str
    uuid_before: str
    uuid_after: str  # the same: no UUID rule depends on CKA_WRAP or CKA_DERIVE
    cleared: tuple[str, ...]  # attribute names cleared now
    refused: tuple[tuple[str, str], ...]  # (attribute name, why the HSM kept it)


# What `keys restrict` clears: PKCS#11 lets both change in place (unless CKA_MODIFIABLE is false or the HSM's
# policy forbids it). CKA_EXTRACTABLE and CKA_SENSITIVE are left to a rotation: the key may have left the HSM.
_RESTRICTABLE: tuple[tuple[str, int, Callable[[SecretKeyAttributes], bool | None]], ...] = (
    ("CKA_WRAP", ck.CKA_WRAP, lambda attrs: attrs.can_wrap),
    ("CKA_DERIVE", ck.CKA_DERIVE, lambda attrs: attrs.can_derive),
)


def restrict(config: PluginConfig, label: str) -> Restricted:
    """Clears CKA_WRAP and CKA_DERIVE of a key in place, where the HSM allows it: the same key material and
    UUID, so what it already wrapped stays readable (a new key under its label would not decrypt it)."""
    token = open_configured_token(config)
    try:
        handle = token.find_one_secret_key(label)
        before = _uuid_text(token, token.key_attributes(handle))
        cleared: list[str] = []
        refused: list[tuple[str, str]] = []
        for name, kind, allowed in _RESTRICTABLE:
            if not allowed(token.key_attributes(handle)):
                continue
            try:
                token.set_key_flag(handle, kind, False)
            except HsmError as exc:
                refused.append((name, exc.ckr_name))
                continue
            if allowed(token.key_attributes(handle)):
                refused.append((name, "the HSM answered CKR_OK but the attribute is still true"))
            else:
                cleared.append(name)
        after = _uuid_text(token, token.key_attributes(handle))
    finally:
        token.close()
    return Restricted(label, before, after, tuple(cleared), tuple(refused))


def _uuid_text(token: Token, attrs: SecretKeyAttributes) -> str:
    try:
        return str(key_uuid(token, attrs)[0])
    except HsmError:
        return "-"


def check_new_label(config: PluginConfig, label: str) -> None:
    problem = label_problem(label)
    if problem is not None:
        raise ConfigError(f"--label {label!r} {problem}; choose a label of letters, digits, '-', '_' and '.' "
                          "(for example k8s-kek-2026-11)")
    if label in config.secondary_keys:
        # New key material under an old label can never decrypt what the old key wrapped.
        raise ConfigError(
            f"--label {label!r} is listed in Secondary_key ({config.where('secondary_key')}): it names an old key "
            "that data may still need, and a new key under that label can never decrypt that data; restore the "
            "old key from an HSM backup or replica, or choose a new label for a new key"
        )


def list_keys(config: PluginConfig) -> list[KeyRow]:
    """Every AES secret key on the configured token, sorted by label, with its role in ``config``."""
    roles = {config.primary_key: "primary", **{label: "secondary" for label in config.secondary_keys}}
    token = open_configured_token(config)
    try:
        rows = []
        for attrs in token.aes_keys():  # only AES keys can be KEKs
            aliases: tuple[str, ...] = ()
            try:
                uuid_value, source = key_uuid(token, attrs)
                uuid_text = str(uuid_value)
                if source != "cka_id":
                    aliases = tuple(str(alias) for alias in alias_uuids(token, attrs, uuid_value))
            except HsmError as exc:  # a key that allows no fingerprint mechanism, or an unstable one
                uuid_text, source = "-", f"unavailable ({exc.ckr_name})"
            rows.append(KeyRow(attrs.label, uuid_text, roles.get(attrs.label, "-"), source, aliases))
    finally:
        token.close()
    return sorted(rows)
