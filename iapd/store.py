"""
Where the manager keeps alerts, written with group commit.

The manager answers 200 only once an alert is committed (DESIGN.md section 5).  One
fsync per alert would cap ingest at the disk's sync rate, so alerts queue while a commit
is in flight and the next commit takes what has queued: one transaction, one fsync,
many alerts.  All database work runs on one dedicated thread, never on the reactor, and
that thread owns the connection, which keeps the database driver's threading rules
simple.  The queueing (L{GroupCommitStore}) is the same for every database; a backend
only knows how to commit one batch.

Exactly-once in the store: a retransmission (same sensor identity, same SHA-256 of the
body) hits a UNIQUE constraint, is ignored, and is reported as a duplicate so that the
sensor still gets its 200.

Fairness: each sensor has its own queue and a batch takes alerts from them in turn, so a
sensor that floods cannot push another sensor's alerts back by more than one turn per
batch; and the bytes waiting across all sensors are bounded (past the bound the manager
answers 503 and the sensor keeps its alerts).
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Protocol, Sequence

import attr
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY,
    sensor TEXT NOT NULL,
    received TEXT NOT NULL,
    content_type TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    via TEXT NOT NULL,
    peer TEXT,
    body BLOB NOT NULL,
    idmef TEXT,
    UNIQUE (sensor, sha256)
);
CREATE INDEX IF NOT EXISTS alerts_received ON alerts (received);
CREATE TABLE IF NOT EXISTS sensors (
    identity TEXT PRIMARY KEY,
    first_seen TEXT NOT NULL,
    last_seen TEXT NOT NULL,
    last_peer TEXT,
    last_via TEXT NOT NULL DEFAULT '[]',
    last_heartbeat TEXT,
    heartbeat_interval REAL
);
"""


class StoreError(Exception):
    """The store cannot be opened, written or read; the message says why."""


def utcnow() -> str:
    """Receive times as ISO 8601 UTC with microseconds: they sort as text."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


@attr.s(frozen=True, slots=True, auto_attribs=True)
class AlertRecord:
    """One received alert, as the manager hands it to the store."""

    sensor: str
    content_type: str
    body: bytes
    via: tuple[str, ...] = ()
    peer: str | None = None
    received: str = attr.Factory(utcnow)
    sha256: str = attr.ib(default=attr.Factory(lambda self: hashlib.sha256(self.body).hexdigest(), takes_self=True))


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Row:
    """An alert as a backend writes it: the record plus its IDMEF summary."""

    record: AlertRecord
    summary: dict[str, Any] | None

    @property
    def heartbeat(self) -> bool:
        return self.summary is not None and self.summary.get("kind") == "Heartbeat"


Seen = dict[str, tuple[str, str | None, tuple[str, ...]]]


class Backend(Protocol):
    """One database: every method runs on the store's own thread."""

    def open(self) -> None: ...

    def commit(self, rows: Sequence[Row], seen: Seen) -> list[bool]:
        """Write C{rows} and C{seen} in one transaction; True for each new alert."""

    def close(self) -> None: ...


def sqlite_path(url: str, base: Path) -> Path:
    """
    The file named by an SQLAlchemy-style C{sqlite:///} URL.

    C{sqlite:////abs/alerts.db} is absolute; C{sqlite:///alerts.db} is relative to
    C{base}, the configuration file's directory.
    """
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise StoreError(f"not an SQLite URL (sqlite:///relative.db or sqlite:////absolute.db): {url!r}")
    path = Path(url[len(prefix):])
    return path if path.is_absolute() else base / path


def _migrate(db: sqlite3.Connection) -> None:
    """Add the columns later versions introduced to a store an older version made."""
    have = {row[1] for row in db.execute("PRAGMA table_info(sensors)")}
    for column, kind in (("last_heartbeat", "TEXT"), ("heartbeat_interval", "REAL")):
        if column not in have:
            db.execute(f"ALTER TABLE sensors ADD COLUMN {column} {kind}")


class SQLiteBackend:
    """An SQLite file in WAL mode with synchronous=FULL."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    def __str__(self) -> str:
        return str(self.path)

    def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: in WAL mode NORMAL may lose the last commits on power loss, and a
            # 200 is a promise that the alert survives.
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(SCHEMA)
            _migrate(db)
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"cannot open SQLite store {self.path}: {e}") from None
        self._db = db

    def commit(self, rows: Sequence[Row], seen: Seen) -> list[bool]:
        db = self._db
        if db is None:
            raise StoreError(f"the store {self.path} is not open")
        results = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for row in rows:
                r = row.record
                cursor = db.execute(
                    "INSERT OR IGNORE INTO alerts (sensor, received, content_type, sha256, via, peer, body, idmef)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (r.sensor, r.received, r.content_type, r.sha256, json.dumps(list(r.via)), r.peer, r.body,
                     None if row.summary is None else json.dumps(row.summary)),
                )
                results.append(cursor.rowcount == 1)
            for identity, (when, peer, via) in seen.items():
                db.execute(
                    "INSERT INTO sensors (identity, first_seen, last_seen, last_peer, last_via) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (identity) DO UPDATE SET last_seen = excluded.last_seen,"
                    " last_peer = excluded.last_peer, last_via = excluded.last_via",
                    (identity, when, when, peer, json.dumps(list(via))),
                )
            for row in rows:
                if row.heartbeat:
                    r = row.record
                    db.execute(
                        "INSERT INTO sensors (identity, first_seen, last_seen, last_peer, last_via, last_heartbeat,"
                        " heartbeat_interval) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (identity) DO UPDATE SET"
                        " last_heartbeat = max(coalesce(last_heartbeat, ''), excluded.last_heartbeat),"
                        " heartbeat_interval = coalesce(excluded.heartbeat_interval, heartbeat_interval)",
                        (r.sensor, r.received, r.received, r.peer, json.dumps(list(r.via)), r.received,
                         (row.summary or {}).get("heartbeat_interval")),
                    )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return results

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


class GroupCommitStore:
    """
    The manager's store: C{add} returns a Deferred that fires once the alert is
    durable, with True for a new alert and False for a retransmitted one.
    """

    log = Logger()

    def __init__(
        self, backend: Any, reactor: Any, max_batch: int = 1024, max_backlog_bytes: int = 256 * 1024 * 1024
    ) -> None:
        self.backend = backend
        self._reactor = reactor
        self._max_batch = max_batch
        # Bound on bodies waiting for a commit across all connections: past it, new
        # alerts are refused (the manager answers 503 and the sensor keeps them).
        self._max_backlog_bytes = max_backlog_bytes
        self._backlog_bytes = 0
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="iapd-store")
        self._open = False
        self._queues: collections.OrderedDict[str, collections.deque[tuple[AlertRecord, Deferred[bool]]]] = (
            collections.OrderedDict()
        )
        self._queued = 0
        self._seen: Seen = {}
        self._committing = False
        self._closing: Deferred[None] | None = None
        self._shut = False
        self.commits = 0
        self.committed = 0
        self.commit_observers: list[Any] = []
        """Called as C{observer(alerts, seconds)} after each committed batch."""

    @property
    def backlog(self) -> int:
        """Alerts waiting for a commit to start."""
        return self._queued

    def open(self) -> Deferred[None]:
        self._pool.start()
        d = self._in_thread(self.backend.open)

        def opened(_: None) -> None:
            self._open = True
            # alerts may have queued while the database was being opened
            self._kick()

        return d.addCallback(opened)

    def _in_thread(self, f: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def seen(self, sensor: str, peer: str | None, via: Sequence[str]) -> None:
        """Note that C{sensor} completed a connection; written with the next batch."""
        self._seen[sensor] = (utcnow(), peer, tuple(via))
        self._kick()

    def add(self, record: AlertRecord) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        if self._closing is not None:
            d.errback(StoreError("the store is shutting down"))
            return d
        if self._backlog_bytes + len(record.body) > self._max_backlog_bytes and self._queued:
            d.errback(StoreError(f"more than {self._max_backlog_bytes} octets wait for a commit"))
            return d
        self._backlog_bytes += len(record.body)
        self._queues.setdefault(record.sensor, collections.deque()).append((record, d))
        self._queued += 1
        self._kick()
        return d

    def _take_batch(self) -> list[tuple[AlertRecord, Deferred[bool]]]:
        """Up to max_batch alerts, one from each sensor's queue in turn."""
        batch: list[tuple[AlertRecord, Deferred[bool]]] = []
        while self._queues and len(batch) < self._max_batch:
            for sensor in list(self._queues):
                queue = self._queues[sensor]
                batch.append(queue.popleft())
                if not queue:
                    del self._queues[sensor]
                if len(batch) >= self._max_batch:
                    break
        self._queued -= len(batch)
        self._backlog_bytes -= sum(len(r.body) for r, _ in batch)
        return batch

    def _kick(self) -> None:
        if not self._open and self._closing is not None:
            # never opened (or open failed): nothing queued can be committed any more
            self._fail_queue(StoreError(f"the store {self.backend} is not open"))
        if self._committing or not self._open or not (self._queued or self._seen):
            if self._closing is not None and not self._committing and not self._queued:
                self._finish_close()
            return
        batch = self._take_batch()
        seen, self._seen = self._seen, {}
        self._committing = True
        started = time.monotonic()
        d = self._in_thread(self._commit, [r for r, _ in batch], seen)

        def committed(results: list[bool]) -> None:
            self.commits += 1
            self.committed += sum(results)
            for observe in self.commit_observers:
                observe(len(batch), time.monotonic() - started)
            for (_, waiting), new in zip(batch, results):
                waiting.callback(new)

        def failed(failure: Any) -> None:
            self.log.error(
                "store commit of {count} alerts failed ({kind}: {why}); answering 503",
                count=len(batch), kind=failure.type.__name__, why=failure.getErrorMessage(),
            )
            for _, waiting in batch:
                waiting.errback(StoreError(f"commit failed: {failure.getErrorMessage()}"))

        def next_batch(_: Any) -> None:
            self._committing = False
            self._kick()

        d.addCallbacks(committed, failed)
        d.addBoth(next_batch)

    def _commit(self, records: list[AlertRecord], seen: Seen) -> list[bool]:
        from .idmef import summarize

        rows = [Row(r, summarize(r.body)) for r in records]  # type: ignore[arg-type]
        return self.backend.commit(rows, seen)

    def _fail_queue(self, error: StoreError) -> None:
        queues, self._queues = self._queues, collections.OrderedDict()
        self._queued = self._backlog_bytes = 0
        for queue in queues.values():
            for _, waiting in queue:
                waiting.errback(error)

    def close(self) -> Deferred[None]:
        """Commit what is queued, then close the database and stop the thread."""
        if self._closing is None:
            self._closing = Deferred()
            self._kick()
        return self._closing

    def _finish_close(self) -> None:
        closing = self._closing
        if closing is None or self._shut:
            return
        self._shut = True
        was_open, self._open = self._open, False
        if self._pool.started:
            d = self._in_thread(self.backend.close) if was_open else Deferred()
            if not was_open:
                d.callback(None)
        else:
            d = Deferred()
            d.callback(None)

        def stop(result: Any) -> None:
            if self._pool.started:
                self._pool.stop()
            if isinstance(result, Failure):
                self.log.failure("closing the store failed", result)
            closing.callback(None)

        d.addBoth(stop)


class SQLiteStore(GroupCommitStore):
    """The embedded default: a L{GroupCommitStore} on an SQLite file."""

    def __init__(self, path: Path, reactor: Any, **kw: Any) -> None:
        super().__init__(SQLiteBackend(path), reactor, **kw)
        self.path = path


# -- reading, for iapctl and tests: synchronous, read-only, another process ----------


def _reader(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise StoreError(f"no store at {path} (has the manager run with this configuration?)")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        db.row_factory = sqlite3.Row
        db.execute("SELECT 1 FROM alerts LIMIT 1")
    except sqlite3.Error as e:
        raise StoreError(f"cannot read store {path}: {e}") from None
    return db


def alert_dict(row: Any, with_body: bool, *, received: str, via: list[str], idmef: Any) -> dict[str, Any]:
    """
    An alert as C{iapctl --json} prints it (DESIGN.md section 7), from a database row
    whose database-specific fields the caller has already decoded.
    """
    out: dict[str, Any] = {
        "id": row["id"],
        "sensor": row["sensor"],
        "received": received,
        "content_type": row["content_type"],
        "sha256": row["sha256"],
        "via": via,
        "peer": row["peer"],
        "size": row["size"],
        "idmef": idmef,
    }
    if with_body:
        out["body"] = bytes(row["body"])
    return out


def _alert_dict(row: sqlite3.Row, with_body: bool) -> dict[str, Any]:
    return alert_dict(
        row, with_body, received=row["received"], via=json.loads(row["via"]),
        idmef=None if row["idmef"] is None else json.loads(row["idmef"]),
    )


def read_alerts(
    path: Path,
    since: str | None = None,
    sensor: str | None = None,
    after_id: int | None = None,
    limit: int | None = None,
    with_body: bool = False,
    heartbeats: bool = True,
) -> list[dict[str, Any]]:
    """
    Stored alerts, oldest first, filtered by receive time, sensor (a glob) or id;
    without IDMEF heartbeats when C{heartbeats} is false.
    """
    clauses: list[str] = []
    args: list[Any] = []
    if not heartbeats:
        clauses.append("(idmef IS NULL OR json_extract(idmef, '$.kind') IS NOT 'Heartbeat')")
    if since is not None:
        clauses.append("received >= ?")
        args.append(since)
    if sensor is not None:
        clauses.append("sensor GLOB ?")
        args.append(sensor.lower())
    if after_id is not None:
        clauses.append("id > ?")
        args.append(after_id)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    tail = ""
    if limit is not None:
        # the newest N, still printed oldest first
        tail = " ORDER BY id DESC LIMIT ?"
        args.append(limit)
    else:
        tail = " ORDER BY id"
    db = _reader(path)
    try:
        rows = db.execute(
            "SELECT id, sensor, received, content_type, sha256, via, peer, length(body) AS size, idmef"
            + (", body" if with_body else "")
            + f" FROM alerts{where}{tail}",
            args,
        ).fetchall()
    finally:
        db.close()
    alerts = [_alert_dict(r, with_body) for r in rows]
    if limit is not None:
        alerts.reverse()
    return alerts


def heartbeat_overdue(last: str | None, interval: float | None, now: datetime.datetime | None = None) -> bool | None:
    """
    Whether a sensor's heartbeat is late: none for two of its announced intervals.

    None when the sensor never sent a heartbeat announcing its interval: then there is
    nothing to be late against.
    """
    if last is None or not interval:
        return None
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return datetime.datetime.fromisoformat(last) + datetime.timedelta(seconds=2 * interval) < now


def read_sensors(path: Path) -> list[dict[str, Any]]:
    """Every sensor that connected or sent an alert, with its counts and times."""
    db = _reader(path)
    try:
        rows = db.execute(
            "SELECT s.identity, s.first_seen, s.last_seen, s.last_peer, s.last_via,"
            " s.last_heartbeat, s.heartbeat_interval,"
            " (SELECT count(*) FROM alerts a WHERE a.sensor = s.identity) AS alerts,"
            " (SELECT max(received) FROM alerts a WHERE a.sensor = s.identity) AS last_alert"
            " FROM sensors s ORDER BY s.identity"
        ).fetchall()
    finally:
        db.close()
    return [
        {
            "sensor": r["identity"],
            "first_seen": r["first_seen"],
            "last_seen": r["last_seen"],
            "last_peer": r["last_peer"],
            "via": json.loads(r["last_via"]),
            "alerts": r["alerts"],
            "last_alert": r["last_alert"],
            "last_heartbeat": r["last_heartbeat"],
            "heartbeat_interval": r["heartbeat_interval"],
            "heartbeat_overdue": heartbeat_overdue(r["last_heartbeat"], r["heartbeat_interval"]),
        }
        for r in rows
    ]

