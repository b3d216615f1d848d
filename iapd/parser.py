"""
Sans-IO parsing of IAP/0.2: setup blocks from lines, content messages from bytes.

Nothing here touches a transport.  Setup messages arrive as lists of lines (the
protocol classes collect them with C{LineReceiver}); the data phase is parsed
incrementally over one buffer by L{ContentReader}, because re-splitting lines for every
alert costs more than the TLS layer does (NOTES.md).  Every function returns either a
message or a L{WireError}; none raises on any input.
"""

from __future__ import annotations

import re
from typing import Iterator, Union

import attr

from .errors import WireError, bad_request
from .messages import (
    ConnectRequest,
    Content,
    ContentHeader,
    Response,
    SetupMessage,
    UpgradeRequest,
    VersionVerify,
)

MAX_LINE = 1024
"""Longest setup or header line, without its CRLF."""
MAX_SETUP_LINES = 64
"""A CONNECT with its VIA lines: a chain longer than this is a loop or an attack."""
MAX_HEADERS = 32
MAX_HEADER_BYTES = 8192
MAX_LENGTH_DIGITS = 19

_VERSION = r"IAP/(?P<major>\d{1,3})\.(?P<minor>\d{1,3})"
# host per RFC 2616 3.2.2: a DNS name or an IPv4 address; IPv6 literals in brackets.
_HOST = r"(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.\-]{0,251}[A-Za-z0-9])?\.?|\[[0-9A-Fa-f:.]{2,45}\])"
_CONNECT = re.compile(rf"{_VERSION} CONNECT {_HOST}\Z")
_VIA = re.compile(rf"{_VERSION} VIA {_HOST}\Z")
_UPGRADE = re.compile(rf"{_VERSION} Upgrade: ?(?P<token>\S+)\Z")
_VERIFY = re.compile(rf"{_VERSION} IAP-Version: ?(?P<iap>\d{{1,3}}\.\d{{1,3}})\Z")
_SENDER = re.compile(r"IAP-Role: ?Sender\Z")
_RESPONSE = re.compile(rf"{_VERSION} (?P<code>[1-5]\d\d)(?: (?P<reason>[\x20-\x7e]*))?\Z")
_HEADER = re.compile(rb"(?P<name>[A-Za-z0-9!#$%&'*+.^_`|~-]+):[ \t]*(?P<value>[\x20-\x7e\t]*?)[ \t]*\Z")


def _decode(line: bytes) -> str | WireError:
    if len(line) > MAX_LINE:
        return bad_request(f"line longer than {MAX_LINE} octets")
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        return bad_request("non-ASCII octet in a setup line")
    if not text.isprintable():
        return bad_request("control character in a setup line")
    return text


def _version(match: re.Match[str]) -> str:
    return f"IAP/{int(match['major'])}.{int(match['minor'])}"


def parse_setup(lines: list[bytes]) -> SetupMessage | WireError:
    """
    Parse one setup-phase message: the lines before its terminating empty line.

    Any IAP version is accepted syntactically, so that a role can answer 505 to a
    version it does not speak rather than 400.
    """
    if not lines:
        return bad_request("empty message")
    if len(lines) > MAX_SETUP_LINES:
        return bad_request(f"more than {MAX_SETUP_LINES} lines in a setup message")
    texts: list[str] = []
    for line in lines:
        text = _decode(line)
        if isinstance(text, WireError):
            return text
        texts.append(text)
    first, rest = texts[0], texts[1:]

    if m := _CONNECT.match(first):
        version = _version(m)
        via: list[str] = []
        for text in rest:
            v = _VIA.match(text)
            if v is None:
                return bad_request(f"unexpected line in CONNECT request: {text[:80]!r}")
            if _version(v) != version:
                # draft 4.1: a proxy MUST use the version of the CONNECT it relays
                return bad_request("VIA version differs from CONNECT version")
            via.append(v["host"])
        return ConnectRequest(version, m["host"], tuple(via))

    if m := _RESPONSE.match(first):
        if rest:
            return bad_request("unexpected line after a response")
        return Response(_version(m), int(m["code"]), m["reason"] or None)

    if m := _UPGRADE.match(first):
        if rest:
            return bad_request("unexpected line after an upgrade request")
        return UpgradeRequest(_version(m), m["token"])

    if m := _VERIFY.match(first):
        if not rest:
            return VersionVerify(_version(m), m["iap"], False)
        if len(rest) == 1 and _SENDER.match(rest[0]):
            return VersionVerify(_version(m), m["iap"], True)
        return bad_request("unexpected line in a version verify")

    return bad_request(f"not an IAP setup message: {first[:80]!r}")


def describe(kind: type) -> str:
    """A short name for a kind of message, for 'expected X, got Y' errors."""
    return {
        ConnectRequest: "CONNECT request",
        Response: "response",
        UpgradeRequest: "upgrade request",
        VersionVerify: "version verify",
    }.get(kind, "unknown message")


def parse_content_header(block: bytes, max_content_length: int) -> ContentHeader | WireError:
    """
    Parse the header block of an iap-content message (without its final CRLF CRLF).

    Field names are case-insensitive as in HTTP.  A repeated Content-Length is refused
    even when the values agree: request smuggling lives in such disagreements between
    hops, and IAP has no reason to repeat it.
    """
    lines = block.split(b"\r\n") if block else []
    if len(lines) > MAX_HEADERS:
        return bad_request(f"more than {MAX_HEADERS} header lines")
    content_type: str | None = None
    length_text: bytes | None = None
    for line in lines:
        if len(line) > MAX_LINE:
            return bad_request(f"header line longer than {MAX_LINE} octets")
        m = _HEADER.match(line)
        if m is None:
            return bad_request(f"malformed header line: {line[:80]!r}")
        name = m["name"].lower()
        if name == b"content-length":
            if length_text is not None:
                return bad_request("Content-Length given twice")
            length_text = m["value"]
        elif name == b"content-type":
            if content_type is not None:
                return bad_request("Content-Type given twice")
            content_type = m["value"].decode("ascii")
        # other fields are ignored, as HTTP does, so that later minor versions may add some
    if length_text is None:
        return WireError(411, "Content-Length is mandatory (draft 5.1)")
    if not length_text.isdigit() or len(length_text) > MAX_LENGTH_DIGITS:
        return bad_request(f"invalid Content-Length: {length_text[:40]!r}")
    length = int(length_text)
    if length > max_content_length:
        return WireError(413, f"Content-Length {length} exceeds the limit of {max_content_length}")
    return ContentHeader(content_type or None, length)


def media_type(content_type: str) -> str:
    """The type/subtype of a Content-Type value, lower-cased, parameters dropped."""
    return content_type.split(";", 1)[0].strip().lower()


def _partial_terminator(buf: bytearray) -> int:
    """How many trailing octets of C{buf} could begin a CRLF CRLF."""
    for n in (3, 2, 1):
        if buf.endswith(b"\r\n\r\n"[:n]):
            return n
    return 0


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Refused:
    """
    A content message that was framed but refused: the peer is told C{error.code} and,
    when C{error.fatal} is false, the connection goes on.
    """

    error: WireError


ContentEvent = Union[Content, Refused, WireError]


class ContentReader:
    """
    Incremental parser of the data phase: feed bytes, get complete events.

    A L{WireError} event means framing is lost: the reader stops, and everything after
    it in the stream is ignored.  A L{Refused} event means one message was refused but
    the stream stays framed (draft 4.3: an unknown content type need not end the
    connection).
    """

    def __init__(self, max_content_length: int, accepted_types: frozenset[str]) -> None:
        self._max = max_content_length
        self._accepted = accepted_types
        self._buffer = bytearray()
        self._scan_from = 0
        self._header: ContentHeader | None = None
        self._header_error: WireError | None = None
        self._broken = False
        self._last_framed: bytes | None = None  # the last header block, with its CRLF CRLF
        self._last_header: tuple[ContentHeader, WireError | None] = (ContentHeader(None, 0), None)

    @property
    def buffered(self) -> int:
        """Octets held for an incomplete message."""
        return len(self._buffer)

    def feed(self, data: bytes) -> Iterator[ContentEvent]:
        if self._broken:
            return
        self._buffer += data
        pos = 0
        buf = self._buffer
        try:
            while True:
                last = self._last_framed
                if self._header is None and last is not None and buf.startswith(last, pos):
                    # a sensor sends the same header again and again (same type, often
                    # the same length): recognised in place, without searching for its
                    # end or copying it.  The header's first CRLF CRLF is where it was
                    # the first time, since the octets before it are the same.
                    pos += len(last)
                    self._scan_from = 0
                    self._header, self._header_error = self._last_header
                if self._header is None:
                    end = buf.find(b"\r\n\r\n", max(pos, self._scan_from - 3))
                    if end < 0:
                        # the last octets may be the start of the CRLF CRLF: not header
                        if len(buf) - pos - _partial_terminator(buf) > MAX_HEADER_BYTES:
                            self._broken = True
                            yield bad_request(f"content header larger than {MAX_HEADER_BYTES} octets")
                            return
                        self._scan_from = len(buf)
                        return
                    if end - pos > MAX_HEADER_BYTES:
                        self._broken = True
                        yield bad_request(f"content header larger than {MAX_HEADER_BYTES} octets")
                        return
                    block = bytes(buf[pos:end])
                    pos = end + 4
                    self._scan_from = 0
                    parsed = parse_content_header(block, self._max)
                    if isinstance(parsed, WireError):
                        self._broken = True
                        yield parsed
                        return
                    self._header = parsed
                    self._header_error = self._check_type(parsed)
                    self._last_framed, self._last_header = block + b"\r\n\r\n", (parsed, self._header_error)
                header = self._header
                assert header.content_length is not None
                need = header.content_length + 4
                if len(buf) - pos < need:
                    return
                body_end = pos + header.content_length
                if not buf.startswith(b"\r\n\r\n", body_end):
                    self._broken = True
                    yield bad_request("alert body is not followed by CRLF CRLF (wrong Content-Length?)")
                    return
                body = bytes(buf[pos:body_end])
                pos += need
                self._header = None
                if self._header_error is not None:
                    yield Refused(self._header_error)
                else:
                    assert header.content_type is not None
                    yield Content(header.content_type, body)
        finally:
            if pos:
                del buf[:pos]
                if self._scan_from:
                    self._scan_from = max(0, self._scan_from - pos)

    def _check_type(self, header: ContentHeader) -> WireError | None:
        if header.content_type is None:
            return bad_request("Content-Type is missing", fatal=False)
        if media_type(header.content_type) not in self._accepted:
            return WireError(415, f"content type {header.content_type!r} is not accepted", fatal=False)
        return None
