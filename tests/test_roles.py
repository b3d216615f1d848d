"""
Which certificates may act as a sensor or a manager, checked on the certificates alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from iapd import pki
from iapd.roles import (
    IAP_ALERT_CONSUMER,
    IAP_ALERT_GENERATOR,
    MANAGER_USAGES,
    SENSOR_USAGES,
    identity_of,
    role_problem,
)


@pytest.fixture(scope="module")
def ca() -> tuple[object, x509.Certificate]:
    # a CA without a path length limit: the case where only iapd's own check helps
    return pki.make_self_signed_ca("open CA")


def cert(ca: tuple[object, x509.Certificate], name: str, usages, **kw) -> x509.Certificate:  # type: ignore[no-untyped-def]
    return pki.make_certificate(ca[0], ca[1], name, usages, **kw)[1]  # type: ignore[arg-type]


def test_good_roles(ca) -> None:  # type: ignore[no-untyped-def]
    assert role_problem(cert(ca, "s.test", SENSOR_USAGES), IAP_ALERT_GENERATOR) is None
    assert role_problem(cert(ca, "m.test", MANAGER_USAGES), IAP_ALERT_CONSUMER) is None


@pytest.mark.parametrize(
    "name,usages,kw,role,problem",
    [
        ("s.test", SENSOR_USAGES, {}, IAP_ALERT_CONSUMER, "lacks IAP_ALERT_CONSUMER"),
        ("m.test", MANAGER_USAGES, {}, IAP_ALERT_GENERATOR, "lacks IAP_ALERT_GENERATOR"),
        ("s.test", SENSOR_USAGES, {"eku_critical": False}, IAP_ALERT_GENERATOR, "lacks IAP_ALERT_GENERATOR"),
        ("s.test", [ExtendedKeyUsageOID.CLIENT_AUTH], {}, IAP_ALERT_GENERATOR, "lacks"),
        ("s.test", None, {}, IAP_ALERT_GENERATOR, "lacks"),
        ("s.test", SENSOR_USAGES, {"is_ca": True}, IAP_ALERT_GENERATOR, "is a CA certificate"),
        ("*.test", SENSOR_USAGES, {}, IAP_ALERT_GENERATOR, "names no plain host name"),
        ("\u212aiosk.test", SENSOR_USAGES, {"san": False}, IAP_ALERT_GENERATOR, "names no plain host name"),
        ("sensor one", SENSOR_USAGES, {"san": False}, IAP_ALERT_GENERATOR, "names no plain host name"),
    ],
)
def test_refused(ca, name, usages, kw, role, problem) -> None:  # type: ignore[no-untyped-def]
    reason = role_problem(cert(ca, name, usages, **kw), role)
    assert reason is not None and problem in reason


def test_identity_is_canonical(ca) -> None:  # type: ignore[no-untyped-def]
    assert identity_of(cert(ca, "Sensor1.Example.ORG", SENSOR_USAGES)) == "sensor1.example.org"
    assert identity_of(cert(ca, "cn-only.test", SENSOR_USAGES, san=False)) == "cn-only.test"
    assert identity_of(cert(ca, "*.test", SENSOR_USAGES)) is None


def test_key_cert_sign_is_refused(ca, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    key, leaf = pki.make_certificate(ca[0], ca[1], "signer.test", SENSOR_USAGES)
    builder = (
        x509.CertificateBuilder()
        .subject_name(leaf.subject)
        .issuer_name(leaf.issuer)
        .public_key(leaf.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(leaf.not_valid_before_utc)
        .not_valid_after(leaf.not_valid_after_utc)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, False, False, False), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("signer.test")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage(list(SENSOR_USAGES)), critical=True)
    )
    signing = builder.sign(ca[0], leaf.signature_hash_algorithm)  # type: ignore[arg-type]
    assert "keyCertSign" in (role_problem(signing, IAP_ALERT_GENERATOR) or "")
