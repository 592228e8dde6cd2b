"""Key management for operators: create a KEK, list the token's keys with their UUIDs and roles."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from p11kms.config import ConfigError, PluginConfig, label_problem
from p11kms.hsm import ckdefs as ck
from p11kms.hsm.errors import HsmError
from p11kms.hsm.keyident import create_kek, key_uuid
from p11kms.plugin.supervisor import open_configured_token


@dataclass(frozen=True, order=True)
class KeyRow:
    label: str
    uuid: str  # "-" when no UUID can be computed
    role: str  # "primary", "secondary" or "-" (not in the config)
    uuid_source: str


def create_key(config: PluginConfig, label: str) -> uuid.UUID:
    """Creates a new KEK; a careless or old label is refused before the HSM is touched."""
    check_new_label(config, label)
    token = open_configured_token(config)
    try:
        return create_kek(token, label)
    finally:
        token.close()


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
        for handle in token.find_secret_keys():
            attrs = token.key_attributes(handle)
            if attrs.key_type != ck.CKK_AES:  # only AES keys can be KEKs
                continue
            try:
                uuid_value, source = key_uuid(token, attrs)
                uuid_text = str(uuid_value)
            except HsmError as exc:  # e.g. a foreign decrypt-only key: no fingerprint can be computed
                uuid_text, source = "-", f"unavailable ({exc.ckr_name})"
            rows.append(KeyRow(attrs.label, uuid_text, roles.get(attrs.label, "-"), source))
    finally:
        token.close()
    return sorted(rows)
