"""
The PostgreSQL store against a real PostgreSQL server (tests/pg.py): group commit,
deduplication, two managers writing one database at once, a real manager over real TLS,
the server crashing and coming back, heartbeats, and iapctl reading it all back in the
same shapes as from SQLite.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from iapd.client import deliver
from iapd.config import ConfigError, load_manager
from iapd.idmef import summarize
from iapd.manager import ManagerFactory, ManagerSettings
from iapd.pgstore import (
    PostgresBackend,
    PostgresStore,
    glob_regex,
    read_alerts_pg,
    read_sensors_pg,
    redact,
)
from iapd.store import (
    AlertRecord,
    Row,
    SQLiteBackend,
    StoreError,
    read_alerts,
    read_sensors,
)
from iapd.tls import load_material

from .pg import USER as PG_USER
from .pg import free_port, pg_database, pg_server  # noqa: F401  (pytest fixtures)
from .support import IDEF, OK, content
from .test_idmef import HEARTBEAT
from .test_manager import IDMEF_ALERT, ManagerCase, within

S503 = b"IAP/0.2 503\r\n\r\n"
NUMBERED_ALERT = (
    b'<IDMEF-Message xmlns="http://iana.org/idmef"><Alert messageid="m%d"><Analyzer analyzerid="a"/>'
    b'<CreateTime>2026-11-23T10:00:00Z</CreateTime><Classification text="c%d"/></Alert></IDMEF-Message>'
)
REPO = Path(__file__).resolve().parent.parent


def record(body: bytes, sensor: str = "s1.test", **kw: Any) -> AlertRecord:
    kw.setdefault("via", ("p.test",))
    kw.setdefault("peer", "127.0.0.1:1")
    return AlertRecord(sensor=sensor, content_type=IDEF, body=body, **kw)


def at(minutes: float) -> str:
    """A receive time C{minutes} after a fixed moment, as the store writes it."""
    start = datetime.datetime(2026, 3, 1, 12, 0, tzinfo=datetime.timezone.utc)
    return (start + datetime.timedelta(minutes=minutes)).isoformat(timespec="microseconds")


@pytest.mark.usefixtures("pg_database")
class PostgresStoreTests(unittest.TestCase):
    pg_url: str
    pg_server: Any

    @inlineCallbacks
    def open_store(self, **kw: Any) -> Any:
        store = PostgresStore(self.pg_url, reactor, **kw)
        yield store.open()
        self.addCleanup(store.close)
        return store

    @inlineCallbacks
    def test_group_commit_and_dedup(self) -> Any:
        store = yield self.open_store()
        bodies = [b"alert %d" % i for i in range(300)] + [b"alert 7", b"alert 8"]
        results = yield DeferredList([store.add(record(b)) for b in bodies], fireOnOneErrback=True)
        self.assertEqual([r for _, r in results], [True] * 300 + [False, False])
        self.assertLess(store.commits, 300)  # many alerts per transaction
        # a retransmission in a later batch is a duplicate too
        again = yield store.add(record(b"alert 0"))
        self.assertFalse(again)
        yield store.close()
        stored = read_alerts_pg(self.pg_url, with_body=True)
        self.assertEqual([a["body"] for a in stored], bodies[:300])
        self.assertEqual(stored[0]["via"], ["p.test"])
        self.assertEqual(stored[0]["peer"], "127.0.0.1:1")
        self.assertEqual(stored[0]["size"], len(b"alert 0"))

    @inlineCallbacks
    def test_each_alert_keeps_its_own_via_and_time_in_a_shared_commit(self) -> Any:
        """Alerts through different proxy chains and received in different seconds, in
        one commit: each row keeps its own, although the commit converts each once."""
        chains = [(), ("p1.test",), ("p2.test", "p3.test"), ("p1.test",), ()]
        times = [at(0), at(1), at(0), at(2), at(1)]
        store = PostgresStore(self.pg_url, reactor)
        opening = store.open()
        added = store.add_many([record(NUMBERED_ALERT % (i, i), via=via, received=when)
                                for i, (via, when) in enumerate(zip(chains, times))])
        yield opening
        self.addCleanup(store.close)
        self.assertEqual((yield within(added)), [True] * 5)
        stored = sorted(read_alerts_pg(self.pg_url, with_body=True), key=lambda a: a["body"])
        self.assertEqual([(a["via"], a["received"]) for a in stored], [(list(c), t) for c, t in zip(chains, times)])

    @inlineCallbacks
    def test_same_body_from_another_sensor_is_another_alert(self) -> Any:
        store = yield self.open_store()
        first = yield store.add(record(b"x", "a.test"))
        second = yield store.add(record(b"x", "b.test"))
        third = yield store.add(record(b"x", "a.test"))
        self.assertEqual((first, second, third), (True, True, False))
        self.assertEqual([a["sensor"] for a in read_alerts_pg(self.pg_url)], ["a.test", "b.test"])

    @inlineCallbacks
    def test_two_managers_on_one_database(self) -> Any:
        """
        Two stores (two managers) commit overlapping alerts at once, in opposite
        orders, in small batches: every alert is new in exactly one of them and a
        duplicate in the other, none fails, and each is stored once.
        """
        a = yield self.open_store(max_batch=40)
        b = yield self.open_store(max_batch=40)
        sensors = [f"s{i}.test" for i in range(5)]
        keys = [(s, b"alert %d" % n) for n in range(300) for s in sensors]
        to_a = keys[: len(keys) * 3 // 4]
        to_b = list(reversed(keys[len(keys) // 4:]))
        pending_a = [a.add(record(body, sensor)) for sensor, body in to_a]
        pending_b = [b.add(record(body, sensor)) for sensor, body in to_b]
        results = yield within(DeferredList(pending_a + pending_b, consumeErrors=True), 60)
        failures = [value for ok, value in results if not ok]
        self.assertEqual(failures, [])
        new: dict[tuple[str, bytes], int] = {}
        for key, (_, is_new) in zip(to_a + to_b, results):
            new[key] = new.get(key, 0) + int(is_new)
        self.assertEqual(set(new), set(keys))
        self.assertEqual({k for k, n in new.items() if n != 1}, set())
        self.assertEqual(a.committed + b.committed, len(keys))
        self.assertGreater(a.commits, 1)
        self.assertGreater(b.commits, 1)
        stored = read_alerts_pg(self.pg_url, with_body=True)
        self.assertEqual(sorted((x["sensor"], x["body"]) for x in stored), sorted(keys))

    @inlineCallbacks
    def test_same_key_racing_in_two_transactions(self) -> Any:
        """
        The same (sensor, sha256) inserted by two transactions that are both open:
        the second waits for the first and then reports a duplicate, no error.
        """
        one, two = PostgresBackend(self.pg_url), PostgresBackend(self.pg_url)
        one.open()
        two.open()
        self.addCleanup(one.close)
        self.addCleanup(two.close)
        rows = [Row(record(b"race %d" % i), None) for i in range(20)]
        barrier = threading.Barrier(2)

        def commit(backend: PostgresBackend, batch: list[Row]) -> list[bool]:
            barrier.wait(10)
            return backend.commit(batch, {})

        results = yield within(
            DeferredList([deferToThread(commit, one, rows), deferToThread(commit, two, rows[::-1])],
                         fireOnOneErrback=True, consumeErrors=True),
            30,
        )
        first, second = results[0][1], results[1][1][::-1]
        self.assertEqual([x + y for x, y in zip(first, second)], [1] * 20)
        self.assertEqual(len(read_alerts_pg(self.pg_url)), 20)

    @inlineCallbacks
    def test_heartbeats_update_the_sensor(self) -> Any:
        store = yield self.open_store()
        store.seen("s1.test", "127.0.0.1:9", ("p.test",))
        yield store.add(record(IDMEF_ALERT, received=at(0)))
        yield store.add(record(HEARTBEAT, received=at(5)))
        [sensor] = read_sensors_pg(self.pg_url)
        self.assertEqual(sensor["last_heartbeat"], at(5))
        self.assertEqual(sensor["heartbeat_interval"], 600.0)
        self.assertTrue(sensor["heartbeat_overdue"])  # 2026-03-01 + 2 x 600 s is long past
        self.assertEqual((sensor["sensor"], sensor["alerts"], sensor["via"]), ("s1.test", 2, ["p.test"]))
        self.assertEqual(sensor["last_peer"], "127.0.0.1:9")
        # a later heartbeat moves it on; one received earlier (another manager's, late)
        # does not move it back
        yield DeferredList([
            store.add(record(HEARTBEAT + b" ", received=at(20))),
            store.add(record(HEARTBEAT + b"  ", received=at(10))),
        ])
        [sensor] = read_sensors_pg(self.pg_url)
        self.assertEqual(sensor["last_heartbeat"], at(20))
        self.assertEqual(sensor["last_alert"], at(20))
        # heartbeats are alerts in the table, hidden when asked
        self.assertEqual(len(read_alerts_pg(self.pg_url)), 4)
        self.assertEqual([a["body"] for a in read_alerts_pg(self.pg_url, heartbeats=False, with_body=True)],
                         [IDMEF_ALERT])

    @inlineCallbacks
    def test_heartbeat_from_a_sensor_never_seen_creates_it(self) -> Any:
        store = yield self.open_store()
        yield store.add(record(HEARTBEAT, "new.test", received=at(1)))
        [sensor] = read_sensors_pg(self.pg_url)
        self.assertEqual(
            (sensor["sensor"], sensor["first_seen"], sensor["last_heartbeat"], sensor["via"]),
            ("new.test", at(1), at(1), ["p.test"]),
        )

    @inlineCallbacks
    def test_restart_while_idle_is_invisible(self) -> Any:
        """The connection died while no commit ran: the next commit reconnects and succeeds."""
        store = yield self.open_store()
        first = yield store.add(record(b"before"))
        yield deferToThread(self.pg_server.stop, "fast")
        yield deferToThread(self.pg_server.start)
        second = yield within(store.add(record(b"after")))
        self.assertEqual((first, second), (True, True))
        self.assertEqual(len(read_alerts_pg(self.pg_url)), 2)

    @inlineCallbacks
    def test_unreachable_server_fails_open_with_store_error(self) -> Any:
        url = f"postgresql://iapd:s3cret@127.0.0.1:{free_port()}/nowhere"
        store = PostgresStore(url, reactor)
        failure = yield self.assertFailure(store.open(), StoreError)
        self.assertIn("cannot connect to PostgreSQL store postgresql://iapd@127.0.0.1:", str(failure))
        self.assertNotIn("s3cret", str(failure))
        self.assertNotIn("s3cret", str(store.backend))
        queued = store.add(record(b"lost?"))
        yield within(store.close())
        yield self.assertFailure(queued, StoreError)

    def test_reader_errors(self) -> None:
        with self.assertRaises(StoreError) as e:
            read_alerts_pg(self.pg_url)  # the manager never ran: no tables
        self.assertIn("has the manager run", str(e.exception))
        with self.assertRaises(StoreError) as e:
            read_sensors_pg(f"postgresql://iapd:s3cret@127.0.0.1:{free_port()}/x")
        self.assertIn("cannot read PostgreSQL store", str(e.exception))
        self.assertNotIn("s3cret", str(e.exception))


def numbered(i: int) -> bytes:
    """An IDMEF alert whose summary names C{i}: message id mI, classification cI."""
    return NUMBERED_ALERT % (i, i)


def raw_summaries(url: str) -> list[str]:
    """The idmef column as stored, by id: 'pending' for SQL NULL, else the JSON type."""
    import psycopg

    with psycopg.connect(url) as conn:
        return [row[0] for row in conn.execute("SELECT coalesce(jsonb_typeof(idmef), 'pending') FROM alerts ORDER BY id")]


def old_schema(url: str) -> None:
    """The tables as an earlier version made them: no alerts_unsummarised index, and
    SQL NULL for a body that has no summary."""
    import psycopg

    from iapd import pgstore

    with psycopg.connect(url, autocommit=True) as conn:
        for statement in pgstore.SCHEMA:
            if statement is not pgstore.UNSUMMARISED_INDEX:
                conn.execute(statement)
        conn.execute(
            "INSERT INTO alerts (sensor, received, content_type, sha256, body, idmef) VALUES"
            " ('old.test', now(), %s, 'aa', 'not xml', NULL),"
            " ('old.test', now(), %s, 'bb', 'also not xml', NULL)",
            (IDEF, IDEF),
        )


@pytest.mark.usefixtures("pg_database")
class PostgresSummaryTests(unittest.TestCase):
    """
    The IDMEF summary is written after the commit, off the acknowledgement path, as in
    SQLite; readers never see the difference.
    """

    pg_url: str
    pg_server: Any
    timeout = 60

    @inlineCallbacks
    def open_store(self, url: str | None = None, **attrs: Any) -> Any:
        store = PostgresStore(url or self.pg_url, reactor)
        for name, value in attrs.items():
            setattr(store, name, value)
        yield store.open()
        self.addCleanup(store.close)
        return store

    @inlineCallbacks
    def wait_summarised(self) -> Any:
        from twisted.internet.task import deferLater

        for _ in range(200):
            if "pending" not in raw_summaries(self.pg_url):
                return
            yield deferLater(reactor, 0.05)
        self.fail(f"summaries still pending: {raw_summaries(self.pg_url)}")

    @inlineCallbacks
    def test_summaries_follow_the_commit(self) -> Any:
        from iapd.web.query import AlertQuery
        from iapd.web.readers import StoreReader

        store = yield self.open_store(SUMMARY_DELAY=3600)  # only the question brings a pass
        self.assertTrue(store.backend.defers_summaries)
        results = yield DeferredList([store.add(record(numbered(i))) for i in range(5)] + [store.add(record(b"not xml"))])
        self.assertEqual([r for _, r in results], [True] * 6)
        # acknowledged before any summary was written
        self.assertEqual(raw_summaries(self.pg_url), ["pending"] * 6)
        # readers summarise what is pending: iapctl and the dashboard
        before = read_alerts_pg(self.pg_url, with_body=True)
        self.assertEqual([a["idmef"]["classification"] for a in before[:5]], [f"c{i}" for i in range(5)])
        self.assertIsNone(before[5]["idmef"])
        page = StoreReader(None, self.pg_url).alerts(AlertQuery())
        self.assertEqual([a["idmef"] and a["idmef"]["messageid"] for a in page.alerts],
                         [None] + [f"m{i}" for i in reversed(range(5))])
        yield store.summarised()
        # a body without a summary holds JSON null: summarised, never looked at again
        self.assertEqual(raw_summaries(self.pg_url), ["object"] * 5 + ["null"])
        self.assertEqual(read_alerts_pg(self.pg_url, with_body=True), before)

    @inlineCallbacks
    def test_pending_summaries_are_written_after_a_restart(self) -> Any:
        backend = PostgresBackend(self.pg_url)
        backend.open()
        backend.commit([Row(record(numbered(i)), None, pending=True) for i in range(150)], {})  # > one pass
        backend.close()
        self.assertEqual(raw_summaries(self.pg_url), ["pending"] * 150)
        yield self.open_store()
        yield self.wait_summarised()
        self.assertEqual([a["idmef"]["messageid"] for a in read_alerts_pg(self.pg_url)], [f"m{i}" for i in range(150)])

    @inlineCallbacks
    def test_a_server_restart_between_commit_and_pass(self) -> Any:
        """The pass finds the connection dead, opens a new one and writes the
        summaries: no error, nothing left pending until some later commit."""
        store = yield self.open_store(SUMMARY_DELAY=3600)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        yield DeferredList([store.add(record(numbered(i))) for i in range(5)])
        yield deferToThread(self.pg_server.stop, "fast")
        yield deferToThread(self.pg_server.start)
        yield within(store.summarised(), 30)
        self.assertEqual(raw_summaries(self.pg_url), ["object"] * 5)
        self.assertEqual([formatEvent(e) for e in events if e.get("log_level") and e["log_level"].name in
                          ("error", "critical")], [])

    @inlineCallbacks
    def test_two_managers_summarise_the_same_alerts(self) -> Any:
        """Both find the same pending alerts and write them at once: neither waits for
        ever nor fails, and each alert ends with its one summary."""
        one, two = PostgresBackend(self.pg_url), PostgresBackend(self.pg_url)
        for backend in (one, two):
            backend.open()
            self.addCleanup(backend.close)
        one.commit([Row(record(numbered(i)), None, pending=True) for i in range(200)], {})
        barrier = threading.Barrier(2)

        def summarise(backend: PostgresBackend, reverse: bool) -> None:
            pending = backend.pending_summaries(500)
            summaries = [(i, summarize(body)) for i, body in pending]
            barrier.wait(10)
            backend.write_summaries(summaries[::-1] if reverse else summaries)

        yield within(DeferredList([deferToThread(summarise, one, False), deferToThread(summarise, two, True)],
                                  fireOnOneErrback=True, consumeErrors=True), 30)
        self.assertEqual([a["idmef"]["messageid"] for a in read_alerts_pg(self.pg_url)], [f"m{i}" for i in range(200)])

    @inlineCallbacks
    def test_a_store_made_by_an_earlier_version_gets_the_index(self) -> Any:
        old_schema(self.pg_url)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        store = yield self.open_store()
        self.assertTrue(store.backend.defers_summaries)
        self.assertIn("creating the index alerts_unsummarised", " ".join(formatEvent(e) for e in events))
        # its NULLs meant "no summary"; now they are pending, and summarised as JSON null
        yield self.wait_summarised()
        self.assertEqual(raw_summaries(self.pg_url), ["null", "null"])
        yield store.add(record(numbered(1)))
        yield self.wait_summarised()
        self.assertEqual([a["idmef"] for a in read_alerts_pg(self.pg_url)][:2], [None, None])
        self.assertEqual(read_alerts_pg(self.pg_url)[2]["idmef"]["messageid"], "m1")

    @inlineCallbacks
    def test_an_index_that_cannot_be_built_fails_the_start_clearly(self) -> Any:
        """Another session holds the old table locked past the manager's lock_timeout:
        the store does not open, says why, and the stored alerts are untouched."""
        import psycopg

        old_schema(self.pg_url)
        before = read_alerts_pg(self.pg_url, with_body=True)
        holder = psycopg.connect(self.pg_url)
        self.addCleanup(holder.close)
        holder.execute("LOCK TABLE alerts IN EXCLUSIVE MODE")  # held until rollback
        url = self.pg_url + "?options=-c%20lock_timeout%3D300"
        store = PostgresStore(url, reactor)
        failure = yield self.assertFailure(within(store.open(), 30), StoreError)
        yield store.close()
        self.assertIn("creating the index alerts_unsummarised failed:", str(failure))
        self.assertIn("lock timeout", str(failure))
        holder.rollback()
        self.assertEqual(read_alerts_pg(self.pg_url, with_body=True), before)
        self.assertEqual(raw_summaries(self.pg_url), ["pending", "pending"])

    @inlineCallbacks
    def test_a_role_that_may_not_create_the_index_summarises_in_the_commit(self) -> Any:
        """Tables a DBA made and owns, a manager role that may only read and write them:
        the manager says what to ask for, and every alert has its summary at its 200."""
        import uuid

        import psycopg

        old_schema(self.pg_url)
        role = f"iapd_writer_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.pg_url, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {role} LOGIN")
            conn.execute(f"GRANT SELECT, INSERT, UPDATE ON alerts, sensors TO {role}")
            conn.execute(f"GRANT USAGE ON SEQUENCE alerts_id_seq TO {role}")

        def drop_role() -> None:
            with psycopg.connect(self.pg_url, autocommit=True) as conn:
                conn.execute(f"DROP OWNED BY {role}")
                conn.execute(f"DROP ROLE {role}")

        self.addCleanup(drop_role)
        url = self.pg_url.replace(f"//{PG_USER}@", f"//{role}@", 1)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        store = yield self.open_store(url)  # closed before the role is dropped (cleanups run last first)
        self.assertFalse(store.backend.defers_summaries)
        logged = " ".join(formatEvent(e) for e in events)
        self.assertIn("cannot create the index alerts_unsummarised", logged)
        self.assertIn("have the tables' owner run (CONCURRENTLY: without holding commits back):"
                      " CREATE INDEX CONCURRENTLY IF NOT EXISTS alerts_unsummarised ON alerts (id) WHERE idmef IS NULL",
                      logged)
        results = yield DeferredList([store.add(record(numbered(i))) for i in range(3)] + [store.add(record(b"x"))])
        self.assertEqual([r for _, r in results], [True] * 4)
        # summarised in the commit: nothing pending at the 200 (the old rows keep their NULL)
        self.assertEqual(raw_summaries(self.pg_url), ["pending"] * 2 + ["object"] * 3 + ["null"])
        self.assertEqual([a["idmef"] for a in read_alerts_pg(self.pg_url)][:2], [None, None])


class PostgresManagerTests(ManagerCase):
    """A real manager (real TCP, real TLS) on the PostgreSQL store."""

    pg_url: str
    pg_server: Any
    timeout = 90

    @pytest.fixture(autouse=True)
    def _database(self, pg_database: str) -> None:  # noqa: F811
        """The database, before setUp starts the manager on it."""

    @inlineCallbacks
    def start_manager(self, cert: str | None = None, **overrides: Any) -> Any:
        crt, key = getattr(self.pki, cert or self.manager_cert)
        settings = ManagerSettings(identity="manager.test", material=load_material(crt, key, self.pki.ca), **overrides)
        self.store = PostgresStore(self.pg_url, reactor)
        yield self.store.open()
        self.addCleanup(self.store.close)
        self.factory = ManagerFactory(settings, self.store, reactor)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.addCleanup(self._drop_connections)

    def stored(self, **kw: Any) -> list[dict[str, Any]]:
        return read_alerts_pg(self.pg_url, with_body=True, **kw)

    def bodies(self) -> list[bytes]:
        return [a["body"] for a in self.stored()]

    def send(self, bodies: list[bytes], window: int = 64) -> Any:
        d = deliver(reactor, self.endpoint(), self.sensor_settings(window=window), [(IDEF, b) for b in bodies])
        return within(d, 60)

    @inlineCallbacks
    def test_delivered_alerts_are_stored_once(self) -> Any:
        batch = [b"alert %04d" % i for i in range(300)] + [IDMEF_ALERT]
        outcomes = yield self.send(batch)
        self.assertEqual({o.code for o in outcomes}, {200})
        self.assertEqual(self.bodies(), batch)
        self.assertEqual({a["sensor"] for a in self.stored()}, {"sensor1.test"})
        self.assertEqual(self.stored()[-1]["idmef"]["classification"], "Teardrop detected")
        # retransmissions: acknowledged, not stored again
        outcomes = yield self.send(batch[:10])
        self.assertEqual([o.code for o in outcomes], [200] * 10)
        self.assertEqual(len(self.stored()), len(batch))
        [sensor] = read_sensors_pg(self.pg_url)
        self.assertEqual((sensor["sensor"], sensor["alerts"]), ("sensor1.test", len(batch)))
        self.assertTrue(sensor["last_peer"].startswith("127.0.0.1:"))

    @inlineCallbacks
    def test_server_down_is_503_then_delivery_resumes(self) -> Any:
        peer = yield self.ready_peer()
        peer.transport.write(content(b"before"))
        yield self.expect(peer, OK)
        yield deferToThread(self.pg_server.stop, "immediate")
        # on a connection in the data phase: 503, and the connection goes on
        peer.transport.write(content(b"while down"))
        yield self.expect(peer, S503)
        # a sensor connecting meanwhile: every alert 503, the sensor keeps them
        outcomes = yield self.send([b"d1", b"d2"])
        self.assertEqual([o.code for o in outcomes], [503, 503])
        yield deferToThread(self.pg_server.start)
        self.assertEqual(self.bodies(), [b"before"])  # nothing else was claimed stored
        peer.transport.write(content(b"while down"))
        yield self.expect(peer, OK)
        outcomes = yield self.send([b"d1", b"d2"])
        self.assertEqual([o.code for o in outcomes], [200, 200])
        self.assertEqual(self.bodies(), [b"before", b"while down", b"d1", b"d2"])

    @inlineCallbacks
    def test_server_crashes_while_a_sensor_sends(self) -> Any:
        """
        The server is killed right after the second commit, with alerts still
        arriving: each alert is answered 200 or 503, exactly the 200 ones are stored,
        and once the server is back the 503 ones are delivered too.
        """
        backend = self.store.backend
        real_commit = backend.commit
        commits = []

        def commit_then_crash(rows: Any, seen: Any) -> Any:
            result = real_commit(rows, seen)
            commits.append(len(rows))
            if len(commits) == 2:
                self.pg_server.stop("immediate")
            return result

        backend.commit = commit_then_crash
        batch = [b"stream %04d" % i for i in range(400)]
        outcomes = yield self.send(batch, window=32)
        codes = [o.code for o in outcomes]
        self.assertEqual(set(codes), {200, 503}, codes)
        acknowledged = [body for body, o in zip(batch, outcomes) if o.code == 200]
        refused = [body for body, o in zip(batch, outcomes) if o.code == 503]
        yield deferToThread(self.pg_server.start)
        self.assertEqual(sorted(self.bodies()), sorted(acknowledged))
        outcomes = yield self.send(refused)
        self.assertEqual({o.code for o in outcomes}, {200})
        self.assertEqual(sorted(self.bodies()), sorted(batch))


# -- the readers and iapctl, compared with SQLite --------------------------------------


def same_rows_in_both(tmp_path: Path, url: str) -> Path:
    """The same batches committed to an SQLite file and to PostgreSQL; the SQLite path."""
    batches = [
        (
            [
                record(IDMEF_ALERT, "dmz-1.test", received=at(0), via=("p1.test", "p2.test")),
                record(b"plain text alert", "dmz-1.test", received=at(1), peer=None, via=()),
                record(HEARTBEAT, "dmz-2.test", received=at(2)),
                record(b"alert", "core.test", received=at(3)),
                record(b"alert", "dmz-2.test", received=at(4)),
            ],
            {"dmz-1.test": (at(0), "192.0.2.1:4000", ("p1.test",)), "core.test": (at(3), "192.0.2.2:1", ())},
        ),
        (
            [
                record(IDMEF_ALERT, "dmz-1.test", received=at(10)),  # a retransmission
                record(b"later", "dmz-1.test", received=at(11)),
                record(HEARTBEAT + b"\n", "dmz-2.test", received=at(12)),
            ],
            {"dmz-1.test": (at(10), "192.0.2.1:4001", ())},
        ),
    ]
    path = tmp_path / "alerts.db"
    sqlite, pg = SQLiteBackend(path), PostgresBackend(url)
    for backend in (sqlite, pg):
        backend.open()
        outcomes = [backend.commit([Row(r, summarize(r.body)) for r in rows], seen) for rows, seen in batches]
        backend.close()
        assert outcomes == [[True] * 5, [False, True, True]]
    return path


def without_ids(alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in a.items() if k != "id"} for a in alerts]


READER_QUERIES: list[dict[str, Any]] = [
    {},
    {"with_body": True},
    {"heartbeats": False},
    {"since": at(3)},
    {"since": "2026-03-01T12:04:00"},  # naive means UTC
    {"sensor": "dmz-*"},
    {"sensor": "DMZ-?.test"},  # iapctl matches lower case
    {"sensor": "[cd]*"},
    {"sensor": "[^d]*"},
    {"sensor": "dmz-1.tes[t"},  # an unterminated set matches nothing
    {"sensor": "dmz.1*"},  # . is literal
    {"after_id": 3},
    {"limit": 2},
    {"limit": 2, "sensor": "dmz-1.test", "heartbeats": False},
]


def test_readers_give_what_the_sqlite_readers_give(tmp_path: Path, pg_database: str) -> None:  # noqa: F811
    path = same_rows_in_both(tmp_path, pg_database)
    for query in READER_QUERIES:
        from_pg = read_alerts_pg(pg_database, **query)
        # ids: both ascend in arrival order, but PostgreSQL's sequence leaves gaps
        # where a retransmission took a number (SQLite reuses it)
        assert [a["id"] for a in from_pg] == sorted(a["id"] for a in from_pg)
        assert without_ids(from_pg) == without_ids(read_alerts(path, **query)), query
    assert read_alerts_pg(pg_database, with_body=True)[0]["idmef"]["classification"] == "Teardrop detected"
    sensors = read_sensors_pg(pg_database)
    assert sensors == read_sensors(path)
    assert [s["sensor"] for s in sensors] == ["core.test", "dmz-1.test", "dmz-2.test"]
    dmz1 = sensors[1]
    assert (dmz1["first_seen"], dmz1["last_seen"], dmz1["last_peer"], dmz1["via"]) == (
        at(0), at(10), "192.0.2.1:4001", []
    )


GLOBS = ["*", "a*", "*.test", "a?c", "[a-c]x", "[^a]x", "[]]x", "[^]]x", "a\\b*", "a.b", "(a|b)+", "x[", "é*", "$a^",
         "[a\\]x", "[[]x", "a{2}", "*+*"]
TEXTS = ["abc", "a.b", "axb", "ax", "bx", "]x", "\\x", "a\\bz", "(a|b)+", "ab", "é1", "$a^", "x[", "", "a", "[x",
         "aa", "a{2}", "a+b", "line\nbreak.test"]


def test_sensor_globs_match_as_in_sqlite(pg_database: str) -> None:  # noqa: F811
    import sqlite3

    import psycopg

    lite = sqlite3.connect(":memory:")
    with psycopg.connect(pg_database) as conn:
        for glob in GLOBS:
            regex = glob_regex(glob)
            for text in TEXTS:
                expected = lite.execute("SELECT ? GLOB ?", (text, glob)).fetchone()[0] == 1
                got = regex is not None and conn.execute("SELECT %s ~ %s", (text, regex)).fetchone()[0]
                assert got == expected, (glob, regex, text)


def test_redact() -> None:
    assert redact("postgresql://u:s3cret@db.example:5432/alerts") == "postgresql://u@db.example:5432/alerts"
    assert redact("postgres://u:s3cret@h/d?sslmode=require&password=x2") == "postgres://u@h/d?sslmode=require"
    assert redact("postgresql://:s3cret@h/d") == "postgresql://h/d"
    assert redact("postgresql:///alerts") == "postgresql:///alerts"
    assert "s3cret" not in redact("host=h password=s3cret dbname=d")
    assert str(PostgresBackend("postgresql://u:s3cret@h/d")) == "postgresql://u@h/d"


def write_manager_yaml(directory: Path, store: str) -> Path:
    path = directory / "manager.yaml"
    path.write_text(
        "identity: manager.test\n"
        "listen: ['tcp:0:interface=127.0.0.1']\n"
        "tls: {certificate: manager.crt, key: manager.key, ca: ca.crt}\n"
        f"store: {json.dumps(store)}\n"
    )
    return path


def test_config_takes_postgresql_urls(tmp_path: Path) -> None:
    pytest.importorskip("psycopg")
    config = load_manager(write_manager_yaml(tmp_path, "postgresql://iapd:pw@db.example/alerts"))
    assert (config.store, config.store_path) == ("postgresql://iapd:pw@db.example/alerts", None)
    assert load_manager(write_manager_yaml(tmp_path, "postgres:///alerts")).store_path is None
    for bad in ("postgresql://iapd:pw@db.example:port/alerts", "postgresql://iapd:pw@h/d?nonsense=1"):
        with pytest.raises(ConfigError) as info:
            load_manager(write_manager_yaml(tmp_path, bad))
        assert "store: not a PostgreSQL URL" in str(info.value)
        assert "pw" not in str(info.value).replace(str(tmp_path), "")


def iapctl(config: Path, *args: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-m", "iapd.ctl", "-c", str(config), *args],
        check=False, capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_iapctl_json_is_the_same_as_for_sqlite(tmp_path: Path, pg_database: str) -> None:  # noqa: F811
    sqlite_dir, pg_dir = tmp_path / "sqlite", tmp_path / "pg"
    sqlite_dir.mkdir()
    pg_dir.mkdir()
    path = same_rows_in_both(sqlite_dir, pg_database)
    sqlite_yaml = write_manager_yaml(sqlite_dir, f"sqlite:///{path.name}")
    pg_yaml = write_manager_yaml(pg_dir, pg_database)
    for args in (["alerts", "--json"], ["alerts", "--json", "--heartbeats"], ["alerts"],
                 ["alerts", "--json", "--sensor", "dmz-*", "--since", "2026-03-01T12:01:00Z", "--limit", "2"],
                 ["sensors", "--json"], ["sensors"]):
        from_pg, from_sqlite = iapctl(pg_yaml, *args), iapctl(sqlite_yaml, *args)
        assert from_pg, args
        if args[0] == "alerts":
            # the same but for the ids, where PostgreSQL's sequence has gaps
            if "--json" in args:
                from_pg = [json.dumps(a, sort_keys=True) for a in without_ids([json.loads(x) for x in from_pg])]
                from_sqlite = [json.dumps(a, sort_keys=True) for a in without_ids([json.loads(x) for x in from_sqlite])]
            else:
                from_pg, from_sqlite = [x[6:] for x in from_pg], [x[6:] for x in from_sqlite]
        assert from_pg == from_sqlite, args
    first = json.loads(iapctl(pg_yaml, "alerts", "--json")[0])
    assert {"id", "sensor", "received", "content_type", "sha256", "via", "idmef"} <= set(first)
    assert first["received"] == at(0)
    assert first["idmef"]["severity"] == "high"


def test_iapctl_tail_follows_a_postgresql_store(tmp_path: Path, pg_database: str) -> None:  # noqa: F811
    same_rows_in_both(tmp_path, pg_database)
    pg_yaml = write_manager_yaml(tmp_path, pg_database)
    tail = subprocess.Popen(
        [sys.executable, "-m", "iapd.ctl", "-c", str(pg_yaml), "tail", "--json", "--count", "1", "--interval", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        # tail starts after the newest alert stored when it looks: keep adding until it
        # has printed one (it stops after --count 1)
        backend = PostgresBackend(pg_database)
        backend.open()
        deadline = time.monotonic() + 30
        n = 0
        while tail.poll() is None and time.monotonic() < deadline:
            n += 1
            backend.commit([Row(record(b"new %d" % n, "dmz-3.test", received=at(30 + n)), None)], {})
            time.sleep(0.3)
        backend.close()
        out, err = tail.communicate(timeout=10)
    finally:
        if tail.poll() is None:
            tail.kill()
    assert tail.returncode == 0, err
    [line] = out.splitlines()
    assert json.loads(line)["sensor"] == "dmz-3.test"


def test_twistd_manager_on_postgresql(tmp_path: Path, pg_database: str) -> None:  # noqa: F811
    """
    The real daemon (twistd iap-manager, its makeService) with a postgresql:// store,
    a password in the URL that must appear nowhere in its log, iap-send and iapctl.
    """
    from .certs import make_test_pki
    from .processes import Daemon, run
    from .processes import free_port as free_tcp_port

    pki = make_test_pki(tmp_path / "pki")
    port = free_tcp_port()
    url = pg_database.replace("postgresql://iapd@", "postgresql://iapd:s3cret-pw@")

    def tls(pair: tuple[Path, Path]) -> str:
        return f'tls: {{certificate: "{pair[0]}", key: "{pair[1]}", ca: "{pki.ca}"}}\n'

    manager = tmp_path / "manager.yaml"
    manager.write_text(
        f'identity: manager.test\nlisten: ["tcp:{port}:interface=127.0.0.1"]\n{tls(pki.manager)}store: "{url}"\n'
    )
    sensor = tmp_path / "sensor.yaml"
    sensor.write_text(
        f'identity: sensor1.test\nmanager: manager.test\nconnect: "tcp:host=127.0.0.1:port={port}"\n{tls(pki.sensor)}'
    )
    files = []
    for i in range(5):
        f = tmp_path / f"alert-{i}.txt"
        f.write_bytes(b"daemon alert %d" % i)
        files.append(str(f))
    daemon = Daemon(["iap-manager", "-c", str(manager)], tmp_path)
    try:
        daemon.wait_for(f"ManagerFactory starting on {port}")
        sent = run(["iapd.send", "-c", str(sensor), *files])
        assert sent.returncode == 0, sent.stdout + sent.stderr
        listed = run(["iapd.ctl", "-c", str(manager), "alerts", "--json"])
        assert listed.returncode == 0, listed.stderr
        alerts = [json.loads(line) for line in listed.stdout.splitlines()]
        assert [a["sensor"] for a in alerts] == ["sensor1.test"] * 5
        assert [a["sha256"] for a in alerts] == [
            a["sha256"] for a in read_alerts_pg(pg_database)
        ]
        # again: acknowledged, not stored twice
        assert run(["iapd.send", "-c", str(sensor), *files]).returncode == 0
        assert len(read_alerts_pg(pg_database)) == 5
    finally:
        code = daemon.stop()
    log = daemon.log()
    assert code in (0, -signal.SIGTERM), log  # twistd may end by its signal
    assert "s3cret-pw" not in log
    assert "Traceback" not in log
