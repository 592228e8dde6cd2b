"""Fixtures of the HSM-layer tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import FaultControl, HsmEnv, private_module_copy


@pytest.fixture
def private_fault_module(hsm_env: HsmEnv, faults: FaultControl, tmp_path: Path,
                         monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fault module in front of a private SoftHSM instance, loaded in this test process."""
    softhsm = private_module_copy(tmp_path / "softhsm", hsm_env.module)
    for name, value in faults.env(str(softhsm)).items():
        monkeypatch.setenv(name, value)
    return private_module_copy(tmp_path / "fault", faults.module)
