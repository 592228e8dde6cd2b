"""Socket ownership: one plugin per socket path, claimed, bound under a private name, published, and
removed only by the process that published it.

The lock file decides between plugins started together; the connect probe finds a socket any other
program serves; the private staging name keeps grpcio from unlinking a live socket or a successor's.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import secrets
import signal
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from p11kms.config import STAGING_NAME_BYTES, PluginConfig
from p11kms.observability import log_event


class SocketInUse(Exception):
    """The socket path is served by a live process or is not a socket at all."""


def claim_socket_path(path: Path, logger: logging.Logger) -> None:
    """Removes a stale socket left by a crash; refuses a live one or a file that is not a socket."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketInUse(f"{path} exists and is not a socket; remove it or choose another Socket path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        log_event(logger, logging.WARNING, "removed stale socket left by an earlier process", socket=str(path))
        return
    finally:
        probe.close()
    raise SocketInUse(f"another process is already serving on {path}; stop it first or choose another Socket")


def bind_socket(server: grpc.Server, config: PluginConfig, path: Path) -> None:
    """Binds ``server`` at ``path`` with the configured mode and group, never looser even briefly."""
    previous = os.umask(0o177)
    try:
        if server.add_insecure_port(f"unix:{path}") == 0:
            raise SocketInUse(f"cannot listen on {path}")
    finally:
        os.umask(previous)
    if config.socket_gid is not None:  # resolved when the config was loaded: a bad group never gets here
        os.chown(path, -1, config.socket_gid)
    os.chmod(path, config.socket_mode)


SocketIdentity = tuple[int, int]  # (st_dev, st_ino) of the socket file this process bound


def staging_path(path: Path) -> Path:
    """The private name the server binds before its socket is published at ``path``.

    grpcio unlinks whatever sits at the path it binds, and unlinks that path again when it stops,
    whoever owns the file by then. Bound to a private name that is gone once published, it can
    neither take over a live socket nor delete a successor's.

    The name is ``.`` + a digest of the socket's file name + random bytes, never the pid: in a
    container p11kms is PID 1, so plugins with different sockets in one hostPath directory would
    all pick ``.1`` and bind over each other. The digest keeps different sockets apart, the random
    part one socket's successive starts.
    """
    named = hashlib.sha256(os.fsencode(path.name)).hexdigest()[:8]
    staged = path.with_name(f".{named}.{secrets.token_hex(3)}")
    assert len(staged.name) <= STAGING_NAME_BYTES  # config loading left room for exactly this much
    return staged


def publish_socket(staging: Path, path: Path, logger: logging.Logger) -> SocketIdentity:
    """Hard-links the bound socket to its configured path; returns the identity of what was published.

    The link fails rather than replace a socket that appeared meanwhile, and the file appears with
    its final mode and group at once.
    """
    try:
        claim_socket_path(path, logger)  # again: the HSM login since the first look took a while
        try:
            os.link(staging, path)
        except FileExistsError:
            raise SocketInUse(f"another process created {path} while p11kms was starting; stop it "
                              "first or choose another Socket") from None
        published = os.lstat(path)
    finally:
        staging.unlink(missing_ok=True)
    return published.st_dev, published.st_ino


def remove_own_socket(path: Path, identity: SocketIdentity | None, logger: logging.Logger) -> None:
    """Unlinks the socket file only if it is still the one this process published."""
    if identity is None:
        return
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if (info.st_dev, info.st_ino) == identity:
        path.unlink(missing_ok=True)
        return
    log_event(logger, logging.WARNING, "the socket path now holds another file; left in place", socket=str(path))


STARTING, SERVING, STOPPING = "starting", "serving", "stopping"
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}  # their handlers mark STOPPING (server.install_signal_handlers)


@dataclass(frozen=True)
class LockHolder:
    """What the process holding a socket lock wrote into the lock file."""

    pid: int | None
    state: str

    @classmethod
    def read(cls, path: Path) -> LockHolder:
        try:
            fields = dict(part.split("=", 1) for part in path.read_text().split() if "=" in part)
        except OSError:
            fields = {}
        pid = fields.get("pid", "")
        return cls(int(pid) if pid.isdigit() else None, fields.get("state", ""))

    def describe(self) -> str:
        return f"pid {self.pid}" if self.pid is not None else "a process that has not written its pid yet"


class SocketLock:
    """An exclusive flock on ``<socket>.lock``, held from the first look at the socket until exit.

    Looking at the socket path cannot tell two plugins started together apart: both see no
    socket, and the HSM login lies between that look and the bind. The lock decides first. The
    kernel drops it when the process dies, so a crash never leaves it held; the file stays,
    because removing it would let one process lock the old file while another locks a new one.
    The holder writes its pid and state into the file, for the message a second instance gives
    and so that a successor started during a graceful stop waits for it instead of failing.
    """

    # Fixed width: a rewrite never leaves a shorter record with the tail of the previous one.
    _RECORD = "pid={pid:<10} state={state:<10}\n"

    def __init__(self, socket_path: Path) -> None:
        self.socket = socket_path
        self.path = socket_path.with_name(socket_path.name + ".lock")
        self._fd: int | None = None
        self._state = ""
        self._marking = threading.Lock()

    def acquire(self, patience: float, logger: logging.Logger) -> None:
        """Takes the lock, or raises SocketInUse at once; a holder that is stopping gets ``patience`` s."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self._wait_for(fd, time.monotonic() + patience, patience, logger)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.mark(STARTING)

    def _wait_for(self, fd: int, give_up_at: float, patience: float, logger: logging.Logger) -> None:
        unnamed_until = time.monotonic() + 1.0  # a holder writes its pid right after it locks
        announced: int | None = None
        while not _try_lock(fd):
            holder = LockHolder.read(self.path)
            now = time.monotonic()
            if holder.pid is None and now < unnamed_until:
                time.sleep(0.02)
                continue
            if holder.state != STOPPING:
                raise SocketInUse(f"another p11kms ({holder.describe()}) is already serving on {self.socket} "
                                  f"and holds {self.path}; stop it first or choose another Socket")
            if now >= give_up_at:
                raise SocketInUse(f"p11kms {holder.describe()} is still stopping after {patience:.0f}s and holds "
                                  f"{self.path}; wait until it has exited, then start again")
            if announced != holder.pid:
                announced = holder.pid
                log_event(logger, logging.INFO, f"waiting for {holder.describe()} to finish stopping",
                          socket=str(self.socket))
            time.sleep(0.05)

    def mark(self, state: str) -> None:
        """Records this process's state in the lock file (a no-op unless the lock is held).

        Stopping is final: a SIGTERM during start must not be overwritten by the start finishing. The
        SIGTERM handler marks STOPPING on the main thread, possibly in the middle of a mark there, so
        the stop signals wait while one is written (their handlers run once it is done); a stuck-call
        exit marks from another thread, hence the lock.
        """
        if self._fd is None:
            return
        blocked = _STOP_SIGNALS if threading.current_thread() is threading.main_thread() else set()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            with self._marking:
                if self._state == STOPPING:
                    return
                self._state = state
                record = self._RECORD.format(pid=os.getpid(), state=state).encode()
                os.pwrite(self._fd, record, 0)
                os.ftruncate(self._fd, len(record))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
