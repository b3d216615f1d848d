"""
IAP role object identifiers and how to read them from a certificate.

The draft (section 6.5) asks for critical "key usage extensions" naming IAP roles but
never assigned OIDs.  We carry them as Extended Key Usage purposes under the UUID arc
2.25, which needs no registration, next to the standard clientAuth/serverAuth purpose:
OpenSSL's SSL purpose check rejects an EKU that lacks the standard purpose, and refuses
an unknown critical extension outright, so EKU is the only form stock TLS stacks accept.
"""

from __future__ import annotations

import re

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .x509compat import extensions, oid

_ARC = "2.25.257399946880122254219957611656582499246"

IAP_ALERT_GENERATOR = oid(_ARC + ".1")
IAP_ALERT_CONSUMER = oid(_ARC + ".2")
IAP_IDEF_CONFIGURATOR = oid(_ARC + ".3")

ROLE_NAMES = {
    IAP_ALERT_GENERATOR: "IAP_ALERT_GENERATOR",
    IAP_ALERT_CONSUMER: "IAP_ALERT_CONSUMER",
    IAP_IDEF_CONFIGURATOR: "IAP_IDEF_CONFIGURATOR",
}

# Certificate purposes each iapd role is issued with (iap-pki) and checked for.
SENSOR_USAGES = (ExtendedKeyUsageOID.CLIENT_AUTH, IAP_ALERT_GENERATOR)
MANAGER_USAGES = (ExtendedKeyUsageOID.SERVER_AUTH, IAP_ALERT_CONSUMER)


def extended_key_usages(cert: x509.Certificate) -> frozenset[x509.ObjectIdentifier]:
    """
    The EKU purposes of C{cert}; empty when it has no EKU extension.

    A certificate without EKU is not unrestricted for IAP: it carries no role.
    """
    try:
        ext = extensions(cert).get_extension_for_class(x509.ExtendedKeyUsage)
    except x509.ExtensionNotFound:
        return frozenset()
    return frozenset(ext.value)


def has_role(cert: x509.Certificate, role: x509.ObjectIdentifier) -> bool:
    """
    Whether C{cert} carries IAP C{role} in a critical EKU, as draft 6.5 demands.

    A non-critical EKU is refused: the draft wants the extension critical "to reduce the
    accidental usage of the certificate for other purposes", so a certificate whose
    issuer did not mark it so was not issued for IAP.
    """
    try:
        ext = extensions(cert).get_extension_for_class(x509.ExtendedKeyUsage)
    except x509.ExtensionNotFound:
        return False
    return ext.critical and role in ext.value


_HOST_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*\Z")


def _plain_host_name(name: str) -> str | None:
    """
    C{name} as a canonical identity, or None when it is not a plain ASCII host name.

    Only ASCII is lower-cased: Unicode case folding maps the Kelvin sign to "k", which
    would let "\u212aiosk" pose as "kiosk".  Wildcards are refused, since an identity of
    "*.example.org" would match allow-list globs literally.
    """
    if not name.isascii():
        return None
    name = name.lower().rstrip(".")
    return name if len(name) <= 253 and _HOST_NAME.match(name) else None


def identity_of(cert: x509.Certificate) -> str | None:
    """
    The IAP identity a certificate names: its first DNS SAN, else its subject CN; None
    when that name is not a plain host name.

    Lower-cased, because DNS names compare case-insensitively and the store's
    deduplication rule keys on the identity.
    """
    try:
        san = extensions(cert).get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
        if names:
            return _plain_host_name(names[0])
    except x509.ExtensionNotFound:
        pass
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns:
        value = cns[0].value
        return _plain_host_name(value.decode("utf-8", "replace") if isinstance(value, bytes) else value)
    return None


def role_problem(cert: x509.Certificate, role: x509.ObjectIdentifier) -> str | None:
    """
    Why C{cert} may not act in IAP C{role}, or None when it may.

    A certificate that could sign others (CA basic constraint, or keyCertSign) is refused
    as a peer even if it carries the role: under a CA hierarchy without a path length
    limit, its key could mint certificates for any sensor name.
    """
    try:
        # extensions the library cannot parse are the issuer's mistake or an attack;
        # either way, a clear refusal (403) and not an exception in the handshake
        return _role_problem(cert, role)
    except ValueError as e:
        return f"has extensions that cannot be read ({e})"


def _role_problem(cert: x509.Certificate, role: x509.ObjectIdentifier) -> str | None:
    try:
        if extensions(cert).get_extension_for_class(x509.BasicConstraints).value.ca:
            return "is a CA certificate, not an end-entity certificate"
    except x509.ExtensionNotFound:
        pass
    try:
        if extensions(cert).get_extension_for_class(x509.KeyUsage).value.key_cert_sign:
            return "may sign certificates (keyCertSign)"
    except x509.ExtensionNotFound:
        pass
    if not has_role(cert, role):
        return f"lacks {ROLE_NAMES[role]} in a critical EKU"
    if identity_of(cert) is None:
        return "names no plain host name in its DNS SAN or CN"
    return None
