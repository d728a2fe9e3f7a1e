"""TLS contexts from PEM files."""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet.ssl import ContextFactory


class ServerTLS(ContextFactory):
    """A server context from a certificate file (which may hold the chain after the
    certificate) and a private key file.  TLS 1.2 or newer only."""

    isClient = 0

    def __init__(self, certificate: str, key: str) -> None:
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.use_certificate_chain_file(certificate)
        context.use_privatekey_file(key)
        context.check_privatekey()
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
