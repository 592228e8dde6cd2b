"""A kube-apiserver stand-in, for tests and demonstrations only: not a Kubernetes server.

It reproduces what kube-apiserver's KMS v2 envelope does with a plugin (spec
sections 2 and 3), stores Secrets in a real etcd in kube-apiserver's format, and
serves just enough of the Kubernetes REST API for kubectl to create, list,
replace and delete Secrets. It lets the rotation procedure run end to end on a
machine without a cluster.
"""
