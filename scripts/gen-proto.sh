#!/usr/bin/env bash
# Regenerates the Python gRPC modules from proto/ into src/.
# The generated files are committed so that `pip install` needs no protoc;
# tests/test_proto_generated.py fails when they drift from the .proto sources.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-src}"
python -m grpc_tools.protoc -Iproto \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  proto/p11kms/kmsv2/api.proto
