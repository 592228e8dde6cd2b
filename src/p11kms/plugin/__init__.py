"""The serving process: what runs while kube-apiserver is connected.

``server`` owns the Unix socket, signals and the HTTP listener; ``service`` answers the KMS v2
gRPC calls and maps HSM errors to status codes (once, here); ``supervisor`` keeps a healthy
``keyring`` in service across HSM faults and reloads; ``health`` caches the HSM round trip that
Status and the probes report; ``metrics`` and ``httpserver`` expose it to Prometheus and the
kubelet. Nothing here imports the operator tools (``p11kms.ops``) or the Kubernetes side
(``p11kms.kube``): the plugin must stay small enough to audit.
"""
