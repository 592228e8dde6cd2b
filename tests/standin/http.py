"""Just enough of the Kubernetes REST API for kubectl to work with Secrets."""

from __future__ import annotations

import json
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from p11kms.kube.envelope import EnvelopeError
from p11kms.kube.etcd import EtcdError
from tests.standin import openapi
from tests.standin.bodies import decode_body
from tests.standin.kms import KmsUnavailable
from tests.standin.store import ApiError, SecretStore

SERVER_VERSION = {"major": "1", "minor": "32", "gitVersion": "v1.32.0-p11kms-standin", "platform": "linux/amd64"}
SECRETS_RESOURCE = {
    "name": "secrets", "singularName": "secret", "namespaced": True, "kind": "Secret",
    "verbs": ["create", "delete", "get", "list", "update"],
}
_NAMESPACED = re.compile(r"^/api/v1/namespaces/([^/]+)/secrets(?:/([^/]+))?$")


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


class KubeApiHandler(BaseHTTPRequestHandler):
    server: StandinHttpServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # request logs would drown the test output; errors are returned to kubectl instead

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        return decode_body(self._raw_body, self.headers.get("Content-Type") or "")

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path.rstrip("/")
        # Read the whole body first, whatever happens next, so the keep-alive connection stays in step.
        self._raw_body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            code, body = self._route(method, path)
        except ApiError as exc:
            code, body = exc.code, _status(exc.code, exc.reason, str(exc))
        except (KmsUnavailable, EtcdError, EnvelopeError) as exc:
            code, body = 500, _status(500, "InternalError", f"Internal error occurred: {exc}")
        self._send(code, body)

    def _route(self, method: str, path: str) -> tuple[int, dict[str, Any]]:
        store = self.server.store
        if method == "GET" and path == "/version":
            return 200, SERVER_VERSION
        if method == "GET" and path == "/api":
            host = self.headers.get("Host", "127.0.0.1")
            return 200, {"kind": "APIVersions", "versions": ["v1"],
                         "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}]}
        if method == "GET" and path == "/healthz/kms-providers":
            kms = store.kms
            healthy = not kms.last_problems
            # key_id is not in kube-apiserver's answer; the stand-in adds it so tests can see a rotation land.
            return (200 if healthy else 500), {"status": "ok" if healthy else "; ".join(kms.last_problems),
                                               "key_id": kms.current_key_id}
        if method == "GET" and path == "/openapi/v3":
            return 200, openapi.root_document()
        if method == "GET" and path == f"/openapi/v3/{openapi.GROUP_VERSION_PATH}":
            return 200, openapi.core_v1_document()
        if method == "GET" and path == "/apis":
            return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []}
        if method == "GET" and path == "/api/v1":
            return 200, {"kind": "APIResourceList", "groupVersion": "v1", "resources": [SECRETS_RESOURCE]}
        if method == "GET" and path == "/api/v1/secrets":
            return 200, self._list(None)
        match = _NAMESPACED.match(path)
        if match is None:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({method} {path})")
        namespace, name = match.groups()
        if name is None:
            if method == "GET":
                return 200, self._list(namespace)
            if method == "POST":
                return 201, store.create(namespace, self._body())
        elif method == "GET":
            return 200, store.get(namespace, name)
        elif method == "PUT":
            return 200, store.replace(namespace, name, self._body())
        elif method == "DELETE":
            return 200, store.delete(namespace, name)
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {path}")

    def _list(self, namespace: str | None) -> dict[str, Any]:
        items, revision = self.server.store.list(namespace)
        return {"kind": "SecretList", "apiVersion": "v1", "metadata": {"resourceVersion": str(revision)},
                "items": items}

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")


class StandinHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], store: SecretStore) -> None:
        super().__init__(address, KubeApiHandler)
        self.store = store
