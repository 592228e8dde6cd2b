"""Generated KMS v2 gRPC code (``scripts/gen-proto.sh`` from ``proto/p11kms/kmsv2``); do not edit."""
