"""A throw-away certificate authority and workload certificates, made at run time.

Istio's identities are X.509 certificates whose URI SAN is a SPIFFE id; Envoy copies the peer's URI
SAN into ``CheckRequest.attributes.source.principal`` and its own into ``destination.principal``.
Making them here, per run, keeps private keys out of the repository while giving the tests a real
TLS handshake to derive identities from.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = datetime.timedelta(days=1)
_CLOCK_SKEW = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class CertificateAuthority:
    """The test CA: its files (for Envoy and clients) and key material (to sign with)."""

    directory: Path
    cert_path: Path
    key_path: Path
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class IssuedCert:
    """A leaf certificate's PEM files plus the CA file that validates its peers."""

    cert_path: Path
    key_path: Path
    ca_path: Path
    spiffe_id: str | None
    dns_names: tuple[str, ...]


def make_ca(directory: Path, common_name: str = "authz-server demo CA") -> CertificateAuthority:
    """Create a self-signed EC P-256 CA in *directory* (created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = _write_pair(directory, "ca", certificate, key)
    return CertificateAuthority(directory, cert_path, key_path, certificate, key)


def issue_workload_cert(
    ca: CertificateAuthority,
    spiffe_id: str | None,
    *,
    dns_names: Iterable[str] = (),
    ip_addresses: Iterable[str] = (),
    name: str | None = None,
) -> IssuedCert:
    """Sign a leaf certificate usable as TLS server and client, written next to the CA.

    A workload certificate has only the SPIFFE URI SAN and an empty subject, as Istio's do; a
    gateway's serving certificate has DNS SANs (and then a CN of the first name). *ip_addresses*
    add IP SANs, which clients need to verify a server addressed as ``https://127.0.0.1:<port>``.
    *name* picks the file stem; by default it is derived from the SPIFFE id or the first DNS name.
    """
    dns = tuple(dns_names)
    if spiffe_id is None and not dns:
        raise ValueError("a certificate needs a SPIFFE id or at least one DNS name")
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans.extend(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses)
    if spiffe_id is not None:
        sans.insert(0, x509.UniformResourceIdentifier(spiffe_id))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0])] if dns else [])
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        # RFC 5280: the SAN extension must be critical when the subject is empty.
        .add_extension(x509.SubjectAlternativeName(sans), critical=not dns)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.private_key.public_key()),
            critical=False,
        )
        .sign(ca.private_key, hashes.SHA256())
    )
    stem = name or _file_stem(spiffe_id or dns[0])
    cert_path, key_path = _write_pair(ca.directory, stem, certificate, key)
    return IssuedCert(cert_path, key_path, ca.cert_path, spiffe_id, dns)


def _file_stem(identity: str) -> str:
    """``spiffe://cluster.local/ns/foo/sa/sleep`` → ``foo-sleep``; ``a.example.com`` → itself."""
    match = re.fullmatch(r"spiffe://[^/]+/ns/([^/]+)/sa/([^/]+)", identity)
    raw = f"{match.group(1)}-{match.group(2)}" if match else identity
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw)


def _write_pair(
    directory: Path, stem: str, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    """Write ``<stem>.pem`` and ``<stem>-key.pem``; the key is readable by the owner only."""
    cert_path = directory / f"{stem}.pem"
    key_path = directory / f"{stem}-key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
