"""
The dashboard's HTML pages: the alert list, one alert, the sensors.

Pages are built as twisted.web.template tag trees and flattened by Twisted, which
escapes every text node and attribute value: alert fields are attacker-controlled (a
sensor, or whoever wrote the alert it relays, chooses every octet of the body and so
every field of the IDMEF summary), and nothing from an alert is ever written into a
page any other way.  There is no inline script or style anywhere (the CSP forbids
both); the page's behaviour is C{/static/dashboard.js}, which builds rows for live
alerts with C{textContent} only.
"""

from __future__ import annotations

import datetime
import urllib.parse
from typing import Any, Callable, Sequence

from defusedxml import DefusedXmlException
from defusedxml.minidom import parseString
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import Request
from twisted.web.template import Tag, flattenString, tags

from .api import respond_later
from .query import SEVERITIES, AlertQuery, QueryError, SensorQuery, decode_args
from .readers import StoreReader

PRETTY_MAX = 256 * 1024
"""Bodies larger than this are shown as received, not pretty-printed."""

SHOW_MAX = 1024 * 1024
"""At most this many octets of a body are shown in the page (the download has all)."""


def link(path: str, params: Sequence[tuple[str, str]] = ()) -> str:
    return path + ("?" + urllib.parse.urlencode(list(params)) if params else "")


def when(text: str | None) -> str:
    """A stored time as 'YYYY-MM-DD HH:MM:SS' UTC (the full value is in the title)."""
    if not text:
        return "-"
    return text[:19].replace("T", " ")


def _html(request: Request, title: str, active: str, *content: Any, scripts: bool = True) -> bytes:
    page = tags.html(lang="en")(
        tags.head(
            tags.meta(charset="utf-8"),
            tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
            tags.title(f"{title} - iapd"),
            tags.link(rel="stylesheet", href="/static/dashboard.css"),
            tags.link(rel="icon", href="/static/favicon.svg", type="image/svg+xml"),
            tags.script(src="/static/dashboard.js", defer="defer") if scripts else "",
        ),
        tags.body(
            tags.header(
                tags.nav(
                    tags.span("iapd", class_="brand"),
                    *[
                        tags.a(label, href=href, class_="active") if name == active else tags.a(label, href=href)
                        for name, label, href in (
                            ("alerts", "Alerts", "/alerts"),
                            ("sensors", "Sensors", "/sensors"),
                            ("api", "API", "/api/"),
                        )
                    ],
                ),
            ),
            Tag("main")(*content),  # not in twisted.web.template.tags
        ),
    )
    out: list[bytes] = []
    d = flattenString(request, page)
    d.addCallback(out.append)
    if not out:  # a tree of plain tags and strings flattens at once
        raise RuntimeError("page did not flatten synchronously")
    request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
    return b"<!DOCTYPE html>\n" + out[0]


def _severity(value: str | None) -> Tag:
    known = value if value in SEVERITIES else "other"
    return tags.span(value or "-", class_=f"sev sev-{known}")


def _addresses(values: Sequence[str] | None) -> str:
    values = list(values or [])
    if len(values) > 3:
        return ", ".join(values[:3]) + f" (+{len(values) - 3})"
    return ", ".join(values) or "-"


def _alert_row(alert: dict[str, Any]) -> Tag:
    idmef = alert.get("idmef") or {}
    classification = idmef.get("classification")
    if classification is None:
        classification = "(heartbeat)" if idmef.get("kind") == "Heartbeat" else "(not IDMEF)" if not idmef else "-"
    return tags.tr(**{"data-id": str(alert["id"])})(
        tags.td(tags.a(str(alert["id"]), href=f"/alerts/{alert['id']}")),
        tags.td(when(alert["received"]), title=alert["received"]),
        tags.td(tags.a(alert["sensor"], href=link("/alerts", [("sensor", alert["sensor"])]))),
        tags.td(_severity(idmef.get("severity"))),
        tags.td(classification, class_="classification"),
        tags.td(_addresses(idmef.get("source"))),
        tags.td(_addresses(idmef.get("target"))),
        tags.td(" > ".join(alert["via"]) or "direct"),
    )


ALERT_COLUMNS = ("ID", "Received (UTC)", "Sensor", "Severity", "Classification", "Source", "Target", "Via")


def _filter_form(query: AlertQuery, raw: dict[str, list[str]]) -> Tag:
    def value(name: str) -> str:
        return (raw.get(name) or [""])[0]

    checks = []
    for severity in SEVERITIES:
        box = tags.input(type="checkbox", name="severity", value=severity, id=f"sev-{severity}")
        if severity in query.severity:
            box(checked="checked")
        checks.append(tags.label(box, " ", _severity(severity), for_=f"sev-{severity}"))
    heartbeats = tags.input(type="checkbox", name="heartbeats", value="1", id="heartbeats")
    if query.heartbeats:
        heartbeats(checked="checked")
    return tags.form(method="get", action="/alerts", class_="filters", id="filters")(
        tags.label("Sensor ", tags.input(type="text", name="sensor", value=value("sensor"), placeholder="dmz-*")),
        tags.label("Classification ", tags.input(
            type="text", name="classification", value=value("classification"), placeholder="contains text")),
        tags.label("Since ", tags.input(type="text", name="since", value=value("since"), placeholder="2h or 2026-11-23T10:00Z")),
        tags.label("Until ", tags.input(type="text", name="until", value=value("until"), placeholder="10m or ISO 8601 UTC")),
        tags.span(*checks, class_="severities"),
        tags.label(heartbeats, " heartbeats", for_="heartbeats"),
        tags.button("Filter", type="submit"),
        tags.a("Clear", href="/alerts", class_="clear"),
    )


class AlertsPage(Resource):
    """C{/alerts}: filters, the per-minute chart, the newest alerts, live updates."""

    def __init__(self, reader: StoreReader, run: Callable[..., Deferred[Any]]) -> None:
        super().__init__()
        self.reader = reader
        self.run = run

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self
        text = path.decode("ascii", "replace")
        if not text.isdigit() or len(text) > 18:
            return ErrorPage(404, "No such alert.")
        return AlertPage(self.reader, self.run, int(text))

    def render_GET(self, request: Request) -> Any:
        raw = decode_args(request.args)
        try:
            query = AlertQuery.from_args(raw)
        except QueryError as e:
            request.setResponseCode(400)
            return _html(request, "Alerts", "alerts", tags.h1("Alerts"), _filter_form(AlertQuery(), raw),
                         tags.p(f"Bad filter: {e}", class_="error"))

        def read() -> tuple[Any, int]:
            return self.reader.alerts(query), self.reader.latest_id()

        def render(result: tuple[Any, int]) -> bytes:
            page, latest = result
            filters = query.filter_args()
            live = query.before_id is None
            events = link("/api/events", [*filters, ("after_id", str(latest))])
            stats = link("/api/stats/per-minute", [(k, v) for k, v in filters if k not in ("since", "until")])
            body = tags.tbody(id="alerts")(*[_alert_row(a) for a in page.alerts])
            if live:
                body(**{"data-events": events})
            pager = []
            if query.before_id is not None:
                pager.append(tags.a("Newest", href=link("/alerts", filters)))
            if page.next_before_id is not None:
                pager.append(tags.a("Older", href=link("/alerts", [*filters, ("before_id", str(page.next_before_id))]),
                                    rel="next"))
            return _html(
                request, "Alerts", "alerts",
                tags.h1("Alerts"),
                _filter_form(query, raw),
                tags.section(class_="chart")(
                    tags.h2("Alerts per minute, last hour, by severity"),
                    tags.div(id="chart", **{"data-stats": stats})(tags.p("(the chart needs JavaScript)", class_="muted")),
                ),
                tags.p(
                    tags.span("live: new alerts appear at the top" if live else "an older page: no live updates",
                              id="status", class_="status"),
                ),
                tags.table(class_="alerts")(
                    tags.thead(tags.tr(*[tags.th(c) for c in ALERT_COLUMNS])),
                    body,
                ),
                tags.p("No alert matches." if not page.alerts else "", id="empty", class_="muted"),
                tags.nav(*pager, class_="pager"),
            )

        return respond_later(request, self.run(read), render)


def pretty_body(body: bytes, content_type: str) -> tuple[str, str]:
    """
    The body as text for the page, and how it is shown: XML pretty-printed (parsed with
    defusedxml: no DTD, no entity), else as received; non-UTF-8 octets and control
    characters are made visible rather than passed to the browser.
    """
    shown = body[:SHOW_MAX]
    cut = len(body) > SHOW_MAX
    note = ""
    if len(body) <= PRETTY_MAX and shown.lstrip()[:1] == b"<":
        try:
            pretty = _pretty_xml(shown)
        except (DefusedXmlException, ValueError, LookupError, Exception):
            pretty = None
        if pretty is not None:
            return _visible(pretty), "XML, pretty-printed (the exact octets are in the download)"
    try:
        text = shown.decode("utf-8")
    except UnicodeDecodeError:
        text = shown.decode("utf-8", "replace")
        note = "not UTF-8: undecodable octets shown as \ufffd; "
    how = note + ("as received" if not cut else f"the first {SHOW_MAX} of {len(body)} octets, as received")
    return _visible(text), how


PRETTY_DEPTH = 64
"""Documents nested deeper than this are shown as received."""


def _pretty_xml(body: bytes) -> str | None:
    """
    The document indented, or None when indenting would cost too much: each line is
    indented by its depth, so a deeply nested body (attacker-chosen) could grow a
    hundredfold (a 250 KB body into 100 MB of page, flattened on the reactor); the
    size is estimated before printing and the document shown as received instead.
    """
    document = parseString(body, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    if not _strip_blank_text(document, budget=SHOW_MAX - len(body)):
        return None
    lines = document.toprettyxml(indent="  ").splitlines()
    # minidom writes a declaration of its own: show the document's, or none
    if lines and lines[0].startswith("<?xml"):
        lines = lines[1:]
        start = body.lstrip()
        if start.startswith(b"<?xml") and b"?>" in start[:256]:
            lines.insert(0, start[: start.index(b"?>") + 2].decode("utf-8", "replace"))
    return "\n".join(line for line in lines if line.strip())


def _strip_blank_text(document: Any, budget: int) -> bool:
    """
    Remove whitespace-only text nodes (without recursion: nesting is unbounded);
    False when the document is nested deeper than L{PRETTY_DEPTH} or its indentation
    would add more than C{budget} characters.
    """
    stack = [(document, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > PRETTY_DEPTH:
            return False
        kept = [c for c in node.childNodes if not (c.nodeType == c.TEXT_NODE and not c.data.strip())]
        if len(kept) != len(node.childNodes):
            # not removeChild, one at a time: each call searches the list (quadratic)
            node.childNodes[:] = kept
            for before, after in zip([None, *kept], [*kept, None]):
                if before is not None:
                    before.nextSibling = after
                if after is not None:
                    after.previousSibling = before
        for child in kept:
            budget -= 2 * depth + 1  # a line of its own, indented (minidom: two spaces a level)
            if budget < 0:
                return False
            if child.hasChildNodes():
                stack.append((child, depth + 1))
    return True


_CONTROLS = {c: 0x2400 + c for c in range(32) if c not in (9, 10, 13)}
_CONTROLS[0x7F] = 0x2421


def _visible(text: str) -> str:
    """Control characters as their Unicode pictures (U+2400...): nothing invisible."""
    return text.translate(_CONTROLS)


def _dl(*rows: tuple[str, Any]) -> Tag:
    return tags.table(class_="fields")(*[tags.tr(tags.th(k), tags.td(v)) for k, v in rows])


def _list(values: Sequence[str] | None, empty: str = "-") -> Any:
    values = list(values or [])
    if not values:
        return empty
    return tags.ul(*[tags.li(v) for v in values])


class AlertPage(Resource):
    """C{/alerts/N}: the IDMEF summary, the delivery (sensor, VIA, peer), the body."""

    isLeaf = True

    def __init__(self, reader: StoreReader, run: Callable[..., Deferred[Any]], alert_id: int) -> None:
        super().__init__()
        self.reader = reader
        self.run = run
        self.alert_id = alert_id

    def render_GET(self, request: Request) -> Any:
        if [p for p in request.postpath if p]:
            return ErrorPage(404, "No such page.").render(request)

        def read() -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
            alert = self.reader.alert(self.alert_id)
            if alert is None:
                return None, None
            return alert, pretty_body(alert["body"], alert["content_type"])

        def render(result: tuple[dict[str, Any] | None, tuple[str, str] | None]) -> bytes:
            alert, shown = result
            if alert is None or shown is None:
                request.setResponseCode(404)
                return _html(request, "No such alert", "alerts", tags.h1(f"No alert {self.alert_id}"))
            text, how = shown
            idmef = alert["idmef"]
            via = alert["via"]
            delivery = _dl(
                ("Alert id", str(alert["id"])),
                ("Received (UTC)", alert["received"]),
                ("Sensor (authenticated)", tags.a(alert["sensor"], href=link("/alerts", [("sensor", alert["sensor"])]))),
                ("Peer address", alert["peer"] or "-"),
                ("VIA path", tags.ol(*[tags.li(hop) for hop in via], class_="via") if via else "direct (no proxy)"),
                ("Content type", alert["content_type"]),
                ("Size", f"{alert['size']} octets"),
                ("SHA-256", tags.code(alert["sha256"])),
            )
            if idmef is None:
                summary: Any = tags.p("Not an IDMEF message (or one that could not be parsed): no summary.",
                                      class_="muted")
            else:
                analyzers = tags.table(class_="analyzers")(
                    tags.thead(tags.tr(tags.th("name"), tags.th("model"), tags.th("analyzerid"))),
                    tags.tbody(*[
                        tags.tr(tags.td(a.get("name") or "-"), tags.td(a.get("model") or "-"),
                                tags.td(a.get("analyzerid") or "-"))
                        for a in idmef.get("analyzer") or []
                    ]),
                ) if idmef.get("analyzer") else "-"
                summary = _dl(
                    ("Kind", idmef.get("kind") or "-"),
                    ("Message id", idmef.get("messageid") or "-"),
                    ("Create time", idmef.get("create_time") or "-"),
                    ("Classification", idmef.get("classification") or "-"),
                    ("Severity", _severity(idmef.get("severity"))),
                    ("Analyzer chain (outermost first)", analyzers),
                    ("Source", _list(idmef.get("source"))),
                    ("Target", _list(idmef.get("target"))),
                    ("Messages in the body", str(idmef.get("messages", "-"))),
                )
            title = (idmef or {}).get("classification") or f"Alert {alert['id']}"
            return _html(
                request, f"Alert {alert['id']}", "alerts",
                tags.h1(tags.span(f"Alert {alert['id']}: "), tags.span(title, class_="classification")),
                tags.section(tags.h2("IDMEF summary"), summary),
                tags.section(tags.h2("Delivery"), delivery),
                tags.section(
                    tags.h2("Raw body"),
                    tags.p(how, " ", tags.a("Download the exact octets", href=f"/api/alerts/{alert['id']}/body"),
                           class_="muted"),
                    tags.pre(tags.code(text), class_="body"),
                ),
            )

        return respond_later(request, self.run(read), render)


def _heartbeat(sensor: dict[str, Any]) -> Tag:
    overdue = sensor["heartbeat_overdue"]
    if overdue is None:
        return tags.span("no heartbeat", class_="hb hb-none")
    if overdue:
        return tags.span("OVERDUE", class_="hb hb-overdue")
    return tags.span("ok", class_="hb hb-ok")


class SensorsPage(Resource):
    """C{/sensors}: every sensor with its last connection, heartbeat and alert counts."""

    isLeaf = True

    def __init__(self, reader: StoreReader, run: Callable[..., Deferred[Any]]) -> None:
        super().__init__()
        self.reader = reader
        self.run = run

    def render_GET(self, request: Request) -> Any:
        try:
            query = SensorQuery.from_args(decode_args(request.args))
        except QueryError as e:
            request.setResponseCode(400)
            return _html(request, "Sensors", "sensors", tags.h1("Sensors"), tags.p(str(e), class_="error"))

        def render(result: tuple[list[dict[str, Any]], str | None]) -> bytes:
            sensors, after = result
            rows = [
                tags.tr(
                    tags.td(tags.a(s["sensor"], href=link("/alerts", [("sensor", s["sensor"])]))),
                    tags.td(_heartbeat(s)),
                    tags.td(str(s["alerts"]), class_="num"),
                    tags.td(when(s["last_alert"]), title=s["last_alert"] or ""),
                    tags.td(when(s["last_seen"]), title=s["last_seen"] or ""),
                    tags.td(when(s["last_heartbeat"]), title=s["last_heartbeat"] or ""),
                    tags.td(f"{s['heartbeat_interval']:g}s" if s["heartbeat_interval"] else "-"),
                    tags.td(when(s["first_seen"]), title=s["first_seen"] or ""),
                    tags.td(s["last_peer"] or "-"),
                    tags.td(" > ".join(s["via"]) or "direct"),
                )
                for s in sensors
            ]
            pager = [tags.a("More", href=link("/sensors", [("after", after)]), rel="next")] if after else []
            now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            return _html(
                request, "Sensors", "sensors",
                tags.h1("Sensors"),
                tags.p(f"As of {now} UTC. A heartbeat is overdue after two missed intervals.", class_="muted"),
                tags.table(class_="sensors")(
                    tags.thead(tags.tr(*[tags.th(c) for c in (
                        "Sensor", "Heartbeat", "Alerts", "Last alert", "Last seen", "Last heartbeat", "Interval",
                        "First seen", "Last peer", "Last via")])),
                    tags.tbody(*rows),
                ),
                tags.p("No sensor has connected yet." if not sensors else "", class_="muted"),
                tags.nav(*pager, class_="pager"),
            )

        return respond_later(request, self.run(self.reader.sensors, query), render)


class ErrorPage(Resource):
    isLeaf = True

    def __init__(self, code: int, message: str) -> None:
        super().__init__()
        self.code = code
        self.message = message

    def render_GET(self, request: Request) -> bytes:
        request.setResponseCode(self.code)
        return _html(request, self.message, "", tags.h1(self.message), scripts=False)


class Redirect(Resource):
    """C{/}: to the alert list."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        if [p for p in request.postpath if p]:
            return ErrorPage(404, "No such page.").render(request)
        request.redirect(b"/alerts")
        return b""
