"""A small etcd v3 client over etcd's JSON gateway (``/v3/kv/...``), with optional client TLS.

etcd serves this gateway on its client URLs by default (3.4 and later), so the
scanner can read a real cluster's etcd with the same endpoints and certificates
etcdctl uses. Only what p11kms needs is here: paged range reads at one revision. The
guarded writes the tests and the kube-apiserver stand-in need are in tests/standin/etcdwrites.py.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


class EtcdError(Exception):
    """etcd could not be reached or refused the request."""


class EtcdTlsOptionError(EtcdError):
    """The client TLS options cannot work as given (a missing half, an unreadable or mismatched file).

    Raised before any connection, so the caller can treat it as a usage error.
    """


# Where kubeadm puts the files kube-apiserver itself reads etcd with: the usual right answer.
KUBEADM_TLS_HINT = ("on a kubeadm control plane: --cacert /etc/kubernetes/pki/etcd/ca.crt "
                    "--cert /etc/kubernetes/pki/apiserver-etcd-client.crt "
                    "--key /etc/kubernetes/pki/apiserver-etcd-client.key")
# OpenSSL's names for the alerts a server sends when it wanted a client certificate and got none.
_NO_CLIENT_CERT_ALERTS = {"SSLV3_ALERT_BAD_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED",
                          "SSLV3_ALERT_HANDSHAKE_FAILURE"}


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key that starts with ``prefix``."""
    trimmed = prefix.rstrip(b"\xff")
    return trimmed[:-1] + bytes([trimmed[-1] + 1]) if trimmed else b"\x00"


def _kv(raw: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=base64.b64decode(raw["key"]),
        value=base64.b64decode(raw.get("value", "")),
        mod_revision=int(raw.get("mod_revision", 0)),
        create_revision=int(raw.get("create_revision", 0)),
    )


def _readable(option: str, path: str) -> None:
    """Opens ``path`` once so a missing or unreadable file is named with its option, not as an OpenSSL error."""
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise EtcdTlsOptionError(f"cannot read {option} {path}: no such file; {KUBEADM_TLS_HINT}") from None
    except PermissionError:
        raise EtcdTlsOptionError(f"cannot read {option} {path}: permission denied; run the scan as a user that "
                                 "may read it (e.g. with sudo on the control-plane node)") from None
    except IsADirectoryError:
        raise EtcdTlsOptionError(f"cannot read {option} {path}: it is a directory; pass the PEM file") from None


def _tls_context(cacert: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    """Client TLS as etcdctl takes it; each mistake is named with its option and file."""
    if bool(cert) != bool(key):
        given, missing = ("--cert", "--key") if cert else ("--key", "--cert")
        raise EtcdTlsOptionError(f"{given} is given without {missing}: a client certificate needs both; pass "
                                 f"{missing} too ({KUBEADM_TLS_HINT})")
    for option, path in (("--cacert", cacert), ("--cert", cert), ("--key", key)):
        if path:
            _readable(option, path)
    try:
        context = ssl.create_default_context(cafile=cacert)
    except ssl.SSLError as exc:
        raise EtcdTlsOptionError(f"--cacert {cacert} holds no PEM CA certificate ({exc.reason}); pass etcd's CA "
                                 f"certificate ({KUBEADM_TLS_HINT})") from None
    if cert and key:
        _load_client_pair(context, cert, key)
    return context


def _load_client_pair(context: ssl.SSLContext, cert: str, key: str) -> None:
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise EtcdTlsOptionError(f"--key {key} does not match the certificate in --cert {cert}: pass the key "
                                     f"made with that certificate ({KUBEADM_TLS_HINT})") from None
        raise EtcdTlsOptionError(f"cannot load --cert {cert} with --key {key} ({exc.reason or exc}): both must be "
                                 "PEM files, the key unencrypted") from None


class EtcdClient:
    def __init__(self, endpoints: list[str], *, cacert: str | None = None, cert: str | None = None,
                 key: str | None = None, timeout: float = 10.0) -> None:
        if not endpoints:
            raise EtcdError("no etcd endpoint given")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self._client_cert = cert
        self._tls: ssl.SSLContext | None = None
        if any(e.startswith("https://") for e in self.endpoints):
            self._tls = _tls_context(cacert, cert, key)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        failures = []
        for endpoint in self.endpoints:
            request = urllib.request.Request(f"{endpoint}/v3/{path}", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout, context=self._tls) as reply:
                    answer: dict[str, Any] = json.loads(reply.read())
                    return answer
            except urllib.error.HTTPError as exc:
                raise EtcdError(f"etcd {endpoint} refused {path}: {exc.code} {exc.read()[:300]!r}") from exc
            except (urllib.error.URLError, OSError) as exc:
                reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
                tls_problem = self._tls_failure(endpoint, reason)
                if tls_problem:
                    raise EtcdError(tls_problem) from exc
                failures.append(f"{endpoint}: {reason}")
        raise EtcdError("no etcd endpoint answered: " + "; ".join(failures))

    def _tls_failure(self, endpoint: str, reason: object) -> str | None:
        """What a TLS handshake failure means for the operator; None when it is not one.

        Every endpoint of one cluster shares the same PKI, so trying the next one would not help.
        """
        if isinstance(reason, ssl.SSLCertVerificationError):
            return (f"cannot verify the certificate of etcd at {endpoint} ({reason.verify_message}): pass --cacert "
                    "with the CA that signed etcd's server certificate, and an endpoint whose host that "
                    f"certificate names ({KUBEADM_TLS_HINT})")
        if isinstance(reason, ssl.SSLEOFError) and self._client_cert is None:
            # With TLS 1.3 etcd may close the connection before its "certificate required" alert is read.
            return (f"etcd at {endpoint} closed the TLS connection without saying why; with no client certificate "
                    "given, it most likely requires a client certificate: pass --cert and --key "
                    f"({KUBEADM_TLS_HINT})")
        if not isinstance(reason, ssl.SSLError) or reason.reason not in _NO_CLIENT_CERT_ALERTS:
            return None
        if self._client_cert is None:
            return (f"etcd at {endpoint} requires a client certificate and none was given: pass --cert and --key "
                    f"({KUBEADM_TLS_HINT})")
        return (f"etcd at {endpoint} refused the client certificate {self._client_cert} ({reason.reason}): pass a "
                f"certificate signed by the CA etcd trusts (its --trusted-ca-file) ({KUBEADM_TLS_HINT})")

    def get(self, key: bytes) -> KeyValue | None:
        kvs = self._post("kv/range", {"key": _b64(key)}).get("kvs", [])
        return _kv(kvs[0]) if kvs else None

    def revision(self) -> int:
        return int(self._post("kv/range", {"key": _b64(b"\x00"), "limit": 1})["header"]["revision"])

    def scan_prefix(self, prefix: bytes, page_size: int = 500, revision: int | None = None,
                    keys_only: bool = False) -> Iterator[list[KeyValue]]:
        """Yields pages of keys under ``prefix``, all read at one revision (a consistent snapshot)."""
        end = prefix_end(prefix)
        start = prefix
        revision = revision or self.revision()
        while True:
            body: dict[str, Any] = {"key": _b64(start), "range_end": _b64(end), "limit": page_size,
                                    "revision": revision}
            if keys_only:
                body["keys_only"] = True
            answer = self._post("kv/range", body)
            page = [_kv(raw) for raw in answer.get("kvs", [])]
            if page:
                yield page
            if not answer.get("more") or not page:
                return
            start = page[-1].key + b"\x00"
