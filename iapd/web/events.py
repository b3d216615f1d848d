"""
C{GET /api/events}: new alerts as server-sent events, for the live alert list.

One L{EventHub} per manager follows the store: the store calls it after each committed
batch (C{commit_observers}), and it reads the new rows once, in a thread, whatever the
number of watching browsers, then gives each browser the ones its filters
(L{AlertQuery.matches}) select.  A timer also looks every few seconds, for alerts that
other managers sharing a PostgreSQL database committed, and writes an SSE comment so
that dead connections are noticed.

Every client has its own position (the last alert id it was shown); the SSE C{id:} of
each event is the alert id, so a browser that reconnects sends C{Last-Event-ID} and
resumes where it stopped.  Memory is bounded per client: each one is registered as the
streaming producer of its response, so a browser that does not read is paused and
simply stays behind (its position does not move) instead of buffering events; when it
is more than L{MAX_BEHIND} alerts behind, it gets a C{reset} event and starts again
from the newest alert (the page reloads).

Events::

    id: 42
    event: alert
    data: {"id": 42, "sensor": ..., "idmef": {...}}   (iapctl --json fields, no body)

    event: reset
    data: {"latest_id": 1234}
"""

from __future__ import annotations

from typing import Any, Callable

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from .query import AlertQuery, QueryError, decode_args
from .readers import StoreReader, json_bytes

MAX_BEHIND = 1000
"""A client further behind than this many alert ids starts again from the newest."""

MAX_CLIENTS = 100
"""Streams open at once; more are answered 503 (each costs a connection and a filter run per alert)."""

BATCH = 500
"""Alerts read from the store at a time."""

TICK = 5.0
"""Seconds between looks at the store without a commit, and between keep-alives."""

log = Logger(namespace="iapd.web")


def alert_event(alert: dict[str, Any]) -> bytes:
    """One SSE event; the JSON holds no line break, so it is one data line."""
    return b"id: %d\nevent: alert\ndata: %s\n\n" % (alert["id"], json_bytes(alert))


def reset_event(latest_id: int) -> bytes:
    return b"event: reset\ndata: %s\n\n" % json_bytes({"latest_id": latest_id})


@implementer(IPushProducer)
class Client:
    """One browser's event stream: its filters, its position, and whether it reads."""

    def __init__(self, hub: "EventHub", request: Request, query: AlertQuery) -> None:
        self.hub = hub
        self.request = request
        self.query = query
        self.last_id: int | None = None  # set once the starting position is known
        self.paused = False
        self.gone = False

    def send(self, data: bytes) -> None:
        if not self.gone:
            self.request.write(data)

    # IPushProducer: the HTTP channel pauses us when the socket's buffer is full
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.hub.poll()

    def stopProducing(self) -> None:
        self.hub.drop(self)


class EventHub:
    """Reads new alerts once per commit and fans them out to the clients' streams."""

    def __init__(self, reader: StoreReader, reactor: Any, run: Callable[..., Deferred[Any]] | None = None) -> None:
        self.reader = reader
        self.reactor = reactor
        self._run = run or (lambda f, *a: deferToThreadPool(reactor, reactor.getThreadPool(), f, *a))
        self.clients: set[Client] = set()
        self._reading = False
        self._again = False
        self._ticker: LoopingCall | None = None
        self.polls = 0  # reads made, for the tests

    def attach(self, store: Any) -> None:
        """Follow C{store}'s commits."""
        store.commit_observers.append(self.committed)

    def committed(self, count: int, seconds: float) -> None:
        if self.clients:
            self.poll()

    def subscribe(self, request: Request, query: AlertQuery, after_id: int | None) -> Client:
        """Start streaming to C{request} from C{after_id} (None: from now on)."""
        client = Client(self, request, query)
        request.notifyFinish().addBoth(lambda _: self.drop(client))
        request.registerProducer(client, True)
        self.clients.add(client)
        self._tick_while_watched()

        def start(latest: int) -> None:
            if after_id is None or after_id > latest:
                client.last_id = latest
            elif latest - after_id > MAX_BEHIND:
                client.send(reset_event(latest))
                client.last_id = latest
            else:
                client.last_id = after_id
            self.poll()

        def failed(failure: Any) -> None:
            log.warn("event stream: cannot read the store: {why}", why=failure.getErrorMessage())
            self.drop(client, finish=True)

        self._run(self.reader.latest_id).addCallbacks(start, failed)
        return client

    def drop(self, client: Client, finish: bool = False) -> None:
        if client.gone:
            return
        client.gone = True
        self.clients.discard(client)
        if finish:
            try:
                client.request.unregisterProducer()
                client.request.finish()
            except Exception:
                pass
        if not self.clients and self._ticker is not None and self._ticker.running:
            self._ticker.stop()
            self._ticker = None

    def close(self) -> None:
        """End every stream (the manager is stopping)."""
        for client in list(self.clients):
            self.drop(client, finish=True)

    def _tick_while_watched(self) -> None:
        if self._ticker is None:
            self._ticker = LoopingCall(self._tick)
            self._ticker.clock = self.reactor
            self._ticker.start(TICK, now=False)

    def _tick(self) -> None:
        for client in list(self.clients):
            if not client.paused:
                client.send(b": keep-alive\n\n")
        self.poll()

    def poll(self) -> None:
        """Read what the ready clients have not seen yet, once for all of them."""
        if self._reading:
            self._again = True
            return
        ready = [c for c in self.clients if c.last_id is not None and not c.paused]
        if not ready:
            return
        low = min(c.last_id for c in ready)  # type: ignore[type-var]
        self._reading = True
        self.polls += 1

        def got(read: list[tuple[dict[str, Any], bytes]]) -> None:
            alerts = [alert for alert, _ in read]
            for client in ready:
                for alert, event in read:
                    if client.gone or client.paused:
                        # paused by the write before (its socket is full): it keeps its
                        # position and is read again, rather than have up to BATCH
                        # events (each as large as a summary may be) queued in memory
                        break
                    assert client.last_id is not None
                    if alert["id"] > client.last_id:
                        if client.query.matches(alert):
                            client.send(event)
                        client.last_id = alert["id"]
            if len(alerts) == BATCH:
                self._again = True

        def failed(failure: Any) -> None:
            log.warn("event stream: cannot read new alerts: {why}", why=failure.getErrorMessage())

        def done(_: Any) -> None:
            self._reading = False
            if self._again:
                self._again = False
                self.poll()

        self._run(_read_events, self.reader, low, BATCH).addCallbacks(got, failed).addBoth(done)
        self._behind()

    def _behind(self) -> None:
        """Reset paused clients that fell too far behind the ones that read."""
        reading = [c.last_id for c in self.clients if c.last_id is not None and not c.paused]
        if not reading:
            return
        front = max(reading)
        for client in list(self.clients):
            if client.paused and client.last_id is not None and front - client.last_id > MAX_BEHIND:
                client.last_id = front
                client.send(reset_event(front))


def _read_events(reader: StoreReader, after_id: int, limit: int) -> list[tuple[dict[str, Any], bytes]]:
    """
    New alerts with their events, in the thread: each is encoded once, however many
    streams it goes to, and not on the reactor (a summary may hold some 300,000
    attacker-chosen characters).
    """
    return [(alert, alert_event(alert)) for alert in reader.after(after_id, limit)]


class EventsResource(Resource):
    """C{GET /api/events?<alert filters>&after_id=N}: the SSE stream of new alerts."""

    isLeaf = True

    def __init__(self, hub: EventHub) -> None:
        super().__init__()
        self.hub = hub

    def render_GET(self, request: Request) -> Any:
        from .api import error

        try:
            query = AlertQuery.from_args(decode_args(request.args))
            resume = request.getHeader(b"last-event-id")
            after_id = query.after_id
            if resume is not None:
                text = resume.decode("ascii", "replace").strip()
                if not text.isdigit() or len(text) > 18:
                    raise QueryError(f"Last-Event-ID: must be an alert id, got {text!r}")
                after_id = int(text)
        except QueryError as e:
            return error(request, 400, str(e))
        if len(self.hub.clients) >= MAX_CLIENTS:
            request.setHeader(b"Retry-After", b"30")
            return error(request, 503, f"too many event streams open (at most {MAX_CLIENTS}); reload later")
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"X-Accel-Buffering", b"no")
        request.write(b"retry: 3000\n\n")
        self.hub.subscribe(request, _live(query), after_id)
        return NOT_DONE_YET


def _live(query: AlertQuery) -> AlertQuery:
    """The filters of a stream: positions are the hub's business, not the query's."""
    return attr.evolve(query, after_id=None, before_id=None)
