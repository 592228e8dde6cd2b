"""The soak of issue 5: 256 callers, 100,000 calls, a hot reload and a remote-HSM restart mid-run.

Runs bench/soak.py at full size and checks what must hold: no wrong answer, errors only while the
HSM is down, and the plugin still up. The script prints the figures (throughput, latency, RSS).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_soak_with_reload_and_hsm_restart() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--callers", "256",
                             "--calls", "100000"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    print("\n" + result.stdout)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["calls"] >= 100_000 and figures["callers"] == 256
    assert figures["wrong"] == 0
    assert figures["errors_outside_hsm_outage"] == 0
    assert set(figures["error_codes"]) <= {"UNAVAILABLE"}
    assert figures["plugin_alive"] is True
    # The SIGHUP rotation really took effect: Status reports the new key afterwards.
    assert figures["key_id_before_reload"] and figures["key_id_after_reload"]
    assert figures["key_id_before_reload"] != figures["key_id_after_reload"]
    # No growth that looks like a leak: the second half of the run stays near the first half's peak.
    assert figures["rss_kib_second_half_max"] <= 1.25 * figures["rss_kib_first_half_max"]
    assert figures["rss_kib_after"] < 200 * 1024
