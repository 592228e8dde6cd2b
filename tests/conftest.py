"""Fixtures: one real SoftHSM2 token per test session, and plugin processes that use it.

SOFTHSM2_CONF is set before the PKCS#11 module is first loaded in this process:
SoftHSM reads it once, at C_Initialize.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from p11kms.hsm.keyident import create_kek
from p11kms.hsm.module import load_module
from p11kms.hsm.provision import init_token
from p11kms.hsm.token import Token, open_token
from p11kms.ops.devenv import find_softhsm_module, write_softhsm_conf
from tests.support import (
    SO_PIN,
    TOKEN_LABEL,
    USER_PIN,
    FaultControl,
    HsmEnv,
    PluginProcess,
    build_fault_module,
    running_etcd,
    start_plugin,
    unique_label,
)


@pytest.fixture(scope="session")
def hsm_env(tmp_path_factory: pytest.TempPathFactory) -> HsmEnv:
    directory = tmp_path_factory.mktemp("softhsm")
    conf = write_softhsm_conf(directory)
    os.environ["SOFTHSM2_CONF"] = str(conf)
    module_path = find_softhsm_module()
    init_token(load_module(module_path), TOKEN_LABEL, SO_PIN.encode(), USER_PIN.encode())
    pin_file = directory / "user.pin"
    pin_file.write_text(USER_PIN + "\n")
    pin_file.chmod(0o600)
    return HsmEnv(directory, module_path, conf, pin_file)


@pytest.fixture(scope="session")
def token(hsm_env: HsmEnv) -> Iterator[Token]:
    module = load_module(hsm_env.module)
    info = module.find_token(label=TOKEN_LABEL, serial=None, slot=None)
    opened = open_token(module, info, USER_PIN.encode(), pool_size=16)
    yield opened
    opened.close()


@pytest.fixture
def new_key(token: Token) -> Callable[[], tuple[str, str]]:
    """Creates a fresh KEK on the test token; returns (label, uuid)."""

    def create() -> tuple[str, str]:
        label = unique_label()
        return label, str(create_kek(token, label))

    return create


@pytest.fixture
def run_plugin(hsm_env: HsmEnv, tmp_path: Path) -> Iterator[Callable[..., PluginProcess]]:
    """Starts plugin processes for one test and stops whatever is still running afterwards."""
    started: list[PluginProcess] = []

    def run(primary: str, secondary: str = "", *, config_name: str = "p11kms.cfg", **attributes: str) -> PluginProcess:
        directory = tmp_path / config_name.replace(".", "-")
        directory.mkdir(exist_ok=True)
        config = hsm_env.write_config(directory / config_name, primary, secondary, **attributes)
        plugin = start_plugin(hsm_env, config)
        started.append(plugin)
        return plugin

    yield run
    for plugin in started:
        plugin.stop()


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real etcd server for the test session; tests keep apart by key prefix."""
    with running_etcd(tmp_path_factory.mktemp("etcd")) as url:
        yield url


@pytest.fixture(scope="session")
def fault_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fault_module(tmp_path_factory.mktemp("faultmodule"))


@pytest.fixture
def faults(fault_module: Path, tmp_path: Path) -> FaultControl:
    return FaultControl(fault_module, tmp_path / "p11fault.control", tmp_path / "p11fault.calls")
