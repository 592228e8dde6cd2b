#!/usr/bin/env bash
# Regenerates the Python protobuf/gRPC modules from proto/ into src/ (or into $1).
# The generated files are committed so that `pip install` needs no protoc;
# tests/test_proto_generated.py fails when they drift from the .proto sources.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-src}"
messages=(proto/p11kms/kmsv2/api.proto proto/p11kms/kmsv2/encrypted_object.proto proto/p11kms/standin/k8s_subset.proto)
python -m grpc_tools.protoc -Iproto --python_out="$out" --pyi_out="$out" "${messages[@]}"
# Only the KMS API defines a service.
python -m grpc_tools.protoc -Iproto --grpc_python_out="$out" proto/p11kms/kmsv2/api.proto
