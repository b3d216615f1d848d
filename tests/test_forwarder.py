"""
The sensor's forwarder against a real manager over real TLS, with a real spool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial import unittest

from iapd.forwarder import Backoff, Forwarder
from iapd.spool import Spool
from iapd.store import AlertRecord, SQLiteStore, read_alerts

from .support import IDEF, ManagerTestCase

WAIT = 30.0


class BackoffTests(unittest.TestCase):
    def test_capped_exponential_with_jitter(self) -> None:
        top = Backoff(initial=1, maximum=8, rng=lambda: 1.0)
        self.assertEqual([top.next_delay() for _ in range(6)], [1, 2, 4, 8, 8, 8])
        low = Backoff(initial=1, maximum=8, rng=lambda: 0.0)
        self.assertEqual([low.next_delay() for _ in range(5)], [0.5, 1, 2, 4, 4])
        top.reset()
        self.assertEqual(top.next_delay(), 1)


class ForwarderCase(ManagerTestCase):
    timeout = 60

    @inlineCallbacks
    def make_forwarder(self, **settings: Any) -> Any:
        self.spool = Spool(Path(self.mktemp()), reactor)
        yield self.spool.open()
        self.addCleanup(self.spool.close)
        forwarder = Forwarder(
            reactor, self.spool, self.sensor_settings(**settings), self.endpoint(),
            Backoff(initial=0.05, maximum=0.2),
        )
        self.addCleanup(forwarder.stop)
        return forwarder

    @inlineCallbacks
    def until(self, test: Any, what: str) -> Any:
        for _ in range(int(WAIT / 0.05)):
            if test():
                return
            yield deferLater(reactor, 0.05)
        self.fail(f"not reached within {WAIT}s: {what}")


class ForwarderTests(ForwarderCase):
    @inlineCallbacks
    def test_drains_the_spool_in_order(self) -> Any:
        forwarder = yield self.make_forwarder(window=16)
        bodies = [b"spooled %d" % i for i in range(200)]
        for body in bodies:
            yield self.spool.append(IDEF, body)
        forwarder.start()
        yield self.until(lambda: self.spool.depth == 0, "spool drained")
        self.assertEqual([a["body"] for a in self.stored()], bodies)
        # alerts arriving later follow on the same connection
        yield self.spool.append(IDEF, b"later")
        yield self.until(lambda: len(self.stored()) == 201, "later alert stored")

    @inlineCallbacks
    def test_refused_alert_is_set_aside_and_the_rest_flow(self) -> Any:
        forwarder = yield self.make_forwarder()
        yield self.spool.append(IDEF, b"good 1")
        yield self.spool.append("text/plain", b"refused for good")
        yield self.spool.append(IDEF, b"good 2")
        forwarder.start()
        yield self.until(lambda: self.spool.depth == 0, "spool drained")
        self.assertEqual([a["body"] for a in self.stored()], [b"good 1", b"good 2"])
        rejected = sorted((self.spool.files.directory / "rejected").iterdir())
        self.assertEqual([p.suffix for p in rejected], [".alert", ".json"])
        self.assertEqual(rejected[0].read_bytes(), b"refused for good")
        self.assertIn('"code": 415', rejected[1].read_text())

    @inlineCallbacks
    def test_refusal_keeps_everything_and_retries(self) -> Any:
        """A manager that refuses the CONNECT (403) does not make the sensor give up."""
        forwarder = yield self.make_forwarder(manager="other.test")
        yield self.spool.append(IDEF, b"kept")
        forwarder.start()
        yield self.until(lambda: forwarder.backoff.failures >= 3, "three refused attempts")
        self.assertEqual(self.spool.depth, 1)
        self.assertEqual(self.stored(), [])
        # the operator fixes the configuration: the same spool delivers
        yield forwarder.stop()
        fixed = Forwarder(reactor, self.spool, self.sensor_settings(), self.endpoint(), Backoff(0.05, 0.2))
        self.addCleanup(fixed.stop)
        fixed.start()
        yield self.until(lambda: self.spool.depth == 0, "delivered after the fix")
        self.assertEqual([a["body"] for a in self.stored()], [b"kept"])

    @inlineCallbacks
    def test_manager_restart_resends_without_duplicates(self) -> Any:
        forwarder = yield self.make_forwarder(window=64)
        for i in range(300):
            yield self.spool.append(IDEF, b"r%d" % i)
        forwarder.start()
        yield self.until(lambda: len(self.stored()) >= 50, "some stored")
        # the manager goes away mid-stream and comes back on the same port and store
        port = self.port_number
        self._drop_connections()
        yield self.port.stopListening()
        self.port = reactor.listenTCP(port, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        yield self.until(lambda: self.spool.depth == 0, "all delivered after the restart")
        stored = [a["body"] for a in self.stored()]
        self.assertEqual(sorted(stored), sorted(b"r%d" % i for i in range(300)))
        self.assertEqual(len(stored), 300)


class FairnessTests(unittest.TestCase):
    @inlineCallbacks
    def test_a_flooding_sensor_does_not_push_others_back(self) -> Any:
        path = Path(self.mktemp()) / "alerts.db"
        store = SQLiteStore(path, reactor, max_batch=10)
        flood = [store.add(AlertRecord("flood.test", IDEF, b"f%d" % i)) for i in range(100)]
        quiet = [store.add(AlertRecord("quiet.test", IDEF, b"q%d" % i)) for i in range(3)]
        yield store.open()
        for d in flood + quiet:
            yield d
        yield store.close()
        order = [a["sensor"] for a in read_alerts(path)]
        # the quiet sensor's three alerts are all in the first batch of ten
        self.assertEqual(order[:10].count("quiet.test"), 3)


class EveInputTests(unittest.TestCase):
    """Suricata's eve.json tailed into a real spool: converted, resumed, rotated."""

    ALERT = (
        b'{"timestamp":"2026-11-23T10:00:00.000001+0000","event_type":"alert","src_ip":"192.0.2.1",'
        b'"src_port":1234,"dest_ip":"198.51.100.2","dest_port":80,"proto":"TCP",'
        b'"alert":{"signature":"ET TEST %d","signature_id":%d,"severity":2}}\n'
    )

    @inlineCallbacks
    def test_alerts_are_spooled_once_across_restarts_and_rotation(self) -> Any:
        from iapd.idmef import summarize
        from iapd.inputs import EveInput

        root = Path(self.mktemp())
        root.mkdir(parents=True)
        eve = root / "eve.json"
        spool = Spool(root / "spool", reactor)
        yield spool.open()
        self.addCleanup(spool.close)
        with open(eve, "wb") as f:
            f.write(self.ALERT % (1, 1) + b'{"event_type":"flow"}\n' + self.ALERT % (2, 2))
            f.write(b'{"event_type":"alert","partial')  # Suricata caught mid-write
        first = EveInput(reactor, spool, eve, "sensor1.test")
        first.start()
        yield first.poll()
        first.stop()
        self.assertEqual(spool.depth, 2)
        # a restart resumes after the last complete line: nothing twice, nothing skipped
        with open(eve, "ab") as f:
            f.write(b'"}\n' + self.ALERT % (3, 3))
        second = EveInput(reactor, spool, eve, "sensor1.test")
        second.start()
        yield second.poll()
        self.assertEqual(spool.depth, 3)
        # rotation: the path now names a new file, while Suricata still finishes a line
        # in the old one before it reopens: the old file is read to its end first
        eve.rename(root / "eve.json.1")
        with open(root / "eve.json.1", "ab") as f:
            f.write(self.ALERT % (5, 5))
        eve.write_bytes(self.ALERT % (4, 4))
        yield second.poll()
        yield second.poll()
        yield second.poll()
        second.stop()
        self.assertEqual(spool.depth, 5)
        records = yield spool.read(list(spool.pending.values()))
        classes = [summarize(r.body)["classification"] for r in records]  # type: ignore[index]
        self.assertEqual(classes, ["ET TEST 1", "ET TEST 2", "ET TEST 3", "ET TEST 5", "ET TEST 4"])
