#!/usr/bin/env bash
# Plays docs/rotating-the-kek.md on the embedded default: a development SoftHSM2 token, a real etcd, a
# real kube-apiserver and kubectl (built by scripts/build-k8s.sh; where they are not built, the project's
# kube-apiserver stand-in, a test tool, and the kubectl on PATH). Everything lives in a temporary
# directory and stops at the end. Needs scripts/setup.sh --dev (scripts/test.sh runs it).
# DEMO_APISERVER=standin chooses the stand-in even where kube-apiserver is built.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$PWD/.venv/bin/python}"
k8s="$PWD/.cache/k8s/bin"
apiserver=standin
[[ -x "$k8s/kube-apiserver" && "${DEMO_APISERVER:-real}" != standin ]] && apiserver=real
work=$(mktemp -d)
pids=()
plugin_pid=
# Stops what the demo started, the newest first: kube-apiserver before the etcd it would otherwise wait
# for while shutting down. Whatever is still running 10 s later is killed.
cleanup() {
  local all=("${pids[@]}" ${plugin_pid:+"$plugin_pid"}) i pid
  for ((i = ${#all[@]} - 1; i >= 0; i--)); do kill "${all[i]}" 2>/dev/null || true; done
  for _ in $(seq 50); do
    for pid in "${all[@]}"; do kill -0 "$pid" 2>/dev/null && { sleep 0.2; continue 2; }; done
    break
  done
  for pid in "${all[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n=== %s\n' "$*"; }
port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

etcd_bin=etcd
[[ $apiserver == real ]] && etcd_bin="$k8s/etcd"   # kube-apiserver 1.31+ needs etcd 3.5.11+
etcd_url="http://127.0.0.1:$(port)"; peer_url="http://127.0.0.1:$(port)"
"$etcd_bin" --name demo --data-dir "$work/etcd" --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
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
export HOME="$work" KUBECONFIG="$work/kubeconfig"

start_real_apiserver() {
  # A throwaway PKI: a CA, the serving certificate, an admin in system:masters, a service-account key.
  local pki="$work/pki"
  mkdir -p "$pki"
  cert() {  # NAME SUBJECT EXTENSION
    openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -keyout "$pki/$1.key" \
      -out "$pki/$1.csr" -subj "$2" 2>/dev/null
    openssl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -days 1 \
      -out "$pki/$1.crt" -extfile <(echo "$3") 2>/dev/null
  }
  openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -keyout "$pki/ca.key" \
    -out "$pki/ca.crt" -subj "/CN=p11kms demo CA" -days 1 2>/dev/null
  cert apiserver "/CN=kube-apiserver" "subjectAltName=IP:127.0.0.1,DNS:localhost"
  cert admin "/O=system:masters/CN=demo-admin" "extendedKeyUsage=clientAuth"
  openssl ecparam -name prime256v1 -genkey -noout -out "$pki/sa.key"
  openssl ec -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  cat >"$work/encryption-config.yaml" <<YAML
apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: [secrets]
    providers:
      - kms: {apiVersion: v2, name: p11kms, endpoint: 'unix://$work/dev/kms.sock', timeout: 3s}
      - identity: {}
YAML
  local api_port; api_port=$(port)
  "$k8s/kube-apiserver" --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$api_port" \
    --etcd-servers="$etcd_url" --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" --authorization-mode=RBAC --service-cluster-ip-range=10.0.0.0/24 \
    --endpoint-reconciler-type=none --service-account-issuer=https://kubernetes.default.svc \
    --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
    --encryption-provider-config="$work/encryption-config.yaml" --encryption-provider-config-automatic-reload \
    --cert-dir="$work/certs" >"$work/kube-apiserver.log" 2>&1 & pids+=($!)
  cat >"$KUBECONFIG" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters: [{name: demo, cluster: {server: "https://127.0.0.1:$api_port", certificate-authority: "$pki/ca.crt"}}]
users: [{name: admin, user: {client-certificate: "$pki/admin.crt", client-key: "$pki/admin.key"}}]
contexts: [{name: demo, context: {cluster: demo, user: admin}}]
current-context: demo
KUBECONFIG
  export PATH="$k8s:$PATH"
  for _ in $(seq 240); do
    [[ "$(kubectl get --raw /readyz 2>/dev/null)" == ok ]] && { echo "kube-apiserver $(kubectl version -o json | \
      "$PY" -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])') is ready"; return; }
    sleep 0.5
  done
  echo "kube-apiserver did not become ready:"; tail -30 "$work/kube-apiserver.log"; exit 1
}

start_standin() {
  "$PY" -m tests.standin --etcd "$etcd_url" --kms-socket "$work/dev/kms.sock" --status-interval 1 \
    --status-retry-interval 1 >"$work/standin.url" 2>"$work/standin.log" & pids+=($!)
  for _ in $(seq 100); do [[ -s "$work/standin.url" ]] && break; sleep 0.1; done
  cat >"$KUBECONFIG" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters: [{name: standin, cluster: {server: "$(head -1 "$work/standin.url")"}}]
users: [{name: operator, user: {}}]
contexts: [{name: standin, context: {cluster: standin, user: operator}}]
current-context: standin
KUBECONFIG
  sleep 1.5
  echo "the kube-apiserver stand-in serves (scripts/build-k8s.sh builds the real one)"
}
if [[ $apiserver == real ]]; then start_real_apiserver; else start_standin; fi

# Seconds until a new secret is stored under key UUID $1: kube-apiserver takes a new key_id at its next
# Status poll (every minute while healthy), and writes with its current DEK seed until then.
wait_for_writes_with() {
  local started=$SECONDS n=0
  while ((SECONDS - started < 120)); do
    n=$((n + 1))
    kubectl create secret generic "poll-probe-$n" --from-literal=probe=1 >/dev/null
    if "$PY" -m p11kms etcd scan --endpoints "$etcd_url" --show "/registry/secrets/default/poll-probe-$n" \
        | grep -q "$1"; then
      echo "kube-apiserver writes with the new key $((SECONDS - started)) s after the restart (its Status poll)"
      return
    fi
    sleep 2
  done
  echo "kube-apiserver did not take the new key within 120 s"; exit 1
}

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
start_plugin
kubectl get secret rotation-canary -o jsonpath='{.data.note}' | base64 -d; echo
new_uuid=$("$PY" -m p11kms status --socket "$work/dev/kms.sock" | awk '/key_id/ {print $2}')
wait_for_writes_with "$new_uuid"
"$PY" -m p11kms etcd scan --endpoints "$etcd_url" --require "$new_uuid" || echo "(expected: not re-encrypted yet)"

step "5. re-encrypt every secret"
if [[ $apiserver == real ]]; then
  kubectl get secrets --all-namespaces -o json | kubectl replace -f -
else
  kubectl get secrets --all-namespaces -o json | kubectl replace --validate=false -f -  # no OpenAPI in the stand-in
fi

step "6. verify: every secret on the new key, and the plugin log shows it"
"$PY" -m p11kms etcd scan --endpoints "$etcd_url" --require "$new_uuid"
grep 'role=primary' "$work/plugin.log" | tail -1
