"""
A small certificate authority for iapd: a CA and role certificates (DESIGN.md section 4).

IAP roles travel as Extended Key Usage purposes in a critical EKU extension, next to the
standard TLS purpose that OpenSSL's purpose check demands (see L{iapd.roles}).  This
module issues certificates that follow that convention so that a deployment (or a test)
needs no other tool; certificates from any CA that follows the same convention work too.

Keys are ECDSA P-256 and signatures SHA-256: small, fast to make (tests create whole
PKIs per test class) and accepted by every TLS 1.2/1.3 stack.  Private keys are written
unencrypted, so they are created with mode 0600 from the first byte (C{O_CREAT|O_EXCL}),
never chmod-ed after the fact, and existing files are never overwritten: replacing a CA
key by accident would orphan every certificate it issued.

Only APIs present in cryptography 38 (Debian 12) are used, and L{iapd.x509compat}
writes the role EKU where that release cannot represent the role OIDs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from iapd.roles import IAP_IDEF_CONFIGURATOR, MANAGER_USAGES, SENSOR_USAGES
from iapd.x509compat import extended_key_usage

PrivateKey = Union[
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
]

_SIGNING_KEYS = (
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
DEFAULT_CA_NAME = "iapd development CA"
DEFAULT_CA_DAYS = 3650
# 825 days: the longest TLS leaf lifetime that Apple platforms and older CA/B rules accept.
DEFAULT_LEAF_DAYS = 825
# Tolerates clocks a little behind the issuer's, so a fresh certificate works at once.
BACKDATE = timedelta(minutes=5)
# ub-common-name (RFC 5280): longer DNS names can only live in the SAN.
_MAX_CN = 64

ROLES = ("sensor", "manager", "proxy")

# ASCII ranges, no IGNORECASE: with it, [a-z] also matches U+212A KELVIN SIGN.
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")


class PKIError(Exception):
    """
    A PKI operation cannot be done as asked; the message is meant for the user.
    """


def usages_for_role(role: str, configurator: bool = False) -> tuple[x509.ObjectIdentifier, ...]:
    """
    The EKU purposes a certificate for C{role} carries.

    Proxies get only the TLS purposes and no IAP role: they are untrusted relays, and the
    certificate exists only for a future TLS hop to the proxy itself.
    """
    if role == "sensor":
        if configurator:
            raise PKIError("the configurator role applies to manager certificates only")
        return SENSOR_USAGES
    if role == "manager":
        return MANAGER_USAGES + ((IAP_IDEF_CONFIGURATOR,) if configurator else ())
    if role == "proxy":
        if configurator:
            raise PKIError("the configurator role applies to manager certificates only")
        return (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
    raise PKIError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")


def check_dns_name(name: str) -> None:
    """
    Refuse C{name} unless it is a DNS host name.

    The name becomes the certificate's DNS SAN, which peers match against the host they
    dialled or the identity they allow, and the stem of the files written: anything
    else (a path separator, a wildcard, an empty label) would break one or the other.
    """
    labels = name.split(".")
    if not (1 <= len(name) <= 253) or not all(_LABEL.match(label) for label in labels):
        raise PKIError(
            f"invalid name {name!r}: expected a DNS name (letters, digits, hyphens and"
            " dots; labels of 1-63 characters not starting or ending with a hyphen;"
            " 1-253 characters in all)"
        )


def _signature_hash(key: PrivateKey) -> hashes.HashAlgorithm | None:
    # EdDSA signs the message itself; everything else signs its SHA-256 digest.
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    return hashes.SHA256()


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _subject(name: str) -> x509.Name:
    if len(name) > _MAX_CN:
        return x509.Name([])
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def make_self_signed_ca(
    name: str = DEFAULT_CA_NAME, days: int = DEFAULT_CA_DAYS
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """
    A new self-signed CA key and certificate, in memory.

    C{path_length=0}: this CA signs leaves only.  It carries no EKU on purpose: OpenSSL
    intersects the EKU of every certificate in the chain, so an EKU on the CA would have
    to list every IAP role OID or it would silently break the role check.
    """
    if not 1 <= len(name) <= _MAX_CN:
        raise PKIError(f"invalid CA name {name!r}: expected 1-{_MAX_CN} characters")
    if days < 1:
        raise PKIError(f"invalid validity {days} days: expected at least 1")
    key = _new_key()
    subject = _subject(name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_identifier(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    # Copy the CA's own SKI when it has one: the AKI must match it byte for byte, and a
    # CA made by another tool may compute its SKI differently.
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        public_key = ca_cert.public_key()
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key)  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)


def make_certificate(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    name: str,
    usages: Sequence[x509.ObjectIdentifier] | None,
    *,
    eku_critical: bool = True,
    san: bool = True,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    is_ca: bool = False,
    key: PrivateKey | None = None,
) -> tuple[PrivateKey, x509.Certificate]:
    """
    A new key and a certificate for C{name} signed by C{ca_key}, in memory.

    Every knob exists so that tests can make precisely the wrong certificate they need:
    C{usages=None} leaves out the EKU extension altogether, C{eku_critical=False} makes
    a role that L{iapd.roles.has_role} must refuse, C{san=False} leaves only the subject
    CN, and the validity bounds can lie entirely in the past.  L{issue} is the safe
    front door.

    @param not_before: defaults to now minus L{BACKDATE}.
    @param not_after: defaults to L{DEFAULT_LEAF_DAYS} days from now.
    @param key: the certificate's key; by default a new P-256 key.
    """
    now = _now()
    not_before = not_before if not_before is not None else now - BACKDATE
    not_after = not_after if not_after is not None else now + timedelta(days=DEFAULT_LEAF_DAYS)
    subject = _subject(name)
    if len(subject) == 0 and not san:
        raise PKIError(f"name {name!r} is too long for a subject CN and needs a SAN")
    if key is None:
        key = _new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), critical=True
        )
        .add_extension(_key_usage(ca=is_ca), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_identifier(ca_cert), critical=False)
    )
    if san:
        # RFC 5280 4.2.1.6: with an empty subject the SAN must be critical.
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name)]), critical=len(subject) == 0
        )
    if usages is not None:
        builder = builder.add_extension(extended_key_usage(usages), critical=eku_critical)
    return key, builder.sign(ca_key, _signature_hash(ca_key))  # type: ignore[arg-type]


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never overwrite, and the mode holds from creation (no window for a
    # world-readable key).  The umask can only make it stricter.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_pair(
    directory: Path, stem: str, key: PrivateKey, cert: x509.Certificate
) -> tuple[Path, Path]:
    """
    Write C{cert} to C{<stem>.crt} and C{key} to C{<stem>.key} (PEM, PKCS8, mode 0600).

    Refuses with L{PKIError} if either file exists, before writing anything, so that a
    failed run leaves no half pair behind.

    @return: the certificate's and the key's paths.
    """
    directory = Path(directory)
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    existing = [p.name for p in (key_path, cert_path) if p.exists()]
    if existing:
        raise PKIError(f"refusing to overwrite {', '.join(existing)} in {directory}")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        _write_new(key_path, key_pem, 0o600)
    except FileExistsError:
        raise PKIError(f"refusing to overwrite {key_path.name} in {directory}") from None
    try:
        _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except BaseException as e:
        key_path.unlink()
        if isinstance(e, FileExistsError):
            raise PKIError(f"refusing to overwrite {cert_path.name} in {directory}") from None
        raise
    return cert_path, key_path


def init_ca(
    directory: Path, name: str = DEFAULT_CA_NAME, days: int = DEFAULT_CA_DAYS
) -> Path:
    """
    Create a CA in C{directory}: C{ca.key} (mode 0600) and C{ca.crt}.

    The directory is created with mode 0700 if it does not exist (an existing one is left
    as it is).  An existing CA is never replaced.

    @return: the path of C{ca.crt}, the file that peers configure as their C{tls.ca}.
    """
    directory = Path(directory)
    existing = [n for n in (CA_KEY, CA_CERT) if (directory / n).exists()]
    if existing:
        raise PKIError(f"CA already exists in {directory}: {', '.join(existing)}")
    key, cert = make_self_signed_ca(name, days)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path, _ = write_pair(directory, "ca", key, cert)
    return cert_path


def load_ca(directory: Path) -> tuple[PrivateKey, x509.Certificate]:
    """
    The CA key and certificate stored in C{directory} by L{init_ca} (or another tool).

    Checks that the key belongs to the certificate: signing with a mismatched key would
    produce certificates that nothing verifies, and the failure would surface much later
    as a handshake error.
    """
    directory = Path(directory)
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    for path in (key_path, cert_path):
        if not path.is_file():
            raise PKIError(
                f"no CA in {directory}: {path.name} not found"
                f" (create one with: iap-pki init-ca {directory})"
            )
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise PKIError(
            f"cannot load {key_path}: {e} (an unencrypted PEM key is expected)"
        ) from None
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError as e:
        raise PKIError(f"cannot load {cert_path}: {e}") from None
    if not isinstance(key, _SIGNING_KEYS):
        raise PKIError(f"unsupported CA key type in {key_path}")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise PKIError(f"{key_path} does not belong to {cert_path}")
    return key, cert


def issue(
    directory: Path,
    role: str,
    name: str,
    days: int = DEFAULT_LEAF_DAYS,
    configurator: bool = False,
) -> tuple[Path, Path]:
    """
    Issue a certificate for C{role} ("sensor", "manager" or "proxy") and DNS C{name}
    from the CA in C{directory}, written there as C{<name>.crt} and C{<name>.key}.

    Sensors get clientAuth + IAP_ALERT_GENERATOR, managers serverAuth +
    IAP_ALERT_CONSUMER (+ IAP_IDEF_CONFIGURATOR with C{configurator}), both in a critical
    EKU; proxies get serverAuth + clientAuth and no IAP role.

    @return: the certificate's and the key's paths.
    """
    usages = usages_for_role(role, configurator)
    check_dns_name(name)
    if days < 1:
        raise PKIError(f"invalid validity {days} days: expected at least 1")
    ca_key, ca_cert = load_ca(directory)
    now = _now()
    key, cert = make_certificate(
        ca_key,
        ca_cert,
        name,
        usages,
        not_before=now - BACKDATE,
        not_after=now + timedelta(days=days),
    )
    return write_pair(Path(directory), name, key, cert)
