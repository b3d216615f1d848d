"""
The fallbacks of L{iapd.x509compat}, checked against the cryptography installed here.

On Debian 12 (cryptography 38) the fallbacks are what reads and writes the IAP role
EKU; the suite runs with a recent cryptography, where they are never taken by iapd
itself.  So these tests call them directly and compare each result with what the recent
cryptography reads from the same certificates: the fallback must agree on every
certificate of the test PKI, the deliberately wrong ones included.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtensionOID

from iapd import pki, roles, x509compat
from iapd.roles import IAP_ALERT_CONSUMER, IAP_ALERT_GENERATOR, MANAGER_USAGES, SENSOR_USAGES

from .certs import make_test_pki


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, x509.Certificate]:
    directory = tmp_path_factory.mktemp("pki")
    test_pki = make_test_pki(directory)
    paths = {"ca": test_pki.ca, "other_ca": test_pki.other_ca}
    for field in dataclasses.fields(test_pki):
        value = getattr(test_pki, field.name)
        if isinstance(value, tuple):
            paths[field.name] = value[0]
    return {name: x509.load_pem_x509_certificate(Path(p).read_bytes()) for name, p in paths.items()}


def _summary(exts: x509.Extensions) -> dict[str, object]:
    # What iapd.roles and iapd.tls read, in a form both parsers can be compared on.
    out: dict[str, object] = {"oids": sorted(e.oid.dotted_string for e in exts)}
    for ext in exts:
        value = ext.value
        if isinstance(value, x509.ExtendedKeyUsage):
            out["eku"] = (ext.critical, sorted(u.dotted_string for u in value))
        elif isinstance(value, x509.SubjectAlternativeName):
            out["san"] = (ext.critical, value.get_values_for_type(x509.DNSName))
        elif isinstance(value, x509.BasicConstraints):
            out["ca"] = (ext.critical, value.ca)
        elif isinstance(value, x509.KeyUsage):
            flags = [getattr(value, n) for n in x509compat._KEY_USAGE_BITS[:7]]
            out["key_usage"] = (ext.critical, flags)
        elif isinstance(value, x509.SubjectKeyIdentifier):  # iapd.tls chooses the CAs it sends by these
            out["ski"] = (ext.critical, value.digest)
        elif isinstance(value, x509.AuthorityKeyIdentifier):
            out["aki"] = (ext.critical, value.key_identifier)
    return out


def _or_unreadable(f: Any, *args: Any) -> object:
    """C{f(*args)}, or "unreadable" where it raises ValueError (both parsers must agree)."""
    try:
        return f(*args)
    except ValueError:
        return "unreadable"


def test_extensions_fallback_agrees(certificates: dict[str, x509.Certificate]) -> None:
    for name, cert in certificates.items():
        fallback = _or_unreadable(lambda: _summary(x509compat._parse_extensions(cert)))
        assert fallback == _or_unreadable(lambda: _summary(cert.extensions)), name
    assert _or_unreadable(x509compat._parse_extensions, certificates["sensor_bad_eku"]) == "unreadable"


def test_roles_through_the_fallback(
    certificates: dict[str, x509.Certificate], monkeypatch: pytest.MonkeyPatch
) -> None:
    def verdicts() -> dict[str, object]:
        return {
            name: (
                _or_unreadable(roles.identity_of, cert),
                # the library's words differ: compare the verdict's first words only
                str(roles.role_problem(cert, IAP_ALERT_GENERATOR)).split(" (")[0],
                str(roles.role_problem(cert, IAP_ALERT_CONSUMER)).split(" (")[0],
                _or_unreadable(roles.extended_key_usages, cert),
            )
            for name, cert in certificates.items()
        }

    expected = verdicts()
    monkeypatch.setattr(roles, "extensions", x509compat._parse_extensions)
    assert verdicts() == expected
    assert expected["sensor"][1] == "None" and expected["manager"][2] == "None"
    assert expected["sensor_bad_eku"][1] == "has extensions that cannot be read"


@pytest.mark.parametrize("usages", [SENSOR_USAGES, MANAGER_USAGES])
def test_hand_encoded_eku(usages: tuple[x509.ObjectIdentifier, ...]) -> None:
    """The EKU written for DottedOIDs is byte for byte what cryptography writes."""
    dotted = [x509compat.DottedOID(u.dotted_string) for u in usages]
    ext = x509compat.extended_key_usage(dotted)
    assert isinstance(ext, x509.UnrecognizedExtension)
    assert ext.oid == ExtensionOID.EXTENDED_KEY_USAGE
    assert ext.value == x509.ExtendedKeyUsage(list(usages)).public_bytes()
    ca_key, ca_cert = pki.make_self_signed_ca("compat CA")
    _, cert = pki.make_certificate(ca_key, ca_cert, "compat.test", dotted)  # type: ignore[arg-type]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert eku.critical and list(eku.value) == list(usages)


@pytest.mark.parametrize("oid, der", [
    (ExtensionOID.AUTHORITY_KEY_IDENTIFIER, b"\x04\x02ab"),  # an OCTET STRING where a SEQUENCE belongs
    (ExtensionOID.AUTHORITY_KEY_IDENTIFIER, b"\x30\x04\x80\x02ab\x00"),  # an octet after the SEQUENCE
    (ExtensionOID.SUBJECT_KEY_IDENTIFIER, b"\x04\x02ab\x00"),  # an octet after the OCTET STRING
    (ExtensionOID.SUBJECT_KEY_IDENTIFIER, b"\x30\x00"),
])
def test_malformed_key_identifiers(oid: x509.ObjectIdentifier, der: bytes) -> None:
    """A key identifier that is not valid DER: both parsers refuse the extensions, so a
    role verdict is the same on Debian's cryptography and on a recent one."""
    ca_key, ca_cert = pki.make_self_signed_ca("compat CA")
    _, cert = pki.make_certificate(ca_key, ca_cert, "compat.test", SENSOR_USAGES)
    builder = x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.issuer) \
        .public_key(cert.public_key()).serial_number(cert.serial_number) \
        .not_valid_before(x509compat.not_valid_before(cert)).not_valid_after(x509compat.not_valid_after(cert))
    for ext in cert.extensions:
        if ext.oid != oid:
            builder = builder.add_extension(ext.value, ext.critical)
    bad = builder.add_extension(x509.UnrecognizedExtension(oid, der), critical=False).sign(ca_key, hashes.SHA256())
    assert _or_unreadable(x509compat._parse_extensions, bad) == "unreadable"
    assert _or_unreadable(lambda: bad.extensions) == "unreadable"


def test_oid_codec() -> None:
    for dotted in ("2.5.29.37", "1.3.6.1.5.5.7.3.1", "2.999.1", IAP_ALERT_GENERATOR.dotted_string):
        encoded = x509compat._encode_oid(dotted)
        assert x509compat._decode_oid(encoded[2:]) == dotted
    with pytest.raises(ValueError):
        x509compat._decode_oid(b"\x2a\x86")  # ends inside an arc


def test_load_pem_certificates_without_the_new_api(
    certificates: dict[str, x509.Certificate], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    pem = b"junk\n" + b"".join(certificates[n].public_bytes(Encoding.PEM) for n in ("sensor", "ca"))
    monkeypatch.delattr(x509, "load_pem_x509_certificates")
    assert x509compat.load_pem_certificates(pem) == [certificates["sensor"], certificates["ca"]]
    with pytest.raises(ValueError):
        x509compat.load_pem_certificates(b"no certificate here")


def test_validity_without_the_utc_properties() -> None:
    class Old:  # cryptography < 42: naive datetimes meaning UTC
        not_valid_before = datetime.datetime(2026, 1, 1, 0, 0)
        not_valid_after = datetime.datetime(2027, 1, 1, 0, 0)

    utc = datetime.timezone.utc
    assert x509compat.not_valid_before(Old()) == datetime.datetime(2026, 1, 1, tzinfo=utc)  # type: ignore[arg-type]
    assert x509compat.not_valid_after(Old()) == datetime.datetime(2027, 1, 1, tzinfo=utc)  # type: ignore[arg-type]
