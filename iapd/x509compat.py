"""
What iapd needs from cryptography that Debian 12's release (38) lacks, with fallbacks.

The IAP role OIDs live under the UUID arc 2.25, whose second arc is a 128-bit number.
cryptography 38 and the releases after it for a while cannot hold an arc that large
(pyca/cryptography#11338): C{x509.ObjectIdentifier} refuses the role OIDs, and
C{Certificate.extensions} raises C{ValueError} for every certificate that carries them.
OpenSSL itself has no such limit, so the handshake is fine; only our own reading and
writing of the role EKU needs help.  With a cryptography that accepts large arcs (the
developer environment's) none of the fallbacks below is ever taken.

What the fallbacks do:

  ==========================  =====================================================
  role OID constants          L{DottedOID}: a hashable stand-in with C{dotted_string}
  Certificate.extensions      L{extensions}: read from the DER of the TBSCertificate;
                              only EKU, SAN (DNS names), basic constraints, key
                              usage and the key identifiers are decoded, as
                              L{iapd.roles} and L{iapd.tls} need nothing else
  ExtendedKeyUsage(...)       L{extended_key_usage}: the EKU extension DER-encoded by
                              hand, as an UnrecognizedExtension under the EKU OID
  load_pem_x509_certificates  L{load_pem_certificates} (cryptography >= 39)
  not_valid_*_utc             L{not_valid_before}, L{not_valid_after} (>= 42)
  ==========================  =====================================================
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Iterator
from typing import Any

import attr
from cryptography import x509
from cryptography.x509.oid import ExtensionOID


@attr.s(frozen=True, auto_attribs=True)
class DottedOID:
    """An OID that this cryptography cannot represent, compared by its dotted form."""

    dotted_string: str


def _large_arcs_supported() -> bool:
    try:
        x509.ObjectIdentifier("2.25.257399946880122254219957611656582499246")
    except ValueError:
        return False
    return True


LARGE_ARCS = _large_arcs_supported()


def oid(dotted: str) -> Any:
    """C{x509.ObjectIdentifier(dotted)}, or a L{DottedOID} where that cannot hold it."""
    try:
        return x509.ObjectIdentifier(dotted)
    except ValueError:
        if LARGE_ARCS:
            raise
        return DottedOID(dotted)


# -- a minimal DER reader and OID codec ------------------------------------------------


def _element(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at C{pos}."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or pos + count > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _children(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    while start < end:
        tag, content, after = _element(data, start)
        if after > end:
            raise ValueError("DER element overruns its parent")
        yield tag, content, after
        start = after


def _decode_oid(content: bytes) -> str:
    arcs: list[int] = []
    value = 0
    for byte in content:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    if not arcs or content[-1] & 0x80:
        raise ValueError("bad OID encoding")
    first = min(arcs[0] // 40, 2)
    return ".".join(map(str, [first, arcs[0] - 40 * first, *arcs[1:]]))


def _encode_oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return b"\x06" + _length(len(body)) + bytes(body)


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


# -- extensions ------------------------------------------------------------------------


class _ExtendedKeyUsage(x509.ExtendedKeyUsage):
    # The stock constructor insists on ObjectIdentifier items; ours may be DottedOIDs.
    def __init__(self, usages: Iterable[Any]) -> None:
        self._usages = list(usages)


_KEY_USAGE_BITS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)


def _value(oid_string: str, der: bytes) -> Any:
    tag, start, end = _element(der, 0)
    if oid_string == ExtensionOID.EXTENDED_KEY_USAGE.dotted_string:
        return _ExtendedKeyUsage(oid(_decode_oid(der[s:e])) for t, s, e in _children(der, start, end) if t == 0x06)
    if oid_string == ExtensionOID.SUBJECT_ALTERNATIVE_NAME.dotted_string:
        return x509.SubjectAlternativeName(
            [x509.DNSName(der[s:e].decode("ascii", "replace")) for t, s, e in _children(der, start, end) if t == 0x82]
        )
    if oid_string == ExtensionOID.BASIC_CONSTRAINTS.dotted_string:
        ca = any(t == 0x01 and der[s:e] != b"\x00" for t, s, e in _children(der, start, end))
        return x509.BasicConstraints(ca=ca, path_length=None)
    if oid_string == ExtensionOID.KEY_USAGE.dotted_string:
        bits = int.from_bytes(der[start + 1 : end] or b"\x00", "big")
        width = 8 * (end - start - 1)
        flags = {name: bool(bits >> (width - 1 - i) & 1) if i < width else False for i, name in enumerate(_KEY_USAGE_BITS)}
        if not flags["key_agreement"]:
            flags["encipher_only"] = flags["decipher_only"] = False
        return x509.KeyUsage(**flags)
    if oid_string == ExtensionOID.SUBJECT_KEY_IDENTIFIER.dotted_string:
        if tag != 0x04 or end != len(der):
            raise ValueError("bad subject key identifier")
        return x509.SubjectKeyIdentifier(der[start:end])
    if oid_string == ExtensionOID.AUTHORITY_KEY_IDENTIFIER.dotted_string:
        if tag != 0x30 or end != len(der):
            raise ValueError("bad authority key identifier")
        key_id = next((der[s:e] for t, s, e in _children(der, start, end) if t == 0x80), None)
        return x509.AuthorityKeyIdentifier(key_id, None, None)
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid_string), der)


def _parse_extensions(cert: x509.Certificate) -> x509.Extensions:
    """The extensions of C{cert}; ValueError, and only ValueError, for malformed DER."""
    try:
        return _parse_tbs_extensions(cert.tbs_certificate_bytes)
    except (IndexError, TypeError, UnicodeError) as e:
        raise ValueError(f"malformed extensions: {e}") from None


def _parse_tbs_extensions(tbs: bytes) -> x509.Extensions:
    _, start, end = _element(tbs, 0)
    found = []
    for tag, s, e in _children(tbs, start, end):
        if tag != 0xA3:  # [3] EXPLICIT Extensions
            continue
        _, s, e = _element(tbs, s)
        for _, ext_start, ext_end in _children(tbs, s, e):
            fields = list(_children(tbs, ext_start, ext_end))
            oid_string = _decode_oid(tbs[fields[0][1] : fields[0][2]])
            critical = any(t == 0x01 and tbs[fs:fe] != b"\x00" for t, fs, fe in fields[1:-1])
            value = _value(oid_string, tbs[fields[-1][1] : fields[-1][2]])
            found.append(x509.Extension(oid(oid_string), critical, value))
    return x509.Extensions(found)


def extensions(cert: x509.Certificate) -> x509.Extensions:
    """
    C{cert.extensions}; where cryptography cannot parse them because of a large OID
    arc, the subset iapd reads, decoded here.
    """
    try:
        return cert.extensions
    except ValueError:
        if LARGE_ARCS:
            raise
        return _parse_extensions(cert)


def extended_key_usage(usages: Iterable[Any]) -> x509.ExtensionType:
    """An EKU extension value for C{CertificateBuilder.add_extension}."""
    usages = list(usages)
    if all(isinstance(u, x509.ObjectIdentifier) for u in usages):
        return x509.ExtendedKeyUsage(usages)
    body = b"".join(_encode_oid(u.dotted_string) for u in usages)
    return x509.UnrecognizedExtension(ExtensionOID.EXTENDED_KEY_USAGE, b"\x30" + _length(len(body)) + body)


# -- small API additions ---------------------------------------------------------------

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def load_pem_certificates(data: bytes) -> list[x509.Certificate]:
    """Every PEM certificate in C{data}; C{ValueError} when there is none."""
    loader = getattr(x509, "load_pem_x509_certificates", None)
    if loader is not None:
        return loader(data)
    blocks = _PEM_CERTIFICATE.findall(data)
    if not blocks:
        raise ValueError("no PEM certificate found")
    return [x509.load_pem_x509_certificate(block) for block in blocks]


def not_valid_before(cert: x509.Certificate) -> datetime.datetime:
    """The start of C{cert}'s validity, timezone-aware (UTC)."""
    value = getattr(cert, "not_valid_before_utc", None)
    return value if value is not None else cert.not_valid_before.replace(tzinfo=datetime.timezone.utc)


def not_valid_after(cert: x509.Certificate) -> datetime.datetime:
    """The end of C{cert}'s validity, timezone-aware (UTC)."""
    value = getattr(cert, "not_valid_after_utc", None)
    return value if value is not None else cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)
