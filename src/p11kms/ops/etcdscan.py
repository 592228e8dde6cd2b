"""A read-only scan of kube-apiserver's etcd keyspace: which key UUID protects which objects.

Nothing is decrypted and nothing is written. kube-apiserver stores each KMS v2
object's key_id in clear, so counting objects per provider and key UUID proves
when an old key no longer protects anything and can be retired.
"""

from __future__ import annotations

import difflib
import hashlib
import posixpath
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from p11kms.kube import envelope
from p11kms.kube.etcd import EtcdClient, KeyValue

# Exit codes of ``etcd scan --require``; 2 stays the usage error of every p11kms command.
EXIT_PASSED = 0
EXIT_NOT_ON_KEY = 1  # objects of a checked resource are not on the key: the old key is still needed
EXIT_NOTHING_PROVEN = 3  # nothing was checked (empty keyspace, wrong prefix, unknown resource): no verdict

WHERE_UUIDS_ARE = ("kube-apiserver stores the key UUID (the plugin's key_id) with every object, never the key "
                   "label: find it with 'p11kms keys list --config FILE' (UUID column), 'p11kms status --socket "
                   "SOCK' (key_id) or in the plugin log line 'keyring loaded role=primary label=... uuid=...'")


def parse_key_uuid(text: str) -> str:
    """``text`` if it is a key UUID in canonical form (lower-case 8-4-4-4-12), the form kube-apiserver stores.

    The gate compares strings, so a label or another spelling of the UUID would match nothing.
    """
    try:
        canonical = str(uuid.UUID(text))
    except ValueError:
        raise ValueError(f"{text!r} is not a key UUID: {WHERE_UUIDS_ARE}") from None
    if canonical != text:
        raise ValueError(f"{text!r} is not a key UUID as kube-apiserver stores it: write it as {canonical}")
    return text


def normalise_prefix(prefix: str) -> str:
    """The prefix kube-apiserver stores under for ``--etcd-prefix prefix``: rooted, cleaned, ending in '/'.

    kube-apiserver joins its --etcd-prefix to '/' and appends '/', so '/registry', 'registry/' and
    '/registry/' all store under '/registry/'; reading '/registry' as given would also match '/registry-x/...'.
    """
    cleaned = posixpath.normpath("/" + prefix.lstrip("/"))
    return cleaned if cleaned.endswith("/") else cleaned + "/"


def resource_of(key: bytes, prefix: bytes) -> str:
    """``secrets`` for /registry/secrets/ns/name; ``group/resource`` for keys of API groups with dots."""
    parts = key[len(prefix):].decode("utf-8", errors="replace").split("/")
    if len(parts) > 2 and "." in parts[0]:
        return f"{parts[0]}/{parts[1]}"
    return parts[0]


class Corrupt(NamedTuple):
    key: str
    resource: str
    reason: str


class OffKey(NamedTuple):
    """An object of a resource that is not on the required key, and why."""

    key: str
    reason: str
    key_id: str | None = None  # the key UUID it is stored under, when it is a readable KMS v2 value


@dataclass
class ScanReport:
    prefix: str
    required: str | None = None  # the key UUID offenders were recorded against, if any
    given_prefix: str | None = None  # the --prefix as typed, when normalising changed it
    revision: int = 0
    scanned: int = 0
    kms: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (provider, key_id, resource)
    other: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, resource)
    corrupt: list[Corrupt] = field(default_factory=list)
    off_key: dict[str, list[OffKey]] = field(default_factory=lambda: defaultdict(list))  # resource -> objects

    def add(self, kv: KeyValue) -> None:
        """Counts one stored value; with a required key, records it if it is not on that key."""
        self.scanned += 1
        resource = resource_of(kv.key, self.prefix.encode())
        key_text = kv.key.decode("utf-8", errors="replace")
        kind = envelope.value_kind(kv.value)
        if kind != "kms-v2":
            self.other[(kind, resource)] += 1
            clear = kind == "identity"
            self._off_key(resource, key_text,
                          "stored in clear (identity)" if clear else f"encrypted by the {kind} provider, not KMS v2")
            return
        try:
            sealed = envelope.decode(kv.value)
        except envelope.EnvelopeError as exc:
            self.corrupt.append(Corrupt(key_text, resource, str(exc)))
            self._off_key(resource, key_text, f"corrupt KMS v2 value: {exc}")
            return
        self.kms[(sealed.provider, sealed.key_id, resource)] += 1
        if sealed.key_id != self.required:
            self._off_key(resource, key_text, f"on another key UUID {sealed.key_id} (provider {sealed.provider})",
                          sealed.key_id)

    def _off_key(self, resource: str, key: str, reason: str, key_id: str | None = None) -> None:
        # Only a gated scan keeps names: an ungated scan of a large cluster would hold every key in memory.
        if self.required is not None:
            self.off_key[resource].append(OffKey(key, reason, key_id))

    def objects_under(self, key_ids: set[str]) -> list[OffKey]:
        """Every KMS v2 object, of any resource, stored under one of ``key_ids`` (none of them the required key).

        Only a gated scan (``required`` set) keeps the objects' names.
        """
        if self.required is None:
            raise ValueError("only a scan with require= keeps the objects' names")
        return [item for items in self.off_key.values() for item in items if item.key_id in key_ids]

    def by_key(self) -> dict[tuple[str, str], dict[str, int]]:
        """Object counts per resource, grouped by (provider, key UUID)."""
        grouped: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
        for (provider, key_id, resource), count in self.kms.items():
            grouped[(provider, key_id)][resource] = count
        return dict(grouped)

    def key_ids(self) -> Counter[tuple[str, str]]:
        return Counter({key: sum(resources.values()) for key, resources in self.by_key().items()})

    def encrypted_resources(self) -> set[str]:
        """Resources holding at least one KMS v2 value (corrupt ones included: they claim to be KMS v2)."""
        return {resource for (_, _, resource) in self.kms} | {c.resource for c in self.corrupt}

    def objects_per_resource(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for (_, _, resource), count in self.kms.items():
            counts[resource] += count
        for (_, resource), count in self.other.items():
            counts[resource] += count
        counts.update(c.resource for c in self.corrupt)
        return counts

    def on_key(self, key_id: str) -> Counter[str]:
        """Objects per resource that are KMS v2 under ``key_id``."""
        counts: Counter[str] = Counter()
        for (_, stored_key_id, resource), count in self.kms.items():
            if stored_key_id == key_id:
                counts[resource] += count
        return counts


def scan(client: EtcdClient, prefix: str = "/registry/", *, page_size: int = 500, require: str | None = None,
         progress: Callable[[int], None] | None = None) -> ScanReport:
    normal = normalise_prefix(prefix)
    report = ScanReport(prefix=normal, required=require, given_prefix=prefix if prefix != normal else None,
                        revision=client.revision())
    for page in client.scan_prefix(normal.encode(), page_size=page_size, revision=report.revision):
        for kv in page:
            report.add(kv)
        if progress:
            progress(report.scanned)
    return report


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
    """The verdict of ``etcd scan --require``, its exit code, and the lines that explain it."""

    exit_code: int
    lines: list[str]
    required: str
    checked: dict[str, int] = field(default_factory=dict)  # resource -> objects checked
    not_on_key: dict[str, list[OffKey]] = field(default_factory=dict)  # resource -> objects off the key

    @property
    def passed(self) -> bool:
        return self.exit_code == EXIT_PASSED

    @property
    def verdict(self) -> str:
        return {EXIT_PASSED: "passed", EXIT_NOT_ON_KEY: "not_on_key"}.get(self.exit_code, "nothing_proven")


def require_key(report: ScanReport, require: str, resources: set[str] | None = None) -> GateResult:
    """The gate of ``etcd scan --require``: passes only when objects were checked and all are on the key.

    Counts decide the verdict; the per-object list only explains it. Every resource that holds KMS v2
    values is checked; ``resources`` adds resources (whose objects may all still be in clear), it never
    leaves one out: an object on another key, in any resource, keeps that key needed.
    """
    if report.required != require:
        raise ValueError(f"the report was scanned for key {report.required}, not {require}: "
                         "scan with require= the same key")
    counts = report.objects_per_resource()
    checked = set(resources or ()) | report.encrypted_resources()
    if not checked:
        return GateResult(EXIT_NOTHING_PROVEN, _nothing_checked(report, counts), require)
    empty = sorted(r for r in checked if not counts[r])
    present = {r: counts[r] for r in sorted(checked) if counts[r]}
    on_key = report.on_key(require)
    failing = {r: n for r, n in present.items() if on_key[r] != n}
    lines = [line for r, n in failing.items() for line in _failure_lines(report, r, n - on_key[r], n, require)]
    lines += [_empty_resource_line(report, r, counts) for r in empty]
    lines += [f"OK: {r}: {_objects(n)}, all on key {require}" for r, n in present.items() if r not in failing]
    not_on_key = {r: report.off_key.get(r, []) for r in failing}
    if failing or empty:
        code = EXIT_NOT_ON_KEY if failing else EXIT_NOTHING_PROVEN
        return GateResult(code, lines, require, present, not_on_key)
    # The summary keeps the form scripts already read: "OK: every object of R is on key UUID".
    lines.append(f"OK: every object of {', '.join(present)} is on key {require} "
                 f"({_objects(sum(present.values()))} checked)")
    lines += _unchecked_note(counts, set(present))
    return GateResult(EXIT_PASSED, lines, require, present)


def _failure_lines(report: ScanReport, resource: str, off: int, total: int, require: str) -> list[str]:
    head = f"FAIL: {resource}: {off} of {_objects(total)} {'is' if off == 1 else 'are'} not on key {require}:"
    return [head, *(f"  {item.key}: {item.reason}" for item in report.off_key.get(resource, []))]


def _nothing_checked(report: ScanReport, counts: Counter[str]) -> list[str]:
    if not report.scanned:
        return [f"NOTHING PROVEN: no key under prefix {report.prefix} at etcd revision {report.revision} "
                f"({report.scanned} keys scanned): --prefix must be kube-apiserver's --etcd-prefix (default "
                "/registry) and --endpoints the etcd it writes to"]
    kinds: dict[str, Counter[str]] = defaultdict(Counter)
    for (kind, resource), count in report.other.items():
        kinds["in clear" if kind == "identity" else f"with {kind}"][resource] += count
    found = "; ".join(f"stored {how}: {_counts(c)}" for how, c in sorted(kinds.items()))
    example = "secrets" if "secrets" in counts else min(counts)
    return [f"NOTHING PROVEN: no object under {report.prefix} is KMS v2, so no resource was checked ({found}).",
            f"  Name each resource your EncryptionConfiguration encrypts, e.g. --resource {example}: its objects "
            "that are not on the key are then listed"]


def _empty_resource_line(report: ScanReport, resource: str, counts: Counter[str]) -> str:
    line = f"NOTHING PROVEN: no object of resource {resource!r} under {report.prefix}"
    close = suggest_resources(resource, set(counts))
    if close:
        return f"{line}; did you mean {' or '.join(close)}?"
    seen = ", ".join(sorted(counts)[:10]) or "none"
    return f"{line}; resources seen: {seen}"


def suggest_resources(name: str, seen: set[str]) -> list[str]:
    """Resources a mistyped --resource probably meant: close spellings, or the same name in an API group."""
    in_group = sorted(r for r in seen if r.endswith("/" + name))
    return in_group or difflib.get_close_matches(name, sorted(seen), n=3, cutoff=0.75)


def _unchecked_note(counts: Counter[str], checked: set[str]) -> list[str]:
    unchecked = sorted(set(counts) - checked)
    if not unchecked:
        return []
    shown = ", ".join(unchecked[:6]) + (f" and {len(unchecked) - 6} more" if len(unchecked) > 6 else "")
    return [f"  not checked (no KMS v2 object): {shown}; name a resource with --resource to require it too"]


def _objects(count: int) -> str:
    return f"{count} object" if count == 1 else f"{count} objects"


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{name}={count}" for name, count in sorted(counter.items()))
