"""TLS on the OTLP/gRPC listener (``OTLP_GRPC_TLS_CERT_FILE``,
``OTLP_GRPC_TLS_KEY_FILE``): the certificate chain and key, read once at
start-up, checked (PEM, the key belongs to the first certificate) and turned
into Twisted's `CertificateOptions` offering ALPN ``h2`` only.

gRPC clients (grpcio, grpc-go, the Collector) refuse a TLS server that does
not select ``h2`` by ALPN, and Twisted's ``ssl:`` endpoint description sets
no ALPN, hence these two variables rather than an ``ssl:`` description in
``OTLP_GRPC_LISTEN``. Problems name the variable and the path, never the
key's bytes.
"""

from __future__ import annotations

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL, crypto
from twisted.internet.ssl import CertificateOptions, TLSVersion

from lgmt_proxy.config.watch import read_bytes

#: The only application protocol the gRPC listener speaks over TLS.
ALPN = (b"h2",)


@attrs.frozen
class ServerTLS:
    """The gRPC listener's TLS settings: ``options`` for the TLS layer, and
    what the start-up line says of the certificate. The key lives only
    inside ``options`` (never in a repr)."""

    options: CertificateOptions = attrs.field(repr=False, eq=False)
    subject: str
    not_after: str


class NoApplicationProtocol(SSL.Error):
    """The client offered ALPN protocols, none of them ``h2``."""


def select_alpn(connection: SSL.Connection, offered: list[bytes]) -> bytes:
    """``h2`` when the client offers it; else fail the handshake with the
    ``no_application_protocol`` alert (RFC 7301, section 3.2). Raised as an
    `SSL.Error`, it ends that handshake like any other TLS failure."""
    if ALPN[0] in offered:
        return ALPN[0]
    # In OpenSSL's error-queue shape, as Twisted's TLS layer reads it.
    raise NoApplicationProtocol([("SSL routines", "select_alpn", "client offered no h2 by ALPN")])


def parse_server_tls(cert_pem: bytes, key_pem: bytes) -> ServerTLS | list[tuple[str, str]]:
    """The settings from a PEM chain (the server's certificate first, then
    intermediates) and its PEM private key, or what is wrong with each:
    ``("cert", problem)``, ``("key", problem)``."""
    problems = []
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        problems.append(("cert", "no valid PEM certificate found"))
    try:
        key = load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        problems.append(("key", "no PEM private key found (an encrypted key is not supported)"))
    if problems:
        return problems
    leaf = chain[0]
    try:
        options = CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(key),  # type: ignore[arg-type]
            certificate=crypto.X509.from_cryptography(leaf),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
            acceptableProtocols=list(ALPN),
            raiseMinimumTo=TLSVersion.TLSv1_2,
        )
        # The context is made once and kept: checks that the key matches the
        # certificate, and takes our ALPN choice (Twisted's selects an empty
        # protocol on no overlap, which OpenSSL answers with internal_error).
        options.getContext().set_alpn_select_callback(select_alpn)
    except (SSL.Error, TypeError, ValueError):
        return [("key", "does not match the first certificate of OTLP_GRPC_TLS_CERT_FILE")]
    return ServerTLS(
        options=options,
        subject=leaf.subject.rfc4514_string(),
        not_after=leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


def load_server_tls(cert_file: str, key_file: str) -> tuple[ServerTLS | None, list[str]]:
    """Read and check both files (once, at start-up): the settings, or one
    problem line per bad variable."""
    cert_pem, cert_problem = read_bytes(cert_file)
    key_pem, key_problem = read_bytes(key_file)
    problems = []
    if cert_problem:
        problems.append(f"OTLP_GRPC_TLS_CERT_FILE: {cert_problem}")
    if key_problem:
        problems.append(f"OTLP_GRPC_TLS_KEY_FILE: {key_problem}")
    if cert_pem is None or key_pem is None:
        return None, problems
    found = parse_server_tls(cert_pem, key_pem)
    if isinstance(found, ServerTLS):
        return found, []
    names = {
        "cert": ("OTLP_GRPC_TLS_CERT_FILE", cert_file),
        "key": ("OTLP_GRPC_TLS_KEY_FILE", key_file),
    }
    return None, [f"{names[which][0]}: {names[which][1]}: {problem}" for which, problem in found]
