"""A KMS v2 client that dials the plugin the way kube-apiserver does (spec 2.1).

Used by ``p11kms status`` and by the tests: Unix socket, no TLS, ``:authority``
forced to ``localhost``, a deadline on every call and a fresh UUID as ``uid``.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc

from p11kms.kmsv2 import api_pb2, api_pb2_grpc

DEFAULT_TIMEOUT = 3.0  # kube-apiserver's default per-call timeout
START_PLUGIN = ("start the plugin (p11kms serve, or its pod or service), or pass the path of its config's "
                "Socket line or the EncryptionConfiguration's endpoint")


def socket_path(address: str | Path) -> Path:
    """The socket file named by a plain path, ``unix:///path`` (as in the EncryptionConfiguration) or ``unix:/path``.

    Raises ValueError for any other scheme, and for ``unix://path``, which kube-apiserver reads as
    a host name followed by a path and so never reaches the intended file.
    """
    text = str(address)
    if text.startswith("unix://"):
        rest = text[len("unix://"):]
        if not rest.startswith("/"):
            raise ValueError(f"{text!r} has two slashes after 'unix:', so kube-apiserver would read "
                             f"{rest.partition('/')[0]!r} as a host: write unix:///{rest}")
        return Path(rest)
    if text.startswith("unix:"):
        return Path(text[len("unix:"):])
    scheme, sep, _ = text.partition("://")
    if sep and scheme.isalpha():
        raise ValueError(f"{text!r}: a KMS v2 plugin is reached over a Unix socket only; pass its path or "
                         "unix:///path")
    return Path(text)


@dataclass(frozen=True)
class SocketProblem:
    """Why a KMS socket cannot be reached, and what to do about it."""

    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.problem} -> fix: {self.fix}"


def socket_problem(path: Path) -> SocketProblem | None:
    """What keeps a client from reaching ``path``; None when something accepts connections there."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return SocketProblem(f"nothing is listening on {path}: no such file", START_PLUGIN)
    except PermissionError:
        return _permission_denied(path)
    except NotADirectoryError:
        return SocketProblem(f"nothing is listening on {path}: a component of the path is not a directory",
                             START_PLUGIN)
    if not stat.S_ISSOCK(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a regular file" if stat.S_ISREG(mode) else "a special file"
        return SocketProblem(f"nothing is listening on {path}: it is {kind}, not a socket",
                             "pass the plugin's socket, not its config or directory; " + START_PLUGIN)
    return _connect_problem(path)


def _connect_problem(path: Path) -> SocketProblem | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except PermissionError:
            return _permission_denied(path)
        except ConnectionRefusedError:
            return SocketProblem(f"nothing is listening on {path}: the socket file is left from a plugin that is "
                                 "no longer running", START_PLUGIN)
        except OSError as exc:
            if exc.errno == errno.EAGAIN:  # the listen queue is full: something is there, only busy
                return None
            return SocketProblem(f"cannot connect to {path}: {exc.strerror}", START_PLUGIN)
    return None


def _permission_denied(path: Path) -> SocketProblem:
    return SocketProblem(f"cannot connect to {path}: permission denied",
                         "run as root or as a member of the socket's group (the plugin's Socket_Group and "
                         "Socket_Mode settings), as kube-apiserver does")


class KmsClient:
    def __init__(self, socket_path_or_address: str | Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket = socket_path(socket_path_or_address)
        self.timeout = timeout
        self._channel = grpc.insecure_channel(
            f"unix:{self.socket}", options=[("grpc.default_authority", "localhost")]
        )
        self._stub = api_pb2_grpc.KeyManagementServiceStub(self._channel)  # type: ignore[no-untyped-call]

    def status(self) -> api_pb2.StatusResponse:
        response: api_pb2.StatusResponse = self._stub.Status(api_pb2.StatusRequest(), timeout=self.timeout)
        return response

    def encrypt(self, plaintext: bytes, uid: str | None = None) -> api_pb2.EncryptResponse:
        request = api_pb2.EncryptRequest(plaintext=plaintext, uid=uid or str(uuid.uuid4()))
        response: api_pb2.EncryptResponse = self._stub.Encrypt(request, timeout=self.timeout)
        return response

    def decrypt(self, ciphertext: bytes, key_id: str, annotations: dict[str, bytes] | None = None,
                uid: str | None = None) -> bytes:
        request = api_pb2.DecryptRequest(ciphertext=ciphertext, key_id=key_id, annotations=annotations or {},
                                         uid=uid or str(uuid.uuid4()))
        response: api_pb2.DecryptResponse = self._stub.Decrypt(request, timeout=self.timeout)
        return response.plaintext

    def explain(self, exc: grpc.RpcError) -> str:
        """A failed call in words: the socket's problem when the plugin was unreachable, else gRPC's own."""
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            problem = socket_problem(self.socket)
            if problem is not None:
                return str(problem)
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return (f"the plugin on {self.socket} did not answer within {self.timeout:g} s: it is busy or its HSM "
                    "is slow -> fix: read the plugin log; retry with a longer --timeout")
        return f"{exc.code().name}: {exc.details()}"

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> KmsClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
