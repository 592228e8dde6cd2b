"""p11kms: a Kubernetes KMS v2 plugin that keeps the key-encryption key in a PKCS#11 HSM."""

__version__ = "0.1.0"
