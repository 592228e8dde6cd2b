"""The committed protobuf and gRPC modules are exactly what scripts/gen-proto.sh makes from their .proto files."""

from __future__ import annotations

import subprocess
from pathlib import Path

from p11kms.kmsv2 import api_pb2

ROOT = Path(__file__).resolve().parent.parent
GENERATED = (
    "kmsv2/api_pb2.py", "kmsv2/api_pb2.pyi", "kmsv2/api_pb2_grpc.py",
    "kmsv2/encrypted_object_pb2.py", "kmsv2/encrypted_object_pb2.pyi",
)
# The stand-in (a test tool) keeps its messages beside it.
TEST_GENERATED = ("tests/standin/k8s_subset_pb2.py", "tests/standin/k8s_subset_pb2.pyi")


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    subprocess.run([str(ROOT / "scripts" / "gen-proto.sh"), str(tmp_path)], check=True, timeout=120)
    for name in GENERATED:
        fresh = (tmp_path / "p11kms" / name).read_text()
        committed = (ROOT / "src" / "p11kms" / name).read_text()
        assert fresh == committed, f"{name} is stale: run scripts/gen-proto.sh and commit the result"
    for name in TEST_GENERATED:
        assert (tmp_path / name).read_text() == (ROOT / name).read_text(), f"{name} is stale: run scripts/gen-proto.sh"


def test_wire_names_match_the_spec() -> None:
    service = api_pb2.DESCRIPTOR.services_by_name["KeyManagementService"]
    assert service.full_name == "v2.KeyManagementService"
    assert [m.name for m in service.methods] == ["Status", "Decrypt", "Encrypt"]
    fields = {
        message: [(f.name, f.number) for f in api_pb2.DESCRIPTOR.message_types_by_name[message].fields]
        for message in ("StatusResponse", "DecryptRequest", "DecryptResponse", "EncryptRequest", "EncryptResponse")
    }
    assert fields == {
        "StatusResponse": [("version", 1), ("healthz", 2), ("key_id", 3)],
        "DecryptRequest": [("ciphertext", 1), ("uid", 2), ("key_id", 3), ("annotations", 4)],
        "DecryptResponse": [("plaintext", 1)],
        "EncryptRequest": [("plaintext", 1), ("uid", 2)],
        "EncryptResponse": [("ciphertext", 1), ("key_id", 2), ("annotations", 3)],
    }
