#!/usr/bin/env bash
# Sets up a fresh machine and runs every check: lint, types, and the whole test suite
# (real SoftHSM2 token, real sockets, real processes).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
.venv/bin/ruff check src tests
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
