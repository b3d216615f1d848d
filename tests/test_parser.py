"""
Tests of the sans-IO wire layer: L{iapd.parser}, L{iapd.messages}, L{iapd.errors}.

Grammar: draft sections 5.2-5.4; status codes and limits: DESIGN.md section 2.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iapd.errors import WireError
from iapd.messages import (
    IDEF_ALERT,
    ConnectRequest,
    Content,
    ContentHeader,
    Response,
    UpgradeRequest,
    VersionVerify,
    ok,
    status,
)
from iapd.parser import (
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    MAX_LINE,
    MAX_SETUP_LINES,
    ContentReader,
    Refused,
    media_type,
    parse_content_header,
    parse_setup,
)

ACCEPTED = frozenset({IDEF_ALERT})
LIMIT = 1 << 20
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------
# helpers


def split_block(data: bytes) -> list[bytes]:
    """The lines of one setup message as LineReceiver hands them over."""
    assert data.endswith(b"\r\n\r\n"), data
    lines = data.split(b"\r\n")
    # a block ends with CRLF CRLF: the split leaves two trailing empty strings
    assert lines[-2:] == [b"", b""], lines
    return lines[:-2]


def setup(*lines: bytes | str) -> object:
    return parse_setup([line.encode("ascii") if isinstance(line, str) else line for line in lines])


def assert_400(result: object) -> None:
    assert isinstance(result, WireError), result
    assert result.code == 400, result
    assert result.fatal is True, result


def reader(limit: int = LIMIT, accepted: frozenset[str] = ACCEPTED) -> ContentReader:
    return ContentReader(limit, accepted)


def feed_all(r: ContentReader, *chunks: bytes) -> list[object]:
    events: list[object] = []
    for chunk in chunks:
        events.extend(r.feed(chunk))
    return events


def header_bytes(*lines: str, body: bytes = b"") -> bytes:
    return "".join(line + "\r\n" for line in lines).encode("ascii") + b"\r\n" + body + b"\r\n\r\n"


def alert(body: bytes, content_type: str = IDEF_ALERT) -> bytes:
    return Content(content_type, body).to_bytes()


def one_error(events: list[object], code: int) -> WireError:
    assert len(events) == 1, events
    event = events[0]
    assert isinstance(event, WireError), event
    assert event.code == code, event
    assert event.fatal is True, event
    return event


def header_error(block: bytes, code: int = 400, limit: int = LIMIT) -> None:
    result = parse_content_header(block, limit)
    assert isinstance(result, WireError), result
    assert result.code == code, result
    assert result.fatal is True, result
    # the same header inside a whole stream stops the reader with the same code
    r = reader(limit)
    one_error(feed_all(r, block + b"\r\n\r\n" + b"x" * 3 + b"\r\n\r\n"), code)
    assert feed_all(r, alert(b"next")) == []


# ---------------------------------------------------------------------------
# strategies

versions = st.builds(lambda a, b: f"IAP/{a}.{b}", st.integers(0, 999), st.integers(0, 999))
dns_hosts = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9.\-]{0,30}[A-Za-z0-9])?\.?", fullmatch=True)
ipv6_hosts = st.from_regex(r"\[[0-9A-Fa-f:.]{2,45}\]", fullmatch=True)
hosts = st.one_of(dns_hosts, ipv6_hosts)
tokens = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)
iap_versions = st.builds(lambda a, b: f"{a}.{b}", st.integers(0, 999), st.integers(0, 999))

connects = st.builds(
    ConnectRequest, versions, hosts, st.lists(hosts, max_size=MAX_SETUP_LINES - 1).map(tuple)
)
responses = st.builds(Response, versions, st.integers(100, 599))
upgrades = st.builds(UpgradeRequest, versions, tokens)
verifies = st.builds(VersionVerify, versions, iap_versions, st.booleans())
setup_messages = st.one_of(connects, responses, upgrades, verifies)

# bodies rich in what trips naive framing: CRLF, CRLF CRLF, 0xFF, NUL
body_pieces = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"\r\n", b"\r\n\r\n", b"\r", b"\n", b"\xff" * 64, b"\x00", b"Content-Length: 9\r\n\r\n"]),
)
bodies = st.lists(body_pieces, max_size=6).map(b"".join)
content_types = st.sampled_from(
    [IDEF_ALERT, "application/x-idef-alert; charset=utf-8", "Application/X-IDEF-Alert"]
)
contents = st.builds(Content, content_types, bodies)


# ---------------------------------------------------------------------------
# serialisation: exact bytes of the draft's forms (draft 5.3, 5.4)


def test_connect_bytes_exact() -> None:
    assert ConnectRequest("IAP/0.2", "M.DOM.ORG").to_bytes() == b"IAP/0.2 CONNECT M.DOM.ORG\r\n\r\n"
    assert (
        ConnectRequest("IAP/0.2", "M.DOM.ORG", ("P.DOM.ORG",)).to_bytes()
        == b"IAP/0.2 CONNECT M.DOM.ORG\r\nIAP/0.2 VIA P.DOM.ORG\r\n\r\n"
    )
    assert (
        ConnectRequest("IAP/0.2", "M.DOM.ORG", ("P1.DOM.ORG", "P2.DOM.ORG")).to_bytes()
        == b"IAP/0.2 CONNECT M.DOM.ORG\r\nIAP/0.2 VIA P1.DOM.ORG\r\nIAP/0.2 VIA P2.DOM.ORG\r\n\r\n"
    )


def test_response_bytes_exact_without_reason_phrase() -> None:
    assert Response("IAP/0.2", 200).to_bytes() == b"IAP/0.2 200\r\n\r\n"
    assert Response("IAP/0.2", 101).to_bytes() == b"IAP/0.2 101\r\n\r\n"
    # a reason phrase that was received is never emitted
    assert Response("IAP/0.2", 403, "Forbidden").to_bytes() == b"IAP/0.2 403\r\n\r\n"
    assert ok() == b"IAP/0.2 200\r\n\r\n"
    assert status(505) == b"IAP/0.2 505\r\n\r\n"
    assert status(415, "IAP/0.3") == b"IAP/0.3 415\r\n\r\n"


def test_upgrade_bytes_exact() -> None:
    assert UpgradeRequest("IAP/0.2").to_bytes() == b"IAP/0.2 Upgrade: TLS/1.0\r\n\r\n"


def test_verify_bytes_exact() -> None:
    assert (
        VersionVerify("IAP/0.2", "0.2", sender=True).to_bytes()
        == b"IAP/0.2 IAP-Version: 0.2\r\nIAP-Role: Sender\r\n\r\n"
    )
    assert VersionVerify("IAP/0.2", "0.2").to_bytes() == b"IAP/0.2 IAP-Version: 0.2\r\n\r\n"


def test_content_bytes_exact_draft_example() -> None:
    # draft 5.4: 64 octets of 0xFF
    body = b"\xff" * 64
    assert Content(IDEF_ALERT, body).to_bytes() == (
        b"Content-Type: application/x-idef-alert\r\nContent-Length: 64\r\n\r\n" + body + b"\r\n\r\n"
    )


def test_draft_transcript_parses() -> None:
    """Every setup block of the draft 5.4 transcript parses to the expected value."""
    transcript = [
        (b"IAP/0.2 CONNECT M.DOM.ORG\r\n\r\n", ConnectRequest("IAP/0.2", "M.DOM.ORG")),
        (
            b"IAP/0.2 CONNECT M.DOM.ORG\r\nIAP/0.2 VIA P.DOM.ORG\r\n\r\n",
            ConnectRequest("IAP/0.2", "M.DOM.ORG", ("P.DOM.ORG",)),
        ),
        (b"IAP/0.2 200\r\n\r\n", Response("IAP/0.2", 200)),
        (b"IAP/0.2 Upgrade: TLS/1.0\r\n\r\n", UpgradeRequest("IAP/0.2", "TLS/1.0")),
        (b"IAP/0.2 101\r\n\r\n", Response("IAP/0.2", 101)),
        (
            b"IAP/0.2 IAP-Version: 0.2\r\nIAP-Role: Sender\r\n\r\n",
            VersionVerify("IAP/0.2", "0.2", True),
        ),
        (b"IAP/0.2 IAP-Version: 0.2\r\n\r\n", VersionVerify("IAP/0.2", "0.2", False)),
    ]
    for data, expected in transcript:
        assert parse_setup(split_block(data)) == expected


def test_draft_example_content_parses() -> None:
    data = b"Content-Type: application/x-idef-alert\r\nContent-Length: 64\r\n\r\n" + b"\xff" * 64 + b"\r\n\r\n"
    assert feed_all(reader(), data) == [Content(IDEF_ALERT, b"\xff" * 64)]


# ---------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize(
    "message",
    [
        ConnectRequest("IAP/0.2", "M.DOM.ORG"),
        ConnectRequest("IAP/0.2", "M.DOM.ORG", ("P.DOM.ORG", "Q.DOM.ORG")),
        ConnectRequest("IAP/0.2", "192.0.2.7", ("[2001:db8::1]",)),
        ConnectRequest("IAP/0.2", "manager.test."),
        Response("IAP/0.2", 200),
        Response("IAP/0.2", 101),
        Response("IAP/0.2", 505),
        UpgradeRequest("IAP/0.2"),
        VersionVerify("IAP/0.2", "0.2", True),
        VersionVerify("IAP/0.2", "0.2", False),
    ],
)
def test_setup_round_trip_examples(message: object) -> None:
    assert parse_setup(split_block(message.to_bytes())) == message  # type: ignore[attr-defined]


@PROPERTY
@given(setup_messages)
def test_setup_round_trip_property(message: object) -> None:
    assert parse_setup(split_block(message.to_bytes())) == message  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "message",
    [
        Content(IDEF_ALERT, b""),
        Content(IDEF_ALERT, b"\xff" * 64),
        Content(IDEF_ALERT, b"\r\n\r\n"),
        Content(IDEF_ALERT, b"<alert/>\r\n\r\nContent-Length: 3\r\n\r\n"),
        Content("application/x-idef-alert; charset=utf-8", b"x"),
    ],
)
def test_content_round_trip_examples(message: Content) -> None:
    assert feed_all(reader(), message.to_bytes()) == [message]


@PROPERTY
@given(contents)
def test_content_round_trip_property(message: Content) -> None:
    assert feed_all(reader(), message.to_bytes()) == [message]


# ---------------------------------------------------------------------------
# parse_setup: accepted forms


def test_response_with_reason_phrase() -> None:
    assert setup("IAP/0.2 403 Forbidden") == Response("IAP/0.2", 403, "Forbidden")
    assert setup("IAP/0.2 505 Version Not Supported") == Response("IAP/0.2", 505, "Version Not Supported")
    assert setup("IAP/0.2 200") == Response("IAP/0.2", 200)


def test_other_version_is_syntactically_accepted() -> None:
    # the role answers 505, not 400
    assert setup("IAP/0.3 CONNECT x") == ConnectRequest("IAP/0.3", "x")
    assert setup("IAP/1.0 CONNECT x", "IAP/1.0 VIA y") == ConnectRequest("IAP/1.0", "x", ("y",))
    assert setup("IAP/0.3 IAP-Version: 0.3") == VersionVerify("IAP/0.3", "0.3", False)


def test_connect_with_max_via_lines() -> None:
    lines = ["IAP/0.2 CONNECT m"] + [f"IAP/0.2 VIA p{i}" for i in range(MAX_SETUP_LINES - 1)]
    result = setup(*lines)
    assert isinstance(result, ConnectRequest)
    assert len(result.via) == MAX_SETUP_LINES - 1


def test_line_of_exactly_max_length_accepted() -> None:
    line = "IAP/0.2 403 "
    line += "x" * (MAX_LINE - len(line))
    assert len(line) == MAX_LINE
    assert setup(line) == Response("IAP/0.2", 403, line[12:])


# ---------------------------------------------------------------------------
# parse_setup: rejected forms (400)


@pytest.mark.parametrize(
    "lines",
    [
        [],
        [b""],
        [b"garbage"],
        [b"GET / HTTP/1.1"],
        [b"HTTP/1.1 200 OK"],
        [b"IAP/0.2"],
        [b"IAP/0.2 CONNECT"],
        [b"IAP/0.2 CONNECT "],
        [b"iap/0.2 CONNECT m"],
        [b"IAP/0.2 connect m"],
        [b"IAP/0.2  CONNECT m"],
        [b"IAP/0.2 CONNECT m "],
        [b"IAP/0.2 CONNECT  m"],
        [b"IAP/0.2 CONNECT m\r"],
        [b"IAP/0.2 VIA m"],
        [b"IAP/0.2 20"],
        [b"IAP/0.2 2000"],
        [b"IAP/0.2 600"],
        [b"IAP/0.2 099"],
        [b"IAP/0.2 Upgrade:"],
        [b"IAP/0.2 IAP-Version: x"],
        [b"IAP-Role: Sender"],
        [b"IAP/0.2 IAP-Version: 0.2", b"IAP-Role: Receiver"],
        [b"IAP/0.2 IAP-Version: 0.2", b"IAP-Role: Sender", b"IAP-Role: Sender"],
    ],
)
def test_garbage_rejected(lines: list[bytes]) -> None:
    assert_400(parse_setup(lines))


@pytest.mark.parametrize(
    "line",
    [
        "IAP/0.2 CONNECT m\u00e9.org".encode("utf-8"),
        b"IAP/0.2 CONNECT m\xff",
        b"IAP/0.2 200 \xe2\x9c\x93",
        b"\xef\xbb\xbfIAP/0.2 200",
    ],
)
def test_non_ascii_rejected(line: bytes) -> None:
    assert_400(parse_setup([line]))


@pytest.mark.parametrize(
    "line",
    [
        b"IAP/0.2 CONNECT m\x00",
        b"IAP/0.2 200\tOK",
        b"IAP/0.2 200 OK\x7f",
        b"IAP/0.2 200 \x1b[31mOK",
        b"IAP/0.2 CONNECT m\rx",
        b"IAP/0.2 CONNECT m\nIAP/0.2 VIA x",
    ],
)
def test_control_characters_rejected(line: bytes) -> None:
    assert_400(parse_setup([line]))


def test_control_character_in_later_line_rejected() -> None:
    assert_400(setup("IAP/0.2 CONNECT m", b"IAP/0.2 VIA p\x00"))


def test_long_line_rejected() -> None:
    line = "IAP/0.2 403 "
    line += "x" * (MAX_LINE + 1 - len(line))
    assert len(line) == MAX_LINE + 1
    assert_400(setup(line))
    assert_400(setup("IAP/0.2 CONNECT m", b"IAP/0.2 VIA " + b"a" * MAX_LINE))


def test_too_many_lines_rejected() -> None:
    lines = ["IAP/0.2 CONNECT m"] + [f"IAP/0.2 VIA p{i}" for i in range(MAX_SETUP_LINES)]
    assert len(lines) == MAX_SETUP_LINES + 1
    assert_400(setup(*lines))


@pytest.mark.parametrize(
    "via",
    ["IAP/0.3 VIA p", "IAP/1.2 VIA p", "IAP/0.2 VIA p", "IAP/0.20 VIA p"],
)
def test_via_version_mismatch_rejected(via: str) -> None:
    connect = "IAP/0.2 CONNECT m" if via != "IAP/0.2 VIA p" else "IAP/0.3 CONNECT m"
    assert_400(setup(connect, via))


def test_via_mismatch_later_in_chain_rejected() -> None:
    assert_400(setup("IAP/0.2 CONNECT m", "IAP/0.2 VIA p", "IAP/0.3 VIA q"))


@pytest.mark.parametrize(
    "extra",
    ["", "IAP/0.2 200", "IAP-Role: Sender", "IAP/0.2 VIA p", "X"],
)
def test_extra_lines_after_response_or_upgrade_rejected(extra: str) -> None:
    assert_400(setup("IAP/0.2 200", extra))
    assert_400(setup("IAP/0.2 403 Forbidden", extra))
    assert_400(setup("IAP/0.2 Upgrade: TLS/1.0", extra))


def test_extra_lines_in_connect_rejected() -> None:
    assert_400(setup("IAP/0.2 CONNECT m", ""))
    assert_400(setup("IAP/0.2 CONNECT m", "IAP/0.2 200"))
    assert_400(setup("IAP/0.2 CONNECT m", "IAP/0.2 CONNECT n"))


@pytest.mark.parametrize(
    "host",
    [
        "",
        " ",
        "m dom.org",
        "m.dom.org extra",
        "_m.dom.org",
        "_",
        "-m.dom.org",
        "m.dom.org-",
        ".m.dom.org",
        "m/dom",
        "m:80",
        "m@dom",
        "[]",
        "[xyz]",
        "a" * 300,
    ],
)
def test_bad_hosts_rejected(host: str) -> None:
    assert_400(setup(f"IAP/0.2 CONNECT {host}"))
    assert_400(setup("IAP/0.2 CONNECT m", f"IAP/0.2 VIA {host}"))


@pytest.mark.parametrize("host", ["m", "M.DOM.ORG", "m.dom.org.", "10.0.0.1", "[::1]", "a-b.c-d.e", "9"])
def test_good_hosts_accepted(host: str) -> None:
    assert setup(f"IAP/0.2 CONNECT {host}") == ConnectRequest("IAP/0.2", host)
    assert setup("IAP/0.2 CONNECT m", f"IAP/0.2 VIA {host}") == ConnectRequest("IAP/0.2", "m", (host,))


# ---------------------------------------------------------------------------
# parse_content_header


def test_content_header_parses() -> None:
    assert parse_content_header(
        b"Content-Type: application/x-idef-alert\r\nContent-Length: 64", LIMIT
    ) == ContentHeader(IDEF_ALERT, 64)
    # order does not matter, unknown fields are ignored
    assert parse_content_header(
        b"X-Extra: 1\r\nContent-Length: 0\r\nContent-Type: application/x-idef-alert", LIMIT
    ) == ContentHeader(IDEF_ALERT, 0)


def test_content_header_field_names_case_insensitive() -> None:
    assert parse_content_header(
        b"content-type: application/x-idef-alert\r\nCONTENT-LENGTH: 3", LIMIT
    ) == ContentHeader(IDEF_ALERT, 3)
    assert parse_content_header(b"cOnTeNt-TyPe: a/b\r\ncontent-length: 3", LIMIT) == ContentHeader("a/b", 3)


def test_content_header_whitespace_around_value() -> None:
    assert parse_content_header(
        b"Content-Type:application/x-idef-alert\r\nContent-Length:\t 7 \t", LIMIT
    ) == ContentHeader(IDEF_ALERT, 7)


def test_missing_content_length_411() -> None:
    header_error(b"Content-Type: application/x-idef-alert", 411)
    header_error(b"X-Other: 1", 411)
    # an empty header block: CRLF CRLF at the very start of the data phase
    result = parse_content_header(b"", LIMIT)
    assert isinstance(result, WireError) and result.code == 411 and result.fatal


def test_content_length_over_limit_413() -> None:
    header_error(b"Content-Type: application/x-idef-alert\r\nContent-Length: 101", 413, limit=100)
    header_error(b"Content-Type: application/x-idef-alert\r\nContent-Length: 9999999999999999999", 413)
    # exactly the limit is accepted
    assert parse_content_header(b"Content-Length: 100", 100) == ContentHeader(None, 100)


@pytest.mark.parametrize(
    "value",
    [b"", b"abc", b"12a", b"0x10", b"1 2", b"-1", b"-0", b"+1", b"+0", b"1.0", b"1e3", b"99999999999999999999", b"0" * 20],
)
def test_invalid_content_length_400(value: bytes) -> None:
    header_error(b"Content-Type: application/x-idef-alert\r\nContent-Length: " + value)


def test_duplicate_content_length_400_even_if_equal() -> None:
    header_error(b"Content-Type: application/x-idef-alert\r\nContent-Length: 3\r\nContent-Length: 3")
    header_error(b"Content-Length: 3\r\nContent-Type: application/x-idef-alert\r\ncontent-length: 3")
    header_error(b"Content-Length: 3\r\nContent-Length: 4\r\nContent-Type: application/x-idef-alert")


def test_duplicate_content_type_400() -> None:
    header_error(b"Content-Type: application/x-idef-alert\r\nContent-Type: application/x-idef-alert\r\nContent-Length: 3")
    header_error(b"Content-Type: application/x-idef-alert\r\nCONTENT-TYPE: text/plain\r\nContent-Length: 3")


@pytest.mark.parametrize(
    "line",
    [
        b"Content-Length 3",
        b"Content-Length : 3",
        b" Content-Length: 3",
        b"Content Length: 3",
        b": 3",
        b"X-Bad: \x00",
        b"X-Bad: \xff",
        b"X-Bad: a\rb",
        b"X-Bad: a\nb",
        b"\tfolded",
        b"",
    ],
)
def test_malformed_header_line_400(line: bytes) -> None:
    block = b"Content-Type: application/x-idef-alert\r\n" + line + b"\r\nContent-Length: 3"
    result = parse_content_header(block, LIMIT)
    assert isinstance(result, WireError) and result.code == 400 and result.fatal, (line, result)


def test_header_line_longer_than_max_line_400() -> None:
    long_line = b"X-Pad: " + b"p" * (MAX_LINE - 6)
    assert len(long_line) == MAX_LINE + 1
    header_error(b"Content-Type: application/x-idef-alert\r\n" + long_line + b"\r\nContent-Length: 3")


def test_header_count_limit() -> None:
    base = [b"Content-Type: application/x-idef-alert", b"Content-Length: 3"]
    pad = [b"X-Pad-%d: v" % i for i in range(MAX_HEADERS - 2)]
    assert parse_content_header(b"\r\n".join(base + pad), LIMIT) == ContentHeader(IDEF_ALERT, 3)
    header_error(b"\r\n".join(base + pad + [b"X-One-Too-Many: v"]))


def test_media_type() -> None:
    assert media_type("application/x-idef-alert") == IDEF_ALERT
    assert media_type("Application/X-IDEF-Alert ; charset=utf-8") == IDEF_ALERT
    assert media_type("  text/plain;q=1") == "text/plain"


# ---------------------------------------------------------------------------
# ContentReader


def test_reader_multiple_messages_in_one_feed() -> None:
    data = alert(b"one") + alert(b"") + alert(b"\xff\r\n\r\n")
    assert feed_all(reader(), data) == [
        Content(IDEF_ALERT, b"one"),
        Content(IDEF_ALERT, b""),
        Content(IDEF_ALERT, b"\xff\r\n\r\n"),
    ]


def test_reader_byte_at_a_time() -> None:
    data = alert(b"\xff" * 64) + alert(b"two\r\n\r\nlines")
    r = reader()
    events = feed_all(r, *(data[i : i + 1] for i in range(len(data))))
    assert events == [Content(IDEF_ALERT, b"\xff" * 64), Content(IDEF_ALERT, b"two\r\n\r\nlines")]
    assert r.buffered == 0


def test_reader_content_type_parameters_accepted() -> None:
    ct = "application/x-idef-alert; charset=utf-8"
    assert feed_all(reader(), alert(b"<a/>", ct)) == [Content(ct, b"<a/>")]
    ct = "APPLICATION/X-IDEF-ALERT;charset=\"utf-8\""
    assert feed_all(reader(), alert(b"<a/>", ct)) == [Content(ct, b"<a/>")]


def test_reader_case_insensitive_field_names() -> None:
    data = header_bytes("content-length: 2", "CONTENT-TYPE: application/x-idef-alert", body=b"ok")
    assert feed_all(reader(), data) == [Content(IDEF_ALERT, b"ok")]


def test_reader_unknown_type_refused_415_and_next_parses() -> None:
    r = reader()
    events = feed_all(r, alert(b"<html/>", "text/html") + alert(b"next"))
    assert len(events) == 2, events
    refused, content = events
    assert isinstance(refused, Refused)
    assert refused.error.code == 415
    assert refused.error.fatal is False
    assert content == Content(IDEF_ALERT, b"next")
    # and the reader keeps going on later feeds
    assert feed_all(r, alert(b"third")) == [Content(IDEF_ALERT, b"third")]


def test_reader_unknown_type_refused_split_feeds() -> None:
    data = alert(b"\r\n\r\n" * 5, "application/json") + alert(b"next")
    r = reader()
    events = feed_all(r, *(data[i : i + 3] for i in range(0, len(data), 3)))
    assert [type(e) for e in events] == [Refused, Content]
    assert events[0].error.code == 415  # type: ignore[union-attr]
    assert events[1] == Content(IDEF_ALERT, b"next")


def test_reader_missing_type_refused_400_non_fatal() -> None:
    r = reader()
    events = feed_all(r, header_bytes("Content-Length: 3", body=b"abc") + alert(b"next"))
    assert len(events) == 2, events
    assert isinstance(events[0], Refused)
    assert events[0].error.code == 400
    assert events[0].error.fatal is False
    assert events[1] == Content(IDEF_ALERT, b"next")


def test_reader_empty_type_refused_400_non_fatal() -> None:
    events = feed_all(reader(), header_bytes("Content-Type:", "Content-Length: 1", body=b"a") + alert(b"n"))
    assert isinstance(events[0], Refused) and events[0].error.code == 400 and not events[0].error.fatal
    assert events[1:] == [Content(IDEF_ALERT, b"n")]


def test_reader_missing_length_411_fatal() -> None:
    r = reader()
    one_error(feed_all(r, header_bytes("Content-Type: application/x-idef-alert", body=b"")), 411)
    assert feed_all(r, alert(b"x")) == []


def test_reader_over_limit_413_fatal() -> None:
    r = reader(limit=10)
    assert feed_all(r, alert(b"0123456789")) == [Content(IDEF_ALERT, b"0123456789")]
    one_error(feed_all(r, alert(b"0123456789A")), 413)
    assert feed_all(r, alert(b"x")) == []


def test_reader_body_not_followed_by_crlf_crlf_fatal() -> None:
    # Content-Length one short, one long, and a body terminated by a single CRLF
    for data in (
        header_bytes("Content-Type: application/x-idef-alert", "Content-Length: 3", body=b"abcd"),
        header_bytes("Content-Type: application/x-idef-alert", "Content-Length: 5", body=b"abcd") + b"XX",
        b"Content-Type: application/x-idef-alert\r\nContent-Length: 4\r\n\r\nabcd\r\nXX",
    ):
        r = reader()
        one_error(feed_all(r, data), 400)
        assert feed_all(r, alert(b"x")) == []


def test_reader_body_not_followed_by_crlf_crlf_fatal_when_split() -> None:
    data = header_bytes("Content-Type: application/x-idef-alert", "Content-Length: 3", body=b"abcd")
    r = reader()
    events = feed_all(r, *(data[i : i + 1] for i in range(len(data))))
    one_error(events, 400)


def test_reader_malformed_header_fatal() -> None:
    r = reader()
    events = feed_all(r, b"this is not a header\r\n\r\n" + alert(b"x"))
    one_error(events, 400)
    assert feed_all(r, alert(b"y")) == []


def test_reader_too_many_headers_fatal() -> None:
    lines = ["Content-Type: application/x-idef-alert", "Content-Length: 1"]
    lines += [f"X-Pad-{i}: v" for i in range(MAX_HEADERS - 1)]
    r = reader()
    one_error(feed_all(r, header_bytes(*lines, body=b"a")), 400)
    assert feed_all(r, alert(b"y")) == []


def test_reader_duplicate_content_length_fatal() -> None:
    data = header_bytes("Content-Length: 1", "Content-Type: application/x-idef-alert", "Content-Length: 1", body=b"a")
    r = reader()
    one_error(feed_all(r, data), 400)
    assert feed_all(r, alert(b"y")) == []


def test_reader_oversize_header_without_terminator_fatal() -> None:
    r = reader()
    # exactly the bound without a terminator: still waiting
    assert feed_all(r, b"X-Pad: " + b"p" * (MAX_HEADER_BYTES - 7)) == []
    assert r.buffered == MAX_HEADER_BYTES
    # one more octet: framing is lost
    one_error(feed_all(r, b"p"), 400)
    held = r.buffered
    # the reader stops: nothing more is parsed or buffered
    assert feed_all(r, alert(b"x")) == []
    assert feed_all(r, b"a" * 100_000) == []
    assert r.buffered == held


def test_reader_oversize_header_in_one_chunk_fatal() -> None:
    r = reader()
    one_error(feed_all(r, b"z" * (MAX_HEADER_BYTES * 4)), 400)
    assert feed_all(r, alert(b"x")) == []


def _padded_header(block_size: int, body: bytes) -> tuple[bytes, int]:
    """A valid header block of exactly C{block_size} octets (lines within MAX_LINE)."""
    lines = [b"Content-Type: application/x-idef-alert", b"Content-Length: %d" % len(body)]
    size = sum(map(len, lines)) + 2 * (len(lines) - 1)
    while size < block_size:
        room = block_size - size - 2  # CRLF before the new line
        n = min(room, MAX_LINE) - 7
        if n < 1:
            # too little room for a new line: grow the previous padding line instead
            lines[-1] += b"q" * (block_size - size)
            size = block_size
            break
        lines.append(b"X-Pad: " + b"p" * n)
        size += 2 + 7 + n
    block = b"\r\n".join(lines)
    assert len(block) == block_size
    assert len(lines) <= MAX_HEADERS and max(map(len, lines)) <= MAX_LINE
    return block, len(block)


def test_reader_header_block_of_exactly_max_bytes_accepted_whole() -> None:
    block, _ = _padded_header(MAX_HEADER_BYTES, b"abc")
    data = block + b"\r\n\r\nabc\r\n\r\n"
    assert feed_all(reader(), data) == [Content(IDEF_ALERT, b"abc")]


def test_reader_header_block_over_max_bytes_rejected() -> None:
    block, _ = _padded_header(MAX_HEADER_BYTES + 1, b"abc")
    data = block + b"\r\n\r\nabc\r\n\r\n"
    one_error(feed_all(reader(), data), 400)


@pytest.mark.parametrize("size", [MAX_HEADER_BYTES - 2, MAX_HEADER_BYTES - 1, MAX_HEADER_BYTES])
@pytest.mark.parametrize("cut", [1, 2, 3])
def test_reader_header_bound_independent_of_chunking(size: int, cut: int) -> None:
    """
    A header block within the bound is accepted whether or not its CRLF CRLF arrives
    split across feeds (a TCP segment boundary is not the peer's choice).
    """
    block, n = _padded_header(size, b"abc")
    data = block + b"\r\n\r\nabc\r\n\r\n"
    assert feed_all(reader(), data) == [Content(IDEF_ALERT, b"abc")]
    assert feed_all(reader(), data[: n + cut], data[n + cut :]) == [Content(IDEF_ALERT, b"abc")]


def test_reader_buffered_tracks_incomplete_message() -> None:
    r = reader()
    data = alert(b"x" * 100)
    assert feed_all(r, data[:50]) == []
    assert r.buffered == 50
    assert feed_all(r, data[50:] + data[:10]) == [Content(IDEF_ALERT, b"x" * 100)]
    assert r.buffered == 10


def test_feed_empty_bytes() -> None:
    r = reader()
    assert feed_all(r, b"") == []
    assert feed_all(r, alert(b"a"), b"") == [Content(IDEF_ALERT, b"a")]
    assert r.buffered == 0


# ---------------------------------------------------------------------------
# hypothesis properties

setup_line = st.one_of(
    st.binary(max_size=60),
    st.sampled_from(
        [
            b"IAP/0.2 CONNECT m",
            b"IAP/0.2 VIA p",
            b"IAP/0.3 VIA p",
            b"IAP/0.2 200",
            b"IAP/0.2 Upgrade: TLS/1.0",
            b"IAP/0.2 IAP-Version: 0.2",
            b"IAP-Role: Sender",
            b"",
            b"x" * (MAX_LINE + 1),
        ]
    ),
)


@PROPERTY
@given(st.lists(setup_line, max_size=MAX_SETUP_LINES + 3))
def test_parse_setup_total(lines: list[bytes]) -> None:
    result = parse_setup(lines)
    if isinstance(result, WireError):
        assert result.code == 400
        assert result.fatal is True
        str(result)
    else:
        assert isinstance(result, (ConnectRequest, Response, UpgradeRequest, VersionVerify))
        # whatever is accepted is serialisable and stable
        assert parse_setup(split_block(result.to_bytes())) == (
            result if not isinstance(result, Response) else Response(result.version, result.code)
        )


stream_piece = st.one_of(
    st.binary(max_size=80),
    st.sampled_from(
        [
            b"\r\n",
            b"\r\n\r\n",
            b"Content-Length: 3\r\n",
            b"Content-Length: 99999\r\n",
            b"Content-Length: -1\r\n",
            b"Content-Type: application/x-idef-alert\r\n",
            b"Content-Type: text/plain\r\n",
            b"abc\r\n\r\n",
        ]
    ),
    contents.map(Content.to_bytes),
)


@PROPERTY
@given(st.lists(stream_piece, max_size=30), st.lists(st.integers(0, 2000), max_size=10))
def test_reader_total(pieces: list[bytes], cuts: list[int]) -> None:
    data = b"".join(pieces)
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    r = reader(limit=1000)
    events: list[object] = []
    for a, b in zip(points, points[1:]):
        events.extend(r.feed(data[a:b]))
    for i, event in enumerate(events):
        assert isinstance(event, (Content, Refused, WireError)), event
        if isinstance(event, WireError):
            assert event.code in {400, 411, 413}, event
            assert event.fatal is True
            # a fatal error is the last event
            assert i == len(events) - 1
        elif isinstance(event, Refused):
            assert event.error.code in {400, 415}, event
            assert event.error.fatal is False
        else:
            assert media_type(event.content_type) in ACCEPTED


@PROPERTY
@given(st.lists(contents, min_size=1, max_size=8), st.data())
def test_reader_chunking_invariance(messages: list[Content], data: st.DataObject) -> None:
    stream = b"".join(m.to_bytes() for m in messages)
    whole = feed_all(reader(), stream)
    assert whole == messages
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="cuts")
    points = sorted(set(cuts) | {0, len(stream)})
    r = reader()
    split = feed_all(r, *(stream[a:b] for a, b in zip(points, points[1:])))
    assert split == whole
    assert r.buffered == 0


@PROPERTY
@given(
    st.lists(
        st.one_of(contents, st.builds(Content, st.sampled_from(["text/plain", "image/png"]), bodies)),
        min_size=1,
        max_size=8,
    ),
    st.data(),
)
def test_reader_chunking_invariance_with_refusals(messages: list[Content], data: st.DataObject) -> None:
    stream = b"".join(m.to_bytes() for m in messages)
    whole = feed_all(reader(), stream)
    assert len(whole) == len(messages)
    for event, message in zip(whole, messages):
        if media_type(message.content_type) in ACCEPTED:
            assert event == message
        else:
            assert isinstance(event, Refused) and event.error.code == 415
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="cuts")
    points = sorted(set(cuts) | {0, len(stream)})
    assert feed_all(reader(), *(stream[a:b] for a, b in zip(points, points[1:]))) == whole


def _no_terminator(data: bytes) -> bytes:
    while b"\r\n\r\n" in data:
        data = data.replace(b"\r\n\r\n", b"\r\n")
    return data


@PROPERTY
@given(
    st.lists(
        st.one_of(st.binary(max_size=3000), st.sampled_from([b"\r\n", b"\r", b"\n", b"\r\n\r"])),
        min_size=1,
        max_size=20,
    )
)
def test_reader_memory_bounded_on_garbage(chunks: list[bytes]) -> None:
    # no CRLF CRLF anywhere in the stream, not even across chunk boundaries
    stream = _no_terminator(b"".join(chunks))
    r = reader()
    pos = 0
    broken_at: int | None = None
    for chunk in chunks:
        piece = stream[pos : pos + len(chunk)]
        pos += len(piece)
        before = r.buffered
        events = list(r.feed(piece))
        if broken_at is None:
            if events:
                one_error(events, 400)
                broken_at = r.buffered
                assert broken_at <= before + len(piece)
            else:
                assert r.buffered <= MAX_HEADER_BYTES
        else:
            # after a fatal error: no events, and the buffer stops growing
            assert events == []
            assert r.buffered == broken_at
    if pos > MAX_HEADER_BYTES:
        assert broken_at is not None
    else:
        assert broken_at is None


@PROPERTY
@given(st.lists(stream_piece, max_size=30), st.lists(st.integers(0, 3000), max_size=15))
def test_reader_memory_bounded_general(pieces: list[bytes], cuts: list[int]) -> None:
    """While the reader is framed it holds at most one incomplete message."""
    limit = 1000
    data = b"".join(pieces)
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    r = reader(limit=limit)
    broken = False
    held = 0
    for a, b in zip(points, points[1:]):
        events = list(r.feed(data[a:b]))
        if broken:
            assert events == [] and r.buffered == held
            continue
        if any(isinstance(e, WireError) for e in events):
            broken, held = True, r.buffered
            continue
        # an incomplete header (bounded) or an incomplete body of at most limit + 4 octets
        assert r.buffered <= max(MAX_HEADER_BYTES, limit + 3)


def _reference_events(data: bytes, limit: int) -> list[tuple[object, ...]]:
    """
    The data phase of a whole stream, parsed the plain way: every header searched for
    and parsed anew.  L{ContentReader} recognises a repeated header in place and reads
    in pieces; whatever it does, it must find what this finds.
    """
    events: list[tuple[object, ...]] = []
    pos = 0
    while True:
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            tail = len(data) - pos - next((n for n in (3, 2, 1) if data.endswith(b"\r\n\r\n"[:n])), 0)
            if tail > MAX_HEADER_BYTES:
                events.append(("fatal", 400))
            return events
        if end - pos > MAX_HEADER_BYTES:
            return events + [("fatal", 400)]
        header = parse_content_header(data[pos:end], limit)
        if isinstance(header, WireError):
            return events + [("fatal", header.code)]
        pos = end + 4
        assert header.content_length is not None
        if len(data) - pos < header.content_length + 4:
            return events
        body_end = pos + header.content_length
        if data[body_end:body_end + 4] != b"\r\n\r\n":
            return events + [("fatal", 400)]
        body, pos = data[pos:body_end], body_end + 4
        if header.content_type is None:
            events.append(("refused", 400))
        elif media_type(header.content_type) not in ACCEPTED:
            events.append(("refused", 415))
        else:
            events.append(("content", header.content_type, body))


def _as_tuples(events: list[object]) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for event in events:
        if isinstance(event, Content):
            out.append(("content", event.content_type, event.body))
        elif isinstance(event, Refused):
            out.append(("refused", event.error.code))
        else:
            assert isinstance(event, WireError)
            out.append(("fatal", event.code))
    return out


repeated_piece = st.one_of(
    stream_piece,
    # the same header again and again, as sensors send it, with bodies that may or
    # may not fit it, and the same header whose next octets differ
    st.sampled_from([
        b"Content-Type: application/x-idef-alert\r\nContent-Length: 3\r\n\r\nabc\r\n\r\n",
        b"Content-Type: application/x-idef-alert\r\nContent-Length: 3\r\n\r\nab\r\n\r\n",
        b"Content-Type: application/x-idef-alert\r\nContent-Length: 3\r\n\r\n\r\n\r\n\r\n",
        b"Content-Type: application/x-idef-alert\r\nContent-Length: 3\r\n\r",
        b"Content-Type: application/x-idef-alert\r\nContent-Length: 30\r\n\r\nabc\r\n\r\n",
        b"Content-Type: text/plain\r\nContent-Length: 3\r\n\r\nabc\r\n\r\n",
        b"\x00Content-Type: application/x-idef-alert\r\n",
    ]),
)


@PROPERTY
@given(st.lists(repeated_piece, max_size=30), st.lists(st.integers(0, 3000), max_size=15))
def test_reader_finds_what_a_plain_parse_finds(pieces: list[bytes], cuts: list[int]) -> None:
    data = b"".join(pieces)
    expected = _reference_events(data, 1000)
    assert _as_tuples(feed_all(reader(limit=1000), data)) == expected
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    split = feed_all(reader(limit=1000), *(data[a:b] for a, b in zip(points, points[1:])))
    assert _as_tuples(split) == expected


def test_reader_repeated_header_with_other_length_is_parsed_again() -> None:
    """A header recognised in place is the same octets: a new length is read anew."""
    first = alert(b"abc")
    other = alert(b"abcdefgh")
    assert feed_all(reader(), first + first + other + first) == [
        Content(IDEF_ALERT, b"abc"), Content(IDEF_ALERT, b"abc"), Content(IDEF_ALERT, b"abcdefgh"),
        Content(IDEF_ALERT, b"abc")]
