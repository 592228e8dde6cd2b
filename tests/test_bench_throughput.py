"""bench/throughput.py runs and prints well-formed figures. No timing thresholds: the benchmark
reports (docs/performance.md), the test only proves it works end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_throughput_bench_reports_every_phase_for_all_three_servers(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--calls", "64",
                             "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    phases = {(p["server"], p["method"], p["callers"]): p for p in report["phases"]}
    assert set(phases) == {(server, method, callers) for server in ("noop", "keyring", "p11kms")
                           for method in ("Encrypt", "Decrypt") for callers in (1, 16, 64)}
    for phase in phases.values():
        assert phase["errors"] == 0 and phase["calls"] == 64
        assert phase["calls_per_second"] > 0 and 0 < phase["p50_ms"] <= phase["p99_ms"] <= phase["max_ms"]
    assert report["peak_rss_kib"]["p11kms"] > 0 and report["ready_seconds"]["p11kms"] > 0
    assert report["hsm_operation_cpu"]["decrypt_us"] > 0
    assert "(1." in result.stdout or "(0." in result.stdout  # ratios to the floor are printed
    # The split adds up: floor + HSM in the server + p11kms's layers is p11kms's own figure.
    for part in report["cost_split"]:
        p11kms = phases[("p11kms", part["method"], part["callers"])]["server_cpu_us_per_call"]
        total = part["grpc_floor_us"] + part["hsm_in_server_us"] + part["p11kms_layers_us"]
        assert abs(total - p11kms) < 0.5, (part, p11kms)
    assert len(report["cost_split"]) == 6 and "p11kms's own layers" in result.stdout


def test_floors_bench_reports_every_server_set_up(tmp_path: Path) -> None:
    out = tmp_path / "floors.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "floors.py"), "--calls", "64",
                             "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    phases = {(p["server"], p["callers"]): p for p in json.loads(out.read_text())["phases"]}
    assert set(phases) == {(setup, callers) for setup in ("p11kms", "sync-2", "sync-16", "sync-64", "aio", "aio-pool")
                           for callers in (1, 16)}
    for phase in phases.values():
        assert phase["errors"] == 0 and phase["calls"] == 64 and phase["server_cpu_us_per_call"] >= 0
    assert "aio-pool" in result.stdout
