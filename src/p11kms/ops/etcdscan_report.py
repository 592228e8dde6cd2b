"""Rendering of an etcd scan report for people (text) and for scripts (JSON)."""

from __future__ import annotations

import json
import shlex
from collections import defaultdict
from typing import Any

from p11kms.ops.etcdscan import GateResult, ScanReport


def _per_resource(counts: dict[str, int]) -> str:
    return ", ".join(f"{resource}={count}" for resource, count in sorted(counts.items()))


def render_text(report: ScanReport, labels: dict[str, str] | None = None) -> str:
    """The report for people; ``labels`` (key UUID -> label, from the plugin config's token) names the keys."""
    lines = [f"etcd revision {report.revision}, prefix {report.prefix}: {report.scanned} keys scanned"]
    if report.given_prefix is not None:
        lines.append(f"(--prefix {report.given_prefix!r} read as {report.prefix}: kube-apiserver stores under "
                     "its --etcd-prefix followed by '/')")
    lines.append("")
    by_key = report.by_key()
    lines.append("KMS v2 objects by provider and key UUID:")
    if not by_key:
        lines.append("  none")
    for (provider, key_id), resources in sorted(by_key.items()):
        label = f" label={labels.get(key_id, '(not on this token)')}" if labels is not None else ""
        lines.append(f"  provider={provider} key={key_id}{label} objects={sum(resources.values())} "
                     f"({_per_resource(resources)})")
    by_kind: dict[str, dict[str, int]] = defaultdict(dict)
    for (kind, resource), count in report.other.items():
        by_kind[kind][resource] = count
    lines.append("Not KMS v2:")
    if not by_kind:
        lines.append("  none")
    for kind, resources in sorted(by_kind.items()):
        lines.append(f"  {kind}: {sum(resources.values())} ({_per_resource(resources)})")
    lines.append(f"Corrupt KMS v2 values: {len(report.corrupt)}")
    lines += [f"  {item.key}: {item.reason}" for item in report.corrupt]
    return "\n".join(lines)


def _gate_document(gate: GateResult) -> dict[str, Any]:
    return {
        "required_key": gate.required,
        "verdict": gate.verdict,
        "exit_code": gate.exit_code,
        "checked": gate.checked,
        "not_on_key": [{"resource": resource, "key": item.key, "reason": item.reason}
                       for resource, items in sorted(gate.not_on_key.items()) for item in items],
        "lines": gate.lines,
    }


def render_json(report: ScanReport, gate: GateResult | None = None) -> str:
    document: dict[str, Any] = {
        "revision": report.revision,
        "prefix": report.prefix,
        "scanned": report.scanned,
        "kms_v2": [
            {"provider": provider, "key_id": key_id, "objects": sum(resources.values()), "resources": resources}
            for (provider, key_id), resources in sorted(report.by_key().items())
        ],
        "other": [{"kind": kind, "resource": resource, "objects": count}
                  for (kind, resource), count in sorted(report.other.items())],
        "corrupt": [{"key": item.key, "resource": item.resource, "reason": item.reason} for item in report.corrupt],
    }
    if gate is not None:
        document["gate"] = _gate_document(gate)
    return json.dumps(document, indent=2)


# etcd key segments whose kubectl resource name differs from the segment kube-apiserver stores under
_KUBECTL_NAMES = {"minions": "nodes", "services/specs": "services", "services/endpoints": "endpoints"}
_NAMES_PER_COMMAND = 50  # keeps each command line well under any shell's limit


def rewrite_commands(gate: GateResult, prefix: str) -> list[str]:
    """For the objects not on the required key only: the kubectl commands that make kube-apiserver rewrite them.

    One command per namespace and resource (names listed, in chunks), so a second pass touches only
    what the first missed. ``kubectl replace`` without ``--force``: an update re-encrypts with the
    current key and keeps the object's UID; ``--force`` deletes and re-creates it instead.
    Corrupt values cannot be read, so they get no command; they are listed as such.
    """
    grouped: dict[tuple[str, str | None], list[str]] = defaultdict(list)
    unreadable: list[str] = []
    for items in gate.not_on_key.values():
        for item in items:
            if item.reason.startswith("corrupt"):
                unreadable.append(item.key)
                continue
            parts = item.key[len(prefix):].split("/")
            if len(parts) >= 2 and "." in parts[0]:  # an API group: group/resource/...
                resource, rest = f"{parts[1]}.{parts[0]}", parts[2:]
            elif len(parts) >= 3 and "/".join(parts[:2]) in _KUBECTL_NAMES:
                resource, rest = _KUBECTL_NAMES["/".join(parts[:2])], parts[2:]
            else:
                resource, rest = _KUBECTL_NAMES.get(parts[0], parts[0]), parts[1:]
            namespace, name = (rest[0], rest[1]) if len(rest) >= 2 else (None, rest[-1])
            grouped[(resource, namespace)].append(name)
    lines = []
    for (resource, namespace), names in sorted(grouped.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        where = f" -n {shlex.quote(namespace)}" if namespace is not None else ""
        ordered = sorted(names)
        for start in range(0, len(ordered), _NAMES_PER_COMMAND):
            chunk = " ".join(shlex.quote(n) for n in ordered[start:start + _NAMES_PER_COMMAND])
            lines.append(f"kubectl get {resource}{where} {chunk} -o json | kubectl replace -f -")
    lines += [f"# {key}: corrupt, cannot be read or rewritten; restore it from a backup or delete it"
              for key in sorted(unreadable)]
    return lines
