"""
Where the manager keeps alerts: an SQLite file written with group commit.

The manager answers 200 only once an alert is committed (DESIGN.md section 5).  One
fsync per alert would cap ingest at the disk's sync rate, so alerts queue while a commit
is in flight and the next commit takes the whole queue: one transaction, one fsync, many
alerts.  All database work runs on one dedicated thread, never on the reactor, and that
thread owns the connection, which keeps SQLite's threading rules simple.

Exactly-once in the store: a retransmission (same sensor identity, same SHA-256 of the
body) hits the UNIQUE constraint, is ignored, and is reported as a duplicate so that the
sensor still gets its 200.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Iterable, Sequence

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
    last_via TEXT NOT NULL DEFAULT '[]'
);
"""


class StoreError(Exception):
    """The store cannot be opened or read; the message says why."""


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


def sqlite_path(url: str, base: Path) -> Path:
    """
    The file named by an SQLAlchemy-style C{sqlite:///} URL.

    C{sqlite:////abs/alerts.db} is absolute; C{sqlite:///alerts.db} is relative to
    C{base}, the configuration file's directory.
    """
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise StoreError(f"not an SQLite URL (sqlite:///relative.db or sqlite:////absolute.db): {url!r}")
    rest = url[len(prefix):]
    path = Path(rest)
    return path if path.is_absolute() else base / path


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    # FULL: in WAL mode NORMAL may lose the last commits on power loss, and a 200 is a
    # promise that the alert survives.
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(SCHEMA)
    return db


class SQLiteStore:
    """
    The manager's store: C{add} returns a Deferred that fires once the alert is
    durable, with True for a new alert and False for a retransmitted one.
    """

    log = Logger()

    def __init__(
        self, path: Path, reactor: Any, max_batch: int = 1024, max_backlog_bytes: int = 256 * 1024 * 1024
    ) -> None:
        self.path = path
        self._reactor = reactor
        self._max_batch = max_batch
        # Bound on bodies waiting for a commit across all connections: past it, new
        # alerts are refused (the manager answers 503 and the sensor keeps them).
        self._max_backlog_bytes = max_backlog_bytes
        self._backlog_bytes = 0
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="iapd-store")
        self._db: sqlite3.Connection | None = None
        self._queue: list[tuple[AlertRecord, Deferred[bool]]] = []
        self._seen: dict[str, tuple[str, str | None, tuple[str, ...]]] = {}
        self._committing = False
        self._closing: Deferred[None] | None = None
        self._shut = False
        self.commits = 0
        self.committed = 0

    @property
    def backlog(self) -> int:
        """Alerts waiting for a commit to start."""
        return len(self._queue)

    def open(self) -> Deferred[None]:
        self._pool.start()
        d = self._in_thread(self._open)

        def opened(_: None) -> None:
            # alerts may have queued while the file was being opened
            self._kick()

        return d.addCallback(opened)

    def _open(self) -> None:
        try:
            self._db = _connect(self.path)
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"cannot open SQLite store {self.path}: {e}") from None

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
        if self._backlog_bytes + len(record.body) > self._max_backlog_bytes and self._queue:
            d.errback(StoreError(f"more than {self._max_backlog_bytes} octets wait for a commit"))
            return d
        self._backlog_bytes += len(record.body)
        self._queue.append((record, d))
        self._kick()
        return d

    def _kick(self) -> None:
        if self._db is None and self._closing is not None:
            # never opened (or open failed): nothing queued can be committed any more
            self._fail_queue(StoreError(f"the store {self.path} is not open"))
        if self._committing or self._db is None or not (self._queue or self._seen):
            if self._closing is not None and not self._committing and not self._queue:
                self._finish_close()
            return
        batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
        self._backlog_bytes -= sum(len(r.body) for r, _ in batch)
        seen, self._seen = self._seen, {}
        self._committing = True
        d = self._in_thread(self._commit, [r for r, _ in batch], seen)

        def committed(results: list[bool]) -> None:
            self.commits += 1
            self.committed += sum(results)
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

    def _commit(
        self, records: list[AlertRecord], seen: dict[str, tuple[str, str | None, tuple[str, ...]]]
    ) -> list[bool]:
        from .idmef import summarize

        db = self._db
        assert db is not None
        rows = []
        for r in records:
            summary = summarize(r.body)
            rows.append(
                (r.sensor, r.received, r.content_type, r.sha256, json.dumps(list(r.via)), r.peer, r.body,
                 None if summary is None else json.dumps(summary))
            )
        results = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for row in rows:
                cursor = db.execute(
                    "INSERT OR IGNORE INTO alerts (sensor, received, content_type, sha256, via, peer, body, idmef)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
                results.append(cursor.rowcount == 1)
            for identity, (when, peer, via) in seen.items():
                db.execute(
                    "INSERT INTO sensors (identity, first_seen, last_seen, last_peer, last_via) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (identity) DO UPDATE SET last_seen = excluded.last_seen,"
                    " last_peer = excluded.last_peer, last_via = excluded.last_via",
                    (identity, when, when, peer, json.dumps(list(via))),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return results

    def _fail_queue(self, error: StoreError) -> None:
        queued, self._queue = self._queue, []
        self._backlog_bytes = 0
        for _, waiting in queued:
            waiting.errback(error)

    def close(self) -> Deferred[None]:
        """Commit what is queued, then close the file and stop the thread."""
        if self._closing is None:
            self._closing = Deferred()
            self._kick()
        return self._closing

    def _finish_close(self) -> None:
        closing = self._closing
        if closing is None or self._shut:
            return
        self._shut = True
        db, self._db = self._db, None

        def shut() -> None:
            if db is not None:
                db.close()

        if self._pool.started:
            d = self._in_thread(shut)
        else:
            shut()
            d = Deferred()
            d.callback(None)

        def stop(result: Any) -> None:
            if self._pool.started:
                self._pool.stop()
            if isinstance(result, Failure):
                self.log.failure("closing the store failed", result)
            closing.callback(None)

        d.addBoth(stop)


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


def _alert_dict(row: sqlite3.Row, with_body: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": row["id"],
        "sensor": row["sensor"],
        "received": row["received"],
        "content_type": row["content_type"],
        "sha256": row["sha256"],
        "via": json.loads(row["via"]),
        "peer": row["peer"],
        "size": row["size"],
        "idmef": None if row["idmef"] is None else json.loads(row["idmef"]),
    }
    if with_body:
        out["body"] = bytes(row["body"])
    return out


def read_alerts(
    path: Path,
    since: str | None = None,
    sensor: str | None = None,
    after_id: int | None = None,
    limit: int | None = None,
    with_body: bool = False,
) -> list[dict[str, Any]]:
    """
    Stored alerts, oldest first, filtered by receive time, sensor (a glob) or id.
    """
    clauses, args = [], []
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


def read_sensors(path: Path) -> list[dict[str, Any]]:
    """Every sensor that connected or sent an alert, with its counts and times."""
    db = _reader(path)
    try:
        rows = db.execute(
            "SELECT s.identity, s.first_seen, s.last_seen, s.last_peer, s.last_via,"
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
        }
        for r in rows
    ]


def iter_json_lines(alerts: Iterable[dict[str, Any]]) -> Iterable[str]:
    for a in alerts:
        yield json.dumps({k: v for k, v in a.items() if k != "body"}, sort_keys=True)


def ensure_private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o750)
