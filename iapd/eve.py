"""
Suricata's C{eve.json} alerts as IDMEF (RFC 4765), for the sensor daemon.

Suricata writes one JSON object per line to C{eve.json}; the sensor tails that file
and sends every C{event_type: "alert"} record to the manager as an IDMEF alert.  Three
pieces, all sans-IO so that the Twisted glue only reads files and calls them:

  - L{eve_to_idmef} turns one line into one IDMEF-Message, or C{None}.
  - L{EveTail} cuts appended bytes into complete lines and says, as a byte offset,
    how far the file has been consumed, so that the caller can persist it and resume
    after a restart neither re-reading nor skipping.
  - L{rotated} tells the caller that the file it tails was rotated or truncated, and
    that it must start again at offset 0 of the new file.

Why the IDMEF is built this way:

  - Re-reading a line must produce the very same body.  The manager deduplicates on
    (sensor identity, SHA-256 of the body) (DESIGN.md section 5), so a line read twice
    after a crash is stored once only if nothing in the body depends on when or how
    often it was converted: the messageid is a hash of the line, no clock is read,
    and element and attribute order is fixed.
  - The original line travels verbatim inside the alert (AdditionalData
    C{meaning="suricata-eve"}): Suricata's records hold far more than IDMEF can say
    (flow, app-layer, metadata), and the manager stores bodies untouched, so nothing
    is lost by converting.  This function does not cap it: the caller bounds line
    length (L{EveTail}'s C{max_line}) so that the body fits the manager's
    C{max_content_length}.
  - Every value goes through ElementTree, which escapes it; nothing untrusted is
    concatenated into XML.  JSON can carry characters XML 1.0 cannot (C{"\\u0000"},
    lone surrogates, U+FFFE): those become U+FFFD, because the body must parse.
  - The manager's summary (L{iapd.idmef.summarize}) reads C{Classification/@text},
    C{Assessment/Impact/@severity}, C{Source}/C{Target} C{Node/Address/address},
    C{CreateTime} and the Analyzer's attributes; those are always filled when the
    record has the data.

Decisions, in one place::

  eve record                               IDMEF
  ---------------------------------------  -------------------------------------------
  not UTF-8, not JSON, NaN/Infinity,        None (nothing raised)
    not an object, event_type != "alert"
  one trailing "\\n" or "\\r\\n" on line     ignored: not hashed, not embedded (a line
                                              from readline() and one from EveTail give
                                              the same body)
  messageid                                 "eve-" + first 32 hex digits of SHA-256 of
                                              the line
  host                                      Analyzer/Node/name
  timestamp "2026-11-23T10:00:00.1+0000"    CreateTime and DetectTime, with ntpstamp:
                                              "2026-11-23T10:00:00.1+00:00"
  timestamp a string but not that form      CreateTime/DetectTime text as given, no
                                              ntpstamp
  timestamp absent or not a string          no CreateTime/DetectTime (never the clock:
                                              the body must not change on re-read)
  src_ip / dest_ip                          Source / Target Node/Address, category
                                              ipv4-addr, ipv6-addr, or unknown when the
                                              string is not an IP address
  src_port / dest_port (int 0-65535)        Source / Target Service/port, with proto as
                                              iana_protocol_name (lower case) or, when
                                              Suricata prints a number ("047"),
                                              iana_protocol_number
  no port (ICMP)                            no Service: RFC 4765 requires a port or name
  alert.signature (non-empty string)        Classification text, else "Suricata alert"
  alert.signature_id (int >= 0)             Classification/Reference origin
                                              vendor-specific, name "sid:N", meaning
                                              alert.category; url empty (the DTD wants
                                              one, Suricata has none)
  alert.severity 1 / 2 / 3 / >= 4           Impact severity high / medium / low / info
  alert.severity absent, < 1, not an int    no Assessment
  the line                                  AdditionalData type string, meaning
                                              suricata-eve
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol
from xml.etree.ElementTree import Element, SubElement, tostring

__all__ = [
    "DEFAULT_MAX_LINE",
    "IDMEF_NAMESPACE",
    "EveTail",
    "StatLike",
    "eve_to_idmef",
    "rotated",
]

IDMEF_NAMESPACE = "http://iana.org/idmef"

DEFAULT_MAX_LINE = 128 * 1024
"""
L{EveTail}'s default bound on a line, in bytes.

Alert lines are 1-10 KiB, a few tens with payload and packet logging.  The IDMEF body
is the line plus about 2 KiB, and more when the line holds characters XML escapes
(C{&} becomes five bytes), so 128 KiB stays well inside the manager's default
C{max_content_length} of 1 MiB for any realistic line.
"""

# Tags are written with their prefix and the root declares it, rather than calling
# ElementTree.register_namespace: that registry is global to the process.
_P = "idmef:"

# Characters XML 1.0 cannot carry, even as character references.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

# Suricata's "%Y-%m-%dT%H:%M:%S.%f%z"; seconds fraction and offset colon optional so
# that ISO 8601 input (other tools writing eve-like lines) is accepted too.
_TIMESTAMP = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]{1,9}))?(Z|([+-])([0-9]{2}):?([0-9]{2}))"
)
_NTP_EPOCH = datetime(1900, 1, 1, tzinfo=timezone.utc)

_SEVERITIES = {1: "high", 2: "medium", 3: "low"}

# IANA numbers for the protocol names Suricata prints; others get a name only.
_PROTOCOL_NUMBERS = {
    "icmp": 1,
    "igmp": 2,
    "tcp": 6,
    "udp": 17,
    "gre": 47,
    "esp": 50,
    "ah": 51,
    "ipv6-icmp": 58,
    "sctp": 132,
}


# -- Converting one line ---------------------------------------------------------------


def eve_to_idmef(line: bytes, analyzer_id: str) -> bytes | None:
    """
    Convert one C{eve.json} line into an IDMEF-Message holding one Alert.

    Return the UTF-8 XML document, or C{None} when the line is not a Suricata alert
    record (see the table in the module docstring).  The same line and C{analyzer_id}
    always give the same bytes, so a line re-read after a restart is deduplicated by
    the manager.

    The whole line is embedded: bound its length before calling (L{EveTail} does).

    This never raises: the line holds attacker-influenced data (HTTP headers, DNS
    names), and one bad line must not stop the tail.
    """
    try:
        return _convert(bytes(line), analyzer_id)
    except Exception:
        # A safety net for a bug here, not an expected path: the tests feed arbitrary
        # bytes and arbitrary JSON objects and expect None or a good document.
        return None


def _reject_constant(name: str) -> Any:
    """Refuse NaN and Infinity: Python accepts them, JSON does not, Suricata never
    writes them."""
    raise ValueError(f"not JSON: {name}")


def _convert(raw: bytes, analyzer_id: str) -> bytes | None:
    """L{eve_to_idmef}, letting errors through."""
    if raw.endswith(b"\r\n"):
        raw = raw[:-2]
    elif raw.endswith(b"\n"):
        raw = raw[:-1]
    try:
        text = raw.decode("utf-8")
        record = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        # UnicodeDecodeError and JSONDecodeError are ValueErrors; so is an integer
        # longer than Python's int_max_str_digits.  RecursionError: deep nesting.
        return None
    if not isinstance(record, dict) or record.get("event_type") != "alert":
        return None
    alert = record.get("alert")
    if not isinstance(alert, dict):
        alert = {}

    root = Element(
        _P + "IDMEF-Message", {"xmlns:idmef": IDMEF_NAMESPACE, "version": "1.0"}
    )
    event = SubElement(root, _P + "Alert", messageid=_messageid(raw))
    _analyzer(event, analyzer_id, record.get("host"))
    timestamp = record.get("timestamp")
    if isinstance(timestamp, str):
        _time(event, "CreateTime", timestamp)
        _time(event, "DetectTime", timestamp)
    proto = record.get("proto")
    _party(event, "Source", record.get("src_ip"), record.get("src_port"), proto)
    _party(event, "Target", record.get("dest_ip"), record.get("dest_port"), proto)
    _classification(event, alert)
    severity = _severity(alert.get("severity"))
    if severity is not None:
        assessment = SubElement(event, _P + "Assessment")
        SubElement(assessment, _P + "Impact", severity=severity)
    data = SubElement(
        event, _P + "AdditionalData", type="string", meaning="suricata-eve"
    )
    SubElement(data, _P + "string").text = _xml(text)

    body: bytes = tostring(root, encoding="UTF-8", xml_declaration=True)
    # ElementTree escapes CR in attributes but not in text, where every XML parser
    # would turn it into LF.  A raw CR byte in the output can only be such text (the
    # declaration ends in LF; UTF-8 never uses 0x0D inside a multi-byte character), so
    # escaping it here keeps the embedded line exact.
    return body.replace(b"\r", b"&#13;")


def _xml(value: str) -> str:
    """C{value} with the characters XML 1.0 cannot carry replaced by U+FFFD."""
    return _NOT_XML.sub("\ufffd", value)


def _text(value: object) -> str | None:
    """A non-empty JSON string, made XML-safe; C{None} for anything else."""
    return _xml(value) if isinstance(value, str) and value else None


def _int(value: object) -> int | None:
    """A JSON integer (not a boolean, which Python counts as one)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _messageid(raw: bytes) -> str:
    """
    An id that depends on the line only: the same line read twice is the same alert.

    128 bits of SHA-256: lines differ by timestamp and flow_id anyway, and the id must
    stay short enough for the manager's summary and people's eyes.
    """
    return "eve-" + hashlib.sha256(raw).hexdigest()[:32]


def _analyzer(event: Element, analyzer_id: str, host: object) -> None:
    """The Analyzer: this sensor's id, Suricata, and Suricata's C{host} as its Node."""
    analyzer = SubElement(
        event,
        _P + "Analyzer",
        {
            "analyzerid": _xml(analyzer_id),
            "name": "suricata",
            "model": "Suricata",
            "class": "NIDS",
        },
    )
    name = _text(host)
    if name is not None:
        node = SubElement(analyzer, _P + "Node")
        SubElement(node, _P + "name").text = name


def _time(event: Element, tag: str, timestamp: str) -> None:
    """
    A CreateTime or DetectTime from Suricata's timestamp.

    Suricata writes C{+0000}; RFC 4765 (via RFC 3339) wants C{+00:00}.  The fraction
    is kept digit for digit.  A timestamp that does not parse is kept as written: it
    is still what the sensor said, and the manager only displays it.
    """
    element = SubElement(event, _P + tag)
    parsed = _parse_timestamp(timestamp)
    if parsed is None:
        element.text = _xml(timestamp)
        return
    iso, ntpstamp = parsed
    if ntpstamp is not None:
        element.set("ntpstamp", ntpstamp)
    element.text = iso


def _parse_timestamp(timestamp: str) -> tuple[str, str | None] | None:
    """Suricata's timestamp as (ISO 8601 text, NTP timestamp or None), or None."""
    match = _TIMESTAMP.fullmatch(timestamp)
    if match is None:
        return None
    year, month, day, hour, minute, second = match.groups()[:6]
    fraction, zone, sign, zh, zm = match.groups()[6:]
    if zone == "Z":
        offset, iso_zone = timedelta(0), "Z"
    elif int(zm) > 59:
        return None
    else:
        offset = timedelta(hours=int(zh), minutes=int(zm))
        offset = -offset if sign == "-" else offset
        iso_zone = f"{sign}{zh}:{zm}"
    try:
        when = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second),
            tzinfo=timezone(offset),
        )
    except ValueError:  # Feb 30, hour 24, offset of a day or more, ...
        return None
    iso = f"{year}-{month}-{day}T{hour}:{minute}:{second}"
    if fraction is not None:
        iso += "." + fraction
    return iso + iso_zone, _ntpstamp(when, fraction)


def _ntpstamp(when: datetime, fraction: str | None) -> str | None:
    """
    RFC 4765's C{ntpstamp} attribute (required by its DTD on CreateTime).

    Seconds since 1900 modulo 2**32 (NTP eras, RFC 5905), then the fraction in
    units of 2**-32 s.  None before 1900, which no sensor clock says.
    """
    try:
        elapsed = when - _NTP_EPOCH
    except OverflowError:
        return None
    seconds = elapsed.days * 86400 + elapsed.seconds
    if seconds < 0:
        return None
    units = 0 if fraction is None else (int(fraction) << 32) // 10 ** len(fraction)
    return f"0x{seconds % (1 << 32):08x}.0x{units:08x}"


def _party(event: Element, role: str, ip: object, port: object, proto: object) -> None:
    """A Source or Target: a Node with the address, a Service with the port."""
    address = _text(ip)
    number = _int(port)
    if number is not None and not 0 <= number <= 65535:
        number = None
    if address is None and number is None:
        return
    party = SubElement(event, _P + role)
    version = None
    if address is not None:
        category, version = _address_category(address)
        node = SubElement(party, _P + "Node")
        found = SubElement(node, _P + "Address", category=category)
        SubElement(found, _P + "address").text = address
    if number is not None:
        service = SubElement(party, _P + "Service", _protocol(proto))
        if version is not None:
            service.set("ip_version", version)
        SubElement(service, _P + "port").text = str(number)


def _address_category(address: str) -> tuple[str, str | None]:
    """RFC 4765's Address category and the IP version, from the address's form."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return "unknown", None
    if parsed.version == 4:
        return "ipv4-addr", "4"
    return "ipv6-addr", "6"


def _protocol(proto: object) -> dict[str, str]:
    """
    Service attributes for Suricata's C{proto}.

    Suricata prints a name ("TCP", "IPv6-ICMP") for protocols it knows and the
    number, zero-padded ("047"), for the others.
    """
    if not isinstance(proto, str) or not proto:
        return {}
    if proto.isascii() and proto.isdigit() and len(proto) <= 3:
        number = int(proto)
        return {"iana_protocol_number": str(number)} if number <= 255 else {}
    name = proto.lower()
    attributes = {"iana_protocol_name": _xml(name)}
    known = _PROTOCOL_NUMBERS.get(name)
    if known is not None:
        attributes["iana_protocol_number"] = str(known)
    return attributes


def _classification(event: Element, alert: dict[str, Any]) -> None:
    """The Classification: the rule's message, and its sid as a vendor reference."""
    signature = _text(alert.get("signature")) or "Suricata alert"
    classification = SubElement(event, _P + "Classification", text=signature)
    sid = _int(alert.get("signature_id"))
    if sid is None or not 0 <= sid < 1 << 64:
        return
    reference = SubElement(classification, _P + "Reference", origin="vendor-specific")
    category = _text(alert.get("category"))
    if category is not None:
        reference.set("meaning", category)
    SubElement(reference, _P + "name").text = f"sid:{sid}"
    SubElement(reference, _P + "url")


def _severity(value: object) -> str | None:
    """
    Suricata's priority (1 most severe, default 3) as RFC 4765's Impact severity.

    Suricata rules carry priorities 1-255; 4 and beyond are informational.
    """
    number = _int(value)
    if number is None or number < 1:
        return None
    return _SEVERITIES.get(number, "info")


# -- Tailing the file ------------------------------------------------------------------


class EveTail:
    """
    Complete lines out of the bytes appended to a growing file.

    Feed it whatever C{read()} returned; it hands back the lines completed so far
    (without their C{\\n} or C{\\r\\n}) and keeps the unfinished last line for the
    next feed.  Suricata may be caught mid-write, so a line without its newline is
    never a line yet.

    L{offset} is the file offset just past the last complete line, newline included:
    persist it once the lines returned so far are safely handled (spooled), and on
    restart seek there and pass it back in.  A crash between handling and persisting
    re-reads some lines, which L{eve_to_idmef} turns into identical bodies that the
    manager deduplicates; nothing is ever skipped.

    Memory stays bounded: a line longer than C{max_line} bytes (terminator excluded)
    is dropped as it streams past, counted in L{skipped}, and its end still advances
    L{offset}, so it is not met again after a restart.  The buffer never holds more
    than C{max_line + 1} bytes (the extra one is a CR that may turn out to belong to
    a CRLF).  Each feed's list is bounded by the caller's read size.

    Callers that keep the file offset themselves (L{iapd.inputs.EveInput}) use the
    relative view instead: read from their offset plus L{buffered}, add
    L{offset_after_last_line} to their offset once the lines are handled, then call
    L{rebase}.

    @ivar offset: File offset just past the last complete (or skipped) line.
    @ivar max_line: The longest line, in bytes without its terminator, handed back.
    @ivar skipped: How many lines were dropped for being longer than C{max_line}.
    """

    def __init__(self, offset: int = 0, max_line: int = DEFAULT_MAX_LINE) -> None:
        """
        @param offset: Where the caller starts reading: 0 for a new file, or the
            offset persisted from an earlier L{EveTail}.
        @param max_line: See the class docstring.
        """
        if offset < 0:
            raise ValueError(f"offset must not be negative, not {offset}")
        if max_line < 1:
            raise ValueError(f"max_line must be positive, not {max_line}")
        self.offset = offset
        self.max_line = max_line
        self.skipped = 0
        self._partial = bytearray()
        # Bytes after offset read so far: the partial line, or the overlong line
        # being dropped (then _partial stays empty).
        self._since = 0
        self._dropping = False
        self._base = offset

    @property
    def pending(self) -> int:
        """Bytes held for the unfinished last line (at most C{max_line + 1})."""
        return len(self._partial)

    @property
    def buffered(self) -> int:
        """
        Bytes fed after L{offset}: the unfinished line, or the part of an overlong
        line already dropped.  The next read starts this far past L{offset}; feeding
        them again would count them twice.
        """
        return self._since

    @property
    def offset_after_last_line(self) -> int:
        """L{offset} relative to where it stood at the last L{rebase} (or creation)."""
        return self.offset - self._base

    def rebase(self) -> None:
        """
        Make L{offset_after_last_line} count from here: the caller has added it to
        its own offset.  The unfinished line is kept.
        """
        self._base = self.offset

    def feed(self, data: bytes) -> list[bytes]:
        """
        Take bytes appended to the file; return the lines they complete, in order.

        Splitting the same stream into different chunks gives the same lines, the
        same L{offset} and the same L{skipped}.
        """
        data = bytes(data)
        lines: list[bytes] = []
        start = 0
        while (newline := data.find(b"\n", start)) >= 0:
            line = self._complete(data, start, newline)
            if line is None:
                self.skipped += 1
            else:
                lines.append(line)
            self.offset += self._since + newline + 1 - start
            self._since = 0
            start = newline + 1
        rest = len(data) - start
        self._since += rest
        if not self._dropping and rest:
            if len(self._partial) + rest > self.max_line + 1:
                self._dropping = True
                self._partial.clear()
            else:
                self._partial += data[start:]
        return lines

    def _complete(self, data: bytes, start: int, newline: int) -> bytes | None:
        """The line ending at C{data[newline]}, or None when it is too long."""
        if self._dropping:
            self._dropping = False
            return None
        if len(self._partial) + newline - start > self.max_line + 1:
            self._partial.clear()
            return None
        line = bytes(self._partial) + data[start:newline]
        self._partial.clear()
        if line.endswith(b"\r"):
            line = line[:-1]
        return None if len(line) > self.max_line else line


class StatLike(Protocol):
    """What L{rotated} reads of an C{os.stat_result}."""

    @property
    def st_ino(self) -> int: ...

    @property
    def st_size(self) -> int: ...


def rotated(previous_inode: int | None, previous_size: int, stat: StatLike) -> bool:
    """
    Whether the file at the tailed path is no longer the one read up to now.

    True when the path now names another file (logrotate's default "move and create",
    then Suricata reopens on SIGHUP), or when the file is shorter than before
    (C{copytruncate}).  Either way the caller finishes reading the old file if it
    still has it open, then starts at offset 0 with a fresh L{EveTail}.

    @param previous_inode: C{st_ino} of the file tailed so far, or None when there is
        none yet (only truncation can then be seen).
    @param previous_size: How far that file is known to extend: pass the persisted
        L{EveTail.offset}, so that a file truncated and refilled to below it is
        still caught.
    @param stat: C{os.stat()} of the path now.

    Not detectable from these alone, and so not claimed: a file truncated and then
    refilled past C{previous_size} between two checks, or a new file that happens to
    get the old inode number back.
    """
    if previous_inode is not None and stat.st_ino != previous_inode:
        return True
    return stat.st_size < previous_size
