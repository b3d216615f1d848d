"""
Which certificates may act as a sensor or a manager, checked on the certificates alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
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


def test_unreadable_extensions_are_a_problem_not_an_exception(tmp_path: Path) -> None:
    """Extensions the X.509 library cannot parse give a reason (the manager's 403),
    never an exception escaping into the handshake callback."""
    from .certs import make_test_pki

    crt, _ = make_test_pki(tmp_path).sensor_bad_eku
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    problem = role_problem(cert, IAP_ALERT_GENERATOR)
    assert problem is not None and problem.startswith("has extensions that cannot be read")


_REAL_TBS = pki.make_certificate(*pki.make_self_signed_ca("fuzz CA"), "fuzz.test", SENSOR_USAGES)[1].tbs_certificate_bytes


@settings(max_examples=500, deadline=None)
@given(st.integers(0, len(_REAL_TBS) - 1), st.integers(0, 255), st.integers(0, len(_REAL_TBS)))
def test_fallback_der_reader_fails_only_in_ways_it_reports(position: int, value: int, cut: int) -> None:
    """The Debian 12 fallback reads the DER of CA-signed but otherwise untrusted
    certificates: a real TBSCertificate with one octet changed and its tail cut gives
    extensions or one of the errors that _parse_extensions reports as ValueError."""
    from iapd.x509compat import _parse_tbs_extensions

    tbs = bytearray(_REAL_TBS)
    tbs[position] = value
    try:
        _parse_tbs_extensions(bytes(tbs[:cut] if cut > position else tbs))
    except (ValueError, IndexError, TypeError, UnicodeError):
        pass
