"""
The TLS profile of iapd (DESIGN.md section 4) and the role checks made after a handshake.

Why not TLS 1.0 and TLS_DHE_DSS_WITH_3DES_EDE_CBC_SHA as the draft says: both are
deprecated (RFC 8996, SWEET32).  iapd keeps the draft's wire token C{TLS/1.0} but
negotiates TLS 1.2 at least, 1.3 by preference, forward-secret AEAD suites only.

OpenSSL does the chain and (on the sensor) the host-name checks during the handshake;
the IAP role OIDs are private EKU purposes that OpenSSL does not know, so each side reads
them from the peer certificate once the handshake has completed.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import attr
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from .roles import IAP_ALERT_CONSUMER, has_role, identity_of
from .x509compat import extensions, load_pem_certificates, not_valid_after, not_valid_before

# Forward-secret AEAD suites for TLS 1.2; TLS 1.3 suites are all of that kind already.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!PSK:!SRP"

SSL_MODE_NO_AUTO_CHAIN = 0x8
"""OpenSSL's ssl.h value (the same since 1.0.2); pyOpenSSL names no constant for it."""

MAX_CHAIN = 8
"""CAs the search by name through a CA file goes up at most, when OpenSSL finds no
chain: deeper than any real PKI, and a bound on a file that holds a long line of CAs."""

log = Logger()


class TLSSetupError(Exception):
    """A certificate, key or CA file that cannot be used; the message says which."""


@attr.s(frozen=True, auto_attribs=True)
class TLSMaterial:
    """
    One role's certificate, key and trusted CAs, loaded and checked once.

    Kept as one value so that a reload (SIGHUP) can swap all of it at once.
    """

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    key_pem: bytes
    cas: tuple[x509.Certificate, ...]

    @property
    def identity(self) -> str | None:
        return identity_of(self.certificate)

    def not_after(self) -> datetime.datetime:
        return not_valid_after(self.certificate)

    def expired(self, now: datetime.datetime | None = None) -> bool:
        now = now or datetime.datetime.now(datetime.timezone.utc)
        return not (not_valid_before(self.certificate) <= now <= not_valid_after(self.certificate))


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TLSSetupError(f"cannot read {what} {path}: {e.strerror}") from None


def load_material(certificate: Path | str, key: Path | str, ca: Path | str) -> TLSMaterial:
    """
    Load and cross-check a role's TLS files, failing with one clear sentence.

    The key is checked against the certificate here, at start, because OpenSSL would
    otherwise report the mismatch only at the first handshake, as an opaque error.
    """
    certificate, key, ca = Path(certificate), Path(key), Path(ca)
    cert_pem = _read(certificate, "certificate")
    try:
        certs = load_pem_certificates(cert_pem)
    except ValueError:
        raise TLSSetupError(f"certificate {certificate} is not a PEM certificate") from None
    key_data = _read(key, "key")
    try:
        private = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError) as e:
        raise TLSSetupError(f"key {key} is not an unencrypted PEM private key ({e})") from None
    if private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != certs[0].public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise TLSSetupError(f"key {key} does not belong to certificate {certificate}")
    try:
        cas = load_pem_certificates(_read(ca, "CA file"))
    except ValueError:
        raise TLSSetupError(f"CA file {ca} holds no PEM certificate") from None
    key_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return TLSMaterial(certs[0], tuple(certs[1:]), key_pem, tuple(cas))


def to_pyopenssl(cert: x509.Certificate) -> crypto.X509:
    """cryptography loads and checks our PEM files; Twisted's TLS wants pyOpenSSL objects."""
    return crypto.X509.from_cryptography(cert)


def trust_root(material: TLSMaterial) -> Any:
    """Our CAs only, never the system store: a sensor certificate from a public CA proves nothing here."""
    return ssl.trustRootFromCertificates(
        [ssl.Certificate(to_pyopenssl(ca)) for ca in material.cas]
    )


def _key_ids(cert: x509.Certificate) -> tuple[bytes | None, bytes | None]:
    """(authority key identifier, subject key identifier) of C{cert}; None where
    absent or unreadable."""
    try:
        found = extensions(cert)
    except Exception:
        return None, None
    ids: list[bytes | None] = []
    for kind, field in ((x509.AuthorityKeyIdentifier, "key_identifier"), (x509.SubjectKeyIdentifier, "digest")):
        try:
            ids.append(getattr(found.get_extension_for_class(kind).value, field))
        except Exception:
            ids.append(None)
    return ids[0], ids[1]


def _self_signed(cert: x509.Certificate) -> bool:
    """A root: issued by itself under its own key.  A key-rollover certificate names
    its own subject as issuer too, but under the other key's identifier: it is sent."""
    if cert.subject != cert.issuer:
        return False
    authority, subject = _key_ids(cert)
    return authority is None or subject is None or authority == subject


def _issued(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """
    Whether C{ca} looks like the issuer of C{cert}: same name, and the same key
    identifier where both certificates carry one and they can be read.  A guess, not a
    verification, for when OpenSSL finds no chain: the peer verifies what it is sent.
    """
    if ca.subject != cert.issuer:
        return False
    wanted, held = _key_ids(cert)[0], _key_ids(ca)[1]
    return wanted is None or held is None or wanted == held


def _preferred(candidates: list[x509.Certificate]) -> list[x509.Certificate]:
    """C{candidates}, those valid now first, then those that last longest: what
    OpenSSL prefers among a certificate's possible issuers."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return sorted(candidates, reverse=True,
                  key=lambda c: (not_valid_before(c) <= now <= not_valid_after(c), not_valid_after(c)))


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _longest_lived(ca: x509.Certificate, cas: tuple[x509.Certificate, ...]) -> x509.Certificate:
    """
    Of C{ca} and its copies in C{cas} (same name, same key: a CA certificate renewed),
    the one valid now that lasts longest.  The chain is chosen when the files are read
    (start and SIGHUP), not at each handshake as OpenSSL's own chain was: of a
    short-lived and a long-lived copy, the short one must not be sent after it expires.
    """
    copies = [c for c in cas if c.subject == ca.subject and _spki(c) == _spki(ca)]
    return _preferred([ca, *copies])[0]


def _built_chain(material: TLSMaterial) -> tuple[x509.Certificate, ...] | None:
    """
    The CAs above our certificate as OpenSSL's verification chains it to a root of the
    CA file (by name, key identifier and validity, as its own automatic chain did);
    None where it finds no chain (our certificate expired, or the CA file holds the
    other end's CA only).
    """
    try:
        store = crypto.X509Store()
        for ca in material.cas:
            store.add_cert(to_pyopenssl(ca))
        chain = crypto.X509StoreContext(store, to_pyopenssl(material.certificate)).get_verified_chain()
    except crypto.X509StoreContextError:
        return None
    except Exception:
        log.failure("cannot have OpenSSL chain {subject} to the CA file; choosing its CAs by name",
                    subject=material.certificate.subject.rfc4514_string())
        return None
    above = [x.to_cryptography() for x in chain[1:]]
    return tuple(_longest_lived(c, material.cas) for c in above if not _self_signed(c))


def _named_chain(material: TLSMaterial) -> tuple[x509.Certificate, ...]:
    """The CAs above our certificate in the CA file, found by issuer name (L{_issued}),
    up to a self-signed one or one not there; of several candidates the one OpenSSL
    would prefer (L{_preferred})."""
    sent: list[x509.Certificate] = []
    current = material.certificate
    while len(sent) < MAX_CHAIN and not _self_signed(current):
        candidates = _preferred([ca for ca in material.cas if ca not in sent and _issued(current, ca)])
        if not candidates or _self_signed(candidates[0]):
            break
        current = candidates[0]
        sent.append(current)
    return tuple(sent)


def chain_to_send(material: TLSMaterial) -> tuple[x509.Certificate, ...]:
    """
    The CA certificates a handshake sends after our own: those that follow it in the
    certificate file, else the CAs between it and a root of the CA file; never a
    self-signed root.  Chosen once per reading of the files (start, SIGHUP), not at
    each handshake.

    Left to itself, OpenSSL completes a chain that the certificate file does not give
    from the trust store, root included.  The peer only trusts a root it holds already,
    yet it parses the copy it is sent and keeps it for as long as the connection lasts:
    4.5 KiB of a manager's memory per connected sensor (bench/tls_memory.py), some 400
    octets and a certificate parse per handshake.  RFC 8446 (4.4.2) lets a trust anchor
    be left out.  The intermediates are still sent, as before: a peer whose CA file
    holds only the root needs them.

    Never raises: on a surprise it logs it and sends the certificate file's chain as it
    is, and a chain the peer cannot use fails the handshake with the peer's reason.
    """
    try:
        given = tuple(c for c in material.chain if not _self_signed(c))
        if given:
            return given
        built = _built_chain(material)
        return built if built is not None else _named_chain(material)
    except Exception:
        log.failure("cannot choose the CAs to send above {subject}; sending the certificate file's as they are",
                    subject=material.certificate.subject.rfc4514_string())
        return tuple(material.chain)


def send_own_chain_only(context: SSL.Context) -> SSL.Context:
    """
    Make C{context}'s connections send their certificate and the chain they were given,
    nothing OpenSSL would add from the trust store (see L{chain_to_send}).  Only before
    the context's first connection: pyOpenSSL refuses a change after it.
    """
    context.set_mode(SSL_MODE_NO_AUTO_CHAIN)
    return context


@implementer(IOpenSSLClientConnectionCreator)
class _OwnChainOnly:
    """
    A Twisted client creator whose connections send only their own chain.

    Twisted keeps a client creator's Context to itself, and pyOpenSSL lets no one change
    a Context once a connection has been made from it, so the mode is set on each
    connection, through the bindings pyOpenSSL itself uses (as L{session_reused} reads
    its state).  Should they ever lack the call, the connection sends the root as
    OpenSSL would, a waste of the peer's memory, not a failure, and the log says so once.
    """

    warned = False

    def __init__(self, inner: IOpenSSLClientConnectionCreator) -> None:
        self.inner = inner

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self.inner.clientConnectionForTLS(tlsProtocol)
        try:
            from OpenSSL._util import lib

            lib.SSL_set_mode(connection._ssl, SSL_MODE_NO_AUTO_CHAIN)
        except (ImportError, AttributeError) as e:
            if not _OwnChainOnly.warned:
                _OwnChainOnly.warned = True
                log.warn("this pyOpenSSL cannot set a connection's mode ({why}): handshakes send the CA"
                         " certificate too, which costs the manager memory, nothing else", why=str(e))
        return connection


def tls_profile() -> dict[str, Any]:
    """The TLS versions and suites of DESIGN.md section 4, shared by every listener and client (IAP and web)."""
    return {
        "raiseMinimumTo": ssl.TLSVersion.TLSv1_2,
        "acceptableCiphers": ssl.AcceptableCiphers.fromOpenSSLCipherString(CIPHERS),
    }


def server_options(material: TLSMaterial) -> ssl.CertificateOptions:
    """
    Context for the manager: client certificate required and chained to our CAs.

    Sessions and tickets are on (draft 6.7): a full mutual-auth handshake costs about
    1.5 ms of server CPU, and sensors reconnect often.
    """
    options = ssl.CertificateOptions(
        privateKey=crypto.load_privatekey(crypto.FILETYPE_PEM, material.key_pem),
        certificate=to_pyopenssl(material.certificate),
        extraCertChain=[to_pyopenssl(c) for c in chain_to_send(material)] or None,
        trustRoot=trust_root(material),  # implies a required, verified client certificate
        enableSessions=True,
        enableSessionTickets=True,
        **tls_profile(),
    )
    send_own_chain_only(options.getContext())  # Twisted keeps this Context and makes every connection from it
    return options


def client_options(material: TLSMaterial, manager_host: str) -> IOpenSSLClientConnectionCreator:
    """
    Context for the sensor: the manager must chain to our CAs and be C{manager_host}.

    C{manager_host} is the host written in CONNECT, so a proxy that routes us to another
    manager is caught by service_identity during the handshake.
    """
    private = ssl.PrivateCertificate.fromCertificateAndKeyPair(
        ssl.Certificate(to_pyopenssl(material.certificate)),
        ssl.KeyPair(crypto.load_privatekey(crypto.FILETYPE_PEM, material.key_pem)),
    )
    extra = tls_profile()
    chain = chain_to_send(material)
    if chain:
        extra["extraCertChain"] = [to_pyopenssl(c) for c in chain]
    return _OwnChainOnly(ssl.optionsForClientTLS(
        manager_host,
        trustRoot=trust_root(material),  # implies a required, verified client certificate
        clientCertificate=private,
        extraCertificateOptions=extra,
    ))


def peer_certificate(transport: Any) -> x509.Certificate | None:
    """The verified peer certificate of a TLS transport, as a cryptography object."""
    try:
        peer = transport.getPeerCertificate()
    except Exception:
        return None
    if peer is None:
        return None
    if isinstance(peer, ssl.Certificate):
        peer = peer.original
    return peer.to_cryptography()


def manager_unusable_reason(material: TLSMaterial | None) -> str | None:
    """
    Why a manager cannot accept an upgrade (answered 500, draft 4.2), or None.
    """
    if material is None:
        return "no certificate is configured"
    if not has_role(material.certificate, IAP_ALERT_CONSUMER):
        return "the manager certificate lacks IAP_ALERT_CONSUMER in a critical EKU"
    if material.expired():
        return f"the manager certificate is not valid now (valid until {material.not_after():%Y-%m-%d %H:%M} UTC)"
    return None


def session_reused(connection: Any) -> bool | None:
    """
    Whether a pyOpenSSL connection resumed a session; None when that cannot be told.

    pyOpenSSL has no public call for it, so this asks OpenSSL through the bindings
    pyOpenSSL itself uses; it is only ever used for logs and tests.
    """
    try:
        from OpenSSL._util import lib

        return bool(lib.SSL_session_reused(connection._ssl))
    except (ImportError, AttributeError):
        return None
