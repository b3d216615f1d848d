"""
The manager's summary of an IDMEF alert body (RFC 4765).

The manager stores every alert body exactly as received and, next to it, a small JSON
summary (the C{idmef} field of C{iapctl alerts --json}, DESIGN.md section 7) so that
people can list and filter alerts without re-parsing XML.  The summary is a convenience:
a body that cannot be summarised is still stored, with a null summary.

Two forces shape this module:

  - The body is attacker-controlled.  Any DTD at all is refused (with defusedxml's
    refusals, on the expat handlers defusedxml uses), so no entity is ever expanded
    and nothing is loaded from disk or the network; every string and list in the
    summary is capped so that a hostile body cannot make the summary large; and
    L{summarize} never raises.
  - Real producers are looser than RFC 4765's schema (NOTES.md, "Real IDMEF in the
    wild"): no XML declaration, no namespace, a bare C{Alert} root, several messages
    written back to back, Analyzers nested several levels deep, DTD violations.  So
    elements are matched on their local names only, whatever their namespace, and
    nothing is validated beyond what the summary needs.

Cost: expat builds the tree straight into ElementTree's C TreeBuilder, with no
Python per element (L{_parser}); what is left is reading the summary out of the tree.
About 50 us for the benchmark's 1 KiB alert, against 90-105 us when the parse went
through defusedxml's pure-Python parser.  The 200 depends only on the raw body being
durable, so call this off the acknowledgement path.

Decisions, in one place::

  input                                   summary
  -------------------------------------   --------------------------------------------
  DOCTYPE / entity / external reference   None (refused, anywhere in body)
  not well-formed, or bad encoding        None
  root not IDMEF-Message/Alert/Heartbeat  None
  IDMEF-Message holding no Alert or       None (nothing to summarise)
    Heartbeat in the whole body
  messages back to back                   first Alert/Heartbeat; "messages" counts the
                                            IDMEF-Message documents (or bare roots),
                                            not the Alerts inside, up to MAX_MESSAGES
  later message broken or not IDMEF       counting stops there; the first is kept
  attribute present but empty             "" (what the producer said)
  element text empty or absent            None
  Heartbeat with alert-only children      ignored: classification/severity None,
                                            source/target empty (RFC 4765 4.2.3)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TypedDict
from xml.etree.ElementTree import Element, ParseError, TreeBuilder
from xml.parsers import expat
from xml.parsers.expat import ExpatError, XMLParserType
from xml.parsers.expat import errors as expat_errors

from defusedxml import (
    DefusedXmlException,
    DTDForbidden,
    EntitiesForbidden,
    ExternalReferenceForbidden,
)

__all__ = [
    "MAX_CHARS",
    "MAX_ITEMS",
    "MAX_MESSAGES",
    "AnalyzerSummary",
    "Summary",
    "summarize",
]

MAX_ITEMS = 64
"""At most this many entries in each list of a summary."""

MAX_CHARS = 1024
"""At most this many characters in each string of a summary."""

MAX_MESSAGES = 1024
"""
C{messages} stops counting here.  Each further message costs a new parser; a 1 MiB
body of tiny messages would otherwise cost seconds of manager CPU.
"""

# Errors that only say "this body is not a usable IDMEF document": expat's, ours (a
# root that is not IDMEF), defusedxml's refusals.  LookupError and
# ValueError come from encodings declared in the XML declaration that Python cannot
# hand to expat (unknown, multi-byte, bytes-to-bytes codecs).
_UNUSABLE = (ExpatError, ParseError, DefusedXmlException, LookupError, ValueError)

_UTF8_BOM = b"\xef\xbb\xbf"
_BLANKS = b" \t\r\n"

# Expat's code for "a complete document was followed by something else".
_JUNK_AFTER_ROOT = expat_errors.codes[expat_errors.XML_ERROR_JUNK_AFTER_DOC_ELEMENT]
_FIRST_CHUNK = 16 * 1024
# Between messages producers leave newlines and, being C programs, NULs; and a BOM
# when each message was written as a file of its own.
_BETWEEN = re.compile(rb"[ \t\r\n\0]*(?:\xef\xbb\xbf[ \t\r\n\0]*)*")

_MESSAGE = "IDMEF-Message"
_KINDS = frozenset({"Alert", "Heartbeat"})
_ROOTS = _KINDS | {_MESSAGE}


class AnalyzerSummary(TypedDict):
    """One Analyzer of the chain that produced or relayed an alert."""

    analyzerid: str | None
    name: str | None
    model: str | None


class Summary(TypedDict):
    """What the manager stores about an IDMEF body; see L{summarize}."""

    kind: str
    messageid: str | None
    create_time: str | None
    classification: str | None
    severity: str | None
    analyzer: list[AnalyzerSummary]
    source: list[str]
    target: list[str]
    messages: int
    heartbeat_interval: int | None


def summarize(body: bytes) -> Summary | None:
    """
    Summarise an IDMEF alert body, or return C{None} when it cannot be.

    The first Alert or Heartbeat of the body is summarised; C{messages} says how many
    IDMEF messages (documents) the body holds, up to L{MAX_MESSAGES}.  C{analyzer} is
    the Analyzer chain outermost first (the last relay first, the original sensor
    last); C{source} and C{target} hold each Node's addresses, or its name when it has
    none, deduplicated in document order.

    This never raises: the body comes from the network, and an alert that cannot be
    summarised must still be stored.
    """
    try:
        return _summarize(body)
    except _UNUSABLE:
        return None
    except Exception:
        # A safety net for a bug in this module, not an expected path: the tests
        # check that arbitrary input only ever raises _UNUSABLE inside.
        return None


def _summarize(body: bytes) -> Summary | None:
    """L{summarize}, letting the parser's complaints through (for the tests)."""
    event, messages = None, 0
    for root in _documents(bytes(body)):
        messages += 1
        if event is None:
            event = _first_event(root)
    if event is None:
        return None
    return _summary(event, messages)


# -- Parsing: one or more documents back to back ------------------------------------


def _parse_one(data: memoryview) -> tuple[Element, int | None]:
    """
    Parse the XML document at the start of C{data}.

    Return its root and the offset in C{data} where something else begins, or C{None}
    when the document ran to the end.

    Expat stops at the first byte that cannot follow what it has read.  When that
    byte follows a complete document, another message may begin there.  Expat says so
    itself for most separators ("junk after document element"); for the rest (a NUL,
    a BOM) the bytes before the error are parsed again on their own, which succeeds
    only if they hold a complete document.
    """
    builder = TreeBuilder()
    parser = _parser(builder)
    try:
        _feed(parser, data)
    except ExpatError as error:
        end = parser.ErrorByteIndex
        if not 0 < end < len(data):
            raise
        if error.code == _JUNK_AFTER_ROOT:
            return builder.close(), end
        return _parse_whole(data[:end]), end
    return builder.close(), None


def _parse_whole(data: memoryview) -> Element:
    """Parse C{data} as exactly one XML document."""
    builder = TreeBuilder()
    _feed(_parser(builder), data)
    root: Element = builder.close()
    return root


def _parser(builder: TreeBuilder) -> XMLParserType:
    """
    An expat parser that builds its tree in C{builder} and refuses any DTD outright.

    IDMEF needs no DTD; an internal one is where entity bombs live, and an external
    one is a network or file access we must never make.  The refusals are
    defusedxml's own, set on the same expat handlers as its parser sets them.

    Expat calls the C TreeBuilder directly, with no Python between them:
    defusedxml's parser is ElementTree's pure-Python one, which runs Python code for
    every element, attribute and comment: most of what a summary cost.
    Tags come as C{namespace}local} rather than C{{namespace}local}; only local names
    are ever compared (L{_local}).
    """
    parser = expat.ParserCreate(None, "}")
    parser.buffer_text = True
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    parser.StartDoctypeDeclHandler = _refuse_dtd
    parser.EntityDeclHandler = _refuse_entity
    parser.UnparsedEntityDeclHandler = _refuse_unparsed_entity
    parser.ExternalEntityRefHandler = _refuse_external
    return parser


# The refusals, with the arguments expat's handlers are given.


def _refuse_dtd(
    name: str, sysid: str | None, pubid: str | None, internal: bool
) -> None:
    raise DTDForbidden(name, sysid, pubid)


def _refuse_entity(
    name: str,
    parameter: bool,
    value: str | None,
    base: str | None,
    sysid: str | None,
    pubid: str | None,
    notation: str | None,
) -> None:
    raise EntitiesForbidden(name, value, base, sysid, pubid, notation)


def _refuse_unparsed_entity(
    name: str,
    base: str | None,
    sysid: str | None,
    pubid: str | None,
    notation: str | None,
) -> None:
    raise EntitiesForbidden(name, None, base, sysid, pubid, notation)


def _refuse_external(
    context: str, base: str | None, sysid: str | None, pubid: str | None
) -> int:
    raise ExternalReferenceForbidden(context, base, sysid, pubid)


def _feed(parser: XMLParserType, data: memoryview) -> None:
    """
    Feed C{data} to C{parser} in chunks that double in size, then end the document.

    Expat copies what it is fed and stops at the end of the first document: fed all at
    once, a 1 MiB body of tiny messages would be copied once per message.  Doubling
    keeps a huge token, which expat rescans from its start at each chunk, linear.
    """
    start, size = 0, _FIRST_CHUNK
    while start < len(data):
        parser.Parse(data[start : start + size], False)
        start, size = start + size, size * 2
    parser.Parse(b"", True)


def _local(tag: object) -> str:
    """The local name of an element tag, whatever its namespace (or none)."""
    return tag.rpartition("}")[2] if isinstance(tag, str) else ""


def _start(body: bytes) -> memoryview:
    """
    The body without a UTF-8 BOM and leading blank lines.

    Blanks are stripped only when a C{<} follows, i.e. in an ASCII-compatible
    encoding: in UTF-16 they are half of a character.
    """
    if body.startswith(_UTF8_BOM):
        body = body[len(_UTF8_BOM) :]
    stripped = body.lstrip(_BLANKS)
    return memoryview(stripped if stripped.startswith(b"<") else body)


def _skip_between(data: memoryview, offset: int) -> int:
    """The offset of the next message after C{offset}: past blanks, NULs and BOMs."""
    match = _BETWEEN.match(data, offset)
    return offset if match is None else match.end()


def _documents(body: bytes) -> Iterator[Element]:
    """
    The roots of the IDMEF messages written back to back in C{body}.

    The first message must parse and be IDMEF, or this raises.  A later one that is
    broken, or not IDMEF, ends the sequence: the messages before it are still good.
    A refusal (DTD, entity) anywhere raises: the body is hostile.
    """
    data = _start(body)
    root, used = _parse_one(data)
    if _local(root.tag) not in _ROOTS:
        raise ParseError(f"not an IDMEF message: {_local(root.tag)[:64]!r}")
    yield root
    count, offset = 1, 0
    while used is not None and count < MAX_MESSAGES:
        offset = _skip_between(data, offset + used)
        if offset >= len(data):
            return
        try:
            root, used = _parse_one(data[offset:])
        except DefusedXmlException:
            raise  # a ValueError too, but hostile rather than broken
        except (ExpatError, ParseError, LookupError, ValueError):
            return
        if _local(root.tag) not in _ROOTS:
            return
        yield root
        count += 1


def _first_event(root: Element) -> Element | None:
    """The first Alert or Heartbeat of a message: the root or an IDMEF-Message child."""
    if _local(root.tag) in _KINDS:
        return root
    return next((child for child in root if _local(child.tag) in _KINDS), None)


# -- Reading the summary out of an Alert or Heartbeat --------------------------------


def _cap(value: str) -> str:
    """C{value} cut to L{MAX_CHARS}: the summary must stay small whatever the body."""
    return value[:MAX_CHARS]


def _children(element: Element, name: str) -> Iterator[Element]:
    """Direct children of C{element} with local name C{name}, in document order."""
    return (child for child in element if _local(child.tag) == name)


def _child(element: Element | None, name: str) -> Element | None:
    """The first direct child of C{element} with local name C{name}."""
    if element is None:
        return None
    return next(_children(element, name), None)


def _attribute(element: Element | None, name: str) -> str | None:
    """An attribute, verbatim but capped; C{None} when absent."""
    if element is None:
        return None
    value = element.get(name)
    return None if value is None else _cap(value)


def _text(element: Element | None) -> str | None:
    """An element's own text, stripped and capped; C{None} when absent or blank."""
    if element is None or element.text is None:
        return None
    return _cap(element.text.strip()) or None


def _analyzers(outermost: Element | None) -> list[AnalyzerSummary]:
    """
    The Analyzer chain, outermost first.

    RFC 4765 nests the Analyzer an alert came from inside the Analyzer that relayed
    it.  The walk is a loop, not a recursion: nesting depth is attacker-controlled.
    """
    chain: list[AnalyzerSummary] = []
    analyzer = outermost
    while analyzer is not None and len(chain) < MAX_ITEMS:
        chain.append(
            AnalyzerSummary(
                analyzerid=_attribute(analyzer, "analyzerid"),
                name=_attribute(analyzer, "name"),
                model=_attribute(analyzer, "model"),
            )
        )
        analyzer = _child(analyzer, "Analyzer")
    return chain


def _node_addresses(node: Element) -> Iterator[str]:
    """A Node's Address/address values, or its name when it has no address."""
    found = False
    for address in _children(node, "Address"):
        for value in _children(address, "address"):
            text = _text(value)
            if text is not None:
                found = True
                yield text
    if not found:
        name = _text(_child(node, "name"))
        if name is not None:
            yield name


def _addresses(parties: list[Element]) -> list[str]:
    """Addresses of the Nodes of C{parties} (Sources or Targets), deduped, in order."""
    seen: dict[str, None] = {}  # an ordered set
    for party in parties:
        for node in _children(party, "Node"):
            for address in _node_addresses(node):
                seen.setdefault(address)
                if len(seen) >= MAX_ITEMS:
                    return list(seen)
    return list(seen)


_PARTS = frozenset(
    {
        "Analyzer",
        "CreateTime",
        "Classification",
        "Assessment",
        "Source",
        "Target",
        "HeartbeatInterval",
    }
)


def _parts(event: Element) -> dict[str, list[Element]]:
    """
    The children of an event that the summary reads, by local name, in document order.

    One pass over the children instead of one per name looked up: the summary runs
    for every alert, and each pass costs a Python call per child.
    """
    parts: dict[str, list[Element]] = {}
    for child in event:
        name = _local(child.tag)
        if name in _PARTS:
            parts.setdefault(name, []).append(child)
    return parts


def _first(parts: dict[str, list[Element]], name: str) -> Element | None:
    found = parts.get(name)
    return found[0] if found else None


def _summary(event: Element, messages: int) -> Summary:
    """The summary of one Alert or Heartbeat element."""
    kind = _local(event.tag)
    parts = _parts(event)
    alert = kind == "Alert"
    return Summary(
        kind=kind,
        messageid=_attribute(event, "messageid"),
        create_time=_text(_first(parts, "CreateTime")),
        classification=_attribute(_first(parts, "Classification"), "text")
        if alert
        else None,
        severity=_attribute(_child(_first(parts, "Assessment"), "Impact"), "severity")
        if alert
        else None,
        analyzer=_analyzers(_first(parts, "Analyzer")),
        source=_addresses(parts.get("Source", [])) if alert else [],
        target=_addresses(parts.get("Target", [])) if alert else [],
        messages=messages,
        heartbeat_interval=None
        if alert
        else _interval(_first(parts, "HeartbeatInterval")),
    )


def _interval(element: Element | None) -> int | None:
    """A Heartbeat's HeartbeatInterval in seconds (RFC 4765 4.2.3), when it is sane."""
    text = _text(element)
    if text is None or not text.isdigit() or len(text) > 9:
        return None
    return int(text)
