"""
The event hub without a network: a fake store, requests that record what they are
sent, and a fake clock.  Fan-out, positions, back-pressure and resets.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from iapd.web import events
from iapd.web.events import EventHub
from iapd.web.query import AlertQuery


class FakeReader:
    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []
        self.reads = 0

    def add(self, severity: str = "low", kind: str = "Alert") -> int:
        alert_id = len(self.alerts) + 1
        self.alerts.append({
            "id": alert_id, "sensor": "s1.test", "received": f"2026-11-23T10:00:{alert_id % 60:02d}+00:00",
            "content_type": "application/x-idef-alert", "sha256": "0" * 64, "via": [], "peer": None, "size": 1,
            "idmef": {"kind": kind, "severity": severity, "classification": f"alert {alert_id}"},
        })
        return alert_id

    def latest_id(self) -> int:
        return len(self.alerts)

    def after(self, after_id: int, limit: int) -> list[dict[str, Any]]:
        self.reads += 1
        return [a for a in self.alerts if a["id"] > after_id][:limit]


class StreamRequest(DummyRequest):
    """A DummyRequest that keeps a push producer instead of pulling from it."""

    producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


def sent_ids(request: DummyRequest) -> list[int]:
    text = b"".join(request.written).decode()
    return [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")]


class HubTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.reader = FakeReader()
        self.hub = EventHub(self.reader, self.clock, run=lambda f, *a: succeed(f(*a)))  # type: ignore[arg-type]

    def subscribe(self, query: AlertQuery = AlertQuery(), after_id: int | None = None) -> Any:
        request = StreamRequest([b"api", b"events"])
        client = self.hub.subscribe(request, query, after_id)
        return request, client

    def test_each_client_gets_what_its_filters_select_from_one_read(self) -> None:
        self.reader.add()
        everything, _ = self.subscribe()
        high, _ = self.subscribe(AlertQuery(severity=("high",)))
        self.assertEqual(sent_ids(everything), [])  # the stream starts after the newest alert
        for severity in ("low", "high", "info"):
            self.reader.add(severity)
        self.reader.add("high", kind="Heartbeat")  # heartbeats only when asked for
        reads = self.reader.reads
        self.hub.committed(4, 0.01)
        self.assertEqual(self.reader.reads - reads, 1)
        self.assertEqual(sent_ids(everything), [2, 3, 4])
        self.assertEqual(sent_ids(high), [3])
        self.hub.committed(0, 0.01)  # nothing new: nothing sent twice
        self.assertEqual(sent_ids(everything), [2, 3, 4])

    def test_resume_from_an_id_and_reset_when_too_far_behind(self) -> None:
        self.patch(events, "MAX_BEHIND", 5)
        for _ in range(8):
            self.reader.add()
        near, _ = self.subscribe(after_id=4)
        self.assertEqual(sent_ids(near), [5, 6, 7, 8])
        far, client = self.subscribe(after_id=1)
        self.assertIn(b"event: reset", b"".join(far.written))
        self.assertEqual((sent_ids(far), client.last_id), ([], 8))

    def test_a_paused_client_stays_behind_and_catches_up(self) -> None:
        request, client = self.subscribe()
        client.pauseProducing()
        self.reader.add()
        self.reader.add()
        self.hub.committed(2, 0.01)
        self.assertEqual(sent_ids(request), [])
        client.resumeProducing()
        self.assertEqual(sent_ids(request), [1, 2])

    def test_a_paused_client_far_behind_the_others_is_reset(self) -> None:
        self.patch(events, "MAX_BEHIND", 3)
        slow, slow_client = self.subscribe()
        fast, _ = self.subscribe()
        slow_client.pauseProducing()
        for _ in range(5):
            self.reader.add()
        self.hub.committed(5, 0.01)
        self.assertEqual(sent_ids(fast), [1, 2, 3, 4, 5])
        self.hub.committed(0, 0.01)
        self.assertIn(b"event: reset", b"".join(slow.written))
        slow_client.resumeProducing()
        self.assertEqual(sent_ids(slow), [])  # it starts again from the newest: the page reloads

    def test_large_backlogs_are_read_in_batches_in_order(self) -> None:
        self.patch(events, "BATCH", 3)
        request, _ = self.subscribe(after_id=0)
        for _ in range(10):
            self.reader.add()
        self.hub.committed(10, 0.01)
        self.assertEqual(sent_ids(request), list(range(1, 11)))

    def test_keep_alive_ticks_only_while_watched(self) -> None:
        request, client = self.subscribe()
        self.reader.add()
        self.clock.advance(events.TICK)  # a look without a commit (another manager's alerts)
        self.assertIn(b": keep-alive\n\n", request.written)
        self.assertEqual(sent_ids(request), [1])
        request.processingFailed(Exception("gone"))  # the browser went away
        self.assertEqual(self.hub.clients, set())
        self.assertIsNone(self.hub._ticker)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_client_paused_by_a_write_gets_nothing_more_from_that_read(self) -> None:
        """
        The socket's buffer fills in the middle of a read: the rest of the batch waits
        for the client to resume instead of piling up in memory behind the socket.
        """
        request, client = self.subscribe()
        real_write = request.write

        def write(data: bytes) -> None:
            real_write(data)
            if data.startswith(b"id: ") and len(sent_ids(request)) == 3:
                client.pauseProducing()  # what the HTTP channel does when the transport is full

        request.write = write  # type: ignore[method-assign]
        for _ in range(10):
            self.reader.add()
        self.hub.committed(10, 0.01)
        self.assertEqual((sent_ids(request), client.last_id), ([1, 2, 3], 3))
        client.resumeProducing()
        self.assertEqual(sent_ids(request), list(range(1, 11)))
