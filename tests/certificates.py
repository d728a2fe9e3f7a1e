"""Throwaway TLS certificates for tests."""

from __future__ import annotations

import datetime
import functools
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl


@functools.cache
def throwaway(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """(key, certificate): self-signed, for ``name`` and 127.0.0.1, valid a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def throwaway_certificate(name: str) -> tuple[bytes, bytes]:
    """(key, certificate) of :func:`throwaway` in PEM."""
    key, certificate = throwaway(name)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, certificate.public_bytes(serialization.Encoding.PEM)


def server_options(name: str) -> ssl.CertificateOptions:
    """Twisted's server options presenting the throwaway certificate for ``name``.
    CertificateOptions hands its key and certificate to pyOpenSSL as they are,
    and pyOpenSSL takes ``cryptography`` objects (its own X509 and PKey are
    deprecated)."""
    key, certificate = throwaway(name)
    return ssl.CertificateOptions(privateKey=key, certificate=certificate)  # type: ignore[arg-type]
