"""
Tests for L{iapd.idmef}: the manager's summary of untrusted IDMEF alert bodies.

The samples below are written to look like what producers really emit (RFC 4765's own
examples, Prelude, Snort's IDMEF output plugin), including their departures from the
schema, because those are what a manager has to accept.
"""

from __future__ import annotations

import contextlib
import json
import socket
import urllib.request
from unittest import mock
from xml.etree.ElementTree import Element, TreeBuilder
from xml.sax.saxutils import quoteattr

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iapd import idmef
from iapd.idmef import MAX_CHARS, MAX_ITEMS, MAX_MESSAGES, summarize

KEYS = {
    "kind",
    "messageid",
    "create_time",
    "classification",
    "severity",
    "analyzer",
    "source",
    "target",
    "messages",
    "heartbeat_interval",
}

# RFC 4765 style: declaration, prefixed namespace, a correlator relaying a sensor's
# alert (Analyzer inside Analyzer), netmask next to the address, Service with port.
RFC4765_ALERT = b"""<?xml version="1.0" encoding="UTF-8"?>
<idmef:IDMEF-Message version="1.0" xmlns:idmef="http://iana.org/idmef">
  <idmef:Alert messageid="abc123456789">
    <idmef:Analyzer analyzerid="bc-corr-01" name="correlator01"
        model="Thor" class="correlator" manufacturer="www.example.com">
      <idmef:Node category="dns">
        <idmef:name>correlator01.example.com</idmef:name>
      </idmef:Node>
      <idmef:Analyzer analyzerid="bc-sensor01" name="sensor01" model="Hugin">
        <idmef:Node category="dns">
          <idmef:name>sensor01.example.com</idmef:name>
        </idmef:Node>
      </idmef:Analyzer>
    </idmef:Analyzer>
    <idmef:CreateTime ntpstamp="0xbc72b2b4.0x00000000">
      2000-03-09T15:31:00-05:00
    </idmef:CreateTime>
    <idmef:Source ident="a1">
      <idmef:Node ident="a1-1">
        <idmef:Address ident="a1-2" category="ipv4-addr">
          <idmef:address>192.0.2.200</idmef:address>
        </idmef:Address>
      </idmef:Node>
    </idmef:Source>
    <idmef:Source ident="a2" spoofed="yes">
      <idmef:Node ident="a2-1" category="dns">
        <idmef:name>badguy.example.net</idmef:name>
        <idmef:Address ident="a2-2" category="ipv4-net-mask">
          <idmef:address>198.51.100.7</idmef:address>
          <idmef:netmask>255.255.255.255</idmef:netmask>
        </idmef:Address>
      </idmef:Node>
    </idmef:Source>
    <idmef:Target ident="d1">
      <idmef:Node ident="d1-1" category="dns">
        <idmef:location>Headquarters DMZ Network</idmef:location>
        <idmef:name>www.example.com</idmef:name>
      </idmef:Node>
      <idmef:Service ident="d1-2">
        <idmef:port>80</idmef:port>
      </idmef:Service>
    </idmef:Target>
    <idmef:Classification text="Teardrop detected">
      <idmef:Reference origin="bugtraqid">
        <idmef:name>124</idmef:name>
        <idmef:url>http://www.securityfocus.com/bid/124</idmef:url>
      </idmef:Reference>
    </idmef:Classification>
    <idmef:Assessment>
      <idmef:Impact severity="high" completion="failed" type="dos"/>
      <idmef:Confidence rating="high"/>
    </idmef:Assessment>
  </idmef:Alert>
</idmef:IDMEF-Message>
"""

# Prelude style: default namespace, a three-deep Analyzer chain (manager relaying a
# correlator relaying LML), ntpstamps, Process, AdditionalData, IPv6, several targets
# naming the same host twice.
PRELUDE_ALERT = b"""<?xml version="1.0" encoding="UTF-8"?>
<IDMEF-Message xmlns="http://iana.org/idmef">
 <Alert messageid="3f0b1b54-7c3a-11ee-9d43-525400123456">
  <Analyzer analyzerid="1984920491244551" name="prelude-manager"
    manufacturer="http://www.prelude-siem.com" model="Prelude Manager"
    version="5.2.0" class="Concentrator" ostype="Linux" osversion="6.1.0-13-amd64">
   <Node category="unknown"><name>siem.example.org</name></Node>
   <Process><name>prelude-manager</name><pid>812</pid></Process>
   <Analyzer analyzerid="2204150831342263" name="prelude-correlator"
     model="Prelude Correlator" class="Correlator">
    <Analyzer analyzerid="3311094530214987" name="prelude-lml"
      manufacturer="http://www.prelude-siem.com" model="Prelude LML"
      version="5.2.0" class="Log Analyzer" ostype="Linux">
     <Node category="unknown">
      <name>web1.example.org</name>
      <Address category="ipv4-addr"><address>10.1.2.3</address></Address>
     </Node>
     <Process><name>prelude-lml</name><pid>1403</pid>
      <path>/usr/sbin/prelude-lml</path></Process>
    </Analyzer>
   </Analyzer>
  </Analyzer>
  <CreateTime ntpstamp="0xe8f1c6a4.0x0">2023-11-05T10:12:36.000000+00:00</CreateTime>
  <DetectTime ntpstamp="0xe8f1c6a4.0x0">2023-11-05T10:12:36.000000+00:00</DetectTime>
  <AnalyzerTime ntpstamp="0xe8f1c6a5.0x0">2023-11-05T10:12:37.000000+00:00</AnalyzerTime>
  <Source spoofed="unknown">
   <Node category="unknown">
    <Address category="ipv6-addr"><address>2001:db8::bad:1</address></Address>
   </Node>
   <Service><port>51234</port><protocol>tcp</protocol></Service>
  </Source>
  <Target decoy="unknown">
   <Node category="unknown">
    <name>web1.example.org</name>
    <Address category="ipv4-addr"><address>10.1.2.3</address></Address>
   </Node>
   <Service><name>ssh</name><port>22</port><iana_protocol_number>6</iana_protocol_number></Service>
   <User category="application-and-os"><UserId type="target-user"><name>root</name></UserId></User>
  </Target>
  <Target>
   <Node><Address category="ipv4-addr"><address>10.1.2.3</address></Address></Node>
  </Target>
  <Classification text="Remote Login">
   <Reference origin="vendor-specific" meaning="ssh_failed_login">
    <name>ssh_failed_login</name><url>https://www.prelude-siem.org</url>
   </Reference>
  </Classification>
  <Assessment>
   <Impact severity="medium" completion="failed" type="admin"
     >Someone tried to log in as root</Impact>
  </Assessment>
  <AdditionalData type="string" meaning="Log received from">
   <string>/var/log/auth.log</string></AdditionalData>
  <AdditionalData type="integer" meaning="Log line number"><integer>4021</integer></AdditionalData>
 </Alert>
</IDMEF-Message>"""

# Snort's IDMEF output plugin style: no declaration, no namespace, an empty attribute
# (model=""), padding in CreateTime, ports as text, tabs and CRLFs.
SNORT_ALERT = (
    b'<IDMEF-Message version="1.0">\r\n'
    b'\t<Alert messageid="2847">\r\n'
    b'\t\t<Analyzer analyzerid="snort-ext-01" model="">\r\n'
    b'\t\t\t<Node category="dns"><name>ids1.example.com</name></Node>\r\n'
    b"\t\t</Analyzer>\r\n"
    b"\t\t<CreateTime>  2004-07-21T13:42:17Z  </CreateTime>\r\n"
    b'\t\t<Source><Node><Address category="ipv4-addr"><address>203.0.113.9'
    b"</address></Address></Node></Source>\r\n"
    b'\t\t<Target><Node><Address category="ipv4-addr"><address>192.0.2.1'
    b"</address></Address></Node></Target>\r\n"
    b'\t\t<Classification text="ICMP PING NMAP">'
    b'<Reference origin="vendor-specific"><name>sid:469</name>'
    b"<url>http://www.snort.org/snort-db/sid.html?sid=469</url></Reference>"
    b"</Classification>\r\n"
    b'\t\t<Assessment><Impact severity="low" type="recon"/></Assessment>\r\n'
    b"\t</Alert>\r\n"
    b"</IDMEF-Message>\r\n"
)

HEARTBEAT = b"""<?xml version="1.0" encoding="UTF-8"?>
<idmef:IDMEF-Message version="1.0" xmlns:idmef="http://iana.org/idmef">
  <idmef:Heartbeat messageid="abc123456789">
    <idmef:Analyzer analyzerid="hq-dmz-analyzer01" name="dmz" model="Thor">
      <idmef:Node category="dns">
        <idmef:location>Headquarters DMZ Network</idmef:location>
        <idmef:name>analyzer01.example.com</idmef:name>
      </idmef:Node>
    </idmef:Analyzer>
    <idmef:CreateTime ntpstamp="0xbc722ebe.0x00000000">2000-03-09T14:07:58Z</idmef:CreateTime>
    <idmef:HeartbeatInterval>600</idmef:HeartbeatInterval>
    <idmef:AdditionalData type="real" meaning="%memused">
      <idmef:real>62.5</idmef:real>
    </idmef:AdditionalData>
  </idmef:Heartbeat>
</idmef:IDMEF-Message>
"""

# DTD violations seen in the wild: a Service with both name and portlist (the DTD
# allows one or the other), empty attributes, an unexpected child, an Address whose
# address is blank (so the Node's name is used).
SERVICE_NAME_AND_PORTLIST = b"""<IDMEF-Message xmlns="http://iana.org/idmef" version="">
  <Alert messageid="">
    <Analyzer analyzerid="scan-01" name="" />
    <CreateTime>2021-01-01T00:00:00Z</CreateTime>
    <Unexpected><Thing/></Unexpected>
    <Source><Node><Address category=""><address>   </address></Address>
      <name>scanner.example.net</name></Node></Source>
    <Target>
      <Node><Address category="ipv4-addr"><address>192.0.2.10</address></Address></Node>
      <Service><name>http</name><portlist>80,443,8080-8090</portlist></Service>
    </Target>
    <Classification text="">
    </Classification>
    <Assessment><Impact severity="" /></Assessment>
  </Alert>
</IDMEF-Message>"""

PASSWD = "/etc/passwd"


def assert_small_summary(summary: object) -> None:
    """Every summary has the documented keys, types and caps, and is JSON."""
    assert isinstance(summary, dict)
    assert set(summary) == KEYS
    assert summary["kind"] in ("Alert", "Heartbeat")
    for key in ("messageid", "create_time", "classification", "severity"):
        assert summary[key] is None or (
            isinstance(summary[key], str) and len(summary[key]) <= MAX_CHARS
        )
    assert len(summary["analyzer"]) <= MAX_ITEMS
    for analyzer in summary["analyzer"]:
        assert set(analyzer) == {"analyzerid", "name", "model"}
        for value in analyzer.values():
            assert value is None or (isinstance(value, str) and len(value) <= MAX_CHARS)
    for key in ("source", "target"):
        assert len(summary[key]) <= MAX_ITEMS
        assert len(set(summary[key])) == len(summary[key])
        assert all(isinstance(v, str) and 0 < len(v) <= MAX_CHARS for v in summary[key])
    assert isinstance(summary["messages"], int)
    assert 1 <= summary["messages"] <= MAX_MESSAGES
    json.dumps(summary)


# -- Realistic alerts ---------------------------------------------------------------


def test_rfc4765_alert() -> None:
    """Namespaced RFC 4765 alert: nested analyzers outermost first, addresses, names."""
    summary = summarize(RFC4765_ALERT)
    expected: idmef.Summary = {
        "kind": "Alert",
        "messageid": "abc123456789",
        "create_time": "2000-03-09T15:31:00-05:00",
        "classification": "Teardrop detected",
        "severity": "high",
        "analyzer": [
            {"analyzerid": "bc-corr-01", "name": "correlator01", "model": "Thor"},
            {"analyzerid": "bc-sensor01", "name": "sensor01", "model": "Hugin"},
        ],
        "source": ["192.0.2.200", "198.51.100.7"],
        "target": ["www.example.com"],
        "messages": 1,
        "heartbeat_interval": None,
    }
    assert summary == expected
    assert_small_summary(summary)


def test_prelude_alert() -> None:
    """Default namespace, three-deep chain, IPv6, duplicate target deduplicated."""
    summary = summarize(PRELUDE_ALERT)
    assert summary == {
        "kind": "Alert",
        "messageid": "3f0b1b54-7c3a-11ee-9d43-525400123456",
        "create_time": "2023-11-05T10:12:36.000000+00:00",
        "classification": "Remote Login",
        "severity": "medium",
        "analyzer": [
            {
                "analyzerid": "1984920491244551",
                "name": "prelude-manager",
                "model": "Prelude Manager",
            },
            {
                "analyzerid": "2204150831342263",
                "name": "prelude-correlator",
                "model": "Prelude Correlator",
            },
            {
                "analyzerid": "3311094530214987",
                "name": "prelude-lml",
                "model": "Prelude LML",
            },
        ],
        "source": ["2001:db8::bad:1"],
        "target": ["10.1.2.3"],
        "messages": 1,
        "heartbeat_interval": None,
    }


def test_snort_alert_without_namespace_or_declaration() -> None:
    """No namespace, no declaration, CRLFs, an empty attribute kept as it was sent."""
    summary = summarize(SNORT_ALERT)
    assert summary == {
        "kind": "Alert",
        "messageid": "2847",
        "create_time": "2004-07-21T13:42:17Z",
        "classification": "ICMP PING NMAP",
        "severity": "low",
        "analyzer": [{"analyzerid": "snort-ext-01", "name": None, "model": ""}],
        "source": ["203.0.113.9"],
        "target": ["192.0.2.1"],
        "messages": 1,
        "heartbeat_interval": None,
    }


def test_heartbeat() -> None:
    """A Heartbeat has no classification, severity, source or target."""
    expected: idmef.Summary = {
        "kind": "Heartbeat",
        "messageid": "abc123456789",
        "create_time": "2000-03-09T14:07:58Z",
        "classification": None,
        "severity": None,
        "analyzer": [
            {"analyzerid": "hq-dmz-analyzer01", "name": "dmz", "model": "Thor"}
        ],
        "source": [],
        "target": [],
        "messages": 1,
        "heartbeat_interval": 600,
    }
    assert summarize(HEARTBEAT) == expected


def test_heartbeat_alert_only_children_ignored() -> None:
    """A Heartbeat carrying alert-only elements (a DTD violation) is still a Heartbeat."""
    body = (
        b'<Heartbeat messageid="h"><Classification text="x"/>'
        b'<Assessment><Impact severity="high"/></Assessment>'
        b"<Source><Node><name>n</name></Node></Source></Heartbeat>"
    )
    summary = summarize(body)
    assert summary is not None
    assert summary["kind"] == "Heartbeat"
    assert summary["classification"] is None
    assert summary["severity"] is None
    assert summary["source"] == []


def test_service_with_name_and_portlist() -> None:
    """DTD violations are tolerated; blank address falls back to the Node's name."""
    summary = summarize(SERVICE_NAME_AND_PORTLIST)
    assert summary == {
        "kind": "Alert",
        "messageid": "",
        "create_time": "2021-01-01T00:00:00Z",
        "classification": "",
        "severity": "",
        "analyzer": [{"analyzerid": "scan-01", "name": "", "model": None}],
        "source": ["scanner.example.net"],
        "target": ["192.0.2.10"],
        "messages": 1,
        "heartbeat_interval": None,
    }


def test_bare_alert_root() -> None:
    """An Alert without the IDMEF-Message wrapper, in the IDMEF namespace."""
    body = (
        b'<Alert xmlns="http://iana.org/idmef" messageid="7">'
        b"<CreateTime>2024-01-01T00:00:00Z</CreateTime></Alert>"
    )
    summary = summarize(body)
    assert summary is not None
    assert (summary["kind"], summary["messageid"], summary["create_time"]) == (
        "Alert",
        "7",
        "2024-01-01T00:00:00Z",
    )
    assert summary["analyzer"] == []
    assert summary["source"] == summary["target"] == []
    assert summary["classification"] is summary["severity"] is None


def test_node_with_address_and_name_gives_addresses_only() -> None:
    """The name is a fallback: a Node with addresses contributes its addresses."""
    body = (
        b"<Alert><Source><Node><name>host.example</name>"
        b"<Address><address>192.0.2.1</address></Address>"
        b"<Address><address>192.0.2.2</address></Address>"
        b"</Node></Source></Alert>"
    )
    summary = summarize(body)
    assert summary is not None
    assert summary["source"] == ["192.0.2.1", "192.0.2.2"]


def test_messages_back_to_back() -> None:
    """Two messages, each with its declaration: the first is summarised, 2 counted."""
    summary = summarize(RFC4765_ALERT + b"\n" + PRELUDE_ALERT)
    assert summary is not None
    assert summary["messageid"] == "abc123456789"
    assert summary["messages"] == 2


def test_messages_back_to_back_without_separators() -> None:
    """Messages glued together, mixed with bare roots, NULs and BOMs between them."""
    body = (
        SNORT_ALERT.rstrip()
        + HEARTBEAT
        + b"\0\0\xef\xbb\xbf"
        + b"<Alert/>\n<Heartbeat/>\n\0"
    )
    summary = summarize(body)
    assert summary is not None
    assert summary["messageid"] == "2847"
    assert summary["messages"] == 4


def test_first_message_without_events_is_skipped() -> None:
    """An empty IDMEF-Message (legal in RFC 4765) does not hide the next one's alert."""
    summary = summarize(b"<IDMEF-Message/>" + SNORT_ALERT)
    assert summary is not None
    assert summary["messageid"] == "2847"
    assert summary["messages"] == 2


def test_no_events_at_all() -> None:
    """Nothing to summarise: None."""
    assert summarize(b'<IDMEF-Message version="1.0"></IDMEF-Message>') is None


def test_broken_later_message_ends_the_count() -> None:
    """A later message cut short, or foreign, does not void the first."""
    for tail in (RFC4765_ALERT[:300], b"<html/>", b"garbage"):
        summary = summarize(SNORT_ALERT + tail)
        assert summary is not None
        assert summary["messageid"] == "2847"
        assert summary["messages"] == 1


def test_message_count_is_capped() -> None:
    """Each message costs a parser: counting stops at MAX_MESSAGES."""
    summary = summarize(b"<Alert/>" * (MAX_MESSAGES + 50))
    assert summary is not None
    assert summary["messages"] == MAX_MESSAGES


def test_messages_across_parser_chunks() -> None:
    """Bodies larger than the parser's first chunk: counts and offsets stay right."""
    padding = "<AdditionalData><string>" + "x" * 5000 + "</string></AdditionalData>"
    messages = [
        f'<IDMEF-Message><Alert messageid="m{i}">{padding}</Alert></IDMEF-Message>\n'
        for i in range(40)
    ]
    summary = summarize("".join(messages).encode())
    assert summary is not None
    assert summary["messageid"] == "m0"
    assert summary["messages"] == 40


def test_huge_attribute_across_parser_chunks() -> None:
    """One attribute far larger than a parser chunk is read whole, then capped."""
    summary = summarize(b'<Alert messageid="' + b"7" * 300_000 + b'"/>')
    assert summary is not None
    assert summary["messageid"] == "7" * MAX_CHARS


def test_utf8_bom() -> None:
    """A UTF-8 BOM before the declaration is stripped."""
    assert summarize(b"\xef\xbb\xbf" + RFC4765_ALERT) == summarize(RFC4765_ALERT)


def test_leading_blank_lines() -> None:
    """Blank lines before the declaration (illegal, but seen) are tolerated."""
    assert summarize(b"\r\n\n  " + RFC4765_ALERT) == summarize(RFC4765_ALERT)


def test_declared_latin1() -> None:
    """An encoding declared in the XML declaration is honoured by the parser."""
    body = (
        '<?xml version="1.0" encoding="ISO-8859-1"?>'
        '<Alert messageid="é"><Classification text="Tentative échouée"/></Alert>'
    ).encode("latin-1")
    summary = summarize(body)
    assert summary is not None
    assert summary["messageid"] == "é"
    assert summary["classification"] == "Tentative échouée"


def test_utf16() -> None:
    """UTF-16 with a BOM (the BOM must not be mistaken for junk)."""
    text = (
        '<?xml version="1.0" encoding="UTF-16"?>\n'
        + PRELUDE_ALERT.decode().split("\n", 1)[1]
    )
    assert summarize(text.encode("utf-16")) == summarize(PRELUDE_ALERT)


# -- Hostile inputs ----------------------------------------------------------------


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE IDMEF-Message [
  <!ENTITY lol "lol">
  <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
  <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
  <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
  <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
  <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
  <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
  <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
  <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
  <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<IDMEF-Message><Alert messageid="&lol9;"><Classification text="&lol9;"/></Alert>
</IDMEF-Message>
"""

EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE IDMEF-Message [
  <!ENTITY xxe SYSTEM "file:///etc/passwd">
]>
<IDMEF-Message><Alert messageid="x"><Classification text="c">&xxe;</Classification>
<CreateTime>&xxe;</CreateTime></Alert></IDMEF-Message>
"""

PARAMETER_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE IDMEF-Message [
  <!ENTITY % passwd SYSTEM "file:///etc/passwd">
  %passwd;
]>
<IDMEF-Message><Alert messageid="x"/></IDMEF-Message>
"""

EXTERNAL_DTD = b"""<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE IDMEF-Message PUBLIC "-//IETF//DTD RFC 4765 IDMEF v1.0//EN"
  "http://127.0.0.1:9/idmef-message.dtd">
<IDMEF-Message version="1.0"><Alert messageid="x"/></IDMEF-Message>
"""

HOSTILE = {
    "billion laughs": BILLION_LAUGHS,
    "external entity": EXTERNAL_ENTITY,
    "parameter entity": PARAMETER_ENTITY,
    "external DTD": EXTERNAL_DTD,
    "hostile second message": SNORT_ALERT + EXTERNAL_ENTITY,
    "hostile after BOM": b"\xef\xbb\xbf" + BILLION_LAUGHS,
}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything tries to reach the network."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture
def no_passwd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything opens /etc/passwd."""
    import builtins
    import io

    real_open = io.open

    def guarded(file: object, *args: object, **kwargs: object) -> object:
        if str(file) == PASSWD:
            raise AssertionError("/etc/passwd opened")
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)


@pytest.mark.parametrize("body", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile(body: bytes, no_network: None, no_passwd: None) -> None:
    """DTDs, entities and external references are refused: no summary at all."""
    assert summarize(body) is None


def test_nothing_from_passwd_leaks() -> None:
    """Even the refusal's path leaves nothing of /etc/passwd in what comes back."""
    with open(PASSWD, encoding="utf-8", errors="replace") as f:
        first_line = f.readline().strip()
    for body in (EXTERNAL_ENTITY, PARAMETER_ENTITY, SNORT_ALERT + EXTERNAL_ENTITY):
        result = summarize(body)
        assert result is None
        assert first_line not in repr(result)
        assert "root:" not in repr(result)


def test_refusal_is_a_defusedxml_refusal() -> None:
    """The inner parser really refuses (rather than failing for another reason)."""
    from defusedxml import DTDForbidden

    for body in (BILLION_LAUGHS, EXTERNAL_ENTITY, EXTERNAL_DTD):
        with pytest.raises(DTDForbidden):
            idmef._summarize(body)


# -- Not IDMEF, or not XML -----------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"\xff" * 64,
        b"",
        b"   \r\n",
        b"\0" * 16,
        b"Content-Type: text/plain\r\n\r\nhello",
        b'{"alert": "json, not xml"}',
    ],
    ids=["0xff", "empty", "blank", "nul", "text", "json"],
)
def test_not_xml(body: bytes) -> None:
    """Bytes that are not XML have no summary."""
    assert summarize(body) is None


@pytest.mark.parametrize(
    "body",
    [
        b"<html><body>Alert</body></html>",
        b'<?xml version="1.0"?><rss version="2.0"><Alert/></rss>',
        b'<idmef:Event xmlns:idmef="http://iana.org/idmef"/>',
        b"<alert/>",  # RFC 4765 names are case-sensitive
        b"<idmef-message><Alert/></idmef-message>",
    ],
)
def test_not_idmef_root(body: bytes) -> None:
    """Well-formed XML whose root is not IDMEF has no summary."""
    assert summarize(body) is None


@pytest.mark.parametrize("cut", [1, 40, 200, len(RFC4765_ALERT) // 2, -30])
def test_truncated(cut: int) -> None:
    """A message cut short has no summary."""
    assert summarize(RFC4765_ALERT[:cut]) is None


def test_undeclared_prefix() -> None:
    """A prefix with no namespace declaration is not well-formed XML."""
    assert summarize(b"<idmef:Alert/>") is None


@pytest.mark.parametrize("encoding", ["rot13", "utf-7", "idna", "bogus", "cp037"])
def test_unusable_declared_encoding(encoding: str) -> None:
    """Encodings Python cannot hand to expat give None, not an exception."""
    body = b'<?xml version="1.0" encoding="%s"?><Alert/>' % encoding.encode()
    assert summarize(body) is None


def test_accepts_bytearray_and_memoryview() -> None:
    """Twisted hands over bytes, but a buffer must not be a crash."""
    expected = summarize(SNORT_ALERT)
    assert summarize(bytearray(SNORT_ALERT)) == expected  # type: ignore[arg-type]
    assert summarize(memoryview(SNORT_ALERT)) == expected  # type: ignore[arg-type]


# -- Caps ---------------------------------------------------------------------------


def test_long_strings_are_capped() -> None:
    """Every string an attacker controls is cut to MAX_CHARS."""
    long = "A" * (MAX_CHARS * 5)
    body = (
        f'<Alert messageid="{long}">'
        f'<Analyzer analyzerid="{long}" name="{long}" model="{long}"/>'
        f"<CreateTime>  {long}  </CreateTime>"
        f"<Source><Node><Address><address>{long}</address></Address></Node></Source>"
        f"<Target><Node><name>{long}</name></Node></Target>"
        f'<Classification text="{long}"/>'
        f'<Assessment><Impact severity="{long}"/></Assessment></Alert>'
    ).encode()
    summary = summarize(body)
    assert_small_summary(summary)
    assert summary is not None
    capped = "A" * MAX_CHARS
    for key in ("messageid", "create_time", "classification", "severity"):
        assert summary[key] == capped
    assert summary["analyzer"] == [
        {"analyzerid": capped, "name": capped, "model": capped}
    ]
    assert summary["source"] == summary["target"] == [capped]


def test_long_lists_are_capped() -> None:
    """Sources, targets and the analyzer chain stop at MAX_ITEMS."""
    sources = "".join(
        f"<Source><Node><Address><address>10.0.{i // 256}.{i % 256}</address>"
        f"</Address></Node></Source>"
        for i in range(MAX_ITEMS * 3)
    )
    targets = "".join(
        f"<Target><Node><name>h{i}.example</name></Node></Target>"
        for i in range(MAX_ITEMS * 3)
    )
    depth = MAX_ITEMS * 3
    analyzers = "".join(f'<Analyzer analyzerid="{i}">' for i in range(depth))
    analyzers += "</Analyzer>" * depth
    body = f"<Alert>{analyzers}{sources}{targets}</Alert>".encode()
    summary = summarize(body)
    assert_small_summary(summary)
    assert summary is not None
    assert len(summary["source"]) == len(summary["target"]) == MAX_ITEMS
    assert summary["source"][:2] == ["10.0.0.0", "10.0.0.1"]
    assert [a["analyzerid"] for a in summary["analyzer"]] == [
        str(i) for i in range(MAX_ITEMS)
    ]


def test_duplicates_do_not_use_up_the_cap() -> None:
    """Deduplication happens before the cap."""
    same = (
        "<Source><Node><Address><address>192.0.2.1</address></Address></Node></Source>"
    )
    other = "<Source><Node><name>other.example</name></Node></Source>"
    body = f"<Alert>{same * 500}{other}</Alert>".encode()
    summary = summarize(body)
    assert summary is not None
    assert summary["source"] == ["192.0.2.1", "other.example"]


def test_deep_nesting() -> None:
    """Deeply nested elements neither recurse nor blow up."""
    depth = 50_000
    body = b"<Alert>" + b"<Analyzer>" * depth + b"</Analyzer>" * depth + b"</Alert>"
    summary = summarize(body)
    assert_small_summary(summary)
    assert summary is not None
    assert len(summary["analyzer"]) == MAX_ITEMS


# -- Properties ---------------------------------------------------------------------

# Inside the module the only exceptions arbitrary input may raise are the parser's
# complaints; anything else would mean the top-level safety net is hiding a bug.
EXPECTED = idmef._UNUSABLE


def check_never_raises(body: bytes) -> None:
    """summarize never raises; inside, only the parser's complaints escape."""
    result = summarize(body)
    if result is not None:
        assert_small_summary(result)
    with contextlib.suppress(*EXPECTED):
        idmef._summarize(body)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes(body: bytes) -> None:
    """Arbitrary bytes never make summarize raise."""
    check_never_raises(body)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=2048), st.sampled_from(["utf-8", "utf-16", "latin-1"]))
def test_arbitrary_text_in_alert(text: str, encoding: str) -> None:
    """Arbitrary text, markup included, between Alert tags never raises."""
    inner = text.encode(
        encoding, errors="surrogatepass" if "utf" in encoding else "replace"
    )
    check_never_raises(b"<Alert>" + inner + b"</Alert>")
    check_never_raises(
        b'<IDMEF-Message><Alert messageid="' + inner + b'"/></IDMEF-Message>'
    )


XML_CHARS = st.characters(blacklist_categories=("Cs", "Cc"))

IDMEF_FRAGMENTS = st.sampled_from(
    [
        "<Analyzer analyzerid='a'>",
        "</Analyzer>",
        "<Source><Node><name>n</name></Node></Source>",
        "<Target><Node><Address><address>192.0.2.1</address></Address></Node></Target>",
        "<Classification text='c'/>",
        "<Assessment><Impact severity='high'/></Assessment>",
        "<CreateTime>t</CreateTime>",
        "</Alert><Alert>",
        "</IDMEF-Message><IDMEF-Message>",
        "<?xml version='1.0'?>",
        "<!DOCTYPE x>",
        "&amp;",
        "&lt;",
        "<![CDATA[<Alert>]]>",
        "<!-- comment -->",
        "\0",
        "\ufeff",
    ]
)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.one_of(IDMEF_FRAGMENTS, st.text(XML_CHARS, max_size=20)), max_size=30)
)
def test_arbitrary_idmef_like_fragments(fragments: list[str]) -> None:
    """Shuffled pieces of IDMEF in an IDMEF-Message never raise."""
    body = "<IDMEF-Message><Alert>" + "".join(fragments) + "</Alert></IDMEF-Message>"
    check_never_raises(body.encode("utf-8", errors="surrogatepass"))


@settings(max_examples=300, deadline=None)
@given(st.text(XML_CHARS, min_size=1, max_size=3000))
def test_attribute_round_trip(value: str) -> None:
    """Any legal attribute value comes back as sent, cut to MAX_CHARS."""
    body = f"<Alert messageid={quoteattr(value)}/>".encode()
    summary = summarize(body)
    assert summary is not None
    assert summary["messageid"] == value[:MAX_CHARS]


# -- The parser against defusedxml's ------------------------------------------------
#
# The summary's parser drives expat itself, with the C TreeBuilder as its target, for
# speed.  defusedxml's parser (ElementTree's pure-Python one, with the same refusals)
# is the reference it replaced: for any input both must build the same tree, or both
# refuse it, or both find it unusable.


def _reference_tree(data: bytes) -> Element:
    from defusedxml.ElementTree import DefusedXMLParser

    parser = DefusedXMLParser(target=TreeBuilder(), forbid_dtd=True)
    parser.feed(data)
    root: Element = parser.close()
    return root


def _dump(element: Element) -> object:
    """A tree as nested tuples, with ElementTree's {ns}local names as expat's ns}local."""

    def name(tag: str) -> str:
        return tag.removeprefix("{")

    return (
        name(element.tag),
        sorted((name(k), v) for k, v in element.attrib.items()),
        element.text,
        element.tail,
        [_dump(child) for child in element],
    )


def _outcome(parse: object, data: bytes) -> object:
    """The tree, or the kind of refusal: DTD, entity or external, or merely unusable."""
    from defusedxml import DefusedXmlException

    try:
        return _dump(parse(data))  # type: ignore[operator]
    except DefusedXmlException as refusal:
        return type(refusal).__name__
    except (*idmef._UNUSABLE, SyntaxError):
        return "unusable"


def check_same_tree(data: bytes) -> None:
    ours = _outcome(lambda d: idmef._parse_whole(memoryview(d)), data)
    assert ours == _outcome(_reference_tree, data)


SAMPLES = {
    "rfc4765": RFC4765_ALERT,
    "prelude": PRELUDE_ALERT,
    "snort": SNORT_ALERT,
    "heartbeat": HEARTBEAT,
    "service": SERVICE_NAME_AND_PORTLIST,
    **HOSTILE,
}


@pytest.mark.parametrize("body", SAMPLES.values(), ids=SAMPLES.keys())
def test_same_tree_as_defusedxml_for_the_samples(body: bytes) -> None:
    check_same_tree(body)
    check_same_tree(body.decode("utf-8").encode("utf-16"))


def test_the_samples_really_build_trees() -> None:
    """The comparison above is not two refusals or two failures agreeing."""
    for body in (RFC4765_ALERT, PRELUDE_ALERT, SNORT_ALERT, HEARTBEAT):
        assert isinstance(
            _outcome(lambda d: idmef._parse_whole(memoryview(d)), body), tuple
        )
    assert (
        _outcome(lambda d: idmef._parse_whole(memoryview(d)), EXTERNAL_ENTITY)
        == "DTDForbidden"
    )


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.one_of(IDMEF_FRAGMENTS, st.text(XML_CHARS, max_size=20)), max_size=30),
    st.sampled_from(["utf-8", "utf-16", "latin-1"]),
)
def test_same_tree_as_defusedxml(fragments: list[str], encoding: str) -> None:
    """Pieces of IDMEF, markup, entities, DTDs and stray text: the same tree or the same refusal."""
    body = "<IDMEF-Message><Alert>" + "".join(fragments) + "</Alert></IDMEF-Message>"
    check_same_tree(body.encode(encoding, errors="replace"))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_same_outcome_as_defusedxml_for_arbitrary_bytes(body: bytes) -> None:
    check_same_tree(body)


def _reference_parse_one(data: memoryview) -> tuple[Element, int | None]:
    """The summary's _parse_one as it was with defusedxml's parser: the reference."""
    from xml.etree.ElementTree import ParseError

    from defusedxml.ElementTree import DefusedXMLParser

    builder = TreeBuilder()
    parser = DefusedXMLParser(target=builder, forbid_dtd=True)
    expat = parser.parser
    try:
        idmef._feed(expat, data)  # the same chunks, straight into the same expat
        root: Element = builder.close()
    except (ParseError, idmef.ExpatError) as error:
        end = expat.ErrorByteIndex
        if not 0 < end < len(data):
            raise
        if error.code == idmef._JUNK_AFTER_ROOT:
            return builder.close(), end
        return _reference_tree(bytes(data[:end])), end
    return root, None


def _whole_body(body: bytes) -> object:
    """What the summary makes of a whole body: the summary, the refusal, or unusable."""
    from defusedxml import DefusedXmlException

    try:
        return idmef._summarize(body)
    except DefusedXmlException as refusal:
        return type(refusal).__name__
    except idmef._UNUSABLE:
        return "unusable"


def check_same_whole_body(body: bytes) -> None:
    ours = _whole_body(body)
    with mock.patch.object(idmef, "_parse_one", _reference_parse_one):
        assert ours == _whole_body(body)


PROLOGS = st.sampled_from(
    [
        "",
        "<?xml version='1.0'?>",
        "<!DOCTYPE IDMEF-Message>",
        "<!DOCTYPE IDMEF-Message [<!ENTITY e 'x'>]>",
        "<!DOCTYPE IDMEF-Message [<!ENTITY % p SYSTEM 'file:///etc/passwd'> %p;]>",
        "<!DOCTYPE IDMEF-Message [<!NOTATION n SYSTEM 'x'><!ENTITY u SYSTEM 'y' NDATA n>]>",
        "<!DOCTYPE IDMEF-Message SYSTEM 'http://127.0.0.1:9/idmef.dtd'>",
        "<!-- comment -->",
        "<?pi data?>",
    ]
)
MESSAGES = st.sampled_from(
    [
        "<IDMEF-Message><Alert messageid='a'><Classification text='c'/></Alert></IDMEF-Message>",
        "<Heartbeat messageid='h'><HeartbeatInterval>60</HeartbeatInterval></Heartbeat>",
        "<Alert messageid='&amp;'><Source><Node><name>n</name></Node></Source></Alert>",
        "<IDMEF-Message><Alert>&e;</Alert></IDMEF-Message>",
        "<rss/>",
        "<Alert>",
    ]
)
SEPARATORS = st.sampled_from(["", "\n", "\0", "\ufeff", "\r\n\0\n"])


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.tuples(SEPARATORS, PROLOGS, MESSAGES), min_size=1, max_size=4),
    st.sampled_from(["utf-8", "utf-16"]),
)
def test_same_outcome_as_defusedxml_with_prologs_between_messages(
    parts: list[tuple[str, str, str]], encoding: str
) -> None:
    """DTDs, entities and notations before any message of a body: the same refusal."""
    body = "".join(sep + prolog + message for sep, prolog, message in parts)
    check_same_whole_body(body.encode(encoding))


def test_the_prolog_comparison_reaches_refusals() -> None:
    """The comparison above meets refusals, in later messages too, not only failures."""
    first = "<!DOCTYPE IDMEF-Message [<!ENTITY e 'x'>]><Alert/>"
    later = "<Alert/>\n<!DOCTYPE IDMEF-Message><Alert/>"
    for body in (first, later):
        assert _whole_body(body.encode()) == "DTDForbidden"
        check_same_whole_body(body.encode())


def test_every_refusal_of_defusedxml_is_set() -> None:
    """Each expat handler defusedxml's parser uses to refuse is set here too."""
    from defusedxml.ElementTree import DefusedXMLParser

    theirs = DefusedXMLParser(target=TreeBuilder(), forbid_dtd=True).parser
    ours = idmef._parser(TreeBuilder())
    refusing = [
        name
        for name in dir(theirs)
        if name.endswith("Handler")
        and getattr(getattr(theirs, name), "__name__", "").startswith("defused_")
    ]
    assert len(refusing) == 4, refusing
    for name in refusing:
        assert getattr(ours, name) is not None, name


def test_the_refusals_behind_the_dtd_refusal_work() -> None:
    """With the DTD let through, entity declarations and external references are
    still refused, each by its own handler."""
    from defusedxml import EntitiesForbidden, ExternalReferenceForbidden

    declared = b"<!DOCTYPE a [<!ENTITY e 'x'>]><Alert>&e;</Alert>"
    unparsed = (
        b"<!DOCTYPE a [<!NOTATION n SYSTEM 'x'><!ENTITY u SYSTEM 'y' NDATA n>]><Alert/>"
    )
    external = (
        b"<!DOCTYPE a [<!ENTITY x SYSTEM 'file:///etc/passwd'>]><Alert>&x;</Alert>"
    )
    with mock.patch.object(idmef, "_refuse_dtd", lambda *a: None):
        for body in (declared, external):
            with pytest.raises(EntitiesForbidden):
                idmef._summarize(body)
        with mock.patch.object(idmef, "_refuse_entity", lambda *a: None):
            with pytest.raises(EntitiesForbidden):
                idmef._summarize(unparsed)
            with (
                mock.patch.object(idmef, "_refuse_unparsed_entity", lambda *a: None),
                pytest.raises(ExternalReferenceForbidden),
            ):
                idmef._summarize(external)
