"""
IAP role object identifiers and how to read them from a certificate.

The draft (section 6.5) asks for critical "key usage extensions" naming IAP roles but
never assigned OIDs.  We carry them as Extended Key Usage purposes under the UUID arc
2.25, which needs no registration, next to the standard clientAuth/serverAuth purpose:
OpenSSL's SSL purpose check rejects an EKU that lacks the standard purpose, and refuses
an unknown critical extension outright, so EKU is the only form stock TLS stacks accept.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_ARC = "2.25.257399946880122254219957611656582499246"

IAP_ALERT_GENERATOR = x509.ObjectIdentifier(_ARC + ".1")
IAP_ALERT_CONSUMER = x509.ObjectIdentifier(_ARC + ".2")
IAP_IDEF_CONFIGURATOR = x509.ObjectIdentifier(_ARC + ".3")

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
        ext = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
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
        ext = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    except x509.ExtensionNotFound:
        return False
    return ext.critical and role in ext.value


def identity_of(cert: x509.Certificate) -> str | None:
    """
    The IAP identity a certificate names: its first DNS SAN, else its subject CN.

    Lower-cased, because DNS names compare case-insensitively and the store's
    deduplication rule keys on the identity.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
        if names:
            return names[0].lower()
    except x509.ExtensionNotFound:
        pass
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns:
        value = cns[0].value
        return (value.decode("utf-8", "replace") if isinstance(value, bytes) else value).lower()
    return None
