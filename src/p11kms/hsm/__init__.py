"""The HSM layer: everything that speaks PKCS#11.

A ctypes binding of the PKCS#11 C API (``ckdefs``, ``module``), a logged-in ``Token`` with its
pool of work sessions, key identity (a key's UUID, the ``key_id`` kube-apiserver stores) and
token provisioning for development. PKCS#11 return values become the typed exceptions of
``errors`` here and nowhere else; what they mean for a gRPC caller is decided in the plugin's
service layer. This package imports nothing else of p11kms.
"""
