#!/usr/bin/env bash
# Runs the seed rotation procedure against other Kubernetes releases' kube-apiserver and kubectl (not part
# of the default suite: each release is a cold build of several minutes).
#
#   scripts/k8s-compat.sh                  the releases in docs/upgrading.md's table
#   scripts/k8s-compat.sh 1.35.4 1.36.3    those releases
#
# Each release is built from k8s.io/kubernetes by scripts/build-k8s.sh --release into .cache/k8s/ (kept for
# the next run); etcd is the one tools/k8s pins. Prints one line per release and exits 1 if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."
releases=("$@")
((${#releases[@]})) || releases=(1.34.4 1.35.4 1.36.3)
tests=(tests/realk8s/test_seed_procedure.py::test_seed_procedure_with_a_plugin_restart
       tests/realk8s/test_seed_procedure.py::test_hot_rotation_through_the_config_watch)
failed=0
results=()
for release in "${releases[@]}"; do
  echo "k8s-compat: Kubernetes $release" >&2
  if ! bin=$(scripts/build-k8s.sh --release "$release"); then
    results+=("$release: BUILD FAILED"); failed=1; continue
  fi
  log=".cache/k8s/compat-$release.log"
  if P11KMS_K8S_BIN="$bin" .venv/bin/python -m pytest -q -s -p no:cacheprovider "${tests[@]}" >"$log" 2>&1; then
    results+=("$release: PASSED ($(grep -o 'new key_id [0-9.]* s after[a-z ]*' "$log" | paste -sd ';' -))")
  else
    results+=("$release: FAILED (see $log)"); failed=1
  fi
done
printf '%s\n' "${results[@]}"
exit "$failed"
