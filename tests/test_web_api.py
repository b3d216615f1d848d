"""
The dashboard's JSON API, pages and event stream, over real HTTP (twisted.web's Agent)
against a real manager (real TLS sensor connections, a real SQLite store), with the
alerts delivered by the sensor code (L{iapd.client.deliver}).
"""

from __future__ import annotations

import base64
import html.parser
import json
import sqlite3
import types
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from iapd.client import deliver
from iapd.config import ConfigError
from iapd.metrics import ManagerMetrics
from iapd.sensor import heartbeat_message
from iapd.store import read_alerts, read_sensors
from iapd.tls import load_material
from iapd.web.api import INDEX
from iapd.web.config import WebConfig, WebTLS
from iapd.web.password import hash_password
from iapd.web.site import SECURITY_HEADERS, make_site, manager_root, manager_site

from .browser import HOSTILE, HOSTILE_HTML_BODY, hostile_alert, idmef_alert
from .support import IDEF, ManagerTestCase

# twisted.web.client's own readBody over a non-persistent pool; nothing of ours
pytestmark = pytest.mark.filterwarnings("ignore:Using readBody with a transport:DeprecationWarning")

HTML = "text/html"
ALERT_FIELDS = {"id", "sensor", "received", "content_type", "sha256", "via", "peer", "size", "idmef"}


class Collector(Protocol):
    """Collects a streamed response body (the event stream) as it arrives."""

    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(None)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for block in self.data.decode().split("\n\n"):
            fields: dict[str, Any] = {}
            for line in block.splitlines():
                if line.startswith(":") or ":" not in line:
                    continue
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value
            if "event" in fields:
                fields["data"] = json.loads(fields["data"])
                out.append(fields)
        return out


class Page(html.parser.HTMLParser):
    """What a browser would build from a page: elements with their attributes, and text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def all_text(self) -> str:
        return "".join(self.text)


class WebTestCase(ManagerTestCase):
    """A manager with its web site on a free loopback port."""

    settings_overrides = {"content_types": frozenset({IDEF, HTML})}
    web: WebConfig | None = None

    @inlineCallbacks
    def setUp(self) -> Any:
        yield super().setUp()
        self.config = types.SimpleNamespace(
            store_path=self.db_path, store=f"sqlite:///{self.db_path}", web=self.web, path=self.tmp / "manager.yaml"
        )
        self.site = self.make_site()
        self.web_port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(self.web_port.stopListening)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=self.pool)

    def make_site(self) -> Any:
        self.root = manager_root(ManagerMetrics(), self.store, self.config, reactor)
        self.addCleanup(self.root.hub.close)
        return make_site(self.root)

    def url(self, path: str, scheme: str = "http") -> bytes:
        return f"{scheme}://127.0.0.1:{self.web_port.getHost().port}{path}".encode()

    @inlineCallbacks
    def get(self, path: str, method: bytes = b"GET", headers: dict[bytes, list[bytes]] | None = None,
            agent: Any = None, scheme: str = "http") -> Any:
        response = yield (agent or self.agent).request(method, self.url(path, scheme), Headers(headers or {}))
        body = yield readBody(response)
        return response, body

    @inlineCallbacks
    def get_json(self, path: str, code: int = 200) -> Any:
        response, body = yield self.get(path)
        self.assertEqual(response.code, code, body)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json; charset=utf-8"])
        return json.loads(body)

    @inlineCallbacks
    def send(self, *bodies: bytes | tuple[str, bytes], cert: str = "sensor") -> Any:
        alerts = [b if isinstance(b, tuple) else (IDEF, b) for b in bodies]
        outcomes = yield deliver(reactor, self.endpoint(), self.sensor_settings(cert=cert), alerts)
        self.assertTrue(all(o.acknowledged for o in outcomes), outcomes)

    @inlineCallbacks
    def until(self, test: Callable[[], bool], what: str, timeout: float = 10.0) -> Any:
        for _ in range(int(timeout / 0.02)):
            if test():
                return
            yield deferLater(reactor, 0.02, lambda: None)
        self.fail(f"timed out waiting for {what}")


class AlertsAPITests(WebTestCase):
    @inlineCallbacks
    def test_alerts_have_the_fields_of_iapctl_json_newest_first(self) -> Any:
        yield self.send(idmef_alert("a-1"), idmef_alert("a-2", severity="high"), (HTML, b"<p>not idmef</p>"))
        page = yield self.get_json("/api/alerts")
        self.assertEqual(set(page), {"alerts", "next_before_id", "next"})
        self.assertIsNone(page["next"])
        self.assertIsNone(page["next_before_id"])
        # the very dicts iapctl --json prints (a JSON round trip of read_alerts), newest first
        expected = json.loads(json.dumps(list(reversed(read_alerts(self.db_path, heartbeats=False)))))
        self.assertEqual(page["alerts"], expected)
        for alert in page["alerts"]:
            self.assertEqual(set(alert), ALERT_FIELDS)
            self.assertEqual(alert["sensor"], "sensor1.test")
            self.assertEqual(alert["via"], [])
        self.assertEqual([a["idmef"] and a["idmef"]["messageid"] for a in page["alerts"]], [None, "a-2", "a-1"])

    @inlineCallbacks
    def test_pages_follow_next_until_null(self) -> Any:
        yield self.send(*[idmef_alert(f"p-{i}", severity="low") for i in range(7)])
        yield self.send(idmef_alert("other-sensor", severity="low"), cert="sensor2")
        seen: list[int] = []
        path = "/api/alerts?limit=3&sensor=sensor1.*&severity=low"
        while path:
            page = yield self.get_json(path)
            self.assertLessEqual(len(page["alerts"]), 3)
            seen += [a["id"] for a in page["alerts"]]
            if page["next"] is not None:
                self.assertIn("sensor=sensor1.%2A", page["next"])
                self.assertIn(f"before_id={page['next_before_id']}", page["next"])
            path = page["next"]
        everything = [a["id"] for a in read_alerts(self.db_path) if a["sensor"] == "sensor1.test"]
        self.assertEqual(seen, sorted(everything, reverse=True))
        self.assertEqual(len(seen), 7)

    @inlineCallbacks
    def test_pages_are_bounded_in_octets_and_next_goes_on(self) -> Any:
        """
        Summaries hold up to some 300,000 attacker-chosen characters: 500 of them would
        be a page of a gigabyte.  A page ends where it would pass MAX_PAGE_BYTES (one
        alert at least), and following next still gives every alert once.
        """
        from iapd.web import api

        yield self.send(*[idmef_alert(f"big-{i}", classification="<" * 1000) for i in range(5)])
        one = len(json.dumps(read_alerts(self.db_path)[0]).replace("<", "\\u003c"))
        self.patch(api, "MAX_PAGE_BYTES", 2 * one + 100)
        seen: list[int] = []
        path = "/api/alerts?limit=500"
        while path:
            response, body = yield self.get(path)
            self.assertEqual(response.code, 200)
            page = json.loads(body)
            self.assertIn(len(page["alerts"]), (1, 2))
            self.assertLessEqual(len(body), 2 * one + 400)
            seen += [a["id"] for a in page["alerts"]]
            path = page["next"]
        self.assertEqual(seen, [5, 4, 3, 2, 1])
        self.patch(api, "MAX_PAGE_BYTES", 10)  # one alert is always given, however large
        page = yield self.get_json("/api/alerts?limit=500")
        self.assertEqual(([a["id"] for a in page["alerts"]], page["next_before_id"]), ([5], 5))
        self.assertEqual(page["next"], "/api/alerts?limit=500&before_id=5")

    @inlineCallbacks
    def test_filters(self) -> Any:
        yield self.send(
            idmef_alert("f-1", classification="SSH brute force", severity="high"),
            idmef_alert("f-2", classification="Port scan", severity="low"),
            idmef_alert("f-3", classification="ssh login OK", severity="info"),
        )
        yield self.send(idmef_alert("f-4", classification="Port scan", severity="high"), cert="sensor2")
        yield self.send(heartbeat_message("sensor1.test", 60))

        def ids(page: Any) -> list[str]:
            return [a["idmef"]["messageid"] for a in page["alerts"]]

        page = yield self.get_json("/api/alerts?severity=high")
        self.assertEqual(ids(page), ["f-4", "f-1"])
        page = yield self.get_json("/api/alerts?severity=high&severity=info")
        self.assertEqual(ids(page), ["f-4", "f-3", "f-1"])
        page = yield self.get_json("/api/alerts?classification=SSH")  # any case
        self.assertEqual(ids(page), ["f-3", "f-1"])
        page = yield self.get_json("/api/alerts?sensor=SENSOR2.test")
        self.assertEqual(ids(page), ["f-4"])
        page = yield self.get_json("/api/alerts?sensor=sensor[12].test&classification=port")
        self.assertEqual(ids(page), ["f-4", "f-2"])
        # heartbeats only when asked for
        page = yield self.get_json("/api/alerts")
        self.assertEqual(len(page["alerts"]), 4)
        page = yield self.get_json("/api/alerts?heartbeats=1")
        self.assertEqual(page["alerts"][0]["idmef"]["kind"], "Heartbeat")
        # time range: half-open [since, until); alerts read together share their receive time
        stored = read_alerts(self.db_path)
        assert stored[0]["received"] < stored[3]["received"]
        fourth = stored[3]["received"]
        quoted = fourth.replace("+", "%2B")
        page = yield self.get_json(f"/api/alerts?since={quoted}")
        self.assertEqual(ids(page), ["f-4"])
        page = yield self.get_json(f"/api/alerts?until={quoted}")
        self.assertEqual(ids(page), ["f-3", "f-2", "f-1"])
        page = yield self.get_json("/api/alerts?since=1h&until=2999-01-01T00:00")
        self.assertEqual(len(page["alerts"]), 4)
        page = yield self.get_json("/api/alerts?until=1h")
        self.assertEqual(page["alerts"], [])
        page = yield self.get_json(f"/api/alerts?after_id={stored[2]['id']}")
        self.assertEqual(ids(page), ["f-4"])

    @inlineCallbacks
    def test_bad_parameters_are_400_naming_them(self) -> Any:
        for query, name in [
            ("limit=0", "limit"), ("limit=501", "limit"), ("limit=x", "limit"), ("since=yesterday", "since"),
            ("until=2026-13-01", "until"), ("before_id=-1", "before_id"), ("after_id=1e3", "after_id"),
            ("heartbeats=maybe", "heartbeats"), ("sensor=a&sensor=b", "sensor"), ("classification=" + "x" * 300,
                                                                                  "classification"),
            ("after_id=%C2%B2", "after_id"), ("limit=%C2%B2", "limit"), ("since=99999999999d", "since"),
            ("until=0001-01-01T00:00%2B01:00", "until"),
        ]:
            answer = yield self.get_json(f"/api/alerts?{query}", code=400)
            self.assertTrue(answer["error"].startswith(f"{name}: "), (query, answer))
        for minutes in ("0", "%C2%B2"):
            answer = yield self.get_json(f"/api/stats/per-minute?minutes={minutes}", code=400)
            self.assertTrue(answer["error"].startswith("minutes: "))
        response, _ = yield self.get("/alerts?since=99999999999d")
        self.assertEqual(response.code, 400)
        answer = yield self.get_json("/api/sensors?limit=-3", code=400)
        self.assertTrue(answer["error"].startswith("limit: "))

    @inlineCallbacks
    def test_one_alert_with_its_body(self) -> Any:
        body = idmef_alert("one", classification="Détection \u2603")
        yield self.send(body, (HTML, b"\xff\xfe not utf-8"))
        first, second = read_alerts(self.db_path)
        alert = yield self.get_json(f"/api/alerts/{first['id']}")
        self.assertEqual(set(alert), ALERT_FIELDS | {"body_base64", "body_text"})
        self.assertEqual(base64.b64decode(alert["body_base64"]), body)
        self.assertEqual(alert["body_text"], body.decode())
        self.assertEqual(alert["idmef"]["classification"], "Détection \u2603")
        other = yield self.get_json(f"/api/alerts/{second['id']}")
        self.assertIsNone(other["body_text"])
        response, raw = yield self.get(f"/api/alerts/{second['id']}/body")
        self.assertEqual(raw, b"\xff\xfe not utf-8")
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/octet-stream"])
        self.assertEqual(response.headers.getRawHeaders(b"content-disposition"),
                         [f'attachment; filename="alert-{second["id"]}.bin"'.encode()])
        for path in ("/api/alerts/999", "/api/alerts/x", "/api/alerts/1/nothing", "/api/nothing"):
            answer = yield self.get_json(path, code=404)
            self.assertIn("error", answer)

    @inlineCallbacks
    def test_sensors_have_the_fields_of_iapctl_sensors_json(self) -> Any:
        yield self.send(idmef_alert("s-1"), heartbeat_message("sensor1.test", 30))
        yield self.send(idmef_alert("s-2"), cert="sensor2")
        answer = yield self.get_json("/api/sensors")
        self.assertEqual(answer["sensors"], json.loads(json.dumps(read_sensors(self.db_path))))
        self.assertIsNone(answer["next"])
        s1 = answer["sensors"][0]
        self.assertEqual((s1["sensor"], s1["alerts"], s1["heartbeat_interval"], s1["heartbeat_overdue"]),
                         ("sensor1.test", 2, 30, False))
        first = yield self.get_json("/api/sensors?limit=1")
        self.assertEqual([s["sensor"] for s in first["sensors"]], ["sensor1.test"])
        self.assertEqual(first["next"], "/api/sensors?limit=1&after=sensor1.test")
        rest = yield self.get_json(first["next"])
        self.assertEqual([s["sensor"] for s in rest["sensors"]], ["sensor2.test"])
        self.assertIsNone(rest["next"])

    @inlineCallbacks
    def test_per_minute_counts_by_severity(self) -> Any:
        yield self.send(
            idmef_alert("m-1", severity="high"), idmef_alert("m-2", severity="high"),
            idmef_alert("m-3", severity="low"), idmef_alert("m-4", severity="bogus"), (HTML, b"x"),
            heartbeat_message("sensor1.test", 60),
        )
        stats = yield self.get_json("/api/stats/per-minute?minutes=5")
        self.assertEqual(stats["severities"], ["high", "medium", "low", "info", "other"])
        self.assertEqual(stats["minutes"], 5)
        self.assertEqual(len(stats["series"]), 5)
        total = {s: sum(m["counts"][s] for m in stats["series"]) for s in stats["severities"]}
        self.assertEqual(total, {"high": 2, "medium": 0, "low": 1, "info": 0, "other": 2})
        stats = yield self.get_json("/api/stats/per-minute?minutes=5&severity=low")
        self.assertEqual(sum(m["counts"]["low"] for m in stats["series"]), 1)
        self.assertEqual(sum(sum(m["counts"].values()) for m in stats["series"]), 1)

    @inlineCallbacks
    def test_alerts_stored_but_not_yet_summarised_are_summarised_when_read(self) -> Any:
        """The SQLite store writes summaries after the commit (off the ack path); a
        reader that comes first, or after a crash in between, still gets them."""
        yield self.send(idmef_alert("pending-1", severity="high"))
        yield self.until(lambda: read_alerts(self.db_path)[0]["idmef"] is not None, "the summary")
        db = sqlite3.connect(self.db_path)
        with db:
            db.execute("UPDATE alerts SET idmef = NULL")  # as if read before the summary pass
        db.close()
        page = yield self.get_json("/api/alerts")
        one = yield self.get_json("/api/alerts/1")
        for alert in (page["alerts"][0], one):
            self.assertEqual((alert["idmef"]["messageid"], alert["idmef"]["severity"]), ("pending-1", "high"))
        response, body = yield self.get("/alerts/1")
        self.assertEqual(response.code, 200)
        self.assertIn(b"pending-1", body)

    @inlineCallbacks
    def test_foreign_pages_may_open_a_page_but_not_load_or_read_one(self) -> Any:
        """A hostile page in the operator's browser cannot make it run API queries
        (an <img> at /api/events with a costly filter) or read anything; a link from
        elsewhere still opens the page, and clients that are not browsers pass."""
        yield self.send(idmef_alert("x-1"))

        def fetch(site: bytes, mode: bytes, dest: bytes) -> dict[bytes, list[bytes]]:
            return {b"Sec-Fetch-Site": [site], b"Sec-Fetch-Mode": [mode], b"Sec-Fetch-Dest": [dest]}

        for site in (b"cross-site", b"same-site"):
            for path, mode, dest in (("/api/events?sensor=*", b"no-cors", b"image"),
                                     ("/api/alerts", b"cors", b"empty"), ("/alerts", b"navigate", b"iframe"),
                                     ("/static/dashboard.js", b"no-cors", b"script")):
                response, body = yield self.get(path, headers=fetch(site, mode, dest))
                self.assertEqual(response.code, 403, (site, path))
                self.assertIn(b"cross-site requests may only open a page", body)
            response, _ = yield self.get("/alerts/1", headers=fetch(site, b"navigate", b"document"))
            self.assertEqual(response.code, 200)
        for site in (b"same-origin", b"none"):
            response, _ = yield self.get("/api/alerts", headers=fetch(site, b"cors", b"empty"))
            self.assertEqual(response.code, 200, site)
        response, _ = yield self.get("/api/alerts")  # curl, Prometheus: no Sec-Fetch-* at all
        self.assertEqual(response.code, 200)
        self.assertFalse(self.root.hub.clients)

    @inlineCallbacks
    def test_read_only_every_other_method_is_405(self) -> Any:
        yield self.send(idmef_alert("r-1"))
        for path in ("/api/alerts", "/api/alerts/1", "/api/sensors", "/api/events", "/alerts", "/alerts/1",
                     "/sensors", "/api/stats/per-minute", "/static/dashboard.js", "/metrics", "/api/openapi.yaml"):
            for method in (b"POST", b"PUT", b"DELETE", b"PATCH"):
                response, _ = yield self.get(path, method=method)
                self.assertEqual(response.code, 405, (method, path))
        self.assertEqual(len(read_alerts(self.db_path)), 1)
        for path in ("/api/alerts", "/api/alerts/1", "/alerts", "/alerts/1", "/sensors", "/api/events", "/metrics"):
            response, body = yield self.get(path, method=b"HEAD")
            self.assertEqual((response.code, body), (200, b""), path)
        yield self.until(lambda: not self.root.hub.clients, "HEAD /api/events to leave no stream")

    @inlineCallbacks
    def test_every_answer_carries_the_security_headers(self) -> Any:
        yield self.send(idmef_alert("h-1"))
        for path in ("/", "/alerts", "/alerts/1", "/alerts/999", "/sensors", "/static/dashboard.js",
                     "/static/dashboard.css", "/static/nothing.js", "/api/", "/api/alerts", "/api/alerts/1/body",
                     "/metrics", "/nothing"):
            response, _ = yield self.get(path)
            for name, value in SECURITY_HEADERS.items():
                self.assertEqual(response.headers.getRawHeaders(name), [value], (path, name))
        response, _ = yield self.get("/")
        self.assertEqual((response.code, response.headers.getRawHeaders(b"location")), (302, [b"/alerts"]))
        csp = SECURITY_HEADERS[b"Content-Security-Policy"]
        self.assertNotIn(b"unsafe-inline", csp)
        self.assertNotIn(b"unsafe-eval", csp)

    @inlineCallbacks
    def test_openapi_describes_every_route_and_field(self) -> Any:
        response, text = yield self.get("/api/openapi.yaml")
        self.assertEqual(response.code, 200)
        spec = yaml.safe_load(text)
        self.assertTrue(spec["openapi"].startswith("3."))
        index = yield self.get_json("/api/")
        self.assertEqual(index, INDEX)
        for route in INDEX.values():
            self.assertIn(route, spec["paths"], route)
        schemas = spec["components"]["schemas"]
        self.assertEqual(set(schemas["Alert"]["required"]), ALERT_FIELDS)
        yield self.send(idmef_alert("o-1"))
        [sensor] = read_sensors(self.db_path)
        self.assertEqual(set(schemas["Sensor"]["required"]), set(sensor))
        [alert] = read_alerts(self.db_path)
        self.assertEqual(set(schemas["Idmef"]["properties"]), set(alert["idmef"]))
        docs = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
        self.assertEqual(docs.read_bytes(), text)


class PageTests(WebTestCase):
    @inlineCallbacks
    def test_pages_show_the_alert_its_delivery_and_the_sensors(self) -> Any:
        yield self.send(idmef_alert("page-1", classification="Port scan", severity="high"))
        [alert] = read_alerts(self.db_path)
        response, body = yield self.get("/alerts")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/html; charset=utf-8"])
        page = Page(body.decode())
        self.assertIn("Port scan", page.all_text())
        [tbody] = [a for t, a in page.elements if t == "tbody"]
        self.assertEqual(tbody["data-events"], f"/api/events?after_id={alert['id']}")
        response, body = yield self.get(f"/alerts/{alert['id']}")
        text = Page(body.decode()).all_text()
        for expected in ("page-1", "sensor1.test", "direct (no proxy)", alert["sha256"], "Snort 3", "192.0.2.10",
                         "XML, pretty-printed", '<Classification text="Port scan"/>'):
            self.assertIn(expected, text)
        response, body = yield self.get("/sensors")
        text = Page(body.decode()).all_text()
        self.assertIn("sensor1.test", text)
        self.assertIn("no heartbeat", text)
        response, body = yield self.get("/alerts?since=nonsense")
        self.assertEqual(response.code, 400)
        self.assertIn("Bad filter: since:", Page(body.decode()).all_text())
        response, _ = yield self.get("/alerts/12345")
        self.assertEqual(response.code, 404)

    @inlineCallbacks
    def test_hostile_alert_is_text_everywhere(self) -> Any:
        """
        Script and markup in every IDMEF field, and an HTML body: the pages hold them
        as text only (no element or attribute comes from the alert), the JSON never
        holds a raw '<'.
        """
        yield self.send(hostile_alert(), (HTML, HOSTILE_HTML_BODY))
        hostile, html_body = read_alerts(self.db_path, with_body=True)
        self.assertEqual(hostile["idmef"]["classification"], HOSTILE["classification"])  # stored verbatim

        def check(body: bytes, must_show: list[str]) -> None:
            page = Page(body.decode())
            tags = [t for t, _ in page.elements]
            for tag in ("img", "svg", "iframe", "b"):
                self.assertNotIn(tag, tags)
            self.assertEqual(tags.count("h1"), 1)
            self.assertEqual([a for t, a in page.elements if t == "script"],
                             [{"src": "/static/dashboard.js", "defer": "defer"}])
            for _, attributes in page.elements:
                for name, value in attributes.items():
                    self.assertFalse(name.startswith("on"), (name, value))
                    self.assertNotIn("javascript:", (value or "").lower())
                    self.assertNotIn("xss", (value or "").lower(), name)
            text = page.all_text()
            for value in must_show:
                self.assertIn(value, text)

        _, listing = yield self.get("/alerts")
        check(listing, [HOSTILE["classification"]])
        _, detail = yield self.get(f"/alerts/{hostile['id']}")
        check(detail, [v for k, v in HOSTILE.items() if k != "severity"] + [HOSTILE["severity"]])
        _, raw = yield self.get(f"/alerts/{html_body['id']}")
        check(raw, ["<script>alert('xss-body')</script>", "\u2400\u241b[31m"])
        for path in ("/api/alerts", f"/api/alerts/{hostile['id']}", "/api/sensors"):
            _, body = yield self.get(path)
            self.assertNotIn(b"<", body)
            self.assertNotIn(b">", body)
        answer = yield self.get_json(f"/api/alerts/{hostile['id']}")
        self.assertEqual(answer["idmef"]["messageid"], HOSTILE["messageid"])


    @pytest.mark.timeout(60)
    @inlineCallbacks
    def test_deep_xml_is_not_amplified_by_indentation(self) -> Any:
        """
        Each pretty-printed line is indented by its depth: a 250 KB body nested 900
        deep with 60,000 leaves there would become a 110 MB page, built on the reactor.
        Such a body is shown as received; a sane one is still pretty-printed.
        """
        from iapd.web.pages import SHOW_MAX

        deep = b"<a>" * 900 + b"<b/>" * 60000 + b"</a>" * 900
        nested = b"<a>" * 20000 + b"</a>" * 20000  # deeper than any recursion would go
        yield self.send(deep, nested, idmef_alert("sane"))
        first, second, sane = read_alerts(self.db_path)
        for alert, body in ((first, deep), (second, nested)):
            response, page = yield self.get(f"/alerts/{alert['id']}")
            self.assertEqual(response.code, 200)
            self.assertLess(len(page), 2 * SHOW_MAX)
            text = Page(page.decode()).all_text()
            self.assertIn("as received", text)
            self.assertIn(body[:3000].decode(), text)
        _, page = yield self.get(f"/alerts/{sane['id']}")
        self.assertIn("XML, pretty-printed", Page(page.decode()).all_text())

    @pytest.mark.timeout(20)
    @inlineCallbacks
    def test_many_blank_text_nodes_are_stripped_in_linear_time(self) -> Any:
        """52,000 siblings separated by blanks: removing the blanks one by one was quadratic."""
        body = b"<r>" + b"<b/>\n" * 52000 + b"</r>"
        yield self.send(body)
        [alert] = read_alerts(self.db_path)
        response, page = yield self.get(f"/alerts/{alert['id']}")
        text = Page(page.decode()).all_text()
        self.assertIn("XML, pretty-printed", text)
        self.assertIn("<r>\n  <b/>\n  <b/>\n", text)


class EventStreamTests(WebTestCase):
    @inlineCallbacks
    def stream(self, path: str, headers: dict[bytes, list[bytes]] | None = None) -> Any:
        response = yield self.agent.request(b"GET", self.url(path), Headers(headers or {}))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream; charset=utf-8"])
        collector = Collector()
        response.deliverBody(collector)
        self.addCleanup(lambda: collector.transport.stopProducing() if collector.transport else None)
        yield self.until(lambda: b"retry:" in collector.data, "the stream's first line")
        yield self.until(lambda: self.root.hub.clients and all(c.last_id is not None for c in self.root.hub.clients),
                         "the stream's position")
        return collector

    @inlineCallbacks
    def test_new_alerts_arrive_filtered_and_a_reconnect_resumes(self) -> Any:
        yield self.send(idmef_alert("before", severity="high"))  # before the stream: not sent
        high = yield self.stream("/api/events?severity=high")
        everything = yield self.stream("/api/events")
        yield self.send(idmef_alert("e-low", severity="low"), idmef_alert("e-high", severity="high"))
        yield self.until(lambda: len(everything.events()) == 2, "two events")
        yield self.until(lambda: len(high.events()) == 1, "one high event")
        [event] = high.events()
        self.assertEqual(event["event"], "alert")
        self.assertEqual(event["data"]["idmef"]["messageid"], "e-high")
        self.assertEqual(int(event["id"]), event["data"]["id"])
        self.assertEqual(set(event["data"]), ALERT_FIELDS)
        self.assertEqual([e["data"]["idmef"]["messageid"] for e in everything.events()], ["e-low", "e-high"])
        # a browser reconnecting sends the last id it saw and gets what followed
        first = int(everything.events()[0]["id"])
        again = yield self.stream("/api/events", {b"Last-Event-ID": [str(first).encode()]})
        yield self.until(lambda: len(again.events()) == 1, "the missed event")
        self.assertEqual(again.events()[0]["data"]["idmef"]["messageid"], "e-high")
        # one read of the store per commit, however many streams watch
        polls = self.root.hub.polls
        yield self.send(idmef_alert("e-3", severity="info"))
        yield self.until(lambda: len(everything.events()) == 3, "the third event")
        self.assertLessEqual(self.root.hub.polls - polls, 2)
        # closing the streams leaves no client and no timer behind
        for collector in (high, everything, again):
            collector.transport.stopProducing()
        yield self.until(lambda: not self.root.hub.clients, "the hub to forget closed streams")
        self.assertIsNone(self.root.hub._ticker)

    @inlineCallbacks
    def test_far_behind_gets_a_reset(self) -> Any:
        from iapd.web import events

        self.patch(events, "MAX_BEHIND", 3)
        yield self.send(*[idmef_alert(f"b-{i}") for i in range(6)])
        collector = yield self.stream("/api/events?after_id=1")
        yield self.until(lambda: b"event: reset" in collector.data, "a reset event")
        self.assertIn(b'"latest_id":6', collector.data)
        yield self.send(idmef_alert("after-reset"))
        yield self.until(lambda: len(collector.events()) == 2, "the next alert")
        self.assertEqual(collector.events()[1]["data"]["idmef"]["messageid"], "after-reset")

    @pytest.mark.timeout(60)
    @inlineCallbacks
    def test_a_pathological_sensor_glob_does_not_freeze_the_manager(self) -> Any:
        """
        The stream's filters run on the reactor: a glob that backtracks for ages (any
        page can make a browser ask for it, no answer needed) must not stop the manager.
        """
        hostile = yield self.stream("/api/events?sensor=" + "*%3F" * 127 + "!")
        normal = yield self.stream("/api/events")
        yield self.send(idmef_alert("after-glob"))
        yield self.until(lambda: len(normal.events()) == 1, "the alert on the unfiltered stream")
        self.assertEqual(hostile.events(), [])

    @inlineCallbacks
    def test_open_streams_are_bounded(self) -> Any:
        from iapd.web import events

        self.patch(events, "MAX_CLIENTS", 2)
        first = yield self.stream("/api/events")
        yield self.stream("/api/events")
        answer = yield self.get_json("/api/events", code=503)
        self.assertIn("too many event streams", answer["error"])
        first.transport.stopProducing()
        yield self.until(lambda: len(self.root.hub.clients) == 1, "the hub to forget the closed stream")
        yield self.stream("/api/events")

    @inlineCallbacks
    def test_bad_last_event_id_is_400(self) -> Any:
        response, body = yield self.get("/api/events", headers={b"Last-Event-ID": [b"zz"]})
        self.assertEqual(response.code, 400)
        self.assertIn(b"Last-Event-ID", body)


class HostTests(WebTestCase):
    """Without web.auth, only requests addressed to a local name (or web.hosts) are served."""

    web = WebConfig(listen="tcp:0:interface=127.0.0.1", hosts=("dash.example.org",))

    def make_site(self) -> Any:
        return manager_site(ManagerMetrics(), self.store, self.config, reactor)

    @inlineCallbacks
    def test_dns_rebinding_is_refused(self) -> Any:
        port = self.web_port.getHost().port
        for host, code in [
            (f"127.0.0.1:{port}", 200), (f"localhost:{port}", 200), ("LOCALHOST", 200), (f"[::1]:{port}", 200),
            ("app.localhost", 200), (f"dash.example.org:{port}", 200), ("127.3.2.1", 200),
            (f"evil.example:{port}", 421), ("evil.example", 421), ("127.0.0.1.evil.example", 421),
            ("192.0.2.1", 421), ("[2001:db8::1]:80", 421), ("", 421),
        ]:
            for path in ("/api/alerts", "/alerts", "/metrics"):
                response, _ = yield self.get(path, headers={b"Host": [host.encode()]})
                self.assertEqual(response.code, code, (host, path))


class ConnectionLimitTests(WebTestCase):
    """Idle connections cannot take every file descriptor of the manager's process."""

    web = WebConfig(listen="tcp:0:interface=127.0.0.1")

    def make_site(self) -> Any:
        return manager_site(ManagerMetrics(), self.store, self.config, reactor)

    @inlineCallbacks
    def open_idle(self) -> Any:
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        protocol = Collector()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.web_port.getHost().port), protocol)
        self.addCleanup(lambda: protocol.transport.abortConnection() if protocol.transport.connected else None)
        return protocol

    @pytest.mark.timeout(30)
    @inlineCallbacks
    def test_connections_from_one_address_are_bounded(self) -> Any:
        from iapd.web import site

        self.patch(site, "MAX_CONNECTIONS_PER_ADDRESS", 3)
        idle = []
        for _ in range(3):
            protocol = yield self.open_idle()
            idle.append(protocol)
        refused = yield self.open_idle()
        yield refused.done  # closed at once, without a byte
        self.assertEqual(refused.data, b"")
        with self.assertRaises(Exception):  # an HTTP client on a fourth connection: refused too
            yield self.get("/api/alerts")
        idle[0].transport.loseConnection()
        yield idle[0].done
        response, _ = yield self.get("/api/alerts")
        self.assertEqual(response.code, 200)


HASH = hash_password("correct horse battery", log_n=4)


def basic(user: str, password: str) -> dict[bytes, list[bytes]]:
    return {b"Authorization": [b"Basic " + base64.b64encode(f"{user}:{password}".encode())]}


class PasswordTests(WebTestCase):
    web = WebConfig(listen="tcp:0:interface=127.0.0.1", user="soc", password_hash=HASH)

    def make_site(self) -> Any:
        return manager_site(ManagerMetrics(), self.store, self.config, reactor)

    @inlineCallbacks
    def test_basic_authentication(self) -> Any:
        for headers, paths in (
            ({}, ("/alerts", "/api/alerts", "/api/events", "/metrics", "/static/dashboard.js", "/")),
            ({b"Authorization": [b"Basic !!!"]}, ("/alerts",)),
            ({b"Authorization": [b"Bearer x"]}, ("/alerts",)),
            (basic("soc", "wrong"), ("/api/alerts",)),
            (basic("admin", "correct horse battery"), ("/metrics",)),
        ):
            for path in paths:
                response, _ = yield self.get(path, headers=headers)
                self.assertEqual(response.code, 401, (path, headers))
                self.assertEqual(response.headers.getRawHeaders(b"www-authenticate"),
                                 [b'Basic realm="iapd dashboard", charset="UTF-8"'])
                self.assertEqual(response.headers.getRawHeaders(b"content-security-policy"),
                                 [SECURITY_HEADERS[b"Content-Security-Policy"]])
        for path in ("/alerts", "/api/alerts", "/metrics", "/static/dashboard.js"):
            response, _ = yield self.get(path, headers=basic("soc", "correct horse battery"))
            self.assertEqual(response.code, 200, path)

    @inlineCallbacks
    def test_repeated_failures_are_throttled(self) -> Any:
        from iapd.web.auth import MAX_FAILURES

        codes = []
        for _ in range(MAX_FAILURES + 2):
            response, _ = yield self.get("/api/alerts", headers=basic("soc", "guess"))
            codes.append(response.code)
        self.assertEqual(codes, [401] * MAX_FAILURES + [429, 429])


class ParallelLoginTests(WebTestCase):
    """Password checks held in the thread until the test lets them finish: what runs at once."""

    web = WebConfig(listen="tcp:0:interface=127.0.0.1", user="soc", password_hash=HASH)

    def make_site(self) -> Any:
        from iapd.web.auth import AuthGate

        self.held: list[tuple[Deferred[Any], Any, tuple[Any, ...]]] = []

        def run(f: Any, *args: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            self.held.append((d, f, args))
            return d

        self.root = manager_root(ManagerMetrics(), self.store, self.config, reactor)
        self.addCleanup(self.root.hub.close)
        assert self.web is not None
        self.gate = AuthGate(self.root, self.web, reactor, run=run)
        return make_site(self.gate)

    def release(self) -> None:
        held, self.held = self.held, []
        for d, f, args in held:
            d.callback(f(*args))

    def fire(self, headers: list[dict[bytes, list[bytes]]]) -> tuple[list[Any], list[Any]]:
        answers: list[Any] = []
        calls = [self.get("/api/alerts", headers=h).addCallback(lambda r: answers.append(r[0].code) or r)
                 for h in headers]
        return answers, calls

    @inlineCallbacks
    def test_parallel_guesses_count_before_they_are_decided(self) -> Any:
        from iapd.web import auth

        self.patch(auth, "MAX_CHECKING", 100)
        extra = 5
        answers, calls = self.fire([basic("soc", f"guess {i}") for i in range(auth.MAX_FAILURES + extra)])
        yield self.until(lambda: len(self.held) == auth.MAX_FAILURES and len(answers) == extra,
                         "ten checks under way and the rest refused")
        self.assertEqual(answers, [429] * extra)
        self.release()
        for call in calls:
            yield call
        self.assertEqual(sorted(answers), [401] * auth.MAX_FAILURES + [429] * extra)
        response, _ = yield self.get("/api/alerts", headers=basic("soc", "correct horse battery"))
        self.assertEqual(response.code, 429)  # the address is throttled now, even with the password

    @inlineCallbacks
    def test_password_checks_at_once_are_bounded(self) -> Any:
        from iapd.web import auth

        answers, calls = self.fire([basic("soc", f"guess {i}") for i in range(auth.MAX_CHECKING + 2)])
        yield self.until(lambda: len(self.held) == auth.MAX_CHECKING and len(answers) == 2, "two refused")
        self.assertEqual(answers, [503, 503])
        self.release()
        for call in calls:
            yield call

    @inlineCallbacks
    def test_the_same_credentials_in_parallel_are_checked_once(self) -> Any:
        from iapd.web import auth

        headers = basic("soc", "correct horse battery")
        answers, calls = self.fire([headers] * (auth.MAX_CHECKING + 3))
        count = auth.MAX_CHECKING + 3

        def arrived() -> int:  # checks started, and requests waiting for one
            return len(self.held) + sum(len(w) for w in getattr(self.gate, "_waiting", {}).values())

        yield self.until(lambda: arrived() == count, "every request to arrive")
        self.assertEqual((len(self.held), answers), (1, []))
        self.release()
        for call in calls:
            yield call
        self.assertEqual(answers, [200] * (auth.MAX_CHECKING + 3))


def test_failures_count_per_ipv6_64_and_per_ipv4_address() -> None:
    """One IPv6 host holds a whole /64: counting per address would never throttle it."""
    from twisted.internet.address import IPv4Address, IPv6Address

    from iapd.web.auth import _peer_key

    def key(address: Any) -> str:
        return _peer_key(types.SimpleNamespace(getClientAddress=lambda: address))  # type: ignore[arg-type]

    assert key(IPv6Address("TCP", "2001:db8:1:2:aaaa::1", 1)) == key(IPv6Address("TCP", "2001:db8:1:2::ffff", 2))
    assert key(IPv6Address("TCP", "2001:db8:1:2::1", 1)) == "2001:db8:1:2::/64"
    assert key(IPv6Address("TCP", "2001:db8:1:3::1", 1)) != key(IPv6Address("TCP", "2001:db8:1:2::1", 1))
    assert key(IPv4Address("TCP", "192.0.2.1", 1)) != key(IPv4Address("TCP", "192.0.2.2", 1))
    assert key(IPv6Address("TCP", "::ffff:192.0.2.1", 1)) == "::ffff:192.0.2.1"


@implementer(IPolicyForHTTPS)
class ClientCertificatePolicy:
    """HTTPS to the test manager's web port, presenting a client certificate (or none)."""

    def __init__(self, pki: Any, cert: str | None) -> None:
        self.pki = pki
        self.cert = cert

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        trust = ssl.Certificate.loadPEM(self.pki.ca.read_bytes())
        if self.cert is None:
            return ssl.optionsForClientTLS("manager.test", trustRoot=trust)
        crt, key = getattr(self.pki, self.cert)
        material = load_material(crt, key, self.pki.ca)
        from OpenSSL import crypto

        client = ssl.PrivateCertificate.fromCertificateAndKeyPair(
            ssl.Certificate(crypto.X509.from_cryptography(material.certificate)),
            ssl.KeyPair(crypto.load_privatekey(crypto.FILETYPE_PEM, material.key_pem)),
        )
        return ssl.optionsForClientTLS("manager.test", trustRoot=trust, clientCertificate=client)


class ClientCertificateTests(WebTestCase):
    """HTTPS with client certificates from the manager's CA, limited by identity glob."""

    def make_site(self) -> Any:
        crt, key = self.pki.manager
        self.config.web = WebConfig(
            listen="tcp:0", loopback=False, tls=WebTLS(crt, key, self.pki.ca),
            client_certificates=("norole.test", "sensor2.test"),
        )
        return manager_site(ManagerMetrics(), self.store, self.config, reactor)

    def agent_for(self, cert: str | None) -> Agent:
        return Agent(reactor, contextFactory=ClientCertificatePolicy(self.pki, cert), pool=self.pool)

    @inlineCallbacks
    def test_allowed_certificate_reads_others_are_refused(self) -> Any:
        yield self.send(idmef_alert("tls-1"))
        response, body = yield self.get("/api/alerts", agent=self.agent_for("sensor_no_role"), scheme="https")
        self.assertEqual(response.code, 200, body)
        self.assertEqual(json.loads(body)["alerts"][0]["idmef"]["messageid"], "tls-1")
        self.assertEqual(response.headers.getRawHeaders(b"strict-transport-security"), [b"max-age=31536000"])
        # a sensor certificate never reads the dashboard, even when its name is listed
        response, body = yield self.get("/api/alerts", agent=self.agent_for("sensor2"), scheme="https")
        self.assertEqual(response.code, 403)
        self.assertIn(b"sensor certificates", body)
        # a good certificate whose name is not listed
        response, body = yield self.get("/alerts", agent=self.agent_for("manager_as_sensor"), scheme="https")
        self.assertEqual(response.code, 403)
        # no certificate at all: the handshake fails
        with self.assertRaises(ResponseFailed):
            yield self.get("/alerts", agent=self.agent_for(None), scheme="https")

    def test_unusable_web_tls_files_name_the_key(self) -> None:
        config = types.SimpleNamespace(**vars(self.config))
        config.web = WebConfig(listen="tcp:0", loopback=False, tls=WebTLS(self.pki.manager[0], self.pki.sensor[1],
                                                                          self.pki.ca),
                               client_certificates=("x.test",))
        with self.assertRaises(ConfigError) as info:
            manager_site(ManagerMetrics(), self.store, config, reactor)
        self.assertIn("manager.yaml: web.tls: key", str(info.exception))
        self.assertIn("does not belong to certificate", str(info.exception))

