"""
A throw-away PKI for TLS tests: good role certificates and precisely wrong ones.

Not a test module.  Call L{make_test_pki} once per test class (it takes a few
milliseconds: ECDSA keys) with a temporary directory; every certificate/key pair is a
C{(crt, key)} tuple of paths.  The good ones come from L{iapd.pki.issue}, the path users
take; the wrong ones from L{iapd.pki.make_certificate}, one defect each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509 import ObjectIdentifier
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from iapd import pki
from iapd.roles import IAP_ALERT_GENERATOR, MANAGER_USAGES, SENSOR_USAGES

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
