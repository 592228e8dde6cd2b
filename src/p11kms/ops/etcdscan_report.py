"""Rendering of an etcd scan report for people (text) and for scripts (JSON)."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from p11kms.ops.etcdscan import GateResult, ScanReport


def _per_resource(counts: dict[str, int]) -> str:
    return ", ".join(f"{resource}={count}" for resource, count in sorted(counts.items()))


def render_text(report: ScanReport) -> str:
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
        lines.append(f"  provider={provider} key={key_id} objects={sum(resources.values())} "
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
