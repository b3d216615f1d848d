"""
Tests for L{iapd.eve}: Suricata C{eve.json} alert lines as IDMEF, and tailing the file.

The lines below are shaped like what Suricata 6-8 writes (field order, flow ids,
community ids, metadata, app-layer records next to the alert); the output is checked
through the manager's own summariser, since that is what people will see.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from xml.etree.ElementTree import Element

import pytest
from defusedxml.ElementTree import fromstring
from hypothesis import given, settings
from hypothesis import strategies as st

from iapd.eve import DEFAULT_MAX_LINE, EveTail, eve_to_idmef, rotated
from iapd.idmef import summarize

NS = "{http://iana.org/idmef}"
NOT_XML = re.compile("[\ufffe\uffff]")
SENSOR = "sensor1.example.org"


def eve(record: dict[str, object], *, ascii_only: bool = False) -> bytes:
    """A record as Suricata writes it: compact JSON on one line, UTF-8."""
    text = json.dumps(record, ensure_ascii=ascii_only, separators=(",", ":"))
    return text.encode("utf-8")


# IPv4 TCP: an ET rule firing on an HTTP request, with the http record and metadata.
TCP_V4 = eve(
    {
        "timestamp": "2026-11-23T10:00:00.123456+0000",
        "flow_id": 1289347127393141,
        "in_iface": "eth0",
        "event_type": "alert",
        "src_ip": "203.0.113.7",
        "src_port": 51514,
        "dest_ip": "192.0.2.10",
        "dest_port": 80,
        "proto": "TCP",
        "pkt_src": "wire/pcap",
        "community_id": "1:Sl1Q7c4Y2K5lZp3d0XHqk3m0M2E=",
        "tx_id": 0,
        "alert": {
            "action": "allowed",
            "gid": 1,
            "signature_id": 2024897,
            "rev": 3,
            "signature": "ET USER_AGENTS Go HTTP Client User-Agent",
            "category": "Misc activity",
            "severity": 3,
            "metadata": {"created_at": ["2017_10_25"], "updated_at": ["2019_09_28"]},
        },
        "http": {
            "hostname": "192.0.2.10",
            "url": "/wp-login.php",
            "http_user_agent": "Go-http-client/1.1",
            "http_method": "POST",
            "protocol": "HTTP/1.1",
            "length": 0,
        },
        "app_proto": "http",
        "flow": {
            "pkts_toserver": 4,
            "pkts_toclient": 1,
            "bytes_toserver": 512,
            "bytes_toclient": 66,
            "start": "2026-11-23T09:59:59.998001+0000",
        },
        "host": "ids-edge-1",
    }
)

# IPv6 UDP: a DNS query for a known bad domain, severity 1.
UDP_V6 = eve(
    {
        "timestamp": "2026-11-23T10:00:01.000042+0100",
        "flow_id": 558104128866519,
        "in_iface": "eth1",
        "event_type": "alert",
        "src_ip": "2001:db8:1::53",
        "src_port": 40211,
        "dest_ip": "2001:db8:ffff::1",
        "dest_port": 53,
        "proto": "UDP",
        "alert": {
            "action": "allowed",
            "gid": 1,
            "signature_id": 2027863,
            "rev": 2,
            "signature": "ET DNS Query to a *.top domain - Likely Hostile",
            "category": "Potentially Bad Traffic",
            "severity": 1,
        },
        "dns": {"query": [{"type": "query", "id": 4321, "rrname": "x.evil.top"}]},
        "app_proto": "dns",
    }
)

# ICMP echo: no ports at all, severity 2, no host.
ICMP = eve(
    {
        "timestamp": "2026-11-23T10:00:02.5+0000",
        "flow_id": 99,
        "event_type": "alert",
        "src_ip": "198.51.100.23",
        "dest_ip": "192.0.2.10",
        "proto": "ICMP",
        "icmp_type": 8,
        "icmp_code": 0,
        "alert": {
            "action": "allowed",
            "gid": 1,
            "signature_id": 2100366,
            "rev": 8,
            "signature": "GPL ICMP_INFO PING *NIX",
            "category": "Misc activity",
            "severity": 2,
        },
    }
)

# A local rule without a priority: Suricata then writes no severity.
NO_SEVERITY = eve(
    {
        "timestamp": "2026-11-23T10:00:03.000000+0000",
        "event_type": "alert",
        "src_ip": "10.0.0.5",
        "src_port": 1234,
        "dest_ip": "10.0.0.6",
        "dest_port": 22,
        "proto": "TCP",
        "alert": {"signature_id": 1000001, "signature": "LOCAL ssh from lab"},
    }
)

# No signature text at all (a decoder event written by a stripped-down rule set).
NO_SIGNATURE = eve(
    {
        "timestamp": "2026-11-23T10:00:04.000000+0000",
        "event_type": "alert",
        "src_ip": "10.0.0.7",
        "dest_ip": "10.0.0.8",
        "proto": "IPv6-ICMP",
        "alert": {"gid": 1, "signature_id": 2200074, "severity": 3},
    }
)

# Markup, quotes, an ampersand and non-ASCII text in the rule message, written raw.
MARKUP_SIGNATURE = 'ET WEB_SERVER XSS <script>alert("x")</script> & «тест» 攻撃 🐍 ]]>'
MARKUP = eve(
    {
        "timestamp": "2026-11-23T10:00:05.000001-0330",
        "event_type": "alert",
        "src_ip": "192.0.2.66",
        "src_port": 44444,
        "dest_ip": "192.0.2.10",
        "dest_port": 443,
        "proto": "TCP",
        "alert": {
            "signature_id": 2999999,
            "signature": MARKUP_SIGNATURE,
            "category": "Web Application Attack <b>",
            "severity": 7,
        },
        "host": "capteur-é",
    }
)
# The same record with the non-ASCII text escaped, as jansson-based Suricata wrote it.
MARKUP_ASCII = eve(json.loads(MARKUP), ascii_only=True)

ALERTS = [TCP_V4, UDP_V6, ICMP, NO_SEVERITY, NO_SIGNATURE, MARKUP, MARKUP_ASCII]


def parse(body: bytes) -> Element:
    """The document, parsed as the manager would: defusedxml, no DTD."""
    root: Element = fromstring(body, forbid_dtd=True)
    return root


def additional_string(body: bytes) -> str:
    """The text of the suricata-eve AdditionalData."""
    (data,) = parse(body).iter(NS + "AdditionalData")
    assert data.get("type") == "string"
    assert data.get("meaning") == "suricata-eve"
    string = data.find(NS + "string")
    assert string is not None and string.text is not None
    return string.text


def convert(line: bytes) -> bytes:
    """L{eve_to_idmef} for a line that must convert."""
    body = eve_to_idmef(line, SENSOR)
    assert body is not None
    return body


# -- eve_to_idmef: realistic alerts ------------------------------------------------------


@pytest.mark.parametrize("line", ALERTS)
def test_summary(line: bytes) -> None:
    """Every sample becomes one well-formed IDMEF Alert the manager summarises fully."""
    record = json.loads(line)
    body = convert(line)
    assert body.startswith(b"<?xml version='1.0' encoding='UTF-8'?>")
    root = parse(body)
    assert root.tag == NS + "IDMEF-Message"
    assert [child.tag for child in root] == [NS + "Alert"]
    summary = summarize(body)
    assert summary is not None
    assert summary["kind"] == "Alert"
    assert summary["messages"] == 1
    assert summary["classification"] == record["alert"].get("signature", "Suricata alert")
    assert summary["source"] == [record["src_ip"]]
    assert summary["target"] == [record["dest_ip"]]
    assert summary["analyzer"] == [
        {"analyzerid": SENSOR, "name": "suricata", "model": "Suricata"}
    ]
    assert summary["messageid"] is not None
    assert summary["messageid"].startswith("eve-") and len(summary["messageid"]) == 36


@pytest.mark.parametrize(
    ("line", "severity"),
    [
        (TCP_V4, "low"),
        (UDP_V6, "high"),
        (ICMP, "medium"),
        (NO_SEVERITY, None),
        (NO_SIGNATURE, "low"),
        (MARKUP, "info"),
    ],
)
def test_severity(line: bytes, severity: str | None) -> None:
    """Suricata priority 1/2/3/4+ is high/medium/low/info; no priority, no Assessment."""
    body = convert(line)
    summary = summarize(body)
    assert summary is not None
    assert summary["severity"] == severity
    assert (parse(body).find(f"{NS}Alert/{NS}Assessment") is None) == (severity is None)


@pytest.mark.parametrize(
    ("value", "severity"),
    [(1, "high"), (2, "medium"), (3, "low"), (4, "info"), (255, "info"),
     (0, None), (-1, None), (True, None), ("1", None), (1.0, None), (None, None)],
)
def test_severity_values(value: object, severity: str | None) -> None:
    """Only a positive JSON integer is a priority."""
    line = eve({"event_type": "alert", "alert": {"signature": "s", "severity": value}})
    summary = summarize(convert(line))
    assert summary is not None
    assert summary["severity"] == severity


@pytest.mark.parametrize("line", ALERTS)
def test_original_line_embedded(line: bytes) -> None:
    """The AdditionalData holds the line exactly, markup and all."""
    assert additional_string(convert(line)) == line.decode("utf-8")


def test_markup_escaped_not_interpreted() -> None:
    """Markup in the rule message stays text: no element, no CDATA break-out."""
    body = convert(MARKUP)
    root = parse(body)
    assert b"<script>" not in body
    assert {element.tag for element in root.iter()} <= {
        NS + name
        for name in (
            "IDMEF-Message Alert Analyzer Node name CreateTime DetectTime Source Target "
            "Address address Service port Classification Reference url Assessment "
            "Impact AdditionalData string"
        ).split()
    }
    classification = root.find(f"{NS}Alert/{NS}Classification")
    assert classification is not None
    assert classification.get("text") == MARKUP_SIGNATURE
    reference = classification.find(NS + "Reference")
    assert reference is not None
    assert reference.get("meaning") == "Web Application Attack <b>"
    assert root.findtext(f"{NS}Alert/{NS}Analyzer/{NS}Node/{NS}name") == "capteur-é"
    # Escaped or not in the JSON, the message is the same and so is the summary.
    raw, escaped = summarize(body), summarize(convert(MARKUP_ASCII))
    assert raw is not None and escaped is not None
    assert raw["messageid"] != escaped["messageid"]
    assert {**raw, "messageid": None} == {**escaped, "messageid": None}


def test_structure_tcp_v4() -> None:
    """RFC 4765 element names and attributes, in the DTD's order."""
    root = parse(convert(TCP_V4))
    alert = root.find(NS + "Alert")
    assert alert is not None
    assert root.get("version") == "1.0"
    assert [child.tag[len(NS) :] for child in alert] == [
        "Analyzer",
        "CreateTime",
        "DetectTime",
        "Source",
        "Target",
        "Classification",
        "Assessment",
        "AdditionalData",
    ]
    analyzer = alert.find(NS + "Analyzer")
    assert analyzer is not None
    assert analyzer.get("analyzerid") == SENSOR
    assert analyzer.findtext(f"{NS}Node/{NS}name") == "ids-edge-1"
    for tag in ("CreateTime", "DetectTime"):
        element = alert.find(NS + tag)
        assert element is not None
        assert element.text == "2026-11-23T10:00:00.123456+00:00"
        assert element.get("ntpstamp") is not None
    source = alert.find(NS + "Source")
    assert source is not None
    address = source.find(f"{NS}Node/{NS}Address")
    assert address is not None and address.get("category") == "ipv4-addr"
    service = source.find(NS + "Service")
    assert service is not None
    assert service.get("iana_protocol_name") == "tcp"
    assert service.get("iana_protocol_number") == "6"
    assert service.get("ip_version") == "4"
    assert service.findtext(NS + "port") == "51514"
    assert alert.findtext(f"{NS}Target/{NS}Service/{NS}port") == "80"
    reference = alert.find(f"{NS}Classification/{NS}Reference")
    assert reference is not None
    assert reference.get("origin") == "vendor-specific"
    assert reference.get("meaning") == "Misc activity"
    assert reference.findtext(NS + "name") == "sid:2024897"
    assert reference.find(NS + "url") is not None  # required by the DTD


def test_structure_udp_v6() -> None:
    """IPv6 addresses are ipv6-addr; the offset gains its colon; proto lower-cased."""
    root = parse(convert(UDP_V6))
    alert = root.find(NS + "Alert")
    assert alert is not None
    for role, port in (("Source", "40211"), ("Target", "53")):
        address = alert.find(f"{NS}{role}/{NS}Node/{NS}Address")
        assert address is not None and address.get("category") == "ipv6-addr"
        service = alert.find(f"{NS}{role}/{NS}Service")
        assert service is not None
        assert service.get("iana_protocol_name") == "udp"
        assert service.get("ip_version") == "6"
        assert service.findtext(NS + "port") == port
    summary = summarize(convert(UDP_V6))
    assert summary is not None
    assert summary["create_time"] == "2026-11-23T10:00:01.000042+01:00"
    assert alert.find(f"{NS}Analyzer/{NS}Node") is None  # no host field


def test_structure_icmp() -> None:
    """Without ports there is no Service (RFC 4765 needs a port or a name in one)."""
    alert = parse(convert(ICMP)).find(NS + "Alert")
    assert alert is not None
    assert alert.find(f"{NS}Source/{NS}Service") is None
    assert alert.find(f"{NS}Target/{NS}Service") is None
    assert alert.findtext(f"{NS}Source/{NS}Node/{NS}Address/{NS}address") == "198.51.100.23"


def test_no_signature_fallback_keeps_reference() -> None:
    """No message: "Suricata alert", still with the sid; no category, no meaning."""
    classification = parse(convert(NO_SIGNATURE)).find(f"{NS}Alert/{NS}Classification")
    assert classification is not None
    assert classification.get("text") == "Suricata alert"
    reference = classification.find(NS + "Reference")
    assert reference is not None
    assert reference.get("meaning") is None
    assert reference.findtext(NS + "name") == "sid:2200074"


def test_minimal_alert() -> None:
    """An alert with nothing but its event_type still converts, with no empty parts."""
    body = convert(b'{"event_type":"alert"}')
    alert = parse(body).find(NS + "Alert")
    assert alert is not None
    assert [child.tag[len(NS) :] for child in alert] == [
        "Analyzer",
        "Classification",
        "AdditionalData",
    ]
    summary = summarize(body)
    assert summary is not None
    assert dict(summary) == {
        "kind": "Alert",
        "messageid": alert.get("messageid"),
        "create_time": None,
        "classification": "Suricata alert",
        "severity": None,
        "analyzer": [{"analyzerid": SENSOR, "name": "suricata", "model": "Suricata"}],
        "source": [],
        "target": [],
        "messages": 1,
        "heartbeat_interval": None,
    }


@pytest.mark.parametrize(
    ("timestamp", "text", "ntpstamp"),
    [
        # RFC 4765's own examples (section 3.2.6 and the heartbeat of 7.5).
        ("2000-03-09T10:01:25.93464-0500", "2000-03-09T10:01:25.93464-05:00",
         "0xbc723b45.0xef449129"),
        ("2000-03-09T14:07:58Z", "2000-03-09T14:07:58Z", "0xbc722ebe.0x00000000"),
        ("2000-03-09T14:07:58+00:00", "2000-03-09T14:07:58+00:00",
         "0xbc722ebe.0x00000000"),
        # After the 2036 NTP era rollover the seconds wrap (RFC 5905).
        ("2036-02-07T06:28:17.000000+0000", "2036-02-07T06:28:17.000000+00:00",
         "0x00000001.0x00000000"),
        # Not a Suricata timestamp: kept as written, no ntpstamp.
        ("2026-02-30T10:00:00.000000+0000", "2026-02-30T10:00:00.000000+0000", None),
        ("2026-11-23T10:00:00.000000+2400", "2026-11-23T10:00:00.000000+2400", None),
        ("2026-11-23T10:00:00.000000+0099", "2026-11-23T10:00:00.000000+0099", None),
        ("yesterday", "yesterday", None),
        ("2026-11-23T10:00:00.000000+0000 ", "2026-11-23T10:00:00.000000+0000 ", None),
        ("２０２６-11-23T10:00:00+0000", "２０２６-11-23T10:00:00+0000", None),
    ],
)
def test_timestamps(timestamp: str, text: str, ntpstamp: str | None) -> None:
    """Suricata's offset gains its colon; what does not parse is kept verbatim."""
    alert = parse(convert(eve({"timestamp": timestamp, "event_type": "alert"}))).find(
        NS + "Alert"
    )
    assert alert is not None
    for tag in ("CreateTime", "DetectTime"):
        element = alert.find(NS + tag)
        assert element is not None
        assert element.text == text
        assert element.get("ntpstamp") == ntpstamp


def test_timestamp_not_a_string() -> None:
    """A timestamp that is no string gives no time at all, never the clock's."""
    alert = parse(convert(b'{"event_type":"alert","timestamp":1700000000}')).find(
        NS + "Alert"
    )
    assert alert is not None
    assert alert.find(NS + "CreateTime") is None
    assert alert.find(NS + "DetectTime") is None


@pytest.mark.parametrize(
    ("proto", "attributes"),
    [
        ("TCP", {"iana_protocol_name": "tcp", "iana_protocol_number": "6"}),
        ("SCTP", {"iana_protocol_name": "sctp", "iana_protocol_number": "132"}),
        ("IPv6-ICMP", {"iana_protocol_name": "ipv6-icmp", "iana_protocol_number": "58"}),
        ("WeirdProto", {"iana_protocol_name": "weirdproto"}),
        ("047", {"iana_protocol_number": "47"}),
        ("999", {}),
        ("", {}),
        (6, {}),
        (None, {}),
    ],
)
def test_protocol(proto: object, attributes: dict[str, str]) -> None:
    """Names are lower-cased IANA names; Suricata's zero-padded numbers are numbers."""
    line = eve({"event_type": "alert", "src_ip": "192.0.2.1", "src_port": 1, "proto": proto})
    service = parse(convert(line)).find(f"{NS}Alert/{NS}Source/{NS}Service")
    assert service is not None
    assert {k: v for k, v in service.items() if k != "ip_version"} == attributes


@pytest.mark.parametrize(
    ("src_ip", "src_port", "addresses", "port"),
    [
        ("not-an-ip", 5, ["not-an-ip"], "5"),
        ("", 5, [], "5"),
        (12, 5, [], "5"),
        ("192.0.2.1", 65536, ["192.0.2.1"], None),
        ("192.0.2.1", -1, ["192.0.2.1"], None),
        ("192.0.2.1", True, ["192.0.2.1"], None),
        ("192.0.2.1", "80", ["192.0.2.1"], None),
        ("fe80::1%eth0", 0, ["fe80::1%eth0"], "0"),
    ],
)
def test_odd_endpoints(
    src_ip: object, src_port: object, addresses: list[str], port: str | None
) -> None:
    """Only strings are addresses and only integers 0-65535 are ports."""
    line = eve({"event_type": "alert", "src_ip": src_ip, "src_port": src_port})
    body = convert(line)
    summary = summarize(body)
    assert summary is not None
    assert summary["source"] == addresses
    alert = parse(body).find(NS + "Alert")
    assert alert is not None
    assert alert.findtext(f"{NS}Source/{NS}Service/{NS}port") == port
    if src_ip == "not-an-ip":
        address = alert.find(f"{NS}Source/{NS}Node/{NS}Address")
        assert address is not None and address.get("category") == "unknown"


def test_messageid_deterministic_and_distinct() -> None:
    """Same line, same bytes (the manager's dedup then applies); other line, other id."""
    ids = set()
    for line in ALERTS:
        first, again = convert(line), eve_to_idmef(line, SENSOR)
        assert first == again
        summary = summarize(first)
        assert summary is not None
        ids.add(summary["messageid"])
    assert len(ids) == len(ALERTS)
    # One byte of difference is another alert.
    other = TCP_V4.replace(b"1289347127393141", b"1289347127393142")
    assert summarize(convert(other))["messageid"] not in ids  # type: ignore[index]


def test_line_terminator_ignored() -> None:
    """A line as readline() returns it gives the same body as one from EveTail."""
    body = convert(TCP_V4)
    assert eve_to_idmef(TCP_V4 + b"\n", SENSOR) == body
    assert eve_to_idmef(TCP_V4 + b"\r\n", SENSOR) == body
    assert additional_string(body) == TCP_V4.decode()


def test_analyzer_id_in_body() -> None:
    """The analyzer id is the caller's; it is escaped like everything else."""
    body = eve_to_idmef(TCP_V4, 'a"<b>&c')
    assert body is not None
    summary = summarize(body)
    assert summary is not None
    assert summary["analyzer"][0]["analyzerid"] == 'a"<b>&c'


def test_characters_xml_cannot_carry() -> None:
    """NUL, lone surrogates, U+FFFE and CR inside JSON strings: the body still parses."""
    line = (
        b'{"event_type":"alert","src_ip":"1.2.3.4\\u0000","alert":'
        b'{"signature":"a\\ud800b\\u0001c\\uffffd\\re"},"x":"\xef\xbf\xbe"}'
    )
    body = convert(line)
    summary = summarize(body)
    assert summary is not None
    assert summary["classification"] == "a\ufffdb\ufffdc\ufffdd\re"
    assert summary["source"] == ["1.2.3.4\ufffd"]
    # U+FFFE, written raw in the line, cannot be in XML at all: it is replaced.
    assert additional_string(body) == line.decode().replace("\ufffe", "\ufffd")


def test_carriage_return_in_line_preserved() -> None:
    """A bare CR (JSON whitespace) survives XML's end-of-line normalisation."""
    line = b'{"event_type":"alert",\r"alert":{"signature":"x"}}'
    body = convert(line)
    assert b"\r" not in body
    assert additional_string(body) == line.decode()


@pytest.mark.parametrize(
    "line",
    [
        eve({"timestamp": "2026-11-23T10:00:00.000000+0000", "event_type": "flow",
             "src_ip": "192.0.2.1", "dest_ip": "192.0.2.2", "proto": "TCP",
             "flow": {"pkts_toserver": 3, "state": "closed", "reason": "timeout"}}),
        eve({"timestamp": "2026-11-23T10:00:00.000000+0000", "event_type": "dns",
             "dns": {"type": "query", "rrname": "example.org", "rrtype": "A"}}),
        eve({"timestamp": "2026-11-23T10:00:00.000000+0000", "event_type": "stats",
             "stats": {"uptime": 3600, "decoder": {"pkts": 123456}}}),
        eve({"event_type": "ALERT", "alert": {"signature": "x"}}),
        eve({"event_type": ["alert"]}),
        eve({"alert": {"signature": "no event_type"}}),
    ],
)
def test_not_alerts(line: bytes) -> None:
    """Only event_type "alert" records are alerts."""
    assert eve_to_idmef(line, SENSOR) is None


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"\n",
        b"not json",
        b'{"event_type":"alert"',  # cut short: a partial last line
        b'["alert"]',
        b'"alert"',
        b"null",
        b'{"event_type":"alert","x":NaN}',
        b'{"event_type":"alert","x":Infinity}',
        b'\xef\xbb\xbf{"event_type":"alert"}',  # BOM: not what Suricata writes
        b'{"event_type":"alert","host":"\xff"}',  # not UTF-8
        '{"event_type":"alert"}'.encode("utf-16"),
        b'{"event_type":"alert","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"event_type":"alert","x":' + b"9" * 5000 + b"}",  # over int_max_str_digits
        b'{"event_type":"alert"}\n{"event_type":"alert"}',  # two lines in one
    ],
)
def test_garbage(line: bytes) -> None:
    """Whatever is not one JSON object is ignored, without an exception."""
    assert eve_to_idmef(line, SENSOR) is None


def test_huge_signature_id() -> None:
    """An id too large for any rule set gives no Reference, not an exception."""
    line = b'{"event_type":"alert","alert":{"signature_id":' + b"9" * 4000 + b"}}"
    classification = parse(convert(line)).find(f"{NS}Alert/{NS}Classification")
    assert classification is not None
    assert classification.find(NS + "Reference") is None


# -- eve_to_idmef: properties ------------------------------------------------------------


def check_output(line: bytes, body: bytes | None) -> None:
    """A body, when there is one, is IDMEF the manager summarises."""
    if body is None:
        return
    parse(body)
    summary = summarize(body)
    assert summary is not None
    assert summary["kind"] == "Alert"
    assert summary["classification"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes(line: bytes) -> None:
    """Arbitrary bytes never raise."""
    check_output(line, eve_to_idmef(line, SENSOR))


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
alert_fields = st.fixed_dictionaries(
    {},
    optional={
        "signature": json_values | st.text(),
        "signature_id": json_values | st.integers(min_value=0, max_value=2**32),
        "category": json_values | st.text(),
        "severity": json_values | st.integers(min_value=-2, max_value=300),
    },
)
records = st.fixed_dictionaries(
    {"event_type": st.sampled_from(["alert", "alert", "alert", "flow"]) | json_values},
    optional={
        "timestamp": json_values
        | st.datetimes(timezones=st.timezones()).map(
            lambda d: d.strftime("%Y-%m-%dT%H:%M:%S.%f%z")
        ),
        "src_ip": json_values | st.ip_addresses().map(str),
        "dest_ip": json_values | st.ip_addresses().map(str),
        "src_port": json_values | st.integers(min_value=-1, max_value=70000),
        "dest_port": json_values | st.integers(min_value=-1, max_value=70000),
        "proto": json_values | st.sampled_from(["TCP", "UDP", "ICMP", "047"]),
        "host": json_values,
        "alert": alert_fields | json_values,
    },
).flatmap(
    lambda record: st.dictionaries(st.text(max_size=8), json_values, max_size=3).map(
        lambda extra: {**extra, **record}
    )
)


@settings(max_examples=300, deadline=None)
@given(records, st.booleans())
def test_arbitrary_json_objects(record: dict[str, object], ascii_only: bool) -> None:
    """
    Arbitrary objects never raise; alerts always convert, summarise, and embed the
    line exactly (up to characters XML 1.0 cannot hold at all).
    """
    text = json.dumps(record, ensure_ascii=ascii_only)
    line = text.encode("utf-8", "surrogatepass")
    body = eve_to_idmef(line, SENSOR)
    check_output(line, body)
    if ascii_only or not any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        assert (body is not None) == (record["event_type"] == "alert")
    if body is None:
        return
    assert eve_to_idmef(line, SENSOR) == body
    summary = summarize(body)
    assert summary is not None
    alert = record.get("alert")
    signature = alert.get("signature") if isinstance(alert, dict) else None
    if isinstance(signature, str) and signature.isprintable() and signature.strip() == signature:
        assert summary["classification"] == (signature or "Suricata alert")[:1024]
    for key, role in (("src_ip", "source"), ("dest_ip", "target")):
        value = record.get(key)
        if isinstance(value, str) and value.isprintable() and value.strip() == value:
            assert summary[role] == ([value[:1024]] if value else [])  # type: ignore[literal-required]
    # The line is valid UTF-8 here, so the only characters XML cannot hold are the
    # non-characters U+FFFE and U+FFFF, written raw by ensure_ascii=False.
    assert additional_string(body) == NOT_XML.sub("\ufffd", text)


# -- EveTail -------------------------------------------------------------------------------


def reference_lines(stream: bytes, start: int, max_line: int) -> tuple[list[bytes], int, int]:
    """What a tail must yield for the whole of C{stream}: (lines, offset, skipped)."""
    lines, skipped, offset = [], 0, start
    pieces = stream.split(b"\n")
    for piece in pieces[:-1]:  # the last one has no newline yet
        offset += len(piece) + 1
        content = piece[:-1] if piece.endswith(b"\r") else piece
        if len(content) > max_line:
            skipped += 1
        else:
            lines.append(content)
    return lines, offset, skipped


def feed_all(tail: EveTail, chunks: list[bytes]) -> list[bytes]:
    """Feed C{chunks} in order; all the lines, checking memory and offsets as we go."""
    lines = []
    for chunk in chunks:
        lines.extend(tail.feed(chunk))
        assert tail.pending <= tail.max_line + 1
    return lines


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    """C{stream} cut at the given positions."""
    points = sorted({min(cut, len(stream)) for cut in cuts})
    edges = [0, *points, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(edges)]


line_contents = st.binary(max_size=24).map(lambda b: b.replace(b"\n", b""))
terminators = st.sampled_from([b"\n", b"\r\n", b"\r\r\n"])


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(line_contents, terminators), max_size=12),
    line_contents,
    st.lists(st.integers(min_value=0, max_value=400), max_size=20),
    st.integers(min_value=1, max_value=20),
    st.integers(min_value=0, max_value=10**12),
)
def test_chunking_invariance(
    lines: list[tuple[bytes, bytes]],
    partial: bytes,
    cuts: list[int],
    max_line: int,
    start: int,
) -> None:
    """Any split of the stream gives the same lines, offset and skipped count."""
    stream = b"".join(content + end for content, end in lines) + partial
    expected = reference_lines(stream, start, max_line)

    whole = EveTail(offset=start, max_line=max_line)
    assert (whole.feed(stream), whole.offset, whole.skipped) == expected

    chunked = EveTail(offset=start, max_line=max_line)
    assert (feed_all(chunked, split(stream, cuts)), chunked.offset, chunked.skipped) == expected

    bytewise = EveTail(offset=start, max_line=max_line)
    one_by_one = [stream[i : i + 1] for i in range(len(stream))]
    assert (feed_all(bytewise, one_by_one), bytewise.offset, bytewise.skipped) == expected


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(line_contents, terminators), max_size=12),
    st.lists(st.integers(min_value=0, max_value=400), max_size=20),
)
def test_offsets_at_line_ends(lines: list[tuple[bytes, bytes]], cuts: list[int]) -> None:
    """After every feed the offset is just past a newline, and resuming there is exact."""
    stream = b"".join(content + end for content, end in lines)
    tail = EveTail(max_line=10)
    seen: list[bytes] = []
    for chunk in split(stream, cuts):
        seen.extend(tail.feed(chunk))
        assert tail.offset == 0 or stream[tail.offset - 1 : tail.offset] == b"\n"
        # Everything up to the offset was handed back (or skipped), nothing more.
        done = reference_lines(stream[: tail.offset], 0, 10)
        assert (done[0], done[2]) == (seen, tail.skipped)
        # A restart at the offset yields exactly the lines not yet seen.
        resumed = EveTail(offset=tail.offset, max_line=10)
        rest = resumed.feed(stream[tail.offset :])
        assert seen + rest == reference_lines(stream, 0, 10)[0]
        assert resumed.offset == len(stream)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(line_contents, terminators), max_size=12),
    st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    st.lists(st.sampled_from(["poll", "restart", "spool-full"]), max_size=30),
    st.integers(min_value=1, max_value=40),
)
def test_caller_keeps_offset(
    lines: list[tuple[bytes, bytes]], cuts: list[int], events: list[str], read_size: int
) -> None:
    """
    The relative view, driven the way L{iapd.inputs.EveInput} drives it: read at
    offset + buffered, add offset_after_last_line once the lines are spooled, rebase.
    Suricata appends in arbitrary pieces; the sensor restarts from its persisted
    offset, or drops a batch the spool had no room for.  Every line is spooled once,
    in order, and the persisted offset is always just past a newline.
    """
    stream = b"".join(content + end for content, end in lines)
    written = split(stream, cuts)
    size = 0  # how much of the stream Suricata has written so far
    offset, tail, spooled = 0, EveTail(max_line=10), []
    for event in [*events, *["poll"] * (2 * len(stream) + 2)]:
        if written:
            size += len(written.pop(0))
        if event == "restart":
            tail = EveTail(max_line=10)  # offset is what was persisted
            continue
        start = offset
        data = stream[: size][offset + tail.buffered :][:read_size]
        batch = tail.feed(data)
        end = start + tail.offset_after_last_line
        if event == "spool-full":
            tail = EveTail(max_line=10)  # re-read from the saved offset later
            continue
        spooled.extend(batch)
        offset = end
        tail.rebase()
        assert offset == 0 or stream[offset - 1 : offset] == b"\n"
        assert spooled == reference_lines(stream[:offset], 0, 10)[0]
    assert not written
    assert offset == len(stream)
    assert spooled == reference_lines(stream, 0, 10)[0]


def test_relative_view_with_overlong_line() -> None:
    """Bytes of an overlong line already dropped are buffered: not read twice."""
    tail = EveTail(max_line=4)
    assert tail.feed(b"ok\n0123456789") == [b"ok"]
    assert (tail.offset_after_last_line, tail.buffered, tail.pending) == (3, 10, 0)
    tail.rebase()
    assert (tail.offset, tail.offset_after_last_line, tail.buffered) == (3, 0, 10)
    assert tail.feed(b"abc\nyes\n") == [b"yes"]
    assert (tail.offset_after_last_line, tail.buffered, tail.skipped) == (18, 0, 1)


def test_overlong_lines_skipped_and_counted() -> None:
    """Longer than max_line (terminator excluded): dropped, counted, offset advanced."""
    tail = EveTail(max_line=5)
    stream = b"12345\n123456\n12345\r\n123456\r\nabcdefghijklmnop\r\r\nok\n"
    assert tail.feed(stream) == [b"12345", b"12345", b"ok"]
    assert tail.skipped == 3
    assert tail.offset == len(stream)


def test_overlong_line_memory_bounded() -> None:
    """A line that never ends costs at most max_line + 1 bytes, however it arrives."""
    tail = EveTail(max_line=100)
    for _ in range(1000):
        assert tail.feed(b"x" * 997) == []
        assert tail.pending <= 101
    assert tail.pending == 0
    assert tail.offset == 0 and tail.skipped == 0  # not complete yet: not counted
    assert tail.feed(b"tail of the monster\r\nnext\n") == [b"next"]
    assert tail.skipped == 1
    assert tail.offset == 997 * 1000 + len(b"tail of the monster\r\nnext\n")


def test_line_exactly_max_line_with_crlf_split_at_cr() -> None:
    """A CR held at the bound may still be the CR of a CRLF."""
    tail = EveTail(max_line=4)
    assert tail.feed(b"abcd\r") == []
    assert tail.pending == 5
    assert tail.feed(b"\n") == [b"abcd"]
    assert tail.feed(b"abcd\r") == []
    assert tail.feed(b"e\n") == []  # "abcd\re" is 6 bytes
    assert tail.skipped == 1


def test_partial_last_line_kept() -> None:
    """Suricata caught mid-write: the half line waits for its newline."""
    tail = EveTail()
    half = len(TCP_V4) // 2
    assert tail.feed(TCP_V4[:half]) == []
    assert tail.offset == 0
    assert tail.feed(TCP_V4[half:] + b"\n" + UDP_V6[:10]) == [TCP_V4]
    assert tail.offset == len(TCP_V4) + 1
    assert tail.feed(UDP_V6[10:] + b"\r\n") == [UDP_V6]
    assert tail.offset == len(TCP_V4) + len(UDP_V6) + 3


def test_empty_lines_are_lines() -> None:
    """Empty lines come back (the converter ignores them) and advance the offset."""
    tail = EveTail()
    assert tail.feed(b"\n\r\n\n") == [b"", b"", b""]
    assert tail.offset == 4
    assert tail.feed(b"") == []


def test_bad_arguments() -> None:
    """A negative offset or a non-positive bound is the caller's bug."""
    with pytest.raises(ValueError):
        EveTail(offset=-1)
    with pytest.raises(ValueError):
        EveTail(max_line=0)
    assert EveTail().max_line == DEFAULT_MAX_LINE


def tail_file(path: Path, offset: int, tail: EveTail) -> Iterator[bytes]:
    """Read what was appended since C{tail.offset}-ish, as the sensor's glue would."""
    with path.open("rb") as f:
        f.seek(offset)
        while chunk := f.read(37):  # a small read size, to cut lines everywhere
            yield from tail.feed(chunk)


def test_tail_real_file_and_resume(tmp_path: Path) -> None:
    """Tail a growing eve.json, stop, resume from the persisted offset: each alert once."""
    path = tmp_path / "eve.json"
    flow = eve({"event_type": "flow", "flow_id": 1})
    path.write_bytes(TCP_V4 + b"\n" + flow + b"\n" + UDP_V6[:50])

    tail = EveTail()
    read_so_far = len(path.read_bytes())
    first = [eve_to_idmef(line, SENSOR) for line in tail_file(path, 0, tail)]
    assert first[1] is None and first[0] == convert(TCP_V4)
    persisted, inode = tail.offset, path.stat().st_ino
    assert persisted == len(TCP_V4) + len(flow) + 2

    with path.open("ab") as f:  # Suricata finishes the line and writes another
        f.write(UDP_V6[50:] + b"\n" + ICMP + b"\n")
    assert not rotated(inode, persisted, path.stat())
    assert read_so_far > persisted

    restarted = EveTail(offset=persisted)
    second = [eve_to_idmef(line, SENSOR) for line in tail_file(path, persisted, restarted)]
    assert second == [convert(UDP_V6), convert(ICMP)]
    assert restarted.offset == path.stat().st_size


def test_rotated_real_files(tmp_path: Path) -> None:
    """Move-and-create and copytruncate are both seen; appends are not."""
    path = tmp_path / "eve.json"
    path.write_bytes(TCP_V4 + b"\n")
    inode, size = path.stat().st_ino, path.stat().st_size
    with path.open("ab") as f:
        f.write(UDP_V6 + b"\n")
    assert not rotated(inode, size, path.stat())

    os.rename(path, tmp_path / "eve.json.1")
    path.write_bytes(ICMP + b"\n")
    assert rotated(inode, size, path.stat())

    inode, size = path.stat().st_ino, path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(0)
    assert rotated(inode, size, path.stat())


@pytest.mark.parametrize(
    ("previous_inode", "previous_size", "inode", "size", "expected"),
    [
        (7, 100, 7, 100, False),  # nothing new
        (7, 100, 7, 250, False),  # appended
        (7, 100, 8, 250, True),  # another file at the path
        (7, 100, 8, 0, True),
        (7, 100, 7, 99, True),  # truncated
        (7, 100, 7, 0, True),
        (None, 0, 7, 0, False),  # first look
        (None, 100, 7, 50, True),  # no inode remembered, but shorter than the offset
    ],
)
def test_rotated(
    previous_inode: int | None, previous_size: int, inode: int, size: int, expected: bool
) -> None:
    """Rotation is a new inode or a shrunken file."""
    stat = SimpleNamespace(st_ino=inode, st_size=size)
    assert rotated(previous_inode, previous_size, stat) is expected
