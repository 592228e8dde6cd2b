"""The checks kube-apiserver applies to a KMS v2 plugin's answers (spec 2.2, 2.4, 2.7, 3.4).

Each function returns a list of problems (empty when the value passes), worded
like the reason kube-apiserver would give. ``p11kms check``, the kube-apiserver
stand-in and the etcd scanner share them, so all three judge by the same rules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

ACCEPTED_VERSIONS = ("v2", "v2beta1")
MAX_KEY_ID_BYTES = 1024
MAX_CIPHERTEXT_BYTES = 1024
MAX_ANNOTATIONS_BYTES = 32 * 1024
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})*")


def key_id_problems(key_id: str) -> list[str]:
    size = len(key_id.encode())
    if size == 0:
        return ["key_id is empty"]
    if size > MAX_KEY_ID_BYTES:
        return [f"key_id is {size} bytes, more than {MAX_KEY_ID_BYTES}"]
    return []


def status_problems(version: str, healthz: str, key_id: str, first_version: str | None = None) -> list[str]:
    problems = []
    if healthz != "ok":
        problems.append(f"healthz is {healthz!r}, not 'ok'")
    if version not in ACCEPTED_VERSIONS:
        problems.append(f"version is {version!r}, expected one of {', '.join(ACCEPTED_VERSIONS)}")
    elif first_version is not None and version != first_version:
        problems.append(f"version changed from {first_version!r} to {version!r}")
    return problems + key_id_problems(key_id)


def is_fqdn(name: str) -> bool:
    """The annotation-key rule: a lowercase RFC 1123 subdomain of at least two labels."""
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > 253 or not _SUBDOMAIN.fullmatch(name):
        return False
    labels = name.split(".")
    return len(labels) >= 2 and all(len(label) <= 63 for label in labels)


def annotations_problems(annotations: Mapping[str, bytes]) -> list[str]:
    problems = [f"annotation key {key!r} is not a fully qualified domain name" for key in annotations
                if not is_fqdn(key)]
    size = sum(len(key.encode()) + len(value) for key, value in annotations.items())
    if size > MAX_ANNOTATIONS_BYTES:
        problems.append(f"annotations total {size} bytes, more than {MAX_ANNOTATIONS_BYTES}")
    return problems


def encrypted_object_problems(ciphertext: bytes, key_id: str, annotations: Mapping[str, bytes]) -> list[str]:
    """Checks on an Encrypt response, and on what is stored in etcd (ValidateEncryptedObject)."""
    problems = []
    if not ciphertext:
        problems.append("ciphertext is empty")
    elif len(ciphertext) > MAX_CIPHERTEXT_BYTES:
        problems.append(f"ciphertext is {len(ciphertext)} bytes, more than {MAX_CIPHERTEXT_BYTES}")
    return problems + key_id_problems(key_id) + annotations_problems(annotations)
