"""smtpguard.tls: PEM files that cannot serve STARTTLS are refused with the key
that named them and what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from OpenSSL import SSL

from smtpguard.tls import ServerTLS, TLSFileError
from tests.certificates import throwaway, throwaway_certificate


def files(tmp_path: Path, key: bytes) -> tuple[str, str]:
    certificate = tmp_path / "cert.pem"
    certificate.write_bytes(throwaway_certificate("guard.test")[1])
    path = tmp_path / "key.pem"
    path.write_bytes(key)
    return str(certificate), str(path)


def refusal(certificate: str, key: str) -> tuple[str, str]:
    with pytest.raises(TLSFileError) as refused:
        ServerTLS(certificate, key)
    return refused.value.setting, str(refused.value)


def test_matching_files_make_a_context(tmp_path: Path) -> None:
    """The certificate and its own key make a context presenting that certificate."""
    certificate, key = files(tmp_path, throwaway_certificate("guard.test")[0])

    connection = SSL.Connection(ServerTLS(certificate, key).getContext())

    assert connection.get_certificate(as_cryptography=True) == throwaway("guard.test")[1]


def test_a_file_without_a_certificate_is_refused(tmp_path: Path) -> None:
    """A certificate file holding no PEM certificate names tls_certificate."""
    _, key = files(tmp_path, throwaway_certificate("guard.test")[0])

    assert refusal(key, key) == ("tls_certificate", f"no PEM certificate in {key!r}")


def test_an_encrypted_key_is_refused(tmp_path: Path) -> None:
    """A passphrase-protected key names tls_key: nobody types the passphrase at start."""
    encrypted = throwaway("guard.test")[0].private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"x")
    )
    certificate, key = files(tmp_path, encrypted)

    assert refusal(certificate, key) == ("tls_key", f"no unencrypted PEM private key in {key!r}")


def test_a_key_that_cannot_sign_is_refused(tmp_path: Path) -> None:
    """An X25519 key (key agreement only) names tls_key and the kind of key."""
    agreement = x25519.X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    certificate, key = files(tmp_path, agreement)

    assert refusal(certificate, key) == (
        "tls_key",
        f"{key!r} holds a X25519PrivateKey, which cannot sign a TLS handshake",
    )
