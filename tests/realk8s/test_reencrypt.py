"""`p11kms reencrypt` against the real kube-apiserver, the real etcd and the real plugin.

Each test rotates once by editing the plugin's config (the config watch applies it, kube-apiserver follows at its
next Status poll, about a minute), then re-encrypts through the Kubernetes API and checks etcd: which key each
object is stored under, and that UIDs stay and only rewritten objects get a new resourceVersion.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from p11kms.kube.etcd import EtcdClient
from p11kms.ops.etcdscan import scan
from tests.realk8s.conftest import Cluster, Keys, swap_labels
from tests.support import wait_until

WIDGET_CRD = """apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec: {type: object, x-kubernetes-preserve-unknown-fields: true}
"""

Snapshot = dict[str, tuple[str, str, str]]  # "resource ns/name" -> (uid, resourceVersion, content)


def _reencrypt_command(cluster: Cluster, *args: str) -> tuple[list[str], dict[str, str]]:
    return [sys.executable, "-m", "p11kms", "reencrypt", *args], cluster.plane.env()


def _reencrypt(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    command, env = _reencrypt_command(cluster, *args)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _summary(output: str) -> dict[str, int]:
    found = re.search(r"(?:rewritten|would rewrite)=(\d+) already_on_key=(\d+) deleted_meanwhile=(\d+) "
                      r"conflicts_retried=(\d+) failed=(\d+) \((\d+) objects looked at", output)
    assert found, output
    names = ("rewritten", "on_key", "deleted", "conflicts", "failed", "listed")
    return dict(zip(names, map(int, found.groups()), strict=True))


def _snapshot(cluster: Cluster, resource: str, namespace: str | None = None) -> Snapshot:
    where = ["-n", namespace] if namespace else ["--all-namespaces"]
    listing = json.loads(cluster.ok("get", resource, *where, "-o", "json"))
    return {f"{resource} {i['metadata']['namespace']}/{i['metadata']['name']}":
            (i["metadata"]["uid"], i["metadata"]["resourceVersion"],
             json.dumps([i.get("data"), i.get("spec"), i["metadata"].get("labels")], sort_keys=True))
            for i in listing["items"]}


def _etcd_key(name: str) -> str:
    resource, path = name.split(" ")
    return f"/registry/{'example.com/widgets' if resource == 'widgets' else resource}/{path}"


def _off_key(cluster: Cluster, key_id: str) -> set[str]:
    """etcd keys of every stored object that is not on ``key_id`` (of any resource holding KMS v2 values)."""
    report = scan(EtcdClient([cluster.plane.etcd_url]), require=key_id)
    return {item.key for items in report.off_key.values() for item in items
            if "/secrets/" in item.key or "/widgets/" in item.key}


def _rotate(cluster: Cluster, old_label: str, new_key: Keys,
            before_the_poll: Callable[[str], None] | None = None) -> str:
    """The one-step swap through the config watch (one node); returns the new key UUID once kube-apiserver
    writes with it. With ``before_the_poll`` the swap comes right after one of kube-apiserver's Status polls,
    and it is called with the new UUID once the plugin took the key: kube-apiserver still writes with the old
    one for most of a minute."""
    polled_at = time.monotonic()
    if before_the_poll is not None:
        polls = cluster.plugin_metric("p11kms_grpc_requests_total", method="Status")
        wait_until(lambda: cluster.plugin_metric("p11kms_grpc_requests_total", method="Status") > polls, 75)
        polled_at = time.monotonic()
    new_label, new_uuid = new_key()
    swap_labels(cluster.config, old_label, new_label)
    wait_until(lambda: "config reloaded" in cluster.plugin.log(), 20)
    if before_the_poll is not None:
        before_the_poll(new_uuid)
        seconds = time.monotonic() - polled_at
        assert seconds < 45, f"{seconds:.1f} s after the poll, the next may have come: nothing was shown"
        print(f"the checks before kube-apiserver's poll ended {seconds:.1f} s after the previous poll")
    delay = cluster.wait_until_writes_use(new_uuid)
    print(f"kube-apiserver wrote with the new key_id {delay:.1f} s after the config change")
    return new_uuid


def _apply_list(cluster: Cluster, items: list[dict[str, object]]) -> None:
    result = cluster.kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                   "items": items}))
    assert result.returncode == 0, result.stderr


def _secret(namespace: str, name: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
            "stringData": {"value": f"{namespace}-{name}-" + "x" * 64}}


def test_reencrypt_with_etcd_moves_only_off_key_secrets_and_widgets_and_resumes_after_a_kill(
        start_cluster: Callable[..., Cluster], new_key: Keys) -> None:
    old_label, old_uuid = new_key()
    cluster = start_cluster(old_label, resources=("secrets", "widgets.example.com"))
    cluster.ok("create", "namespace", "team-a")
    cluster.ok("create", "namespace", "bulk")
    created = cluster.kubectl("apply", "-f", "-", stdin=WIDGET_CRD)
    assert created.returncode == 0, created.stderr
    cluster.ok("wait", "--for", "condition=established", "--timeout=60s", "crd/widgets.example.com")
    _apply_list(cluster, [_secret("bulk", f"s-{n:02d}") for n in range(30)]
                + [_secret("team-a", f"t-{n}") for n in range(6)]
                + [{"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": f"w-{n}",
                                                                                   "namespace": "team-a"},
                    "spec": {"size": n, "colour": "blue"}} for n in range(10)])
    assert cluster.stored("example.com/widgets", "team-a", "w-3").key_id == old_uuid

    new_uuid = _rotate(cluster, old_label, new_key)
    before = _snapshot(cluster, "secrets") | _snapshot(cluster, "widgets")
    off = _off_key(cluster, new_uuid)
    on_new_key = {name for name in before if _etcd_key(name) not in off}
    assert len(off) >= 46 and on_new_key, (len(off), on_new_key)  # the last probe is already on the new key
    etcd = ["--etcd-endpoints", cluster.plane.etcd_url, "--key-id", new_uuid]

    # --dry-run lists exactly the objects etcd shows off the key and writes nothing.
    dry = _reencrypt(cluster, "--resources", "secrets,widgets.example.com", *etcd, "--dry-run")
    assert dry.returncode == 1, dry.stdout + dry.stderr  # the gate: objects are still off the key
    listed = {line.removeprefix("would rewrite ") for line in dry.stdout.splitlines()
              if line.startswith("would rewrite ")}
    assert {_etcd_key(name.replace("widgets.example.com", "widgets")) for name in listed} == off
    assert _snapshot(cluster, "secrets") | _snapshot(cluster, "widgets") == before
    assert _off_key(cluster, new_uuid) == off

    # Killed midway (SIGKILL, no chance to clean up) ...
    command, env = _reencrypt_command(cluster, "--resources", "secrets,widgets.example.com", *etcd,
                                      "--concurrency", "1", "--max-rate", "4")
    log = cluster.directory / "killed-reencrypt.log"
    with log.open("w") as stderr:
        killed = subprocess.Popen(command, env=env, stdout=stderr, stderr=stderr, text=True)
    try:
        wait_until(lambda: len(off - _off_key(cluster, new_uuid)) >= 8 or killed.poll() is not None, 60)
        assert killed.poll() is None, log.read_text()
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
    time.sleep(1)  # an update already sent lands
    left = _off_key(cluster, new_uuid)
    moved_first = off - left
    assert 8 <= len(moved_first) < len(off) - 10, len(moved_first)
    middle = _snapshot(cluster, "secrets") | _snapshot(cluster, "widgets")

    # ... and run again, from the resources the EncryptionConfiguration names: only what is left is touched.
    started = time.monotonic()
    again = _reencrypt(cluster, "--encryption-config", str(cluster.plane.encryption_config_path), *etcd,
                       "--concurrency", "4")
    seconds = time.monotonic() - started
    assert again.returncode == 0, again.stdout + again.stderr
    counts = _summary(again.stdout)
    print(f"second run: {counts}, {seconds:.1f} s wall ({counts['rewritten'] / seconds:.1f} objects/s)")
    assert counts["rewritten"] == len(left) and counts["failed"] == 0 and counts["deleted"] == 0
    assert counts["on_key"] == len(before) - len(left)
    totals = {int(total) for total in re.findall(r"^reencrypt: \d+/(\d+) ", again.stderr, re.MULTILINE)}
    assert totals == {len(before)}, again.stderr  # the objects already on the key are in the total, and done
    assert "OK: every object of" in again.stdout and new_uuid in again.stdout
    assert _off_key(cluster, new_uuid) == set()
    assert cluster.stored("example.com/widgets", "team-a", "w-3").key_id == new_uuid
    assert cluster.stored("secrets", "team-a", "t-0").key_id == new_uuid

    after = _snapshot(cluster, "secrets") | _snapshot(cluster, "widgets")
    assert after.keys() == before.keys()
    for name, (uid, version, content) in before.items():
        assert after[name][0] == uid, f"{name}: UID changed"
        assert after[name][2] == content, f"{name}: content changed"
        if name in on_new_key:
            assert after[name][1] == version, f"{name} was on the key and was rewritten"
        else:
            assert after[name][1] != version, f"{name} was off the key and was not rewritten"
    for name in before:  # the objects the killed run moved were not touched again
        if _etcd_key(name) in moved_first:
            assert after[name][1] == middle[name][1], f"{name} rewritten twice"

    # Nothing left: a third run rewrites nothing and still passes the gate.
    third = _reencrypt(cluster, "--resources", "secrets,widgets.example.com", *etcd)
    assert third.returncode == 0, third.stdout + third.stderr
    assert _summary(third.stdout)["rewritten"] == 0
    assert _snapshot(cluster, "secrets") | _snapshot(cluster, "widgets") == after


def test_reencrypt_without_etcd_conflict_deleted_state_resume_and_dry_run(
        start_cluster: Callable[..., Cluster], new_key: Keys, tmp_path: Path) -> None:
    old_label, _ = new_key()
    cluster = start_cluster(old_label)
    cluster.ok("create", "namespace", "bulk")
    _apply_list(cluster, [_secret("bulk", f"s-{n:02d}") for n in range(40)])

    unknown = _reencrypt(cluster, "--resources", "secrets,gadgets.nowhere.example")
    assert unknown.returncode == 2 and "unknown resource 'gadgets.nowhere.example'" in unknown.stderr, unknown.stderr

    before = _snapshot(cluster, "secrets", "bulk")

    def too_early(new_uuid: str) -> None:
        """kube-apiserver still writes with the old key: a run cannot move anything, and must say so instead of
        counting the objects as already on the key."""
        early = _reencrypt(cluster, "--resources", "secrets", "-n", "bulk", "--etcd-endpoints",
                           cluster.plane.etcd_url, "--key-id", new_uuid)
        assert early.returncode == 1, early.stdout + early.stderr
        assert "has not switched to the new key yet" in early.stdout, early.stdout
        assert "already_on_key=0" in early.stdout, early.stdout
        without_etcd = _reencrypt(cluster, "--resources", "secrets", "-n", "bulk")
        assert without_etcd.returncode == 0, without_etcd.stdout + without_etcd.stderr
        assert "kube-apiserver wrote none of the 40 objects again" in without_etcd.stdout, without_etcd.stdout
        assert _snapshot(cluster, "secrets", "bulk") == before

    new_uuid = _rotate(cluster, old_label, new_key, before_the_poll=too_early)
    state = tmp_path / "reencrypt.state"

    dry = _reencrypt(cluster, "--resources", "secrets", "-n", "bulk", "--dry-run", "--state", str(state))
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert sum(line.startswith("would rewrite secrets bulk/") for line in dry.stdout.splitlines()) == 40
    assert _snapshot(cluster, "secrets", "bulk") == before and not state.exists()

    command, env = _reencrypt_command(cluster, "--resources", "secrets", "--namespace", "bulk", "--page-size", "20",
                                      "--concurrency", "1", "--max-rate", "4", "--state", str(state))
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    assert first.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(first.stderr or ()), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any("page 1: 20 objects listed" in line for line in lines), 30)
        # Between the list and their update: s-19 changes (its update must conflict, be re-read and keep the
        # change), s-18 goes away.
        cluster.ok("label", "secret", "s-19", "-n", "bulk", "touched=yes")
        cluster.ok("delete", "secret", "s-18", "-n", "bulk")
        wait_until(lambda: any("page 2: 20 objects listed" in line for line in lines), 30)
        time.sleep(1.5)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    page_two = next(line for line in lines if "page 2: 20 objects listed" in line)
    assert "deleted_meanwhile=1 conflicts_retried=1 failed=0" in page_two, page_two
    recorded = json.loads(state.read_text())
    assert recorded["namespace"] == "bulk" and recorded["resources"]["secrets"]["continue"], recorded

    still_old = {n for n in before if n != "secrets bulk/s-18"
                 and cluster.stored("secrets", "bulk", n.split("/")[1]).key_id != new_uuid}
    assert still_old and all(name > "secrets bulk/s-19" for name in still_old), still_old

    # Resumed from the state file, and kube-apiserver restarted under it: the run waits for it and finishes.
    command, env = _reencrypt_command(cluster, "--resources", "secrets", "--namespace", "bulk", "--page-size", "20",
                                      "--max-rate", "2", "--state", str(state))
    log = cluster.directory / "resumed-reencrypt.log"
    with log.open("w") as stderr:
        resumed = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    wait_until(lambda: "page 1: 20 objects listed" in log.read_text(), 30)
    restart = cluster.plane.restart_apiserver()
    output, _ = resumed.communicate(timeout=240)
    print(f"kube-apiserver restarted in {restart:.1f} s during the resumed run")
    assert resumed.returncode == 0, output + log.read_text()
    assert "continuing after the last completed page" in log.read_text()
    counts = _summary(output)
    assert counts["listed"] == 20, counts  # page 2 only
    # An update whose answer was lost in the restart is sent again: kube-apiserver then finds it on the key.
    assert counts["rewritten"] + counts["on_key"] == 20 and counts["failed"] == 0, counts
    assert len(still_old) - 2 <= counts["rewritten"] <= len(still_old), (counts, len(still_old))
    assert not state.exists()

    after = _snapshot(cluster, "secrets", "bulk")
    assert set(before) - set(after) == {"secrets bulk/s-18"}
    for name, (uid, version, content) in after.items():
        assert uid == before[name][0] and version != before[name][1], name
        assert cluster.stored("secrets", "bulk", name.split("/")[1]).key_id == new_uuid, name
        if name != "secrets bulk/s-19":
            assert content == before[name][2], name
    labels = json.loads(cluster.ok("get", "secret", "s-19", "-n", "bulk", "-o", "json"))["metadata"]["labels"]
    assert labels == {"touched": "yes"}, "the retried update lost the change made meanwhile"

    # Every object is on the key now: an update is a no-op for kube-apiserver, and nothing gets a new version.
    again = _reencrypt(cluster, "--resources", "secrets", "--namespace", "bulk")
    assert again.returncode == 0, again.stdout + again.stderr
    assert _summary(again.stdout) | {"listed": 0} == {"rewritten": 0, "on_key": 39, "deleted": 0, "conflicts": 0,
                                                      "failed": 0, "listed": 0}
    assert _snapshot(cluster, "secrets", "bulk") == after
