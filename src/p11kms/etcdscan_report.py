"""Rendering of an etcd scan report for people (text) and for scripts (JSON)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

from p11kms.etcdscan import ScanReport


def _per_resource(counts: dict[str, int]) -> str:
    return ", ".join(f"{resource}={count}" for resource, count in sorted(counts.items()))


def render_text(report: ScanReport) -> str:
    lines = [f"etcd revision {report.revision}, prefix {report.prefix}: {report.scanned} keys scanned", ""]
    by_key: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    for (provider, key_id, resource), count in report.kms.items():
        by_key[(provider, key_id)][resource] = count
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
    totals: Counter[tuple[str, str]] = report.key_ids()
    document = {
        "revision": report.revision,
        "prefix": report.prefix,
        "scanned": report.scanned,
        "kms_v2": [
            {"provider": provider, "key_id": key_id, "objects": count,
             "resources": {r: n for (p, k, r), n in report.kms.items() if (p, k) == (provider, key_id)}}
            for (provider, key_id), count in sorted(totals.items())
        ],
        "other": [{"kind": kind, "resource": resource, "objects": count}
                  for (kind, resource), count in sorted(report.other.items())],
        "corrupt": [{"key": key, "reason": reason} for key, reason in report.corrupt],
    }
    return json.dumps(document, indent=2)
