#!/usr/bin/env bash
# Installs what p11kms needs on a fresh Debian/Ubuntu machine and the project into .venv.
#   scripts/setup.sh          runtime: SoftHSM2 and the plugin
#   scripts/setup.sh --dev    also the test tools: OpenSC, p11-kit, etcd, compilers, dev extras
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(softhsm2 python3-venv)
if [[ "${1:-}" == "--dev" ]]; then
  packages+=(opensc p11-kit p11-kit-modules libp11-kit-dev gcc etcd-server etcd-client)
fi

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  echo "setup: installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if [[ "${1:-}" == "--dev" ]]; then
  .venv/bin/python -m pip install -q -e ".[dev]"
else
  .venv/bin/python -m pip install -q -e .
fi
