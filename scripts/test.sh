#!/usr/bin/env bash
# Sets up a fresh machine and runs every check: lint, types, and the whole test suite
# (real SoftHSM2 token, real sockets, real processes).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
export PATH="$PWD/.venv/bin:$PATH"  # tools setup.sh may have put there (kubectl)
.venv/bin/ruff check src tests bench scripts
.venv/bin/mypy
scripts/audit.sh
.venv/bin/python -m pytest "$@"
