"""Re-encryption and writes through a real kube-apiserver (built by scripts/build-k8s.sh), with figures.

    .venv/bin/python bench/k8s_reencrypt.py [--objects 10000] [--size 1024] [--with-force]

1. The plugin's share of a write: OBJECTS secrets of SIZE bytes created through kube-apiserver with
   p11kms as the KMS v2 provider, with the built-in `aesgcm` provider, and with `identity` (8 writers).
2. Re-encryption after a rotation, each on objects that are all stale: the kubectl one-liner
   (`kubectl get secrets -A -o json | kubectl replace -f -`), then `p11kms reencrypt` without etcd
   access (every object rewritten) and with it (only what is off the key). Wall time, peak memory
   (largest process), objects whose UID changed, failures. `--with-force` adds the vendor's `--force`.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from _env import ROOT, make_token, start_plugin, status_key_id, write_config

from tests.controlplane import ControlPlane, encryption_config, start_control_plane

LABELS = ("bench-kek-1", "bench-kek-2", "bench-kek-3", "bench-kek-4")


def create_secrets(plane: ControlPlane, count: int, size: int, writers: int = 8, prefix: str = "s") -> float:
    """Creates ``count`` secrets through the API with ``writers`` threads; returns the seconds it took."""
    payload = base64.b64encode(os.urandom(size)).decode()
    failures: list[str] = []

    def write(first: int) -> None:
        for index in range(first, count, writers):
            body: dict[str, object] = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"{prefix}-{index}"},
                                       "data": {"v": payload}}
            try:
                status, text = plane.request("POST", "/api/v1/namespaces/default/secrets", body, timeout=30)
            except OSError as exc:
                failures.append(str(exc))
                continue
            if status != 201:
                failures.append(f"HTTP {status} {text[:200]}")

    started = time.monotonic()
    threads = [threading.Thread(target=write, args=(first,)) for first in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"{len(failures)} creates failed, first: {failures[0]}")
    return time.monotonic() - started


def uids(plane: ControlPlane) -> dict[str, str]:
    listing = plane.kubectl("get", "secrets", "-n", "default", "-o", "json", timeout=600)
    return {item["metadata"]["name"]: item["metadata"]["uid"] for item in json.loads(listing.stdout)["items"]}


def measured(plane: ControlPlane, command: str) -> tuple[float, int, subprocess.CompletedProcess[str]]:
    """Runs ``command`` in a shell; returns wall seconds, the peak RSS of its largest process (KiB), and it."""
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1], shell=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", probe, command], env=plane.env(), capture_output=True, text=True,
                            timeout=3600)
    seconds = time.monotonic() - started
    peak = int(result.stderr.strip().splitlines()[-1])
    return seconds, peak, result


def rotate(config: Path, plane: ControlPlane, socket: Path, old: str, new: str) -> None:
    """The seed's swap on one node (the old primary joins the secondaries), then waits until kube-apiserver
    writes with the new key: its next Status poll, up to a minute."""
    old_key_id = status_key_id(socket)
    lines = config.read_text().splitlines()
    secondaries = [line.split("=", 1)[1].strip() for line in lines if line.startswith("Secondary_key")]
    labels = [old, *(secondaries[0].split(", ") if secondaries else [])]
    kept = [line for line in lines if not line.startswith(("Secondary_key", "Primary_key"))]
    config.write_text("".join(f"{line}\n" for line in kept)
                      + f"Primary_key = {new}\nSecondary_key = {', '.join(labels)}\n")
    end = time.monotonic() + 60
    while status_key_id(socket) in ("", old_key_id):
        if time.monotonic() > end:
            raise SystemExit(f"the plugin did not reload to {new}")
        time.sleep(0.2)
    key_id = status_key_id(socket)
    for attempt in range(200):
        name = f"probe-{new}-{attempt}"
        plane.kubectl("create", "secret", "generic", name, "-n", "kube-public", "--from-literal=p=1")
        stored = subprocess.run([str(ROOT / ".cache/k8s/bin/etcdctl"), "--endpoints", plane.etcd_url, "get",
                                 f"/registry/secrets/kube-public/{name}", "--print-value-only"], capture_output=True)
        if key_id.encode() in stored.stdout:
            return
        time.sleep(1)
    raise SystemExit(f"kube-apiserver never wrote with {new}")


def row(name: str, seconds: float, objects: int, peak_kib: int | None, changed: int | str, failed: int | str) -> str:
    memory = f"{peak_kib / 1024:.0f} MB" if peak_kib is not None else "-"
    name = name.replace("|", "\\|")  # a pipe inside a Markdown table cell
    return f"| {name} | {seconds:.1f} s | {objects / seconds:.0f}/s | {memory} | {changed} | {failed} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--with-force", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="p11kms-k8s-bench-"))
    env, softhsm, pin = make_token(work / "hsm", LABELS)
    config = write_config(work, softhsm, pin, Primary_key=LABELS[0])
    plugin = start_plugin(config, env, work / "plugin.log")
    socket = work / "kms.sock"
    aesgcm = base64.b64encode(os.urandom(32)).decode()
    providers: dict[str, str] = {
        "p11kms (KMS v2)": encryption_config(socket),
        "aesgcm (built in)": encryption_config(socket, first=f"aesgcm: {{keys: [{{name: k1, secret: {aesgcm}}}]}}"),
        "identity": encryption_config(socket, first="identity: {}"),
    }
    version = subprocess.run([str(ROOT / ".cache/k8s/bin/kube-apiserver"), "--version"], capture_output=True,
                             text=True).stdout.strip()
    print(f"{args.objects} secrets of {args.size} bytes, {version}")
    print("\n| first provider | creates (8 writers) | per second |\n| --- | --- | --- |")
    try:
        for index, (name, encryption) in enumerate(providers.items()):
            plane = start_control_plane(work / f"writes-{index}", encryption)
            try:
                seconds = create_secrets(plane, args.objects, args.size)
                print(f"| {name} | {seconds:.1f} s | {args.objects / seconds:.0f}/s |", flush=True)
            finally:
                plane.stop()

        plane = start_control_plane(work / "reencrypt", encryption_config(socket))
        try:
            create_secrets(plane, args.objects, args.size)
            print("\n| re-encryption | wall time | objects/s | peak memory (largest process) | UIDs changed | "
                  "failed |\n| --- | --- | --- | --- | --- | --- |")
            runs: list[tuple[str, Callable[[], str]]] = [
                ("kubectl get ... | kubectl replace -f -",
                 lambda: "kubectl get secrets -A -o json | kubectl replace -f -"),
                ("p11kms reencrypt (no etcd: every object)",
                 lambda: f"{shlex.quote(sys.executable)} -m p11kms reencrypt --resources secrets"),
                ("p11kms reencrypt --etcd-endpoints (off-key only)",
                 lambda: f"{shlex.quote(sys.executable)} -m p11kms reencrypt --resources secrets "
                         f"--etcd-endpoints {plane.etcd_url} --socket {socket}"),
            ]
            if args.with_force:
                runs.append(("kubectl ... | kubectl replace --force -f -",
                             lambda: "kubectl get secrets -A -o json | kubectl replace --force -f -"))
            for step, (name, command) in enumerate(runs):
                if "--force" not in name:  # --force re-creates every object whatever key it is on
                    rotate(config, plane, socket, LABELS[step], LABELS[step + 1])
                before = uids(plane)
                seconds, peak, result = measured(plane, command())
                after = uids(plane)
                changed = sum(1 for key, uid in before.items() if after.get(key) != uid)
                failed = result.stdout.count("Error") + result.stderr.count("Error") if result.returncode else 0
                print(row(name, seconds, len(before), peak, changed, failed), flush=True)
        finally:
            plane.stop()
    finally:
        plugin.terminate()
        plugin.wait(30)


if __name__ == "__main__":
    main()
