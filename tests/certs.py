"""
A throw-away PKI for TLS tests: good role certificates and precisely wrong ones.

Not a test module.  Call L{make_test_pki} once per test class (it takes a few
milliseconds: ECDSA keys) with a temporary directory; every certificate/key pair is a
C{(crt, key)} tuple of paths.  The good ones come from L{iapd.pki.issue}, the path users
take; the wrong ones from L{iapd.pki.make_certificate}, one defect each.
L{TwoLevelPKI} has an intermediate CA, as company PKIs do, and L{handshake} drives two
pyOpenSSL connections through memory BIOs.  No pytest here: tests/chaincheck.py imports
this module under Debian's interpreter, which has none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509 import ObjectIdentifier
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from OpenSSL import SSL

from iapd import pki
from iapd.roles import IAP_ALERT_GENERATOR, MANAGER_USAGES, SENSOR_USAGES
from iapd.tls import TLSMaterial, load_material

Pair = tuple[Path, Path]
Usages = Sequence[ObjectIdentifier]


@dataclass(frozen=True)
class TestPKI:
    """
    Paths of a test PKI.  C{ca} is the CA everyone trusts; C{other_ca} is the rogue CA
    that signed the C{*_other_ca} certificates.
    """

    __test__ = False  # not a pytest test class, despite its name

    ca: Path
    other_ca: Path
    manager: Pair  # manager.test, serverAuth + CONSUMER
    sensor: Pair  # sensor1.test, clientAuth + GENERATOR
    sensor2: Pair  # sensor2.test, clientAuth + GENERATOR
    sensor_cn_only: Pair  # CN sensor-cn.test, no SAN
    sensor_no_role: Pair  # norole.test, clientAuth only
    sensor_noncritical: Pair  # noncrit.test, sensor EKU not critical
    sensor_expired: Pair  # expired.test, validity entirely in the past
    sensor_other_ca: Pair  # rogue.test, signed by other_ca
    sensor_wildcard: Pair  # SAN *.test: a wildcard is no identity
    sensor_kelvin: Pair  # CN "\u212aiosk.test" (Kelvin sign), no SAN: lower() would give kiosk.test
    sensor_ca: Pair  # caleaf.test, sensor role, but a CA certificate (could mint sensors)
    sensor_bad_eku: Pair  # badeku.test, an EKU extension whose DER is cut short
    sensor_ed25519: Pair  # ed25519.test, good CA and role, an Ed25519 key (iapctl's are P-256)
    manager_no_consumer: Pair  # manager.test, serverAuth only
    manager_as_sensor: Pair  # manager.test, clientAuth + GENERATOR
    manager_other_ca: Pair  # manager.test, signed by other_ca
    manager_wrong_name: Pair  # other-manager.test, good CA and role


def _malformed_eku(directory: Path, ca_key: Any, ca_cert: x509.Certificate) -> Pair:
    """A CA-signed certificate whose critical EKU is not valid DER: the library parsing
    it raises, and the manager must still answer with a clear 403."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "badeku.test")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("badeku.test")]), critical=False)
        .add_extension(x509.UnrecognizedExtension(ExtensionOID.EXTENDED_KEY_USAGE, b"\x30\x05\x06"), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return pki.write_pair(directory, "sensor_bad_eku", key, cert)


def make_test_pki(directory: Path) -> TestPKI:
    """
    Create the CAs and certificates of L{TestPKI} in C{directory}.

    Files of the deliberately wrong certificates are named after the attribute
    (C{sensor_expired.crt}), because several of them share a DNS name.
    """
    directory = Path(directory)
    ca = pki.init_ca(directory, name="iapd test CA")
    ca_key, ca_cert = pki.load_ca(directory)
    rogue_key, rogue_cert = pki.make_self_signed_ca("rogue test CA")
    other_ca = directory / "other_ca.crt"
    pki.write_pair(directory, "other_ca", rogue_key, rogue_cert)

    def good(stem: str, name: str, usages: Usages, **kwargs: Any) -> Pair:
        key, cert = pki.make_certificate(ca_key, ca_cert, name, usages, **kwargs)
        return pki.write_pair(directory, stem, key, cert)

    def rogue(stem: str, name: str, usages: Usages) -> Pair:
        key, cert = pki.make_certificate(rogue_key, rogue_cert, name, usages)
        return pki.write_pair(directory, stem, key, cert)

    now = datetime.now(timezone.utc)
    return TestPKI(
        ca=ca,
        other_ca=other_ca,
        manager=pki.issue(directory, "manager", "manager.test"),
        sensor=pki.issue(directory, "sensor", "sensor1.test"),
        sensor2=pki.issue(directory, "sensor", "sensor2.test"),
        sensor_cn_only=good("sensor_cn_only", "sensor-cn.test", SENSOR_USAGES, san=False),
        sensor_no_role=good("sensor_no_role", "norole.test", [ExtendedKeyUsageOID.CLIENT_AUTH]),
        sensor_noncritical=good(
            "sensor_noncritical", "noncrit.test", SENSOR_USAGES, eku_critical=False
        ),
        sensor_expired=good(
            "sensor_expired",
            "expired.test",
            SENSOR_USAGES,
            not_before=now - timedelta(days=30),
            not_after=now - timedelta(days=1),
        ),
        sensor_other_ca=rogue("sensor_other_ca", "rogue.test", SENSOR_USAGES),
        sensor_wildcard=good("sensor_wildcard", "*.test", SENSOR_USAGES),
        sensor_kelvin=good("sensor_kelvin", "\u212aiosk.test", SENSOR_USAGES, san=False),
        sensor_ca=good("sensor_ca", "caleaf.test", SENSOR_USAGES, is_ca=True),
        sensor_bad_eku=_malformed_eku(directory, ca_key, ca_cert),
        sensor_ed25519=good("sensor_ed25519", "ed25519.test", SENSOR_USAGES, key=ed25519.Ed25519PrivateKey.generate()),
        manager_no_consumer=good(
            "manager_no_consumer", "manager.test", [ExtendedKeyUsageOID.SERVER_AUTH]
        ),
        manager_as_sensor=good(
            "manager_as_sensor",
            "manager.test",
            [ExtendedKeyUsageOID.CLIENT_AUTH, IAP_ALERT_GENERATOR],
        ),
        manager_other_ca=rogue("manager_other_ca", "manager.test", MANAGER_USAGES),
        manager_wrong_name=pki.issue(directory, "manager", "other-manager.test"),
    )


def make_ca(name: str, signer: tuple[Any, x509.Certificate] | None = None, key: Any = None,
        expired: bool = False, days: int = 2) -> tuple[Any, x509.Certificate]:
    """A CA that may sign CAs below it: self-signed, or signed by C{signer} (key, cert),
    valid for C{days} from an hour ago, or C{expired} a day ago.  iap-pki's own CA has a
    path length of 0 and signs leaves only."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_key, issuer_name = (key, subject) if signer is None else (signer[0], signer[1].subject)
    now = datetime.now(timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=30 if expired else 0, hours=1))
        .not_valid_after(now - timedelta(days=1) if expired else now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if signer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer[0].public_key()), critical=False
        )
    return key, builder.sign(issuer_key, hashes.SHA256())


def pem(*certs: x509.Certificate) -> bytes:
    """Certificates as one PEM file holds them."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


class TwoLevelPKI:
    """
    root -> intermediate -> {manager.test, sensor1.test}, written as the files a user
    of a company PKI would have: each leaf alone, with its intermediate, with its
    intermediate and the root; CA files with the root alone and with both.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.root_key, self.root = make_ca("iapd test root CA")
        self.intermediate_key, self.intermediate = make_ca("iapd test intermediate CA", (self.root_key, self.root))
        self.leaf: dict[str, x509.Certificate] = {}
        for stem, name, usages in (("manager", "manager.test", MANAGER_USAGES),
                                   ("sensor", "sensor1.test", SENSOR_USAGES)):
            key, cert = pki.make_certificate(self.intermediate_key, self.intermediate, name, usages)
            self.leaf[stem] = cert
            pki.write_pair(directory, stem, key, cert)
            (directory / f"{stem}+intermediate.crt").write_bytes(pem(cert, self.intermediate))
            (directory / f"{stem}+intermediate+root.crt").write_bytes(pem(cert, self.intermediate, self.root))
            (directory / f"{stem}+root.crt").write_bytes(pem(cert, self.root))
        (directory / "root.crt").write_bytes(pem(self.root))
        (directory / "root+intermediate.crt").write_bytes(pem(self.root, self.intermediate))

    def material(self, stem: str, certificate_file: str, ca_file: str) -> TLSMaterial:
        """C{stem}'s key with the certificate file and CA file named."""
        d = self.directory
        return load_material(d / certificate_file, d / f"{stem}.key", d / ca_file)


def handshake(client: SSL.Connection, server: SSL.Connection) -> None:
    """Drive both handshakes to the end, shuttling bytes between the memory BIOs."""

    def pump(source: SSL.Connection, sink: SSL.Connection) -> bool:
        try:
            data = source.bio_read(65536)
        except SSL.WantReadError:
            return False
        sink.bio_write(data)
        return True

    for _ in range(20):
        finished = True
        for conn in (client, server):
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                finished = False
        moved = pump(client, server) | pump(server, client)
        if finished and not moved:
            return
    raise AssertionError("handshake did not finish")
