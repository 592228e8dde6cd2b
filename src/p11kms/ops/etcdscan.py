"""A read-only scan of kube-apiserver's etcd keyspace: which key UUID protects which objects.

Nothing is decrypted and nothing is written. kube-apiserver stores each KMS v2
object's key_id in clear, so counting objects per provider and key UUID proves
when an old key no longer protects anything and can be retired.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from p11kms.kube import envelope
from p11kms.kube.etcd import EtcdClient, KeyValue


def resource_of(key: bytes, prefix: bytes) -> str:
    """``secrets`` for /registry/secrets/ns/name; ``group/resource`` for keys of API groups with dots."""
    parts = key[len(prefix):].decode("utf-8", errors="replace").split("/")
    if len(parts) > 2 and "." in parts[0]:
        return f"{parts[0]}/{parts[1]}"
    return parts[0]


@dataclass
class ScanReport:
    prefix: str
    revision: int = 0
    scanned: int = 0
    kms: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (provider, key_id, resource)
    other: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, resource)
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    off_key: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # resource -> keys

    def by_key(self) -> dict[tuple[str, str], dict[str, int]]:
        """Object counts per resource, grouped by (provider, key UUID)."""
        grouped: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
        for (provider, key_id, resource), count in self.kms.items():
            grouped[(provider, key_id)][resource] = count
        return dict(grouped)

    def key_ids(self) -> Counter[tuple[str, str]]:
        return Counter({key: sum(resources.values()) for key, resources in self.by_key().items()})

    def encrypted_resources(self) -> set[str]:
        return {resource for (_, _, resource) in self.kms}

    def not_on(self, resources: set[str]) -> list[str]:
        """Objects of ``resources`` that are not KMS v2 under the required key, corrupt ones included."""
        keys = [key for resource in sorted(resources) for key in self.off_key.get(resource, [])]
        return keys + [key for key, _ in self.corrupt]


def scan(client: EtcdClient, prefix: str = "/registry/", *, page_size: int = 500, require: str | None = None,
         progress: Callable[[int], None] | None = None) -> ScanReport:
    report = ScanReport(prefix=prefix, revision=client.revision())
    raw_prefix = prefix.encode()
    for page in client.scan_prefix(raw_prefix, page_size=page_size, revision=report.revision):
        for kv in page:
            _classify(report, kv, raw_prefix, require)
        report.scanned += len(page)
        if progress:
            progress(report.scanned)
    return report


def _classify(report: ScanReport, kv: KeyValue, prefix: bytes, require: str | None) -> None:
    resource = resource_of(kv.key, prefix)
    key_text = kv.key.decode("utf-8", errors="replace")
    kind = envelope.value_kind(kv.value)
    if kind != "kms-v2":
        report.other[(kind, resource)] += 1
        if require is not None:
            report.off_key[resource].append(key_text)
        return
    try:
        sealed = envelope.decode(kv.value)
    except envelope.EnvelopeError as exc:
        report.corrupt.append((key_text, str(exc)))
        return
    report.kms[(sealed.provider, sealed.key_id, resource)] += 1
    if require is not None and sealed.key_id != require:
        report.off_key[resource].append(key_text)


def describe_value(kv: KeyValue) -> list[tuple[str, str]]:
    """The envelope of one stored value, field by field, without decrypting anything."""
    rows = [("key", kv.key.decode("utf-8", errors="replace")), ("etcd mod revision", str(kv.mod_revision)),
            ("value kind", envelope.value_kind(kv.value)), ("value bytes", str(len(kv.value)))]
    if rows[2][1] != "kms-v2":
        return rows
    try:
        sealed = envelope.decode(kv.value)
    except envelope.EnvelopeError as exc:
        return [*rows, ("corrupt", str(exc))]
    annotations = ", ".join(f"{k}={v!r}" for k, v in sorted(sealed.annotations.items())) or "none"
    return [
        *rows,
        ("provider", sealed.provider),
        ("key UUID (keyID)", sealed.key_id),
        ("DEK source type", f"{envelope.TYPE_NAMES[sealed.dek_source_type]} ({sealed.dek_source_type})"),
        ("encryptedDEKSource", f"{len(sealed.encrypted_dek_source)} bytes, "
                               f"sha256:{hashlib.sha256(sealed.encrypted_dek_source).hexdigest()}"),
        ("annotations", annotations),
        ("encryptedData", f"{len(sealed.encrypted_data)} bytes"),
    ]


@dataclass(frozen=True)
class GateResult:
    """Whether every object of the checked resources is on the required key, and the lines that say so."""

    passed: bool
    lines: list[str]


def require_key(report: ScanReport, require: str, resources: set[str] | None = None) -> GateResult:
    """The gate of ``etcd scan --require``: decides whether an old key still protects anything."""
    checked = resources if resources else report.encrypted_resources()
    missing = report.not_on(checked)
    if missing:
        head = (f"FAIL: {len(missing)} object(s) of {', '.join(sorted(checked)) or 'no resource'} "
                f"are not on key {require}:")
        return GateResult(False, [head, *(f"  {key}" for key in missing)])
    return GateResult(True, [f"OK: every object of {', '.join(sorted(checked))} is on key {require}"])
