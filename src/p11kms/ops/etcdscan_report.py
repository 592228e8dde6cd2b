"""Rendering of an etcd scan report for people (text) and for scripts (JSON)."""

from __future__ import annotations

import json
from collections import defaultdict

from p11kms.ops.etcdscan import ScanReport


def _per_resource(counts: dict[str, int]) -> str:
    return ", ".join(f"{resource}={count}" for resource, count in sorted(counts.items()))


def render_text(report: ScanReport) -> str:
    lines = [f"etcd revision {report.revision}, prefix {report.prefix}: {report.scanned} keys scanned", ""]
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
    lines += [f"  {key}: {reason}" for key, reason in report.corrupt]
    return "\n".join(lines)


def render_json(report: ScanReport) -> str:
    document = {
        "revision": report.revision,
        "prefix": report.prefix,
        "scanned": report.scanned,
        "kms_v2": [
            {"provider": provider, "key_id": key_id, "objects": sum(resources.values()), "resources": resources}
            for (provider, key_id), resources in sorted(report.by_key().items())
        ],
        "other": [{"kind": kind, "resource": resource, "objects": count}
                  for (kind, resource), count in sorted(report.other.items())],
        "corrupt": [{"key": key, "reason": reason} for key, reason in report.corrupt],
    }
    return json.dumps(document, indent=2)
