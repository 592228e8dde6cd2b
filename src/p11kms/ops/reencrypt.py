"""``p11kms reencrypt``: rewrite stored objects through the Kubernetes API so kube-apiserver encrypts them with the
current key.

Each object gets an update (PUT) that changes nothing but carries the object's resourceVersion. kube-apiserver
writes such an update only when the stored value is stale (another key_id, another provider, in clear), so an
object already on the current key is left as it is and keeps its resourceVersion. An object is never deleted and
re-created: UIDs stay. A conflict (409: changed since it was read) re-reads it and tries again; an object deleted
meanwhile (404) is counted and skipped.

With etcd access only the objects not yet on the primary key are touched (etcd is read, never written), and the
run ends with the gate of ``etcd scan --require``. Without it every object is updated, page by page
(``limit``/``continue``), and a small state file records the last completed page of each resource so that a run
interrupted and started again continues where it stopped.

The official ``kubernetes`` client is imported here only: the serving process never loads it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import urllib3
import yaml
from kubernetes import client as kclient
from kubernetes import config as kconfig
from kubernetes.config.config_exception import ConfigException

from p11kms.kube.etcd import EtcdClient
from p11kms.ops.etcdscan import (
    EXIT_NOT_ON_KEY,
    EXIT_NOTHING_PROVEN,
    EXIT_PASSED,
    GateResult,
    ScanReport,
    normalise_prefix,
    require_key,
    resource_of,
    scan,
)

DEFAULT_CONCURRENCY = 4
DEFAULT_PAGE_SIZE = 100
MAX_CONFLICT_RETRIES = 10
TRANSIENT_RETRY_SECONDS = 120.0  # an apiserver restart or overload: retry a request this long before failing it
STATE_VERSION = 1
# Where built-in resources are stored under a name other than their plural (kube-apiserver's storage prefixes).
_STORED_AS = {("", "nodes"): "minions", ("", "services"): "services/specs", ("", "endpoints"): "services/endpoints",
              ("networking.k8s.io", "ingresses"): "ingress"}


class UsageError(Exception):
    """An argument or input file that cannot work: exit 2, nothing written."""


class ApiFailure(Exception):
    """The API server answered with an error status (or could not be reached)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------- resources


def parse_resources(text: str) -> list[str]:
    """``secrets,configmaps,widgets.example.com`` -> the names, as an EncryptionConfiguration spells them."""
    names = [part.strip() for part in text.split(",")]
    if not names or any(not name for name in names):
        raise UsageError(f"--resources {text!r}: give resource names separated by commas, "
                         "e.g. secrets,configmaps,widgets.example.com")
    for name in names:
        if "/" in name or " " in name or (name.startswith("*") and not name.startswith("*.")):
            raise UsageError(f"--resources: {name!r} is not a resource name: write PLURAL (core) or "
                             "PLURAL.GROUP, as in the EncryptionConfiguration (e.g. widgets.example.com)")
    return names


def resources_from_encryption_config(path: Path) -> tuple[list[str], list[str]]:
    """(the resources kube-apiserver encrypts, those it writes in clear), as the EncryptionConfiguration names
    them (wildcards such as ``*.apps`` included). A name counts where it is first listed, as kube-apiserver
    takes the first entry that matches; an entry whose first provider is ``identity`` writes in clear, and
    rewriting its objects would not move them to any key."""
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UsageError(f"--encryption-config {path}: cannot read it: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"--encryption-config {path}: not YAML: {exc}") from None
    if not isinstance(document, dict) or document.get("kind") != "EncryptionConfiguration":
        raise UsageError(f"--encryption-config {path}: not an EncryptionConfiguration (kind: "
                         f"{document.get('kind') if isinstance(document, dict) else None!r})")
    encrypted: list[str] = []
    in_clear: list[str] = []
    for entry in document.get("resources") or []:
        providers = (entry or {}).get("providers") or [{}]
        first = providers[0] if isinstance(providers[0], dict) else {}
        for name in (entry or {}).get("resources") or []:
            if isinstance(name, str) and name not in encrypted and name not in in_clear:
                (in_clear if "identity" in first else encrypted).append(name)
    if not encrypted:
        raise UsageError(f"--encryption-config {path}: names no resource that kube-apiserver encrypts"
                         + (f" ({', '.join(in_clear)}: identity is the first provider)" if in_clear else "")
                         + "; use --resources to rewrite resources anyway")
    return encrypted, in_clear


@dataclass(frozen=True)
class Target:
    """A resource resolved through discovery."""

    name: str  # secrets, widgets.example.com
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def collection(self, namespace: str | None) -> str:
        root = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        where = f"/namespaces/{_quote(namespace)}" if namespace and self.namespaced else ""
        return f"{root}{where}/{self.plural}"

    def item(self, namespace: str | None, name: str) -> str:
        return f"{self.collection(namespace)}/{_quote(name)}"


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="")


# ---------------------------------------------------------------- the API


class Api:
    """Raw JSON requests through the official client's connection, authentication and TLS set-up.

    Objects are sent back exactly as read (dicts, not the client's models, which would drop fields they
    do not know).
    """

    def __init__(self, api_client: Any, timeout: float = 30.0, stop: threading.Event | None = None) -> None:
        self._client = api_client
        self.timeout = timeout
        self.stop = stop or threading.Event()
        self.server = str(api_client.configuration.host)

    def request(self, method: str, path: str, query: dict[str, str] | None = None,
                body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One request; connection errors, 429 and 5xx other than 500 are retried for a while (an apiserver
        restarting, overloaded); a 500 three times."""
        started = time.monotonic()
        delay, attempts = 0.5, 0
        while True:
            attempts += 1
            try:
                return self._once(method, path, query, body)
            except ApiFailure as exc:
                transient = exc.status in (0, 429, 502, 503, 504) or (exc.status == 500 and attempts < 3)
                if not transient or time.monotonic() - started > TRANSIENT_RETRY_SECONDS or self.stop.is_set():
                    raise
            self.stop.wait(delay)
            delay = min(delay * 2, 5.0)

    def _once(self, method: str, path: str, query: dict[str, str] | None,
              body: dict[str, Any] | None) -> dict[str, Any]:
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        serialized = self._client.param_serialize(method, path, query_params=list((query or {}).items()),
                                                  header_params=headers, auth_settings=["BearerToken"])
        _, url, headers, _, _ = serialized
        try:
            reply = self._client.call_api(method, url, header_params=headers, body=body,
                                          _request_timeout=self.timeout)
            raw = reply.read()
        except (urllib3.exceptions.HTTPError, OSError, kclient.ApiException) as exc:
            raise ApiFailure(0, f"{self.server} did not answer: {exc}") from exc
        status = int(reply.status)
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            answer = {"message": raw[:300].decode(errors="replace")}
        if not 200 <= status < 300:
            raise ApiFailure(status, str(answer.get("message") or answer) if isinstance(answer, dict) else raw)
        if not isinstance(answer, dict):
            raise ApiFailure(status, f"unexpected answer to {method} {path}")
        return answer


def connect(kubeconfig: str | None, context: str | None, timeout: float = 30.0) -> Api:
    """Credentials found as kubectl finds them: --kubeconfig, else $KUBECONFIG, else ~/.kube/config, else the
    pod's service account (in-cluster)."""
    configuration = kclient.Configuration()
    env = os.environ.get("KUBECONFIG")
    default = Path("~/.kube/config").expanduser()
    try:
        if kubeconfig or env or default.exists():
            source = kubeconfig or env or str(default)
            if kubeconfig and not Path(kubeconfig).is_file():
                raise UsageError(f"--kubeconfig {kubeconfig}: no such file")
            kconfig.load_kube_config(config_file=source, context=context,  # type: ignore[no-untyped-call]
                                     client_configuration=configuration, persist_config=False)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            if context:
                raise UsageError("--context needs a kubeconfig; none was found (in-cluster credentials are used)")
            kconfig.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            raise UsageError("no credentials: pass --kubeconfig FILE, set KUBECONFIG, create ~/.kube/config, "
                             "or run in a pod with a service account")
    except ConfigException as exc:
        raise UsageError(f"cannot load Kubernetes credentials: {exc}") from None
    return Api(kclient.ApiClient(configuration), timeout)


def _verbs_fit(resource: dict[str, Any]) -> bool:
    verbs = set(resource.get("verbs") or ())
    return "/" not in str(resource.get("name")) and {"list", "get", "update"} <= verbs


def _group_version(api: Api, group: str) -> str | None:
    if not group:
        return "v1"
    try:
        answer = api.request("GET", f"/apis/{group}")
    except ApiFailure as exc:
        if exc.status == 404:
            return None
        raise
    preferred = answer.get("preferredVersion") or {}
    return str(preferred.get("version")) if preferred.get("version") else None


def _served(api: Api, group: str, version: str) -> list[dict[str, Any]]:
    path = f"/apis/{group}/{version}" if group else f"/api/{version}"
    return list(api.request("GET", path).get("resources") or [])


def _target(name: str, group: str, version: str, resource: dict[str, Any]) -> Target:
    return Target(name, group, version, str(resource["name"]), str(resource.get("kind") or ""),
                  bool(resource.get("namespaced")))


def resolve(api: Api, names: Iterable[str]) -> list[Target]:
    """Group, version and plural of each name through discovery; ``*.GROUP``, ``*.`` and ``*.*`` expand to
    every resource of the group (core, all) that can be listed and updated."""
    targets: list[Target] = []
    for name in names:
        if name.startswith("*."):
            targets += _expand(api, name[2:])
            continue
        plural, _, group = name.partition(".")
        version = _group_version(api, group)
        found = [r for r in _served(api, group, version) if r.get("name") == plural] if version else []
        if not found:
            where = f"group {group!r}" if group else "the core group (write PLURAL.GROUP for another group)"
            raise UsageError(f"unknown resource {name!r}: the API server serves no {plural!r} in {where}")
        if not _verbs_fit(found[0]):
            raise UsageError(f"resource {name!r} cannot be listed and updated (verbs: "
                             f"{', '.join(found[0].get('verbs') or ())})")
        targets.append(_target(name, group, version or "v1", found[0]))
    unique: dict[tuple[str, str], Target] = {}
    for target in targets:
        unique.setdefault((target.group, target.plural), target)
    return list(unique.values())


def _expand(api: Api, group: str) -> list[Target]:
    if group == "*":
        groups = [""] + [str(g["name"]) for g in api.request("GET", "/apis").get("groups") or []]
    else:
        groups = [group]
    expanded = []
    for each in groups:
        version = _group_version(api, each)
        if version is None:
            raise UsageError(f"unknown API group {each!r}")
        expanded += [_target(f"{r['name']}.{each}" if each else str(r["name"]), each, version, r)
                     for r in _served(api, each, version) if _verbs_fit(r)]
    return expanded


# ---------------------------------------------------------------- counting, pacing, progress


@dataclass
class Counts:
    rewritten: int = 0  # updated, and kube-apiserver wrote a new value (new resourceVersion)
    on_key: int = 0  # already on the key: left alone (etcd), or an update kube-apiserver did not write
    deleted: int = 0  # deleted between the list and the update
    conflicts: int = 0  # 409s re-read and retried
    failed: int = 0
    listed: int = 0  # objects this run looked at
    failures: list[str] = field(default_factory=list)

    @property
    def done(self) -> int:
        return self.rewritten + self.on_key + self.deleted + self.failed

    def summary(self) -> str:
        return (f"rewritten={self.rewritten} already_on_key={self.on_key} deleted_meanwhile={self.deleted} "
                f"conflicts_retried={self.conflicts} failed={self.failed}")


class RateLimit:
    """At most ``rate`` starts per second over all workers (None: no limit)."""

    def __init__(self, rate: float | None, stop: threading.Event) -> None:
        self._interval = 1.0 / rate if rate else 0.0
        self._next = time.monotonic()
        self._lock = threading.Lock()
        self._stop = stop

    def wait(self) -> None:
        if not self._interval:
            return
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self._interval
        if slot > now:
            self._stop.wait(slot - now)


class Progress:
    """A bar with counts and ETA on a terminal; a plain line every few seconds otherwise."""

    def __init__(self, stream: TextIO, total: int, interactive: bool, every: float = 5.0) -> None:
        self.stream, self.total, self.interactive, self.every = stream, total, interactive, every
        self.started = time.monotonic()
        self._last = 0.0
        self._lock = threading.Lock()

    def note(self, text: str) -> None:
        with self._lock:
            if self.interactive:
                self.stream.write("\r\x1b[K")
            self.stream.write(f"reencrypt: {text}\n")
            self.stream.flush()

    def update(self, counts: Counts, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last < (0.2 if self.interactive else self.every):
                return
            self._last = now
            done, elapsed = counts.done, max(now - self.started, 1e-6)
            rate = done / elapsed
            total = max(self.total, done)
            eta = f"{_duration((total - done) / rate)}" if rate > 0 and total else "?"
            if self.interactive:
                width = 30
                filled = int(width * done / total) if total else width
                self.stream.write(f"\r\x1b[K[{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
                                  f"{rate:.1f}/s ETA {eta} ({counts.summary()})")
            else:
                percent = f" ({100 * done // total}%)" if total else ""
                self.stream.write(f"reencrypt: {done}/{total}{percent} {rate:.1f}/s ETA {eta}: {counts.summary()}\n")
            self.stream.flush()

    def finish(self, counts: Counts) -> None:
        self.update(counts, force=True)
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    whole = int(seconds)
    if whole >= 3600:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 60}m{whole % 60:02d}s"


# ---------------------------------------------------------------- one object


class Rewriter:
    """Updates objects, unchanged, with bounded concurrency and rate; counts what happened."""

    def __init__(self, api: Api, counts: Counts, progress: Progress, rate: RateLimit, dry_run: bool,
                 out: TextIO) -> None:
        self.api, self.counts, self.progress, self.rate = api, counts, progress, rate
        self.dry_run, self.out = dry_run, out
        self._lock = threading.Lock()
        # With etcd: the checks that kube-apiserver writes with the run's key (they raise KeyNotInUse). The first
        # rewritten object is checked once; an object etcd showed off the key that kube-apiserver did not write
        # again is checked each time, since it is the sign that kube-apiserver still uses the old key.
        self.after_first_write: Callable[[Target, str | None, str], None] | None = None
        self.after_unchanged: Callable[[Target, str | None, str], None] | None = None
        self._first_done = False

    def _count(self, outcome: str, detail: str = "") -> None:
        with self._lock:
            setattr(self.counts, outcome, getattr(self.counts, outcome) + 1)
            if outcome == "failed" and len(self.counts.failures) < 50:
                self.counts.failures.append(detail)
        self.progress.update(self.counts)

    def rewrite(self, target: Target, namespace: str | None, name: str, listed: dict[str, Any] | None) -> None:
        """One object; ``listed`` is the object as a list returned it (None: read it first)."""
        where = f"{target.name} {namespace}/{name}" if namespace else f"{target.name} {name}"
        if self.api.stop.is_set():
            return
        if self.dry_run:
            with self._lock:  # one write per line: print() from several threads interleaves text and newline
                self.out.write(f"would rewrite {where}\n")
                self.out.flush()
            self._count("rewritten")
            return
        self.rate.wait()
        if self.api.stop.is_set():
            return
        body = listed
        for _ in range(MAX_CONFLICT_RETRIES + 1):
            try:
                if body is None:
                    body = self.api.request("GET", target.item(namespace, name))
                before = str(body.get("metadata", {}).get("resourceVersion", ""))
                body.setdefault("apiVersion", target.api_version)
                body.setdefault("kind", target.kind)
                written = self.api.request("PUT", target.item(namespace, name), body=body)
            except ApiFailure as exc:
                if exc.status == 404:
                    self._count("deleted")
                    return
                if exc.status == 409:
                    with self._lock:
                        self.counts.conflicts += 1
                    body = None  # re-read: the update must carry the object as it is now
                    continue
                self._count("failed", f"{where}: {exc}")
                return
            except (KeyError, TypeError, ValueError) as exc:  # an answer that is not an object
                self._count("failed", f"{where}: unexpected answer: {exc!r}")
                return
            after = str(written.get("metadata", {}).get("resourceVersion", ""))
            if after == before and self.after_unchanged is not None:
                self.after_unchanged(target, namespace, name)
            self._count("rewritten" if after != before else "on_key")
            if after != before and self.after_first_write is not None and not self._first_done:
                self._first_done = True
                self.after_first_write(target, namespace, name)
            return
        self._count("failed", f"{where}: still conflicting after {MAX_CONFLICT_RETRIES} re-reads")

    def run_batch(self, pool: ThreadPoolExecutor,
                  batch: Sequence[tuple[Target, str | None, str, dict[str, Any] | None]]) -> None:
        """Rewrites a batch with the pool and returns when all of it is done."""
        for future in [pool.submit(self.rewrite, *item) for item in batch]:
            future.result()


# ---------------------------------------------------------------- without etcd: every object, with a state file


@dataclass
class State:
    """The resume file: per resource, the continue token after the last completed page, or done."""

    path: Path | None
    server: str
    namespace: str | None
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None, server: str, namespace: str | None) -> State:
        state = cls(path, server, namespace)
        if path is None or not path.exists():
            return state
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"--state {path}: not a reencrypt state file ({exc}); remove it to start over") from None
        if not isinstance(document, dict) or document.get("version") != STATE_VERSION:
            raise UsageError(f"--state {path}: not a reencrypt state file of this version; remove it to start over")
        if document.get("server") != server or document.get("namespace") != namespace:
            raise UsageError(f"--state {path} belongs to another run (server {document.get('server')}, namespace "
                             f"{document.get('namespace') or 'all'}); remove it or give another --state")
        state.resources = dict(document.get("resources") or {})
        return state

    def save(self) -> None:
        if self.path is None:
            return
        document = {"version": STATE_VERSION, "server": self.server, "namespace": self.namespace,
                    "resources": self.resources}
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps(document, indent=1) + "\n")
        os.replace(temporary, self.path)

    def remove(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _pages(api: Api, target: Target, namespace: str | None, page_size: int,
           start: str | None, note: Callable[[str], None]) -> Iterator[tuple[list[dict[str, Any]], str | None]]:
    """Pages of a list with limit/continue, each with the token that follows it."""
    token = start
    while True:
        query = {"limit": str(page_size)}
        if token:
            query["continue"] = token
        try:
            answer = api.request("GET", target.collection(namespace), query)
        except ApiFailure as exc:
            if exc.status != 410 or not token:
                raise
            # The token outlived etcd's compaction; start the resource over (already rewritten objects are
            # on the key, so kube-apiserver leaves them alone).
            note(f"{target.name}: the continue token expired (410); listing it again from the start")
            token = None
            continue
        items = list(answer.get("items") or [])
        token = (answer.get("metadata") or {}).get("continue") or None
        yield items, token
        if not token:
            return


def _count_objects(api: Api, target: Target, namespace: str | None) -> int:
    answer = api.request("GET", target.collection(namespace), {"limit": "1"})
    remaining = (answer.get("metadata") or {}).get("remainingItemCount") or 0
    return len(answer.get("items") or []) + int(remaining)


def _every_object(api: Api, targets: list[Target], options: Options, rewriter: Rewriter, pool: ThreadPoolExecutor,
                  state: State) -> bool:
    """Rewrites every object; True when every resource was finished (not stopped)."""
    for target in targets:
        record = state.resources.setdefault(target.name, {"continue": None, "done": False})
        if record.get("done"):
            rewriter.progress.note(f"{target.name}: finished by an earlier run (--state {state.path}); skipped")
            continue
        if record.get("continue"):
            rewriter.progress.note(f"{target.name}: continuing after the last completed page (--state {state.path})")
        pages = _pages(api, target, options.namespace, options.page_size, record.get("continue"),
                       rewriter.progress.note)
        for page_number, (items, token) in enumerate(pages, start=1):
            rewriter.counts.listed += len(items)
            rewriter.progress.note(f"{target.name}: page {page_number}: {len(items)} objects listed "
                                   f"(so far {rewriter.counts.summary()})")
            batch: list[tuple[Target, str | None, str, dict[str, Any] | None]] = [
                (target, (i.get("metadata") or {}).get("namespace"), str(i["metadata"]["name"]), i) for i in items]
            rewriter.run_batch(pool, batch)
            if api.stop.is_set():
                return False
            if not options.dry_run:
                record["continue"] = token
                state.save()
        record["done"] = True
        if not options.dry_run:
            state.save()
    return True


# ---------------------------------------------------------------- with etcd: only what is off the key


def _storage_prefix(api: Api, etcd: EtcdClient, prefix: str, target: Target,
                    namespace: str | None) -> str | None:
    """The etcd key prefix kube-apiserver stores ``target`` under, found by reading one of its objects both
    ways: the candidate whose key holds the object at its resourceVersion. None: the resource has no object."""
    sample = api.request("GET", target.collection(namespace), {"limit": "1"}).get("items") or []
    if not sample:
        return None
    meta = sample[0]["metadata"]
    candidates = []
    if (target.group, target.plural) in _STORED_AS:
        candidates.append(_STORED_AS[(target.group, target.plural)])
    if target.group:
        candidates.append(f"{target.group}/{target.plural}")
    candidates.append(target.plural)
    for candidate in candidates:
        key = f"{prefix}{candidate}/" + (f"{meta['namespace']}/" if target.namespaced else "") + meta["name"]
        stored = etcd.get(key.encode())
        if stored is not None and str(stored.mod_revision) == str(meta.get("resourceVersion")):
            return f"{prefix}{candidate}/"
    raise UsageError(f"cannot find where kube-apiserver stores {target.name} under etcd prefix {prefix} "
                     f"(tried {', '.join(candidates)}): is --etcd-prefix kube-apiserver's --etcd-prefix?")


def _spool_off_key(etcd: EtcdClient, prefix: str, key_prefix: str, key_id: str, page_size: int,
                   spool: TextIO) -> tuple[int, int]:
    """Writes the etcd keys under ``key_prefix`` that are not on ``key_id`` to ``spool``, one a line; returns
    (off the key, on the key). Each page is classified by the scanner's own rules."""
    off = on = 0
    for page in etcd.scan_prefix(key_prefix.encode(), page_size=page_size):
        report = ScanReport(prefix=prefix, required=key_id)
        for kv in page:
            report.add(kv)
        misses = [item.key for items in report.off_key.values() for item in items]
        spool.writelines(key + "\n" for key in misses)
        off += len(misses)
        on += len(page) - len(misses)
    return off, on


def _off_key_objects(api: Api, etcd: EtcdClient, targets: list[Target], options: Options, rewriter: Rewriter,
                     pool: ThreadPoolExecutor, key_id: str) -> tuple[bool, set[str]]:
    """Rewrites only what etcd shows is not on ``key_id``; returns (finished, resources as the scan names them).

    The keys are spooled to a temporary file first (bounded memory, and no etcd read held open across the
    rewrites, which could outlive etcd's compaction)."""
    prefix = normalise_prefix(options.etcd_prefix)
    spools: list[tuple[Target, str, TextIO]] = []
    scan_names: set[str] = set()
    try:
        for target in targets:
            key_prefix = _storage_prefix(api, etcd, prefix, target, options.namespace)
            if key_prefix is None:
                rewriter.progress.note(f"{target.name}: no object")
                continue
            scan_names.add(resource_of((key_prefix + "x/y").encode(), prefix.encode()))
            if options.namespace and target.namespaced:
                key_prefix += options.namespace + "/"
            spool: TextIO = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115 - closed in finally
            spools.append((target, key_prefix, spool))
            off, on = _spool_off_key(etcd, prefix, key_prefix, key_id, options.page_size, spool)
            rewriter.counts.on_key += on
            rewriter.progress.total += off + on  # the objects on the key count as done from the start
            rewriter.progress.note(f"{target.name}: {off} objects not on key {key_id}, {on} already on it")
        for target, key_prefix, spool in spools:
            spool.seek(0)
            batch: list[tuple[Target, str | None, str, dict[str, Any] | None]] = []
            for line in spool:
                rest = line.rstrip("\n")[len(key_prefix):]
                namespace, _, name = rest.rpartition("/") if target.namespaced else ("", "", rest)
                namespace = options.namespace if options.namespace and target.namespaced else namespace
                rewriter.counts.listed += 1
                batch.append((target, namespace or None, name, None))
                if len(batch) >= options.page_size:
                    rewriter.run_batch(pool, batch)
                    batch = []
                    if api.stop.is_set():
                        return False, scan_names
            rewriter.run_batch(pool, batch)
            if api.stop.is_set():
                return False, scan_names
    finally:
        for _, _, spool in spools:
            spool.close()
    return True, scan_names


# ---------------------------------------------------------------- the run


@dataclass
class Options:
    resources: list[str]
    namespace: str | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    max_rate: float | None = None
    page_size: int = DEFAULT_PAGE_SIZE
    dry_run: bool = False
    state: Path | None = None
    etcd: EtcdClient | None = None
    etcd_prefix: str = "/registry/"
    key_id: str | None = None


@dataclass
class Outcome:
    exit_code: int
    counts: Counts
    lines: list[str]
    gate: GateResult | None = None
    seconds: float = 0.0


class KeyNotInUse(Exception):
    """kube-apiserver wrote an object under another key than the one the run was asked to move objects to."""


def run(api: Api, options: Options, err: TextIO, out: TextIO, interactive: bool) -> Outcome:
    """Rewrites what ``options`` select and says how it went; ``api.stop`` set (a signal) ends it early."""
    started = time.monotonic()
    targets = resolve(api, options.resources)
    counts = Counts()
    progress = Progress(err, 0, interactive)
    state = State.load(None if options.etcd else options.state, api.server, options.namespace)
    rewriter = Rewriter(api, counts, progress, RateLimit(options.max_rate, api.stop), options.dry_run, out)
    lines: list[str] = []
    gate: GateResult | None = None
    with ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix="reencrypt") as pool:
        if options.etcd is not None:
            key_id = options.key_id or ""
            etcd = options.etcd
            rewriter.after_first_write = _check_key(etcd, options, api, key_id, "rewrote")
            rewriter.after_unchanged = _check_key(etcd, options, api, key_id, "did not write again")
            try:
                finished, scan_names = _off_key_objects(api, etcd, targets, options, rewriter, pool, key_id)
            except KeyNotInUse as exc:
                progress.finish(counts)
                seconds = time.monotonic() - started
                return Outcome(EXIT_NOT_ON_KEY, counts, [_summary_line(counts, options, seconds), f"STOPPED: {exc}"],
                               seconds=seconds)
        else:
            progress.total = sum(_count_objects(api, t, options.namespace) for t in targets)
            progress.note(f"{progress.total} objects of {', '.join(t.name for t in targets)}: every one is updated "
                          "(give --etcd-endpoints to touch only those not on the primary key)")
            finished = _every_object(api, targets, options, rewriter, pool, state)
    progress.finish(counts)
    seconds = time.monotonic() - started
    lines.append(_summary_line(counts, options, seconds))
    lines += [f"FAILED: {line}" for line in counts.failures]
    if not finished:
        resume = ("run the same command again: it touches only what is still off the key" if options.etcd
                  else f"run the same command again: it continues after the last completed page (--state "
                       f"{options.state})" if options.state else
                  "run it again (without --state it starts over; objects already on the key are not rewritten)")
        lines.append(f"INTERRUPTED: {resume}")
        return Outcome(EXIT_NOT_ON_KEY, counts, lines, seconds=seconds)
    if options.etcd is not None and options.key_id:
        report = scan(options.etcd, options.etcd_prefix, page_size=500, require=options.key_id)
        gate = require_key(report, options.key_id, scan_names)
        lines += gate.lines
        code = gate.exit_code
    else:
        code = EXIT_NOTHING_PROVEN if counts.listed == 0 else EXIT_PASSED
        if code == EXIT_NOTHING_PROVEN:
            lines.append("NOTHING PROVEN: no object of the resources given was found")
        elif counts.rewritten == 0 and counts.on_key and not options.dry_run:
            # Without etcd an unchanged answer cannot be told apart: on the key already, or kube-apiserver still
            # on the old key (its Status poll has not seen the new one). Say both.
            lines.append(f"NOTE: kube-apiserver wrote none of the {counts.on_key} objects again: each is current "
                         "under the key kube-apiserver writes with. Right after a rotation that can be the old key "
                         "(kube-apiserver asks the plugin's Status about once a minute): run again a minute after "
                         "the plugin took the new key, or give --etcd-endpoints and --key-id to check in etcd")
    if not options.dry_run:
        state.remove()
    if counts.failed and code == EXIT_PASSED:
        code = EXIT_NOT_ON_KEY
    return Outcome(code, counts, lines, gate, seconds)


def _summary_line(counts: Counts, options: Options, seconds: float) -> str:
    verb = "would rewrite" if options.dry_run else "rewritten"
    return (f"{counts.summary()} ({counts.listed} objects looked at in {seconds:.1f} s)"
            .replace("rewritten=", f"{verb}=", 1))


def _check_key(etcd: EtcdClient, options: Options, api: Api, key_id: str,
               what_happened: str) -> Callable[[Target, str | None, str], None]:
    """Is the object just updated stored under ``key_id``? If not, kube-apiserver still writes with the old key
    (its Status poll has not seen the new one yet): rewriting the rest would do nothing, or be done again."""
    prefix = normalise_prefix(options.etcd_prefix)

    def check(target: Target, namespace: str | None, name: str) -> None:
        key_prefix = _storage_prefix(api, etcd, prefix, target, namespace)
        if key_prefix is None:
            return
        stored = etcd.get(f"{key_prefix}{namespace + '/' if namespace else ''}{name}".encode())
        if stored is None:
            return
        report = ScanReport(prefix=prefix, required=key_id)
        report.add(stored)
        misses = [item for items in report.off_key.values() for item in items]
        if misses:
            api.stop.set()
            raise KeyNotInUse(f"kube-apiserver {what_happened} {target.name} "
                              f"{namespace + '/' if namespace else ''}{name}, which is stored "
                              f"{misses[0].reason.replace('on another', 'under')}, not under "
                              f"{key_id}: it has not switched to the new key yet (it asks the plugin's Status "
                              "about once a minute). Wait a minute and run the same command again")

    return check
