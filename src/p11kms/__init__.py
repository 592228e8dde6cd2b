"""p11kms: a Kubernetes KMS v2 plugin that keeps the key-encryption key in a PKCS#11 HSM."""

# The one place the version is written: pyproject.toml reads it (dynamic version), and so do
# `p11kms --version`, the "serving KMS v2" log line and the p11kms_build_info metric.
__version__ = "0.1.0"
