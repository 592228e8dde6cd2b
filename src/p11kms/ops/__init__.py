"""Operator tools: commands that inspect, prepare or prove, and never serve.

The node pre-flight (``doctor``), the plugin check that calls a running plugin as
kube-apiserver would (``preflight``), the etcd scan that proves which key every stored object
uses (``etcdscan`` and its report), key management (``keys``) and the development environment
(``devenv``). They may use the plugin's and Kubernetes' packages; nothing imports them but the
command line.
"""
