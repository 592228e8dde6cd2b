"""Kubernetes' side of the contract: what kube-apiserver and etcd do and expect.

The checks kube-apiserver applies to a plugin's answers (``apiserver_rules``), the envelope it
stores in etcd (``envelope``), a KMS v2 client that calls a plugin as kube-apiserver does
(``client``) and a read-only etcd v3 client (``etcd``). Written from the protocol spec, used by
the operator tools and the stand-in, never by the serving plugin itself.
"""
