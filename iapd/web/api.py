"""
The JSON API under C{/api/}: read-only, GET (and HEAD) only, documented in
C{openapi.yaml} (served as C{/api/openapi.yaml}; C{docs/openapi.yaml} in the source).

Field names are those of C{iapctl --json} (DESIGN.md section 7): an alert is C{id,
sensor, received, content_type, sha256, via, peer, size, idmef}, a sensor is what
C{iapctl sensors --json} prints.  Lists are pages: C{{"alerts": [...], "next_before_id":
N, "next": "/api/alerts?...&before_id=N"}}, newest first; C{next} is null on the last page.

Any other method is answered 405 by twisted.web itself (no C{render_POST} anywhere),
which with the strict CSP and no cookies makes the API CSRF-safe: there is nothing a
cross-site request could change.
"""

from __future__ import annotations

import base64
import urllib.parse
from importlib import resources
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..store import StoreError
from .events import EventHub, EventsResource
from .query import AlertQuery, QueryError, SensorQuery, StatsQuery, decode_args
from .readers import StoreReader, body_text, json_bytes

log = Logger(namespace="iapd.web")

JSON = b"application/json; charset=utf-8"


def error(request: Request, code: int, message: str) -> bytes:
    """A JSON error answer: C{{"error": message}}."""
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", JSON)
    return json_bytes({"error": message}) + b"\n"


def answer(request: Request, value: Any) -> bytes:
    request.setHeader(b"Content-Type", JSON)
    return json_bytes(value) + b"\n"


SUMMARY_WAIT = 2.0
"""Longest a read waits for the store to summarise what it has committed."""


def in_thread(reactor: Any, store: Any = None) -> Callable[..., Deferred[Any]]:
    """Run a blocking read in the reactor's thread pool, never on the reactor.

    With C{store}, a read first waits (at most L{SUMMARY_WAIT} seconds) until the
    alerts committed so far are summarised: the store writes summaries after the
    commit, and a filter on severity or classification must not miss an alert that is
    stored but not yet summarised.  Past the wait the read goes ahead (rows still
    unsummarised are summarised when read, but only filters in SQL can select them).
    Only this manager's commits are waited for: with several managers on one
    PostgreSQL database, another's fresh alerts match such a filter once it has
    summarised them.
    """

    def run(f: Any, *args: Any) -> Deferred[Any]:
        ready = summaries_then(reactor, store) if store is not None else succeed(None)
        return ready.addCallback(lambda _: deferToThreadPool(reactor, reactor.getThreadPool(), f, *args))

    return run


def summaries_then(reactor: Any, store: Any, timeout: float = SUMMARY_WAIT) -> Deferred[None]:
    """Fires when C{store} has summarised its committed alerts, or after C{timeout}."""
    done: Deferred[None] = Deferred()
    summarised = getattr(store, "summarised", None)
    if summarised is None:
        done.callback(None)
        return done

    def fire(_: Any = None) -> None:
        if timer.active():
            timer.cancel()
        if not done.called:
            done.callback(None)

    def give_up() -> None:
        waiting.cancel()  # the store forgets the question; fire() runs from its errback
        fire()

    timer = reactor.callLater(timeout, give_up)
    waiting = summarised()
    waiting.addBoth(fire)
    return done


def respond_later(request: Request, d: Deferred[Any], render: Callable[[Any], bytes]) -> Any:
    """
    Finish C{request} with C{render(result)} once C{d} fires; a store that cannot be
    read is a 503, anything else a 500 (logged; the message is not shown).
    """
    finished = []  # the client went away, or (HEAD) twisted.web already answered
    request.notifyFinish().addBoth(lambda _: finished.append(True))

    def ok(body: bytes) -> None:
        if finished:
            return
        request.write(body)
        request.finish()

    def failed(failure: Any) -> None:
        if finished:
            return
        if failure.check(StoreError):
            body = error(request, 503, f"the store cannot be read: {failure.getErrorMessage()}")
        else:
            log.failure("web request {uri} failed", failure, uri=request.uri)
            body = error(request, 500, "internal error (see the manager's log)")
        request.write(body)
        request.finish()

    d.addCallback(render).addCallbacks(ok, failed)
    return NOT_DONE_YET


def page_link(path: str, params: list[tuple[str, str]]) -> str:
    return path + ("?" + urllib.parse.urlencode(params) if params else "")


class _Read(Resource):
    """A GET-only JSON resource over the store reader."""

    isLeaf = True

    def __init__(self, reader: StoreReader, run: Callable[..., Deferred[Any]]) -> None:
        super().__init__()
        self.reader = reader
        self.run = run


class AlertsResource(Resource):
    """C{/api/alerts}: a page of alerts; C{/api/alerts/N}: one; C{/api/alerts/N/body}: its raw body."""

    def __init__(self, reader: StoreReader, run: Callable[..., Deferred[Any]]) -> None:
        super().__init__()
        self.reader = reader
        self.run = run

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self
        text = path.decode("ascii", "replace")
        if not text.isdigit() or len(text) > 18:
            return JSONError(404, "no such alert")
        return OneAlert(self.reader, self.run, int(text))

    def render_GET(self, request: Request) -> Any:
        try:
            query = AlertQuery.from_args(decode_args(request.args))
        except QueryError as e:
            return error(request, 400, str(e))

        def render(body: bytes) -> bytes:
            request.setHeader(b"Content-Type", JSON)
            return body

        return respond_later(request, self.run(alerts_page_json, self.reader, query), render)


MAX_PAGE_BYTES = 8 * 1024 * 1024
"""A page of /api/alerts stops at the alert that takes it past this size (C{next} goes on)."""


def alerts_page_json(reader: StoreReader, query: AlertQuery) -> bytes:
    """
    A page of C{/api/alerts} as JSON, built in the thread: an alert's summary may hold
    some 300,000 attacker-chosen characters (up to six octets each in JSON), so 500 of
    them would be a page of a gigabyte, encoded on the reactor.  The page ends, with a
    C{next}, where it would grow past L{MAX_PAGE_BYTES}; it always holds one alert.
    """
    page = reader.alerts(query)
    parts: list[bytes] = []
    size = 0
    next_before = page.next_before_id
    for alert in page.alerts:
        encoded = json_bytes(alert)
        if parts and size + len(encoded) > MAX_PAGE_BYTES:
            next_before = page.alerts[len(parts) - 1]["id"]
            break
        parts.append(encoded)
        size += len(encoded) + 1
    params = [*query.filter_args(), ("limit", str(query.limit))]
    if query.after_id is not None:
        params.append(("after_id", str(query.after_id)))
    rest = json_bytes({
        "next_before_id": next_before,
        "next": None if next_before is None else page_link("/api/alerts", [*params, ("before_id", str(next_before))]),
    })
    # the same octets as json_bytes of the whole object: its keys sorted, "alerts" first
    return b'{"alerts":[' + b",".join(parts) + b"]," + rest[1:] + b"\n"


class OneAlert(Resource):
    """C{/api/alerts/N}: the alert with its body (base64, and as text when UTF-8)."""

    isLeaf = True

    def __init__(self, reader: StoreReader, run: Callable[..., Deferred[Any]], alert_id: int) -> None:
        super().__init__()
        self.reader = reader
        self.run = run
        self.alert_id = alert_id

    def render_GET(self, request: Request) -> Any:
        rest = [p for p in request.postpath if p]
        if rest not in ([], [b"body"]):
            return error(request, 404, "no such resource")
        raw = rest == [b"body"]

        def render(alert: dict[str, Any] | None) -> bytes:
            if alert is None:
                return error(request, 404, f"no alert {self.alert_id}")
            body = alert.pop("body")
            if raw:
                # the exact octets received, as a download: never rendered by a browser
                request.setHeader(b"Content-Type", b"application/octet-stream")
                request.setHeader(
                    b"Content-Disposition", b'attachment; filename="alert-%d.bin"' % self.alert_id
                )
                return body
            alert["body_base64"] = base64.b64encode(body).decode("ascii")
            alert["body_text"] = body_text(body)
            return answer(request, alert)

        return respond_later(request, self.run(self.reader.alert, self.alert_id), render)


class SensorsResource(_Read):
    """C{/api/sensors}: sensors by identity, C{iapctl sensors --json} fields, paged by C{after}."""

    def render_GET(self, request: Request) -> Any:
        try:
            query = SensorQuery.from_args(decode_args(request.args))
        except QueryError as e:
            return error(request, 400, str(e))

        def render(result: tuple[list[dict[str, Any]], str | None]) -> bytes:
            sensors, after = result
            return answer(request, {
                "sensors": sensors,
                "next_after": after,
                "next": None if after is None else page_link(
                    "/api/sensors", [("limit", str(query.limit)), ("after", after)]
                ),
            })

        return respond_later(request, self.run(self.reader.sensors, query), render)


class PerMinuteResource(_Read):
    """C{/api/stats/per-minute}: alerts per minute by severity, for the chart."""

    def render_GET(self, request: Request) -> Any:
        try:
            query = StatsQuery.from_args(decode_args(request.args))
        except QueryError as e:
            return error(request, 400, str(e))
        return respond_later(request, self.run(self.reader.per_minute, query), lambda r: answer(request, r))


class JSONError(Resource):
    isLeaf = True

    def __init__(self, code: int, message: str) -> None:
        super().__init__()
        self.code = code
        self.message = message

    def render(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            return error(request, 405, "read-only: GET only")
        return error(request, self.code, self.message)


class JSONDirectory(Resource):
    """A GET-only node of the API tree whose unknown children are JSON 404s."""

    def __init__(self, index: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.index = index

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"" and self.index is not None:
            return self
        return JSONError(404, "no such resource")

    def render_GET(self, request: Request) -> bytes:
        return answer(request, self.index)


def openapi_text() -> bytes:
    return resources.files("iapd.web").joinpath("openapi.yaml").read_bytes()


class OpenAPIResource(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/yaml; charset=utf-8")
        return openapi_text()


INDEX = {
    "openapi": "/api/openapi.yaml",
    "alerts": "/api/alerts",
    "alert": "/api/alerts/{id}",
    "alert_body": "/api/alerts/{id}/body",
    "sensors": "/api/sensors",
    "per_minute": "/api/stats/per-minute",
    "events": "/api/events",
}


def api_root(reader: StoreReader, hub: EventHub, reactor: Any, store: Any = None) -> Resource:
    """C{/api}: the tree of L{INDEX}."""
    run = in_thread(reactor, store)
    api = JSONDirectory(INDEX)
    api.putChild(b"alerts", AlertsResource(reader, run))
    api.putChild(b"sensors", SensorsResource(reader, run))
    stats = JSONDirectory({"per_minute": "/api/stats/per-minute"})
    stats.putChild(b"per-minute", PerMinuteResource(reader, run))
    api.putChild(b"stats", stats)
    api.putChild(b"events", EventsResource(hub))
    api.putChild(b"openapi.yaml", OpenAPIResource())
    return api
