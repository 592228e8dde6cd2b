#!/usr/bin/env bash
# Regenerates the Python protobuf/gRPC modules from their .proto sources: the KMS v2 API from proto/
# into src/, the stand-in's Kubernetes subset from tests/standin/ next to it. With a directory $1,
# both go under it instead (tests/test_proto_generated.py compares that with what is committed).
# The generated files are committed so that `pip install` needs no protoc.
set -euo pipefail
cd "$(dirname "$0")/.."
src_out="${1:-src}"
tests_out="${1:-.}"
python -m grpc_tools.protoc -Iproto --python_out="$src_out" --pyi_out="$src_out" \
  proto/p11kms/kmsv2/api.proto proto/p11kms/kmsv2/encrypted_object.proto
# Only the KMS API defines a service.
python -m grpc_tools.protoc -Iproto --grpc_python_out="$src_out" proto/p11kms/kmsv2/api.proto
python -m grpc_tools.protoc -I. --python_out="$tests_out" --pyi_out="$tests_out" tests/standin/k8s_subset.proto
