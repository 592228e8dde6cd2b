"""Throwaway CAs and certificates: a server and a client certificate for the etcd TLS tests, and what a
real kube-apiserver needs to serve and to know its admin (tests/controlplane.py)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[Path, Path]:
    key_path, cert_path = path.with_suffix(".key"), path.with_suffix(".crt")
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
                 signer: ec.EllipticCurvePrivateKey, *, ca: bool,
                 usages: list[x509.ObjectIdentifier], organization: str = "") -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    # kube-apiserver reads a client certificate's Organization as the user's groups.
    names = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)] if organization else []
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([*names, x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(signer, hashes.SHA256())


def make_pki(directory: Path) -> dict[str, Path]:
    """Returns paths: ca, server_cert, server_key, client_cert, client_key."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p11kms test CA")])
    ca_cert = _certificate("p11kms test CA", ca_key, ca_name, ca_key, ca=True, usages=[])
    ca_path, _ = _write(directory / "ca", ca_key, ca_cert)
    paths = {"ca": ca_path}
    # etcd's own JSON gateway dials etcd with the server certificate, so that one needs client use too.
    roles = (("server", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
             ("client", [ExtendedKeyUsageOID.CLIENT_AUTH]))
    for role, usages in roles:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"p11kms test {role}", key, ca_name, ca_key, ca=False, usages=usages)
        paths[f"{role}_cert"], paths[f"{role}_key"] = _write(directory / role, key, cert)
    return paths


def make_control_plane_pki(directory: Path) -> dict[str, Path]:
    """Returns paths: ca, apiserver_cert, apiserver_key (serving), admin_cert, admin_key (a member of
    system:masters), service_account_key (signs service-account tokens) and service_account_pub
    (verifies them)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p11kms test cluster CA")])
    ca_path, _ = _write(directory / "ca", ca_key, _certificate("p11kms test cluster CA", ca_key, ca_name, ca_key,
                                                             ca=True, usages=[]))
    paths = {"ca": ca_path}
    roles = (("apiserver", "kube-apiserver", "", ExtendedKeyUsageOID.SERVER_AUTH),
             ("admin", "p11kms-admin", "system:masters", ExtendedKeyUsageOID.CLIENT_AUTH))
    for role, subject, organization, usage in roles:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(subject, key, ca_name, ca_key, ca=False, usages=[usage], organization=organization)
        paths[f"{role}_cert"], paths[f"{role}_key"] = _write(directory / role, key, cert)
    service_account = ec.generate_private_key(ec.SECP256R1())
    paths["service_account_key"] = directory / "service-account.key"
    paths["service_account_key"].write_bytes(service_account.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    paths["service_account_pub"] = directory / "service-account.pub"
    paths["service_account_pub"].write_bytes(service_account.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return paths
