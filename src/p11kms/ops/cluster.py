"""``p11kms cluster status``: what every control-plane node's plugin serves, and whether they agree.

Reads fail exactly when one node's kube-apiserver wrote with a key another node's plugin cannot
decrypt. So the verdict is not "do the primaries agree" (they differ, harmlessly, while a
two-phase rotation is rolled out) but "can every node decrypt every node's primary".

A node is reached by its plugin's HTTP endpoint (``http://HOST:PORT``; ``/healthz`` lists every key
with role, label and UUID, and the config generation) or its Unix socket (a path or
``unix:///path``; Status gives the primary UUID and health only). Between two sockets the answer
is proven by a round trip: Encrypt a random 32-byte value on one node, Decrypt it on the other.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import grpc

from p11kms.kube.client import KmsClient

EXIT_OK = 0
EXIT_FAILED = 1
_UNPROVEN = "unproven: "


@dataclass
class NodeView:
    """One node's plugin as its endpoint shows it."""

    endpoint: str
    error: str | None = None  # set when the endpoint could not be read
    health: str = ""
    primary_uuid: str = ""
    primary_label: str = ""  # "" when the endpoint does not say (a socket)
    decrypts: dict[str, str] | None = None  # UUID -> label of every loaded key; None when unknown (a socket)
    missing: list[str] = field(default_factory=list)  # configured labels missing from the HSM
    generation: str | None = None
    config_error: str | None = None  # the newest config on disk was rejected

    @property
    def is_http(self) -> bool:
        return self.endpoint.startswith(("http://", "https://"))

    def describe(self) -> list[str]:
        if self.error is not None:
            return [f"node {self.endpoint}: UNREACHABLE: {self.error}"]
        label = f"{self.primary_label} " if self.primary_label else ""
        lines = [f"node {self.endpoint}: health {self.health}; primary {label}({self.primary_uuid})"]
        if self.decrypts is not None:
            others = [f"{lab} ({uuid})" for uuid, lab in self.decrypts.items() if uuid != self.primary_uuid]
            lines.append(f"  decrypt-only: {', '.join(others) or 'none'}")
        else:
            lines.append("  decrypt-only: not shown over a socket (give the plugin's http://HOST:PORT to see them)")
        if self.missing:
            lines.append(f"  configured but missing from the HSM: {', '.join(self.missing)}")
        if self.generation is not None:
            lines.append(f"  config generation {self.generation}")
        if self.config_error is not None:
            lines.append(f"  NEWEST CONFIG REJECTED (the previous keyring serves): {self.config_error}")
        return lines


def _http_view(endpoint: str, timeout: float) -> NodeView:
    url = endpoint.rstrip("/") + "/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            body = reply.read()
    except urllib.error.HTTPError as exc:  # 503 still carries the JSON detail
        body = exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return NodeView(endpoint, error=f"cannot read {url}: {reason}")
    try:
        document = json.loads(body)
        view = NodeView(endpoint, health=str(document["status"]), primary_uuid=str(document["key_id"]))
        keys = document.get("keys", [])
    except (ValueError, KeyError, TypeError):
        return NodeView(endpoint, error=f"{url} did not answer with p11kms's /healthz JSON")
    view.decrypts = {}
    for key in keys:
        if key.get("state") != "loaded":
            view.missing.append(str(key.get("label")))
            continue
        view.decrypts[str(key["uuid"])] = str(key["label"])
        if key.get("role") == "primary":
            view.primary_label = str(key["label"])
    config = document.get("config") or {}
    view.generation = config.get("generation")
    if config.get("reload_failed"):
        view.config_error = str(config.get("error", "rejected"))
    return view


def _socket_view(endpoint: str, timeout: float) -> NodeView:
    try:
        with KmsClient(endpoint, timeout) as client:
            try:
                reply = client.status()
            except grpc.RpcError as exc:
                return NodeView(endpoint, error=f"Status failed: {client.explain(exc)}")
    except ValueError as exc:
        return NodeView(endpoint, error=str(exc))
    return NodeView(endpoint, health=reply.healthz, primary_uuid=reply.key_id)


def read_node(endpoint: str, timeout: float = 3.0) -> NodeView:
    endpoint = endpoint.strip()
    if endpoint.startswith(("http://", "https://")):
        return _http_view(endpoint, timeout)
    return _socket_view(endpoint, timeout)


def socket_decrypts(endpoint: str, ciphertext: bytes, key_id: str, timeout: float = 3.0) -> str | None:
    """None when the plugin on ``endpoint`` decrypts ``ciphertext`` under ``key_id``, else why not."""
    with KmsClient(endpoint, timeout) as client:
        try:
            client.decrypt(ciphertext, key_id)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    return None


def _round_trip(writer: NodeView, reader: NodeView, timeout: float) -> str | None:
    """None when ``reader`` decrypts what ``writer`` encrypts now, else why not."""
    with KmsClient(writer.endpoint, timeout) as client:
        try:
            wrapped = client.encrypt(os.urandom(32))
        except grpc.RpcError as exc:
            return f"Encrypt on {writer.endpoint} failed: {exc.code().name}: {exc.details()}"
    return socket_decrypts(reader.endpoint, wrapped.ciphertext, wrapped.key_id, timeout)


@dataclass
class ClusterVerdict:
    exit_code: int
    lines: list[str]
    nodes: list[NodeView]


def cluster_status(endpoints: list[str], timeout: float = 3.0) -> ClusterVerdict:
    nodes = [read_node(endpoint, timeout) for endpoint in endpoints if endpoint.strip()]
    lines = [line for node in nodes for line in node.describe()]
    failed = False
    reachable = [n for n in nodes if n.error is None]
    if len(reachable) != len(nodes):
        failed = True
        lines.append("FAIL: a node could not be read, so nothing is proven about it; fix the endpoint or the plugin")
    primaries = {n.primary_uuid for n in reachable}
    if len(primaries) > 1:
        named = ", ".join(f"{n.endpoint}={n.primary_label or n.primary_uuid}" for n in reachable)
        lines.append(f"WARNING: nodes disagree on the primary key ({named}): expected only while a promote is "
                     "rolled out; finish it on every node")
    for writer in reachable:
        for reader in reachable:
            if reader is writer:
                continue
            problem = _cannot_decrypt(writer, reader, timeout)
            if problem is None:
                continue
            failed = True
            name = writer.primary_label or writer.primary_uuid
            if problem.startswith(_UNPROVEN):
                lines.append(f"UNPROVEN: whether {reader.endpoint} decrypts the primary key {name} of "
                             f"{writer.endpoint}: {problem[len(_UNPROVEN):]}")
                continue
            lines.append(f"FAIL: {reader.endpoint} cannot decrypt the primary key {name} ({writer.primary_uuid}) "
                         f"of {writer.endpoint}: {problem}. What kube-apiserver on {writer.endpoint} writes "
                         f"cannot be read through {reader.endpoint}: stage that key there now "
                         f"(p11kms rotate stage {writer.primary_label or 'LABEL'} on that node)")
    for node in reachable:
        if node.config_error is not None:
            failed = True
            lines.append(f"FAIL: {node.endpoint} rejected its newest config and serves the previous keyring: "
                         f"{node.config_error}")
        if node.health != "ok":
            failed = True
            lines.append(f"FAIL: {node.endpoint} is not healthy: {node.health}")
    if not failed:
        lines.append(f"OK: each of the {len(nodes)} nodes decrypts every node's primary key")
    return ClusterVerdict(EXIT_FAILED if failed else EXIT_OK, lines, nodes)


def _cannot_decrypt(writer: NodeView, reader: NodeView, timeout: float) -> str | None:
    if reader.decrypts is not None:
        if writer.primary_uuid in reader.decrypts:
            return None
        return "the key is not in its keyring"
    if not writer.is_http:
        return _round_trip(writer, reader, timeout)
    if writer.primary_uuid == reader.primary_uuid:
        return None
    return (_UNPROVEN + "the reader was given as a socket, which does not list its decrypt-only keys, and the "
            "writer as HTTP, which cannot Encrypt; give both as sockets or the reader as http://HOST:PORT")
