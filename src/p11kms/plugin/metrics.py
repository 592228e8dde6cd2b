"""Prometheus metrics, fed by the observer hooks of the HSM layer, the supervisor and the service.

Names follow Prometheus conventions (``p11kms_`` prefix, base units, ``_total`` counters). Labels carry
method names, gRPC codes, PKCS#11 function and return-code names, key UUIDs and labels: never a PIN,
a payload or a plaintext.

Every label set known in advance is exported at zero from the start (each method with each code the
service answers, reload and reconnect results, each configured key as missing or not): a counter
whose series is born at 1 has an ``increase()`` of 0, so the first event would fire no alert.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from p11kms.hsm.errors import ckr_name
from p11kms.observability import build_info
from p11kms.plugin.keyring import Keyring
from p11kms.plugin.service import ANSWER_CODES, CHECK_PROBE_CODE, METHODS

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


_Metric = TypeVar("_Metric", Counter, Histogram)


class _Children(Generic[_Metric]):
    """The labelled children of a metric observed on every request, each looked up once.

    ``labels()`` takes a lock and checks its arguments on every call, several times per request;
    a dict lookup does not. Only for metrics that are never cleared (clearing orphans the children).
    """

    def __init__(self, metric: _Metric) -> None:
        self._metric: _Metric = metric
        self._children: dict[tuple[str, ...], _Metric] = {}

    def __call__(self, *values: str) -> _Metric:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class Metrics:
    """One registry per plugin; implements HsmObserver, SupervisorObserver and ServiceObserver."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("p11kms_grpc_requests", "KMS v2 RPCs by method and gRPC status code.",
                                ["method", "code"], registry=r)
        self.request_seconds = Histogram("p11kms_grpc_request_duration_seconds", "KMS v2 RPC latency.",
                                         ["method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.hsm_seconds = Histogram("p11kms_hsm_call_duration_seconds", "PKCS#11 call latency by function.",
                                     ["function"], buckets=_LATENCY_BUCKETS, registry=r)
        self.hsm_errors = Counter("p11kms_hsm_call_errors", "PKCS#11 calls that returned an error, by return code.",
                                  ["function", "ckr"], registry=r)
        self.in_flight_gauge = Gauge("p11kms_hsm_operations_in_flight", "HSM operations running right now.",
                                     registry=r)
        self.calls_held = Gauge("p11kms_grpc_calls_held", "KMS v2 calls held right now, running or waiting for a "
                                "handler thread; at Max_Calls further calls are refused.", registry=r)
        self.hsm_up = Gauge("p11kms_hsm_up", "1 while the HSM connection is usable, else 0.", registry=r)
        self.hsm_state_info = Gauge("p11kms_hsm_state", "The HSM connection state (1 for the current one).",
                                    ["state"], registry=r)
        self.reconnects = Counter("p11kms_hsm_reconnect_attempts", "Reconnects to the HSM, by result.",
                                  ["result"], registry=r)
        self.primary = Gauge("p11kms_primary_key_info", "The key that encrypts (value 1).", ["uuid", "label"],
                             registry=r)
        self.configured = Gauge("p11kms_keyring_keys", "Keys in the keyring by role.", ["role"], registry=r)
        self.missing = Gauge("p11kms_keyring_missing_key", "A configured decrypt-only key that is not in the HSM "
                             "(value 1); Decrypts under it fail until it is restored.", ["label", "role"], registry=r)
        self.weak_key = Gauge("p11kms_key_policy_weak", "A loaded key that is extractable, not sensitive, shorter "
                              "than 256 bits or allows wrap/derive (value 1).", ["label", "role"], registry=r)
        self.decrypts = Counter("p11kms_decrypt", "Successful Decrypts by key UUID and role.", ["key_uuid", "role"],
                                registry=r)
        self.reloads = Counter("p11kms_keyring_reloads", "Keyring reloads (SIGHUP) by result.", ["result"],
                               registry=r)
        self.config_reload_failed = Gauge("p11kms_config_reload_failed", "1 while the newest config on disk is "
                                          "rejected and the previous keyring serves, else 0.", registry=r)
        self.config_reload_success = Gauge("p11kms_config_last_reload_success_timestamp_seconds",
                                           "Unix time of the last config load that was adopted (start or reload).",
                                           registry=r)
        info = build_info()
        self.build_info = Gauge("p11kms_build_info", "The running p11kms (value 1): its version, Python and grpcio.",
                                list(info), registry=r)
        self.build_info.labels(**info).set(1)
        self._requests = _Children(self.requests)
        self._request_seconds = _Children(self.request_seconds)
        self._hsm_seconds = _Children(self.hsm_seconds)
        self._decrypts = _Children(self.decrypts)
        self.check_probes = Counter("p11kms_check_probes", "The deliberate unknown-key_id Decrypts of `p11kms check`, "
                                    "by gRPC code; kept out of p11kms_grpc_requests_total so alerts do not see them.",
                                    ["code"], registry=r)
        for method in METHODS:
            self._request_seconds(method)
            for code in ANSWER_CODES:
                self._requests(method, code)
        for result in ("success", "failure"):
            self.reloads.labels(result)
            self.reconnects.labels(result)
        self.check_probes.labels(CHECK_PROBE_CODE)

    # HsmObserver
    def pkcs11_call(self, function: str, seconds: float, rv: int) -> None:
        self._hsm_seconds(function).observe(seconds)
        if rv != 0:
            self.hsm_errors.labels(function, ckr_name(rv)).inc()

    def in_flight(self, delta: int) -> None:
        self.in_flight_gauge.inc(delta)

    def count_calls_held(self, held: Callable[[], int]) -> None:
        """The gRPC server's calls held, read at each scrape (nothing is counted per call here)."""
        self.calls_held.set_function(held)

    # SupervisorObserver
    def keyring_loaded(self, keyring: Keyring) -> None:
        self.primary.clear()
        self.primary.labels(keyring.primary.uuid, keyring.primary.label).set(1)
        self.configured.labels("primary").set(1)
        self.configured.labels("secondary").set(len(keyring.secondaries))
        self.missing.clear()
        for kek in keyring.keys:  # 0: present; so that a key going missing later changes a series, not starts one
            self.missing.labels(kek.label, kek.role.value).set(0)
        for missing in keyring.missing:
            self.missing.labels(missing.label, missing.role.value).set(1)
        self.weak_key.clear()
        for kek in keyring.keys:
            if kek.policy_warnings:
                self.weak_key.labels(kek.label, kek.role.value).set(1)

    def hsm_state(self, state: str) -> None:
        self.hsm_state_info.clear()
        self.hsm_state_info.labels(state).set(1)
        self.hsm_up.set(1 if state == "ready" else 0)

    def reconnect_attempt(self, succeeded: bool) -> None:
        self.reconnects.labels("success" if succeeded else "failure").inc()

    # ServiceObserver
    def rpc(self, method: str, code: str, seconds: float) -> None:
        self._requests(method, code).inc()
        self._request_seconds(method).observe(seconds)

    def decrypted(self, key_uuid: str, role: str) -> None:
        self._decrypts(key_uuid, role).inc()

    def check_probe(self, code: str) -> None:
        self.check_probes.labels(code).inc()

    # reloads are counted by the server, which knows whether the new config was accepted
    def reload(self, succeeded: bool) -> None:
        self.reloads.labels("success" if succeeded else "failure").inc()
        self.config_reload(succeeded)

    def config_reload(self, succeeded: bool) -> None:
        """The state of the newest config on disk: adopted (now), or rejected until a good one arrives."""
        self.config_reload_failed.set(0 if succeeded else 1)
        if succeeded:
            self.config_reload_success.set_to_current_time()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
