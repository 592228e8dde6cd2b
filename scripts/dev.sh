#!/usr/bin/env bash
# Sets up a fresh machine and runs the plugin on the embedded default: a private SoftHSM2 token
# with a first KEK in ./.p11kms-dev, served on ./.p11kms-dev/kms.sock. Development only.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/p11kms serve --dev "$@"
