"""Request bodies as kubectl sends them: JSON, or Kubernetes protobuf for typed creates."""

from __future__ import annotations

import base64
import json
from typing import Any

from google.protobuf.message import DecodeError

from tests.standin.k8s_subset_pb2 import Secret, Unknown
from tests.standin.store import ApiError

PROTOBUF_MAGIC = b"k8s\x00"
PROTOBUF_TYPE = "application/vnd.kubernetes.protobuf"


def decode_body(raw: bytes, content_type: str) -> dict[str, Any]:
    if content_type.startswith(PROTOBUF_TYPE):
        return _secret_from_protobuf(raw)
    if "json" in content_type or not content_type:
        try:
            parsed = json.loads(raw or b"{}")
        except json.JSONDecodeError as exc:
            raise ApiError(400, "BadRequest", f"request body is not valid JSON: {exc}") from exc
        if not isinstance(parsed, dict):
            raise ApiError(400, "BadRequest", "request body must be a JSON object")
        return parsed
    raise ApiError(415, "UnsupportedMediaType", f"unsupported Content-Type {content_type!r}")


def _secret_from_protobuf(raw: bytes) -> dict[str, Any]:
    if not raw.startswith(PROTOBUF_MAGIC):
        raise ApiError(400, "BadRequest", "protobuf body does not start with the k8s magic")
    try:
        unknown = Unknown.FromString(raw[len(PROTOBUF_MAGIC):])
        if unknown.typeMeta.kind != "Secret":
            raise ApiError(415, "UnsupportedMediaType", f"protobuf bodies of kind {unknown.typeMeta.kind!r} "
                           "are not supported; only Secret")
        secret = Secret.FromString(unknown.raw)
    except DecodeError as exc:
        raise ApiError(400, "BadRequest", f"protobuf body does not parse: {exc}") from exc
    metadata: dict[str, Any] = {"name": secret.metadata.name}
    if secret.metadata.namespace:
        metadata["namespace"] = secret.metadata.namespace
    for field in ("labels", "annotations"):
        if getattr(secret.metadata, field):
            metadata[field] = dict(getattr(secret.metadata, field))
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": "Secret", "metadata": metadata}
    if secret.data:
        obj["data"] = {key: base64.b64encode(value).decode() for key, value in secret.data.items()}
    if secret.stringData:
        obj["stringData"] = dict(secret.stringData)
    if secret.HasField("type"):
        obj["type"] = secret.type
    if secret.HasField("immutable"):
        obj["immutable"] = secret.immutable
    return obj
