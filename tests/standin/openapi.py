"""The smallest OpenAPI v3 documents that let kubectl's default validation ("strict") succeed.

kubectl asks /openapi/v3 whether the server checks fields itself: it looks for
a PATCH operation of the object's kind that accepts the ``fieldValidation``
query parameter. When that is found, kubectl leaves validation to the server
instead of downloading the full schema, so ``kubectl replace -f -`` works
without ``--validate=false``.
"""

from __future__ import annotations

from typing import Any

GROUP_VERSION_PATH = "api/v1"
DOCUMENT_HASH = "p11kms-standin-1"
_SECRET_GVK = {"group": "", "version": "v1", "kind": "Secret"}
_FIELD_VALIDATION = {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True}}
_OK = {"200": {"description": "OK"}}


def _operation(action: str) -> dict[str, Any]:
    return {"x-kubernetes-action": action, "x-kubernetes-group-version-kind": _SECRET_GVK,
            "parameters": [_FIELD_VALIDATION], "responses": _OK}


def root_document() -> dict[str, Any]:
    url = f"/openapi/v3/{GROUP_VERSION_PATH}?hash={DOCUMENT_HASH}"
    return {"paths": {GROUP_VERSION_PATH: {"serverRelativeURL": url}}}


def core_v1_document() -> dict[str, Any]:
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (p11kms stand-in)", "version": "v1.32.0"},
        "paths": {
            "/api/v1/namespaces/{namespace}/secrets": {"post": _operation("post")},
            "/api/v1/namespaces/{namespace}/secrets/{name}": {
                "put": _operation("put"), "patch": _operation("patch"),
            },
        },
        "components": {"schemas": {"io.k8s.api.core.v1.Secret": {
            "type": "object", "x-kubernetes-group-version-kind": [_SECRET_GVK],
        }}},
    }
