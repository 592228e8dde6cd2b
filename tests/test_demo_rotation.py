"""The documented walkthrough (scripts/demo-rotation.sh) runs as written and ends on the new key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_rotation_script_completes() -> None:
    # Any free HTTP port: the default 8095 may be taken by a development plugin or another test.
    env = {**os.environ, "PYTHON": sys.executable, "DEMO_HTTP_ADDRESS": "127.0.0.1:0"}
    result = subprocess.run([str(ROOT / "scripts" / "demo-rotation.sh")], env=env, capture_output=True, text=True,
                            timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    before, _, after = result.stdout.partition("=== 5. re-encrypt every secret")
    assert "(expected: not re-encrypted yet)" in before
    assert "secret/rotation-canary replaced" in after
    assert "OK: every object of secrets is on key" in after
    new_uuid = after.split("OK: every object of secrets is on key ")[1].split()[0]
    assert f"role=primary label=kek-2 uuid={new_uuid}" in after
