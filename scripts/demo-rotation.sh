#!/usr/bin/env bash
# Plays docs/rotating-the-kek.md on the embedded default: a development SoftHSM2 token, a real etcd,
# the kube-apiserver stand-in (a test tool) and the real kubectl. Everything lives in a temporary
# directory and stops at the end. Needs scripts/setup.sh --dev (scripts/test.sh runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$PWD/.venv/bin/python}"
work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
step() { printf '\n=== %s\n' "$*"; }
port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

etcd_url="http://127.0.0.1:$(port)"; peer_url="http://127.0.0.1:$(port)"
etcd --name demo --data-dir "$work/etcd" --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
  --listen-peer-urls "$peer_url" --initial-advertise-peer-urls "$peer_url" --initial-cluster "demo=$peer_url" \
  >"$work/etcd.log" 2>&1 & pids+=($!)

# Creates the development token and config, then gives the plugin's HTTP listener an address:
# DEMO_HTTP_ADDRESS, by default 127.0.0.1:0 (any free port), so the demo runs beside scripts/dev.sh,
# whose plugin holds the default 127.0.0.1:8095. The address taken is in the plugin log.
"$PY" -m p11kms keys list --dev --dev-dir "$work/dev" >/dev/null
echo "HTTP_Address = ${DEMO_HTTP_ADDRESS:-127.0.0.1:0}" >>"$work/dev/p11kms.cfg"

start_plugin() {
  "$PY" -m p11kms serve --dev --dev-dir "$work/dev" >>"$work/plugin.log" 2>&1 & plugin_pid=$!
  for _ in $(seq 100); do
    "$PY" -m p11kms status --socket "$work/dev/kms.sock" >/dev/null 2>&1 && return
    kill -0 "$plugin_pid" 2>/dev/null || { echo "plugin exited:"; cat "$work/plugin.log"; exit 1; }  # at once
    sleep 0.1
  done
  echo "plugin did not start"; cat "$work/plugin.log"; exit 1
}
start_plugin
"$PY" -m p11kms.standin --etcd "$etcd_url" --kms-socket "$work/dev/kms.sock" --status-interval 1 \
  --status-retry-interval 1 >"$work/standin.url" 2>"$work/standin.log" & pids+=($!)
for _ in $(seq 100); do [[ -s "$work/standin.url" ]] && break; sleep 0.1; done
export HOME="$work" KUBECONFIG="$work/kubeconfig"
cat >"$KUBECONFIG" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters: [{name: standin, cluster: {server: "$(head -1 "$work/standin.url")"}}]
users: [{name: operator, user: {}}]
contexts: [{name: standin, context: {cluster: standin, user: operator}}]
current-context: standin
KUBECONFIG
sleep 1.5

step "0. pre-flight"
"$PY" -m p11kms check --socket "$work/dev/kms.sock"

step "1. create a secret; its key UUID in etcd and in the plugin log"
kubectl create secret generic rotation-canary --from-literal=note=before
"$PY" -m p11kms etcd scan --endpoints "$etcd_url" --show /registry/secrets/default/rotation-canary
grep 'role=primary' "$work/plugin.log"

step "2. create the new key; Secondary_key = old Primary_key, Primary_key = new label"
"$PY" -m p11kms keys create --dev --dev-dir "$work/dev" --label kek-2
sed -i 's/^Primary_key = kek-1$/Primary_key = kek-2\nSecondary_key = kek-1/' "$work/dev/p11kms.cfg"
grep -E '^(Primary|Secondary)_key' "$work/dev/p11kms.cfg"

step "4. restart the plugin; the old secret still reads"
kill -TERM "$plugin_pid"; wait "$plugin_pid" || true
start_plugin; pids+=("$plugin_pid")
sleep 2.5   # the stand-in's Status poll picks up the new key_id
kubectl get secret rotation-canary -o jsonpath='{.data.note}' | base64 -d; echo
new_uuid=$("$PY" -m p11kms status --socket "$work/dev/kms.sock" | awk '/key_id/ {print $2}')
"$PY" -m p11kms etcd scan --endpoints "$etcd_url" --require "$new_uuid" || echo "(expected: not re-encrypted yet)"

step "5. re-encrypt every secret"
kubectl get secrets --all-namespaces -o json | kubectl replace --validate=false -f -

step "6. verify: every secret on the new key, and the plugin log shows it"
"$PY" -m p11kms etcd scan --endpoints "$etcd_url" --require "$new_uuid"
grep 'role=primary' "$work/plugin.log" | tail -1
