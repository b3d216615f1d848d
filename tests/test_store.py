"""
The SQLite store: group commit, deduplication, failures, opening and closing.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from iapd import store as store_module
from iapd.store import AlertRecord, SQLiteStore, StoreError, body_digest, read_alerts, read_sensors

from .support import IDEF, OK, content
from .test_manager import ManagerCase, within

S503 = b"IAP/0.2 503\r\n\r\n"


def bulky(body: bytes) -> AlertRecord:
    """An alert whose row is about 2 KiB (its VIA: 30 long proxy names), to fill the WAL
    now that bodies go to the body log."""
    return AlertRecord(sensor="s1.test", content_type=IDEF, body=body,
                       via=tuple(f"{'p' * 60}{k}.test" for k in range(30)), peer="127.0.0.1:1")


def record(body: bytes, sensor: str = "s1.test") -> AlertRecord:
    return AlertRecord(sensor=sensor, content_type=IDEF, body=body, via=("p.test",), peer="127.0.0.1:1")


class DigestTests(unittest.TestCase):
    def test_body_digest_is_the_sha256_of_the_body(self) -> None:
        """Hashed in pieces or at once, around every piece boundary: the same digest."""
        body = bytes(range(256)) * 4100
        for size in (0, 1, 2046, 2047, 2048, 2049, 4093, 4094, 4095, 4096, 1 << 20, len(body)):
            self.assertEqual(body_digest(body[:size]), hashlib.sha256(body[:size]).hexdigest(), size)
        self.assertEqual(record(b"x" * 5000).sha256, hashlib.sha256(b"x" * 5000).hexdigest())

    def test_a_record_is_hashed_when_its_digest_is_first_needed(self) -> None:
        """The reactor builds records and never needs their digest; the store's thread
        asks for it.  Computed once, and no part of what makes two records equal."""
        fresh = record(b"y" * 4096)
        self.assertIsNone(fresh._digest)  # building it hashed nothing
        digest = fresh.sha256
        self.assertEqual(digest, hashlib.sha256(b"y" * 4096).hexdigest())
        self.assertIs(fresh.sha256, digest)
        twin = AlertRecord(sensor=fresh.sensor, content_type=fresh.content_type, body=fresh.body,
                           via=fresh.via, peer=fresh.peer, received=fresh.received)
        self.assertEqual(twin, fresh)
        self.assertEqual(hash(twin), hash(fresh))


class StoreTests(unittest.TestCase):
    def setUp(self) -> None:
        self.path = Path(self.mktemp()) / "alerts.db"

    @inlineCallbacks
    def test_group_commit_and_dedup(self) -> Any:
        store = SQLiteStore(self.path, reactor)
        yield store.open()
        bodies = [b"alert %d" % i for i in range(300)] + [b"alert 7", b"alert 8"]
        results = yield DeferredList([store.add(record(b)) for b in bodies], fireOnOneErrback=True)
        news = [r for _, r in results]
        self.assertEqual(news, [True] * 300 + [False, False])
        self.assertLess(store.commits, 300)  # many alerts per transaction
        yield store.close()
        stored = read_alerts(self.path, with_body=True)
        self.assertEqual([a["body"] for a in stored], bodies[:300])
        self.assertEqual(stored[0]["via"], ["p.test"])

    @inlineCallbacks
    def test_bodies_are_kept_in_the_body_log_and_absent_values_as_null(self) -> Any:
        """
        Each body is appended to the log beside the file, octet for octet, where its
        row says; the row keeps an empty body.  The store registers an sqlite3 adapter
        for None (to spare an exception per parameter): it must store NULL.
        """
        store = SQLiteStore(self.path, reactor)
        self.addCleanup(store.close)
        yield store.open()
        bodies = [bytes(range(256)) * 16, b"", b"\x00heartbeat\xff"]
        records = [AlertRecord(sensor="s1.test", content_type=IDEF, body=b) for b in bodies]  # peer None
        yield store.add_many(records)
        yield store.close()
        with closing(sqlite3.connect(self.path)) as db:
            rows = db.execute("SELECT body, body_at, body_size, typeof(peer), typeof(idmef) FROM alerts ORDER BY id").fetchall()
        log = (self.path.parent / "alerts.db-bodies").read_bytes()
        self.assertEqual(log, b"".join(bodies))
        self.assertEqual([(b"", log[at:at + size], "null", "null") for _, at, size, _, _ in rows],
                         [(in_row, b, peer, idmef) for (in_row, _, _, peer, idmef), b in zip(rows, bodies)])
        self.assertEqual([(at, size) for _, at, size, _, _ in rows], [(0, 4096), (4096, 0), (4096, 11)])
        self.assertEqual([a["body"] for a in read_alerts(self.path, with_body=True)], bodies)

    @inlineCallbacks
    def test_same_body_from_another_sensor_is_another_alert(self) -> Any:
        store = SQLiteStore(self.path, reactor)
        yield store.open()
        first = yield store.add(record(b"x", "a.test"))
        second = yield store.add(record(b"x", "b.test"))
        yield store.close()
        self.assertEqual((first, second), (True, True))
        self.assertEqual(len(read_alerts(self.path)), 2)

    @inlineCallbacks
    def test_alert_added_while_opening_is_committed(self) -> Any:
        store = SQLiteStore(self.path, reactor)
        opening = store.open()
        pending = store.add(record(b"early"))
        yield opening
        new = yield within(pending)
        self.assertTrue(new)
        self.assertEqual(len(read_alerts(self.path)), 1)
        yield store.close()

    @inlineCallbacks
    def test_each_alert_keeps_its_own_via_in_a_shared_commit(self) -> Any:
        """Alerts of connections through different proxy chains (and none), in one
        commit: each row keeps its own chain, although the commit converts each chain once."""
        store = SQLiteStore(self.path, reactor)
        chains = [(), ("p1.test",), ("p2.test", "p3.test"), ("p1.test",), ()]
        opening = store.open()
        added = store.add_many([AlertRecord(sensor="s1.test", content_type=IDEF, body=b"chain %d" % i, via=via)
                                for i, via in enumerate(chains)])
        yield opening
        self.assertEqual((yield within(added)), [True] * 5)
        yield store.close()
        self.assertEqual([a["via"] for a in read_alerts(self.path)], [list(c) for c in chains])

    @inlineCallbacks
    def test_a_busy_sensor_does_not_crowd_the_others_out_of_a_commit(self) -> Any:
        """Past max_batch, each sensor's queue gives an equal share in turn; each
        sensor's alerts keep their order."""
        store = SQLiteStore(self.path, reactor, max_batch=10)
        commits: list[int] = []
        store.commit_observers.append(lambda alerts, seconds: commits.append(alerts))
        opening = store.open()  # both queues fill before the first commit can start
        busy = store.add_many([record(b"busy %02d" % i, "a.test") for i in range(30)])
        quiet = store.add_many([record(b"quiet %d" % i, "b.test") for i in range(3)])
        yield opening
        self.assertEqual((yield within(busy)), [True] * 30)
        self.assertEqual((yield within(quiet)), [True] * 3)
        yield store.close()
        self.assertEqual([c for c in commits if c], [10, 10, 10, 3])
        stored = read_alerts(self.path, with_body=True)
        first_commit = [a["sensor"] for a in stored[:10]]
        self.assertEqual(first_commit.count("b.test"), 3)
        for sensor, prefix in (("a.test", b"busy"), ("b.test", b"quiet")):
            bodies = [a["body"] for a in stored if a["sensor"] == sensor]
            self.assertEqual(bodies, sorted(bodies))
            self.assertTrue(all(b.startswith(prefix) for b in bodies))

    @inlineCallbacks
    def test_everything_queued_goes_into_one_commit_when_it_fits(self) -> Any:
        store = SQLiteStore(self.path, reactor, max_batch=64)
        commits: list[int] = []
        store.commit_observers.append(lambda alerts, seconds: commits.append(alerts))
        opening = store.open()
        groups = [store.add_many([record(b"%s %02d" % (s.encode(), i), s) for i in range(16)])
                  for s in ("a.test", "b.test", "c.test", "d.test")]
        yield opening
        for group in groups:
            self.assertEqual((yield within(group)), [True] * 16)
        self.assertEqual(store.backlog, 0)
        yield store.close()
        self.assertEqual([c for c in commits if c], [64])
        self.assertEqual(len(read_alerts(self.path)), 64)

    @inlineCallbacks
    def test_close_commits_what_is_queued(self) -> Any:
        store = SQLiteStore(self.path, reactor)
        yield store.open()
        pending = [store.add(record(b"q%d" % i)) for i in range(50)]
        yield store.close()
        self.assertTrue(all(d.called for d in pending))
        self.assertEqual(len(read_alerts(self.path)), 50)
        refused = store.add(record(b"late"))
        yield self.assertFailure(refused, StoreError)

    @inlineCallbacks
    def test_unopenable_store_fails_and_still_closes(self) -> Any:
        store = SQLiteStore(Path("/proc/iapd-no-such-dir/alerts.db"), reactor)
        failure = yield self.assertFailure(store.open(), StoreError)
        self.assertIn("cannot open SQLite store", str(failure))
        queued = store.add(record(b"lost?"))
        yield within(store.close())
        yield self.assertFailure(queued, StoreError)

    @inlineCallbacks
    def test_backlog_is_bounded(self) -> Any:
        store = SQLiteStore(self.path, reactor, max_backlog_bytes=100)
        yield store.open()
        # the first add starts a commit at once; the rest wait, up to 100 octets
        pending = [store.add(record(b"%039d" % i)) for i in range(6)]
        results = yield DeferredList(pending, consumeErrors=True)
        outcomes = [ok for ok, _ in results]
        self.assertEqual(outcomes, [True, True, True, False, False, False])
        for _, value in results[3:]:
            self.assertIsInstance(value.value, StoreError)
        yield store.close()
        self.assertEqual(len(read_alerts(self.path)), 3)

    @inlineCallbacks
    def test_add_many_settles_each_alert(self) -> Any:
        store = SQLiteStore(self.path, reactor, max_backlog_bytes=100)
        yield store.open()
        yield store.add(record(b"old"))
        group = [record(b"old"), record(b"%039d" % 1), record(b"%039d" % 2), record(b"%039d" % 3), record(b"new")]
        results = yield store.add_many(group)
        # past the backlog bound one is refused; the others of the group are settled as usual
        self.assertEqual(results[:3] + results[4:], [False, True, True, True])
        self.assertIsInstance(results[3], StoreError)
        self.assertEqual((yield store.add_many([])), [])
        yield store.close()
        closed = yield store.add_many([record(b"late")])
        self.assertIsInstance(closed[0], StoreError)

    @inlineCallbacks
    def test_sensors_table(self) -> Any:
        store = SQLiteStore(self.path, reactor)
        yield store.open()
        store.seen("s1.test", "127.0.0.1:9", ("p.test",))
        yield store.add(record(b"one"))
        yield store.close()
        [sensor] = read_sensors(self.path)
        self.assertEqual((sensor["sensor"], sensor["alerts"], sensor["via"]), ("s1.test", 1, ["p.test"]))

    @inlineCallbacks
    def test_next_commit_starts_before_answers(self) -> Any:
        """
        While the answers for one batch are being written, the alerts that arrived
        during its commit are already on their way to the disk.
        """
        store = SQLiteStore(self.path, reactor)
        yield store.open()
        first = store.add(record(b"first"))
        second = store.add(record(b"second"))  # queued while "first" commits
        backlog_when_first_answered = []
        first.addCallback(lambda new: backlog_when_first_answered.append(store.backlog) or new)
        results = yield DeferredList([first, second], fireOnOneErrback=True)
        yield store.close()
        self.assertEqual([r for _, r in results], [True, True])
        self.assertEqual(backlog_when_first_answered, [0])
        self.assertEqual(store.commits, 2)
        self.assertEqual([a["body"] for a in read_alerts(self.path, with_body=True)], [b"first", b"second"])

    @inlineCallbacks
    def test_failing_commit_observer_does_not_stop_the_store(self) -> Any:
        store = SQLiteStore(self.path, reactor)
        seen: list[int] = []

        def broken(count: int, seconds: float) -> None:
            seen.append(count)
            raise RuntimeError("observer bug")

        store.commit_observers.append(broken)
        yield store.open()
        first = yield store.add(record(b"one"))
        second = yield store.add(record(b"two"))
        yield store.close()
        self.assertEqual((first, second), (True, True))
        self.assertEqual(seen, [1, 1])
        self.assertEqual(len(read_alerts(self.path)), 2)
        self.flushLoggedErrors(RuntimeError)

    @inlineCallbacks
    def test_a_failing_step_after_a_commit_still_answers_the_batch(self) -> Any:
        """A bug in starting the next commit must not leave the committed batch's
        sensors waiting for an ack that never comes; the next alert starts over."""
        store = SQLiteStore(self.path, reactor)
        yield store.open()
        take = store._take_batch
        calls = []

        def flaky() -> Any:
            calls.append(1)
            if len(calls) == 2:  # the one that follows the first commit
                raise RuntimeError("bug in the next batch")
            return take()

        store._take_batch = flaky  # type: ignore[method-assign]
        first = store.add(record(b"first"))
        second = store.add(record(b"second"))  # queued while "first" commits
        self.assertEqual((yield first), True)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        third = store.add(record(b"third"))
        self.assertEqual(((yield second), (yield third)), (True, True))
        yield store.close()
        self.assertEqual([a["body"] for a in read_alerts(self.path, with_body=True)], [b"first", b"second", b"third"])

    @inlineCallbacks
    def test_wal_is_cut_back_after_checkpoints(self) -> Any:
        """
        The WAL may grow to WAL_PAGES between checkpoints (a larger WAL makes commits
        cheaper), and not beyond: it is truncated back after each one.
        """
        self.patch(store_module, "WAL_PAGES", 32)
        store = SQLiteStore(self.path, reactor)
        yield store.open()
        wal = Path(str(self.path) + "-wal")
        sizes = []
        for n in range(40):
            yield DeferredList([store.add(bulky(b"%d-%d" % (n, i))) for i in range(20)])
            sizes.append(wal.stat().st_size)
        checkpoints = store.backend._checkpoints
        passes, finished = checkpoints.passes, checkpoints.finished
        yield store.close()
        self.assertGreater(passes, 0)  # copies made in the background
        self.assertGreater(finished, 0)  # and finished by the store's thread past the limit
        self.assertLess(finished, 40)
        self.assertEqual(len(read_alerts(self.path)), 800)
        # one commit of 20 alerts of 2 KiB writes about 50 pages; the store's thread
        # finishes the checkpoint once a background copy found the limit passed, or the
        # file at twice the limit
        self.assertLess(max(sizes[10:]), (2 * 32 + 80) * (4096 + 24))
        self.assertGreater(max(sizes), 32 * 4096 // 2)

    @inlineCallbacks
    def wait_for(self, condition: Callable[[], bool], what: str) -> Any:
        for _ in range(200):  # up to 10 s
            if condition():
                return
            yield deferLater(reactor, 0.05, lambda: None)
        self.fail(f"still waiting for {what}")

    @inlineCallbacks
    def test_checkpoints_are_copied_in_the_background(self) -> Any:
        """
        A copy is asked for once a sixty-fourth of the limit has been written, and below
        the limit the store's thread never checkpoints: the pages reach the database
        file by the checkpoint thread alone, and closing stops it and removes the log.
        """
        self.patch(store_module, "WAL_PAGES", 256)  # a copy is asked for every 4 pages, 64 rows, written
        store = SQLiteStore(self.path, reactor)
        self.addCleanup(store.close)  # also when an assertion fails: the store's thread would hold the process
        yield store.open()
        checkpoints = store.backend._checkpoints
        empty = self.path.stat().st_size
        yield DeferredList([store.add(bulky(b"%d" % i)) for i in range(30)])
        self.assertEqual(checkpoints.passes, 0)  # 30 rows: not enough to ask for a copy
        yield DeferredList([store.add(bulky(b"%d" % i)) for i in range(30, 100)])
        yield self.wait_for(lambda: checkpoints.passes >= 1 and self.path.stat().st_size > empty + 100 * 1500,
                            "the alerts' pages in the database file")
        reader = sqlite3.connect(self.path)  # they are there, whichever file holds them
        self.assertEqual(reader.execute("SELECT count(*) FROM alerts").fetchone()[0], 100)
        reader.close()
        self.assertEqual(checkpoints.finished, 0)
        thread = checkpoints._thread
        yield store.close()
        self.assertFalse(thread.is_alive())
        self.assertFalse(Path(str(self.path) + "-wal").exists())
        self.assertEqual(len(read_alerts(self.path)), 100)

    @inlineCallbacks
    def test_failed_background_checkpoints_fall_back_to_sqlite(self) -> Any:
        """
        When the checkpoint thread fails, the store says so once and SQLite's own
        checkpoints take over: the log stays bounded and nothing is lost.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.patch(store_module, "WAL_PAGES", 32)
        store = SQLiteStore(self.path, reactor)
        self.addCleanup(store.close)  # also when an assertion fails: the store's thread would hold the process
        yield store.open()
        checkpoints = store.backend._checkpoints
        with checkpoints._lock:  # between copies: its next one fails
            checkpoints._db.close()
        wal = Path(str(self.path) + "-wal")
        sizes = []
        for n in range(40):
            results = yield DeferredList([store.add(bulky(b"%d-%d" % (n, i))) for i in range(20)])
            self.assertEqual([r for _, r in results], [True] * 20)
            sizes.append(wal.stat().st_size)
            if n == 0:
                yield self.wait_for(lambda: not checkpoints._thread.is_alive(), "the checkpoint thread to stop")
        errors = [text for text in map(formatEvent, events) if "background checkpoints of" in text]
        self.assertEqual(len(errors), 1)
        self.assertIn("Cannot operate on a closed database", errors[0])
        self.assertIn("the store's thread checkpoints from now on", errors[0])
        self.assertLess(max(sizes[10:]), (32 + 80) * (4096 + 24))
        yield store.close()
        self.assertEqual(len(read_alerts(self.path)), 800)

    def test_reader_errors(self) -> None:
        with self.assertRaises(StoreError) as e:
            read_alerts(self.path)
        self.assertIn("no store at", str(e.exception))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(b"this is not a database" * 100)
        with self.assertRaises(StoreError):
            read_alerts(self.path)


IDMEF_ALERT = (
    b'<IDMEF-Message xmlns="http://iana.org/idmef"><Alert messageid="m%d"><Analyzer analyzerid="a"/>'
    b'<CreateTime>2026-11-23T10:00:00Z</CreateTime><Classification text="c%d"/></Alert></IDMEF-Message>'
)
HEARTBEAT = (
    b'<IDMEF-Message xmlns="http://iana.org/idmef"><Heartbeat messageid="hb"><Analyzer analyzerid="a"/>'
    b'<CreateTime>2026-11-23T10:00:00Z</CreateTime><HeartbeatInterval>60</HeartbeatInterval></Heartbeat>'
    b'</IDMEF-Message>'
)


def raw_summaries(path: Path) -> list[Any]:
    """The C{idmef} column as stored: None while an alert waits for its summary."""
    with sqlite3.connect(path) as db:
        return [row[0] for row in db.execute("SELECT idmef FROM alerts ORDER BY id")]


class DeferredSummaryTests(unittest.TestCase):
    """
    The IDMEF summary is written after the alert's commit, off the acknowledgement
    path; readers never see the difference.
    """

    timeout = 60

    def setUp(self) -> None:
        self.path = Path(self.mktemp()) / "alerts.db"

    @inlineCallbacks
    def wait_summarised(self, store: SQLiteStore) -> Any:
        from twisted.internet.task import deferLater

        for _ in range(200):
            if None not in raw_summaries(self.path):
                return
            yield deferLater(reactor, 0.05)
        self.fail(f"summaries still pending: {raw_summaries(self.path)}")

    @inlineCallbacks
    def test_summaries_follow_the_commit(self) -> Any:
        store = SQLiteStore(self.path, reactor)
        yield store.open()
        yield DeferredList([store.add(record(IDMEF_ALERT % (i, i))) for i in range(100)] + [store.add(record(b"not xml"))])
        yield self.wait_summarised(store)
        yield store.close()
        alerts = read_alerts(self.path)
        self.assertEqual([a["idmef"]["messageid"] for a in alerts[:100]], [f"m{i}" for i in range(100)])
        self.assertIsNone(alerts[100]["idmef"])
        # a body without a summary is marked as summarised all the same
        self.assertEqual(raw_summaries(self.path)[100], "null")

    @inlineCallbacks
    def test_summarised_fires_once_committed_alerts_have_summaries(self) -> Any:
        """What the dashboard waits on before a filter on summary fields: asked while a
        pass is not due yet (fewer than a batch, before the delay), it runs one now."""
        store = SQLiteStore(self.path, reactor)
        store.SUMMARY_DELAY = 3600  # only the question can bring the pass forward
        yield store.open()
        yield DeferredList([store.add(record(IDMEF_ALERT % (i, i))) for i in range(5)])
        self.assertEqual(raw_summaries(self.path), [None] * 5)
        yield store.summarised()
        self.assertNotIn(None, raw_summaries(self.path))
        yield store.summarised()  # nothing pending: at once
        yield store.close()

    @inlineCallbacks
    def test_a_reader_waiting_for_summaries_does_not_hold_back_acks(self) -> Any:
        """
        A dashboard filter waits for the summaries; an alert that arrives meanwhile is
        committed after one summary pass, not after all of them.
        """
        store = SQLiteStore(self.path, reactor)
        self.addCleanup(store.close)
        store.SUMMARY_DELAY = 3600  # no pass before the question
        yield store.open()
        yield DeferredList([store.add(record(IDMEF_ALERT % (i, i))) for i in range(20)])
        self.assertEqual(raw_summaries(self.path).count(None), 20)
        store.SUMMARY_BATCH = 2
        waiting = store.summarised()
        unsummarised_at_ack = []
        late = store.add(record(b"late"))
        late.addCallback(lambda new: unsummarised_at_ack.append(raw_summaries(self.path)[:20].count(None)) or new)
        self.assertTrue((yield late))
        # one pass of SUMMARY_BATCH, then the commit (and the next pass may be under
        # way as the answer is written: the next step starts before the answers)
        [left] = unsummarised_at_ack
        self.assertGreaterEqual(left, 20 - 2 * store.SUMMARY_BATCH)
        yield waiting  # with nothing queued, the passes catch up
        self.assertNotIn(None, raw_summaries(self.path))

    @inlineCallbacks
    def test_a_reader_that_stops_waiting_withdraws_its_question(self) -> Any:
        """The dashboard waits for summaries at most a few seconds; past that, the
        store must not go on favouring summary passes for a reader that has gone."""
        import threading

        from iapd.web.api import summaries_then

        store = SQLiteStore(self.path, reactor)
        store.SUMMARY_DELAY = 3600
        yield store.open()
        yield store.add(record(IDMEF_ALERT % (1, 1)))
        release = threading.Event()
        busy = store._in_thread(release.wait, 30)  # the store's thread cannot summarise
        try:
            yield summaries_then(reactor, store, timeout=0.05)
            self.assertEqual(store._summary_waiters, [])
        finally:
            release.set()
        yield busy
        yield store.close()

    @inlineCallbacks
    def test_heartbeat_is_summarised_in_its_commit(self) -> Any:
        store = SQLiteStore(self.path, reactor)
        yield store.open()
        yield store.add(record(HEARTBEAT))
        # the sensor's heartbeat time is written with the alert, before the 200
        [sensor] = read_sensors(self.path)
        self.assertEqual(sensor["heartbeat_interval"], 60)
        self.assertIsNotNone(raw_summaries(self.path)[0])
        yield store.close()

    def commit_unsummarised(self, count: int) -> None:
        """What a manager killed between a commit and the summary pass leaves behind."""
        from iapd.store import Row, SQLiteBackend

        backend = SQLiteBackend(self.path)
        backend.open()
        backend.commit([Row(record(IDMEF_ALERT % (i, i)), None, pending=True) for i in range(count)], {})
        backend.close()

    def test_readers_summarise_what_is_pending(self) -> None:
        self.commit_unsummarised(3)
        self.assertEqual(raw_summaries(self.path), [None, None, None])
        alerts = read_alerts(self.path, with_body=True)
        self.assertEqual([a["idmef"]["classification"] for a in alerts], ["c0", "c1", "c2"])
        self.assertEqual([a["body"] for a in alerts], [IDMEF_ALERT % (i, i) for i in range(3)])
        self.assertEqual(len(read_alerts(self.path, heartbeats=False)), 3)

    @inlineCallbacks
    def test_pending_summaries_are_written_after_a_restart(self) -> Any:
        self.commit_unsummarised(150)  # more than one summary batch
        store = SQLiteStore(self.path, reactor)
        yield store.open()
        yield self.wait_summarised(store)
        yield store.close()
        alerts = read_alerts(self.path)
        self.assertEqual([a["idmef"]["messageid"] for a in alerts], [f"m{i}" for i in range(150)])

    @inlineCallbacks
    def test_summaries_do_not_wait_for_an_idle_store(self) -> Any:
        """Under a stream of alerts that never lets the queue empty, summaries advance."""
        from twisted.internet.defer import Deferred

        store = SQLiteStore(self.path, reactor)
        yield store.open()
        yield DeferredList([store.add(record(IDMEF_ALERT % (i, i))) for i in range(50)])
        done: Deferred[int] = Deferred()
        waves = 4 * store.SUMMARY_EVERY

        def wave(_: Any, n: int) -> None:
            # called as the previous alert is committed: the queue is never empty
            if n == waves:
                done.callback(sum(1 for s in raw_summaries(self.path) if s is not None))
                return
            store.add(record(IDMEF_ALERT % (1000 + n, 0))).addCallback(wave, n + 1)

        store.add(record(b"first")).addCallback(wave, 0)
        store.add(record(b"second"))
        summarised = yield done
        self.assertGreater(summarised, 0)
        yield store.close()

    @inlineCallbacks
    def test_a_sensor_waiting_for_its_answers_is_not_held_back_by_summaries(self) -> Any:
        """
        One sensor keeps a window of alerts in flight and sends the next window as soon
        as it has the answers for the last: the queue is empty at the end of every
        commit, but the store is not idle, and a summary pass then would hold back the
        next window.  After such large commits, passes wait until the store has been
        quiet, or until SUMMARY_EVERY commits have gone by without one.
        """
        from twisted.internet.defer import Deferred
        from twisted.internet.task import deferLater

        store = SQLiteStore(self.path, reactor)
        self.addCleanup(store.close)
        store.SUMMARY_DELAY = 3600  # passes of full batches only
        store.SUMMARY_QUIET = 2.0  # the next alert comes in the same reactor turn anyway
        yield store.open()
        yield DeferredList([store.add(record(IDMEF_ALERT % (i, i))) for i in range(3 * store.SUMMARY_BATCH)])
        done: Deferred[list[int]] = Deferred()
        summarised_at_each_answer: list[int] = []
        waves = 2 * store.SUMMARY_EVERY

        def wave(_: Any, n: int) -> None:
            summarised_at_each_answer.append(sum(1 for s in raw_summaries(self.path) if s is not None))
            if n == waves:
                done.callback(summarised_at_each_answer)
                return
            window = [record(b"wave %d alert %d" % (n, i)) for i in range(store.SUMMARY_LARGE_COMMIT)]
            store.add_many(window).addCallback(wave, n + 1)  # one read, one commit

        wave(None, 0)
        counts = (yield done)[1:]
        # a pass only once SUMMARY_EVERY commits have gone by (the first commits count
        # too), so that summaries advance all the same, but never between two answers
        passes = [n for n, (before, after) in enumerate(zip([0] + counts, counts)) if after > before]
        self.assertEqual(len(passes), 2, counts)
        self.assertGreaterEqual(passes[0], store.SUMMARY_EVERY - 3, counts)
        # (a pass starts just before the answers go out, and the answer may or may not
        # see it written: one answer's leeway)
        self.assertGreaterEqual(passes[1] - passes[0], store.SUMMARY_EVERY - 1, counts)
        self.assertEqual(counts[-1], 2 * store.SUMMARY_BATCH)
        # once the sensor has stopped and the store has been quiet, the next full
        # batch is summarised without waiting for more commits
        for _ in range(100):
            now = sum(1 for s in raw_summaries(self.path) if s is not None)
            if now > counts[-1]:
                break
            yield deferLater(reactor, 0.05)
        self.assertGreaterEqual(now, 3 * store.SUMMARY_BATCH)
        yield store.summarised()
        self.assertNotIn(None, raw_summaries(self.path))

    @inlineCallbacks
    def test_a_sender_that_pauses_between_windows_gets_passes_in_the_pauses(self) -> Any:
        """Large commits with pauses between them (a proxy forwarding a window now and
        then) leave quiet moments, and the summaries keep up in them, without waiting
        for SUMMARY_EVERY commits or SUMMARY_DELAY."""
        from twisted.internet.task import deferLater

        store = SQLiteStore(self.path, reactor)
        self.addCleanup(store.close)
        store.SUMMARY_DELAY = 3600
        store.SUMMARY_EVERY = 10**6
        yield store.open()
        for n in range(4):
            window = [record(IDMEF_ALERT % (100 * n + i, i)) for i in range(store.SUMMARY_BATCH)]
            yield store.add_many(window)  # one commit of a whole window
            # in the pause that follows (no alert comes), the window is summarised
            for _ in range(200):
                done = sum(1 for s in raw_summaries(self.path) if s is not None)
                if done == (n + 1) * store.SUMMARY_BATCH:
                    break
                yield deferLater(reactor, 0.05)
            self.assertEqual(done, (n + 1) * store.SUMMARY_BATCH)

    @inlineCallbacks
    def test_after_small_commits_a_pass_starts_once_nothing_waits(self) -> Any:
        """A light load (an alert or two a commit) does not wait for a quiet store: a
        pass starts as soon as no alert waits, so that passes stay small."""
        store = SQLiteStore(self.path, reactor)
        self.addCleanup(store.close)
        store.SUMMARY_DELAY = store.SUMMARY_QUIET = 3600
        store.SUMMARY_EVERY = 10**6
        yield store.open()
        for i in range(store.SUMMARY_BATCH):
            yield store.add(record(IDMEF_ALERT % (i, i)))
        yield self.wait_summarised(store)

    @inlineCallbacks
    def test_duplicates_in_one_batch(self) -> Any:
        store = SQLiteStore(self.path, reactor)
        yield store.open()
        yield store.add(record(b"old"))
        results = yield DeferredList([store.add(record(b)) for b in (b"new", b"old", b"new", b"other", b"old")])
        self.assertEqual([r for _, r in results], [True, False, False, True, False])
        yield store.close()
        self.assertEqual([a["body"] for a in read_alerts(self.path, with_body=True)], [b"old", b"new", b"other"])


class DigestFilterTests(ManagerCase):
    """A manager restarted on a store that holds alerts, over real TLS: once its digest
    filter is full, new alerts are told from retransmissions as before."""

    @inlineCallbacks
    def test_retransmissions_after_a_restart_with_the_filter_full(self) -> Any:
        from twisted.internet.threads import deferToThread

        peer = yield self.ready_peer()
        for body in (b"first", b"second", b"third"):
            yield self.send_alert(peer, body)
        peer.transport.abortConnection()
        yield self.port.stopListening()
        yield self.store.close()
        yield self.start_manager()
        digests = self.store.backend.digests
        self.assertTrue((yield deferToThread(digests.wait_filter, 30)))
        self.assertEqual(digests.filter_state, "full")
        again = yield self.ready_peer()
        # the sensor resends what it had no answer for, then goes on
        for body in (b"second", b"fourth", b"third", b"fourth"):
            yield self.send_alert(again, body)
        self.assertEqual([a["body"] for a in self.stored()], [b"first", b"second", b"third", b"fourth"])
        self.assertEqual((again.connected_, self.store.backend.digests.filter_state), (True, "full"))


class StoreDownTests(ManagerCase):
    """A real SQLite failure (a trigger that aborts inserts) while a sensor sends."""

    @inlineCallbacks
    def test_store_down_is_503_and_the_connection_goes_on(self) -> Any:
        peer = yield self.ready_peer()
        db = sqlite3.connect(self.db_path)
        db.execute("CREATE TRIGGER down BEFORE INSERT ON alerts BEGIN SELECT RAISE(ABORT, 'disk on fire'); END")
        db.commit()
        peer.transport.write(content(b"while down"))
        yield self.expect(peer, S503)
        self.assertEqual(self.stored(), [])
        db.execute("DROP TRIGGER down")
        db.commit()
        db.close()
        # the sensor kept the alert and sends it again: now it is stored
        peer.transport.write(content(b"while down"))
        yield self.expect(peer, OK)
        self.assertEqual([a["body"] for a in self.stored()], [b"while down"])


class SlowStoreTests(ManagerCase):
    """The store cannot commit (another writer holds the lock): the manager stops reading."""

    timeout = 120

    @inlineCallbacks
    def test_manager_stops_reading_instead_of_buffering(self) -> Any:
        from twisted.internet.task import deferLater

        from iapd.manager import MAX_IN_FLIGHT

        peer = yield self.ready_peer()
        locker = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        locker.execute("BEGIN EXCLUSIVE")

        def release() -> None:
            if locker.in_transaction:
                locker.execute("ROLLBACK")

        self.addCleanup(release)  # runs before the store's close, even if we fail
        count = MAX_IN_FLIGHT * 3
        peer.transport.write(b"".join(content(b"pressure %06d" % i) for i in range(count)))
        # give the manager time to read all it is willing to read
        for _ in range(40):
            yield deferLater(reactor, 0.05)
        [proto] = list(self.factory.connections)
        # bounded near the limit (TLS hands over what it already decrypted), not `count`
        self.assertLess(proto.in_flight, MAX_IN_FLIGHT * 1.5)
        self.assertTrue(proto._paused)
        release()
        yield within(peer.until_length(count * len(OK)), 90)
        self.assertEqual(peer.take(), OK * count)
        self.assertEqual(len(self.stored()), count)


class BodyLogTests(unittest.TestCase):
    """
    Bodies live in an append-only log beside the file (iapd/bodylog.py): flushed before
    the rows that point at them commit, checked against their digest when read.
    """

    timeout = 60

    def setUp(self) -> None:
        self.path = Path(self.mktemp()) / "alerts.db"
        self.log = self.path.parent / "alerts.db-bodies"
        self.errors: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_level") is not None and event["log_level"].name in ("error", "critical"):
                self.errors.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    @inlineCallbacks
    def store(self, bodies: list[bytes], *, summaries: bool = True) -> Any:
        store = SQLiteStore(self.path, reactor)
        self.addCleanup(store.close)  # also when an assertion fails: the store's thread would hold the process
        if not summaries:
            store.SUMMARY_DELAY = 3600
        yield store.open()
        new = yield store.add_many([record(b) for b in bodies])
        if summaries:
            yield store.summarised()
        yield store.close()
        return new

    @inlineCallbacks
    def test_octets_a_crash_left_after_the_last_commit_are_never_read(self) -> Any:
        """A crash between the append and the commit leaves bodies no row points at: the
        next batch goes after them, and every alert reads back as it came."""
        first = [IDMEF_ALERT % (i, i) for i in range(3)]
        yield self.store(first)
        with open(self.log, "ab") as f:
            f.write(b"<half an alert from a batch that never committed")
        then = [IDMEF_ALERT % (i, i) for i in range(3, 6)]
        self.assertEqual((yield self.store(then + first[:1])), [True] * 3 + [False])
        alerts = read_alerts(self.path, with_body=True)
        self.assertEqual([a["body"] for a in alerts], first + then)
        self.assertEqual([a["idmef"]["messageid"] for a in alerts], [f"m{i}" for i in range(6)])
        self.assertEqual(self.errors, [])

    @inlineCallbacks
    def test_a_damaged_body_is_named_and_harms_no_other_alert(self) -> Any:
        from iapd.web.readers import StoreReader

        bodies = [IDMEF_ALERT % (i, i) for i in range(3)]
        yield self.store(bodies, summaries=False)
        with closing(sqlite3.connect(self.path)) as db:
            at = db.execute("SELECT body_at FROM alerts WHERE id = 2").fetchone()[0]
        damaged = bytearray(self.log.read_bytes())
        damaged[at + 10] ^= 0x20
        self.log.write_bytes(bytes(damaged))

        listed = read_alerts(self.path)  # a listing without bodies still shows every alert
        self.assertEqual([a["idmef"] and a["idmef"]["messageid"] for a in listed], ["m0", None, "m2"])
        self.assertEqual([a["size"] for a in listed], [len(b) for b in bodies])
        with self.assertRaises(StoreError) as raised:
            read_alerts(self.path, with_body=True)
        self.assertEqual(str(raised.exception), f"alert 2: its body in {self.log.resolve()} (at {at}) does not match its SHA-256")
        self.assertEqual([a["body"] for a in read_alerts(self.path, with_body=True, after_id=2)], bodies[2:])
        reader = StoreReader(self.path, None)
        self.assertEqual(reader.alert(1)["body"], bodies[0])
        self.assertRaises(StoreError, reader.alert, 2)  # the dashboard answers 503 with the message

        yield self.store([IDMEF_ALERT % (3, 3)])  # the manager's summary pass goes on past it
        self.assertEqual(raw_summaries(self.path)[1], "null")
        self.assertEqual([json.loads(s) and json.loads(s)["messageid"] for s in raw_summaries(self.path)],
                         ["m0", None, "m2", "m3"])
        self.assertEqual(len(self.errors), 1, self.errors)
        self.assertIn("no summary for alert 2: its body in", self.errors[0])

    @inlineCallbacks
    def test_a_store_whose_body_log_is_lost_is_refused_until_it_is_back_or_extended(self) -> Any:
        """
        A database restored without its log: new bodies would go where old rows point,
        so the manager refuses to start, saying what to do; with the log put back
        everything reads again, and an operator who extends the log as told goes on
        without the old bodies, which readers then report.
        """
        from iapd.web.readers import StoreReader

        bodies = [IDMEF_ALERT % (i, i) for i in range(2)]
        yield self.store(bodies)
        kept = self.log.read_bytes()
        self.log.unlink()
        with self.assertRaises(StoreError) as raised:
            read_alerts(self.path, with_body=True)
        self.assertIn("alert 1: cannot read its body from", str(raised.exception))
        self.assertIn("No such file or directory", str(raised.exception))

        store = SQLiteStore(self.path, reactor)
        self.addCleanup(store.close)
        with self.assertRaises(StoreError) as raised:
            yield store.open()
        log = self.log.resolve()
        self.assertEqual(
            str(raised.exception),
            f"cannot open SQLite store {self.path}: the body log {log} holds 0 octets, but the body of alert 2 ends"
            f" at {len(kept)}: put back the body log that belongs with this database (a backup's, copied after it);"
            f" to go on without the bodies it lacks, extend it with: truncate -s {len(kept)} {log}",
        )

        self.log.write_bytes(kept)  # put back
        yield self.store([b"after the return"])
        self.assertEqual([a["body"] for a in read_alerts(self.path, with_body=True)], bodies + [b"after the return"])

        self.log.write_bytes(b"")
        os.truncate(self.log, len(kept) + len(b"after the return"))  # extended, as the message says
        yield self.store([b"after the loss"])
        self.assertEqual(read_alerts(self.path, with_body=True, after_id=3)[0]["body"], b"after the loss")
        with self.assertRaises(StoreError) as raised:
            StoreReader(self.path, None).alert(2)
        self.assertEqual(str(raised.exception), f"alert 2: its body in {log} (at {len(bodies[0])}) does not match its SHA-256")
        self.assertEqual(self.errors, [])

    @inlineCallbacks
    def test_a_store_made_before_the_body_log_is_read_then_given_the_columns(self) -> Any:
        """
        A file an earlier version wrote keeps its bodies in their rows: readers
        (read-only) take it as it is and leave it alone; the manager adds the columns
        at open, and old and new alerts read back as they came.
        """
        old_schema = store_module.SCHEMA.replace("    idmef TEXT,\n    body_at INTEGER,\n    body_size INTEGER\n);",
                                                 "    idmef TEXT\n);")
        self.assertNotEqual(old_schema, store_module.SCHEMA)
        self.path.parent.mkdir()
        old = [IDMEF_ALERT % (i, i) for i in range(2)]
        with closing(sqlite3.connect(self.path)) as db:
            db.executescript(old_schema)
            db.executemany(
                "INSERT INTO alerts (sensor, received, content_type, sha256, via, peer, body, idmef)"
                " VALUES ('s1.test', '2026-11-23T10:00:00.000000+00:00', ?, ?, '[]', NULL, ?, NULL)",
                [(IDEF, hashlib.sha256(b).hexdigest(), b) for b in old],
            )
            db.commit()
        before = self.path.read_bytes()
        listed = read_alerts(self.path, with_body=True)
        self.assertEqual([(a["body"], a["size"], a["idmef"]["messageid"]) for a in listed],
                         [(b, len(b), f"m{i}") for i, b in enumerate(old)])
        self.assertEqual(self.path.read_bytes(), before)  # the reader changed nothing
        self.assertFalse(self.log.exists())
        from iapd.web.readers import StoreReader

        self.assertEqual(StoreReader(self.path, None).alert(2)["body"], old[1])  # the dashboard's reader too

        new = [IDMEF_ALERT % (i, i) for i in range(2, 4)]
        self.assertEqual((yield self.store(new + old[:1])), [True, True, False])  # an old alert's retransmission is known
        with closing(sqlite3.connect(self.path)) as db:
            places = db.execute("SELECT length(body), body_at, body_size FROM alerts ORDER BY id").fetchall()
        self.assertEqual(places, [(len(old[0]), None, None), (len(old[1]), None, None),
                                  (0, 0, len(new[0])), (0, len(new[0]), len(new[1]))])
        self.assertEqual([a["body"] for a in read_alerts(self.path, with_body=True)], old + new)
        self.assertEqual(self.errors, [])

    @inlineCallbacks
    def test_a_body_log_that_cannot_be_opened_stops_the_open(self) -> Any:
        self.path.parent.mkdir()
        self.log.mkdir()  # in the way
        store = SQLiteStore(self.path, reactor)
        self.addCleanup(store.close)
        with self.assertRaises(StoreError) as raised:
            yield store.open()
        self.assertIn(f"cannot open SQLite store {self.path}: cannot open the body log {self.log.resolve()}: Is a directory",
                      str(raised.exception))

    @inlineCallbacks
    def test_a_body_log_the_disk_refuses_fails_the_commit_and_stores_nothing(self) -> Any:
        """A full disk (the log on /dev/full): the batch is answered with the error (a
        503 on the wire), no row points at a body that is not there, and the manager
        goes on."""
        if not Path("/dev/full").exists():
            raise unittest.SkipTest("no /dev/full")
        self.path.parent.mkdir()
        self.log.symlink_to("/dev/full")
        store = SQLiteStore(self.path, reactor)
        self.addCleanup(store.close)
        yield store.open()
        outcomes = yield store.add_many([record(IDMEF_ALERT % (1, 1)), record(IDMEF_ALERT % (2, 2))])
        yield store.close()
        self.assertEqual([type(o) for o in outcomes], [StoreError, StoreError])
        self.assertIn("cannot append to the body log", str(outcomes[0]))
        self.assertIn("No space left on device", str(outcomes[0]))
        with closing(sqlite3.connect(self.path)) as db:
            self.assertEqual(db.execute("SELECT count(*) FROM alerts").fetchone()[0], 0)
        self.assertEqual(len(self.errors), 1, self.errors)
        self.assertIn("store commit of 2 alerts failed (BodyLogError: cannot append to the body log", self.errors[0])

    @inlineCallbacks
    def test_a_log_that_cannot_be_read_for_a_while_leaves_summaries_to_a_later_pass(self) -> Any:
        """Only a damaged body becomes "no summary": while the log cannot be read (here a
        directory stands at its path) the pass fails, the rows stay pending, and the
        next pass writes their summaries."""
        store = SQLiteStore(self.path, reactor)
        self.addCleanup(store.close)
        store.SUMMARY_DELAY = 3600
        yield store.open()
        yield store.add_many([record(IDMEF_ALERT % (i, i)) for i in range(2)])
        aside = self.path.parent / "aside"
        os.rename(self.log, aside)
        os.mkdir(self.log)
        yield store.summarised()
        self.assertEqual(raw_summaries(self.path), [None, None])
        self.assertEqual(len(self.errors), 1, self.errors)
        self.assertIn("writing alert summaries failed (alert 1: cannot read its body from", self.errors[0])
        self.assertIn("Is a directory", self.errors[0])

        os.rmdir(self.log)
        os.rename(aside, self.log)
        yield store.add_many([record(IDMEF_ALERT % (2, 2))])
        yield store.summarised()
        yield store.close()
        self.assertEqual([json.loads(s)["messageid"] for s in raw_summaries(self.path)], ["m0", "m1", "m2"])
        self.assertEqual(len(self.errors), 1, self.errors)
