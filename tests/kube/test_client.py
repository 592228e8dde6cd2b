"""How `p11kms status` and `check` find the plugin's socket, and say why they cannot reach it."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from p11kms.kube.client import KmsClient, socket_path, socket_problem
from tests.misbehaving import Behaviour, serve_misbehaving


@pytest.mark.parametrize(("given", "path"), [
    ("/var/run/kmsplugin/kms.sock", "/var/run/kmsplugin/kms.sock"),
    ("unix:///var/run/kmsplugin/kms.sock", "/var/run/kmsplugin/kms.sock"),  # as in the EncryptionConfiguration
    ("unix:/var/run/kmsplugin/kms.sock", "/var/run/kmsplugin/kms.sock"),
    ("kms.sock", "kms.sock"),
    ("unix:kms.sock", "kms.sock"),
])
def test_socket_addresses(given: str, path: str) -> None:
    assert socket_path(given) == Path(path)


@pytest.mark.parametrize(("given", "message"), [
    ("unix://var/run/kms.sock", "write unix:///var/run/kms.sock"),
    ("tcp://127.0.0.1:9000", "over a Unix socket only"),
])
def test_socket_addresses_that_cannot_work(given: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        socket_path(given)


@pytest.fixture
def bound(tmp_path: Path) -> Iterator[socket.socket]:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "kms.sock"))
    yield server
    server.close()


def test_a_listening_socket_has_no_problem(tmp_path: Path, bound: socket.socket) -> None:
    bound.listen(1)
    assert socket_problem(tmp_path / "kms.sock") is None


def test_a_socket_file_left_by_a_stopped_plugin(tmp_path: Path, bound: socket.socket) -> None:
    problem = socket_problem(tmp_path / "kms.sock")  # bound, never listening: connect is refused
    assert problem is not None
    assert problem.problem == f"nothing is listening on {tmp_path / 'kms.sock'}: the socket file is left from a " \
        "plugin that is no longer running"
    assert "p11kms serve" in problem.fix


def test_missing_file_and_non_sockets_are_told_apart(tmp_path: Path) -> None:
    (tmp_path / "p11kms.cfg").write_text("Socket = kms.sock\n")
    for name, said in (("none.sock", "no such file"), ("p11kms.cfg", "it is a regular file, not a socket"),
                       (".", "it is a directory, not a socket"),
                       ("p11kms.cfg/kms.sock", "a component of the path is not a directory")):
        problem = socket_problem(tmp_path / name)
        assert problem is not None and problem.problem.endswith(said), (name, problem)
        assert problem.problem.startswith(f"nothing is listening on {tmp_path / name}")


def test_client_dials_the_encryption_configuration_endpoint(tmp_path: Path) -> None:
    with serve_misbehaving(tmp_path / "k.sock", Behaviour(status_key_id="key-x")), \
            KmsClient(f"unix://{tmp_path / 'k.sock'}") as client:
        assert client.status().key_id == "key-x"
