"""TLS contexts from PEM files, loaded with ``cryptography`` so that a file that
cannot be used is named with what is wrong with it."""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from OpenSSL import SSL
from twisted.internet.ssl import ContextFactory

SigningKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)


class TLSFileError(Exception):
    """A certificate or key file that cannot be used; ``setting`` is the
    configuration key that named it (``tls_certificate`` or ``tls_key``)."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(problem)
        self.setting = setting


def _read(setting: str, path: str) -> bytes:
    try:
        with open(path, "rb") as pem:
            return pem.read()
    except OSError as error:
        raise TLSFileError(setting, f"cannot read {path!r}: {error.strerror}") from None


def load_certificates(path: str) -> list[x509.Certificate]:
    """The certificate in the PEM file ``path``, then the chain after it."""
    try:
        return x509.load_pem_x509_certificates(_read("tls_certificate", path))
    except ValueError:
        raise TLSFileError("tls_certificate", f"no PEM certificate in {path!r}") from None


def load_key(path: str) -> SigningKey:
    """The private key in the PEM file ``path``, which must not be encrypted
    (nobody is there to type a passphrase when the service starts)."""
    try:
        key = serialization.load_pem_private_key(_read("tls_key", path), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise TLSFileError("tls_key", f"no unencrypted PEM private key in {path!r}") from None
    if not isinstance(key, SigningKey):
        raise TLSFileError("tls_key", f"{path!r} holds a {type(key).__name__}, which cannot sign a TLS handshake")
    return key


class ServerTLS(ContextFactory):
    """A server context from a certificate file (which may hold the chain after the
    certificate) and a private key file.  TLS 1.2 or newer only."""

    isClient = 0

    def __init__(self, certificate: str, key: str) -> None:
        leaf, *chain = load_certificates(certificate)
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.use_certificate(leaf)
        for intermediate in chain:
            context.add_extra_chain_cert(intermediate)
        private_key = load_key(key)
        try:
            context.use_privatekey(private_key)
            context.check_privatekey()
        except SSL.Error:
            raise TLSFileError("tls_key", f"{key!r} is not the key of the certificate in {certificate!r}") from None
        self._context = context

    def getContext(self) -> SSL.Context:
        return self._context


def negotiated(transport: object) -> tuple[str, str]:
    """The TLS version and cipher of ``transport``'s finished handshake, as
    OpenSSL names them ("TLSv1.3", "TLS_AES_256_GCM_SHA384"); empty when the
    transport does not tell them."""
    get_handle = getattr(transport, "getHandle", None)
    connection = get_handle() if get_handle is not None else None
    if not isinstance(connection, SSL.Connection):
        return "", ""
    return connection.get_protocol_version_name(), connection.get_cipher_name() or ""
