#!/usr/bin/env bash
# Builds p11-kit 0.25.5 (p11-kit server + p11-kit-client.so) from Debian trixie's source package into
# .cache/p11kit, for the tests that use a remote HSM which can be killed and restarted.
#
# Why not Debian 12's own p11-kit: its 0.24.1 RPC forwards only mechanisms without parameters, so
# C_EncryptInit(CKM_AES_GCM) through p11-kit-client.so answers CKR_MECHANISM_INVALID (measured);
# 0.25 forwards CKM_AES_GCM parameters. The source comes from the machine's own Debian mirror
# (the URIs already configured for apt), and apt checks it against the signed archive index.
#
# Two clients: the unmodified p11-kit-client.so goes to .cache/p11kit/stock/, and the one installed in
# the usual place carries scripts/p11kit-wake-readers.py's fix (a connection broken mid-reply left
# every other thread's call waiting for ever). The HSM-restart drills use the fixed client; one test
# uses the stock client to show what p11kms does when a PKCS#11 library wedges.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix="$PWD/.cache/p11kit"
version=0.25.5
build_id="$version-wake-readers"
if [[ -x "$prefix/bin/p11-kit" && -f "$prefix/.version-$build_id" ]]; then
  exit 0
fi
mirror=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[[ -n "$mirror" ]] || mirror=$(awk '/^deb / && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[[ -n "$mirror" ]] || { echo "build-p11kit: no Debian mirror configured for apt" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial"
echo "deb-src $mirror trixie main" >"$work/sources.list"
apt_opts=(-o Dir::Etc::sourcelist="$work/sources.list" -o Dir::Etc::sourceparts=- -o Dir::State::Lists="$work/lists")
apt-get "${apt_opts[@]}" update -qq
# The detached .asc of the upstream tarball is not on every mirror; apt still verifies the tarball's
# checksum against the signed Sources index, so a missing signature file is not fatal here.
(cd "$work" && apt-get "${apt_opts[@]}" source --download-only "p11-kit=$version-3" >/dev/null 2>&1) || true
tarball="$work/p11-kit_$version.orig.tar.xz"
[[ -f "$tarball" ]] || { echo "build-p11kit: could not download the p11-kit $version source" >&2; exit 1; }
tar xf "$tarball" -C "$work"
python=${PYTHON:-.venv/bin/python}
"$python" -m mesonbuild.mesonmain setup "$work/build" "$work/p11-kit-$version" --prefix="$prefix" \
  -Dsystemd=disabled -Dbash_completion=disabled -Dman=false -Dgtk_doc=false -Dnls=false \
  -Dtrust_module=disabled -Dtest=false >"$work/setup.log" || { cat "$work/setup.log"; exit 1; }
build_and_install() {
  ninja -C "$work/build" >"$work/build.log" || { tail -50 "$work/build.log"; exit 1; }
  ninja -C "$work/build" install >/dev/null
}
rm -rf "$prefix"
build_and_install
mkdir -p "$prefix/stock"
cp "$(find "$prefix" -path '*/pkcs11/p11-kit-client.so' | head -1)" "$prefix/stock/p11-kit-client.so"
"$python" scripts/p11kit-wake-readers.py "$work/p11-kit-$version"
build_and_install  # only rpc-transport.c and what links it are built again
touch "$prefix/.version-$build_id"
echo "build-p11kit: p11-kit $version installed in $prefix (stock client in $prefix/stock)" >&2
