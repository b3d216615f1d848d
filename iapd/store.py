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
body) is found before the insert (SQLite: in the digest index beside the file,
L{iapd.digests}; PostgreSQL: by its UNIQUE constraint), is not stored again, and is
reported as a duplicate so that the sensor still gets its 200.

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
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import attr
import plyvel
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from .bodylog import BodyDamaged, BodyLog, BodyLogError, BodyReader, last_body_end, log_path
from .checkpoint import WalCheckpointer
from .digests import DigestIndex, DigestIndexError, digest_key, why

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
    body_at INTEGER,
    body_size INTEGER
);
CREATE INDEX IF NOT EXISTS alerts_received ON alerts (received);
CREATE INDEX IF NOT EXISTS alerts_unsummarised ON alerts (id) WHERE idmef IS NULL;
CREATE TABLE IF NOT EXISTS sensors (
    identity TEXT PRIMARY KEY,
    first_seen TEXT NOT NULL,
    last_seen TEXT NOT NULL,
    last_peer TEXT,
    last_via TEXT NOT NULL DEFAULT '[]',
    last_heartbeat TEXT,
    heartbeat_interval REAL
);
CREATE TABLE IF NOT EXISTS iapd_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""
"""The alerts table has no UNIQUE (sensor, sha256): the digest index (L{iapd.digests})
does that job.  Stores made by earlier versions keep theirs (SQLite cannot drop it
without copying the table): it is slower, but never wrong.

Bodies are in the body log beside the file (L{iapd.bodylog}): C{body_at} is where a
body starts there and C{body_size} its length, and C{body} is empty.  Rows an earlier
version wrote hold their body in C{body}, and NULL in the other two."""


class StoreError(Exception):
    """The store cannot be opened, written or read; the message says why."""


def _null(value: None) -> None:
    return None


# sqlite3 adapts every parameter that is not an int, float, str or bytearray: for each
# NULL (an alert's peer, its summary while pending) it first looks for __adapt__ on its
# protocol's type, which raises and formats an AttributeError that it then throws away
# (measured alone: 0.8 us per row when bodies were bound as bytes too).  An adapter
# registered for None ends the search in sqlite3's registry and hands back None:
# nothing stored changes.
sqlite3.register_adapter(type(None), _null)


_second: list[Any] = [None, ""]


def utcnow() -> str:
    """
    Receive times as ISO 8601 UTC with microseconds: they sort as text.

    Every alert gets one, so the date and time of day are formatted once a second.
    """
    now = time.time()
    second = int(now)
    if second != _second[0]:
        _second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_second[1]}.{int((now - second) * 1e6):06d}+00:00"


_GIL_HELD_BELOW = 2048
"""hashlib lets other threads run while it hashes this many octets or more at once
(documented: "the GIL is released for data larger than 2047 bytes")."""


def body_digest(body: bytes) -> str:
    """
    The SHA-256 of an alert body, in hex, hashed in pieces that keep the GIL.

    Given 4 KiB at once, hashlib lets the GIL go, hashes, and then waits to win it back
    from the other threads.  When the reactor hashed every alert, that cost 9.6 us per
    alert in a 16-sensor run instead of 3.4, and, behind a thread busy in Python (a
    summary pass), up to a switch interval of 5 ms (800 us on average, measured alone).
    The store's thread now hashes (L{AlertRecord.sha256}); there the two ways measured
    alike (4 KiB, 16 sensors, medians of 6: 17,868 alerts/s in pieces, 17,295 at once).
    In pieces, the store's thread does not give the GIL up and win it back from a busy
    reactor once per alert; the reactor may wait for it instead, up to a switch
    interval, as for any Python the store's thread runs.
    """
    if len(body) < _GIL_HELD_BELOW:
        return hashlib.sha256(body).hexdigest()
    h = hashlib.sha256()
    view = memoryview(body)
    for start in range(0, len(view), _GIL_HELD_BELOW - 1):
        h.update(view[start:start + _GIL_HELD_BELOW - 1])
    return h.hexdigest()


@attr.s(slots=True, auto_attribs=True, hash=True)
class AlertRecord:
    """
    One received alert, as the manager hands it to the store.

    Not frozen, though nothing changes a record once made (and it hashes as if it
    were): the reactor makes one per alert, and a frozen attrs class sets each field
    through C{object.__setattr__}, which took twice as long (1.33 against 0.63 us per
    record).
    """

    sensor: str
    content_type: str
    body: bytes
    via: tuple[str, ...] = ()
    peer: str | None = None
    received: str = attr.Factory(utcnow)
    _digest: str | None = attr.ib(default=None, init=False, eq=False, repr=False)

    @property
    def sha256(self) -> str:
        """
        The body's SHA-256 in hex, computed on first use.

        Only the store needs it, so the store's thread computes it, not the reactor
        that builds the record: the reactor sets the pace of a saturated manager, and
        hashing was an eighth of its time at 4 KiB (16 sensors: 17,241 -> 19,484
        alerts/s, medians of 6, with the summary rule of L{GroupCommitStore}).
        """
        digest = self._digest
        if digest is None:
            digest = body_digest(self.body)
            self._digest = digest
        return digest


@attr.s(slots=True, auto_attribs=True)
class Row:
    """
    An alert as a backend writes it: the record plus its IDMEF summary, or C{pending}
    when the summary is left for later (L{GroupCommitStore}: off the ack path).
    """

    record: AlertRecord
    summary: dict[str, Any] | None
    pending: bool = False

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
    # no default: the rows already there keep their bodies (NULL: in the row)
    have = {row[1] for row in db.execute("PRAGMA table_info(alerts)")}
    for column in ("body_at", "body_size"):
        if column not in have:
            db.execute(f"ALTER TABLE alerts ADD COLUMN {column} INTEGER")


ROW_OCTETS = 256
"""About what a row writes to the WAL now that its body is in the body log (sensor,
times, digest, VIA, peer and their share of the indexes): what L{WalCheckpointer}
counts to know when to copy."""


WAL_PAGES = 16384
"""Pages in the SQLite WAL (64 MiB with 4 KiB pages) past which the store's thread
finishes the checkpoint itself (L{WalCheckpointer}) and the WAL is started over."""


class SQLiteBackend:
    """An SQLite file in WAL mode with synchronous=FULL, and its digest index beside it."""

    log = Logger()
    defers_summaries = True  # L{GroupCommitStore}: NULL in C{idmef} is "not yet"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._checkpoints: WalCheckpointer | None = None
        # beside the file itself: two managers reaching one file through different
        # links must find the same index (and its lock)
        real = path.resolve()
        self.digests = DigestIndex(real.with_name(real.name + "-digests"))
        self.bodies = BodyLog(log_path(path))

    def __str__(self) -> str:
        return str(self.path)

    def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"cannot open SQLite store {self.path}: {e}") from None
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: in WAL mode NORMAL may lose the last commits on power loss, and a
            # 200 is a promise that the alert survives.
            db.execute("PRAGMA synchronous=FULL")
            # A batch of 4,096 1 KiB alerts fills some 1,100 pages (and in a store made
            # by an earlier version, whose UNIQUE (sensor, sha256) index puts each alert
            # on a random leaf, some 4,000).  At SQLite's default (a checkpoint once the
            # WAL passes 1,000 pages) every commit also copied its pages into the
            # database and fsync'd it, on the store's thread.  Now a thread of its own
            # copies the WAL while the next batch is committed, and the
            # store's thread only finishes the copy once the WAL passes WAL_PAGES
            # (iapd/checkpoint.py).
            db.execute("PRAGMA wal_autocheckpoint=0")
            # A WAL frame is a page and a 24-octet header: when the WAL starts over, its
            # file is cut back to WAL_PAGES whole frames, not to nothing, so that it is
            # not grown again each cycle.
            db.execute(f"PRAGMA journal_size_limit={32 + WAL_PAGES * (4096 + 24)}")
            db.executescript(SCHEMA)
            _migrate(db)
            self.digests.open(db)
            self.bodies.open()
            self._check_body_log(db)
            self._checkpoints = WalCheckpointer(self.path, WAL_PAGES)
            self._checkpoints.start()
        except (sqlite3.Error, OSError, DigestIndexError, BodyLogError, plyvel.Error, RuntimeError) as e:
            if self._checkpoints is not None:
                self._checkpoints.close()
                self._checkpoints = None
            self.bodies.close()
            self.digests.close()
            db.close()
            raise StoreError(f"cannot open SQLite store {self.path}: {why(e)}") from None
        self._db = db

    def _check_body_log(self, db: sqlite3.Connection) -> None:
        """
        Refuse a body log shorter than the rows say (lost, or a database restored
        without its log; a crash never does that, the log is flushed before the rows
        commit).  New bodies would be appended where old rows point, and putting the
        right log back later would then cost the alerts stored meanwhile.
        """
        last = last_body_end(db)
        size = self.bodies.size()
        if last is not None and last[1] > size:
            raise BodyLogError(
                f"the body log {self.bodies.path} holds {size} octets, but the body of alert {last[0]} ends at"
                f" {last[1]}: put back the body log that belongs with this database (a backup's, copied after"
                f" it); to go on without the bodies it lacks, extend it with: truncate -s {last[1]}"
                f" {self.bodies.path}"
            )

    def commit(self, rows: Sequence[Row], seen: Seen) -> list[bool]:
        """
        Find retransmissions in the digest index, insert the rest, commit, then add
        their digests to the index.  Of two equal alerts in one batch the first is new.
        """
        db = self._db
        if db is None:
            raise StoreError(f"the store {self.path} is not open")
        try:
            keys = [digest_key(row.record.sensor, row.record.sha256) for row in rows]
        except (ValueError, UnicodeError) as e:
            raise StoreError(f"an alert without a valid sensor name or digest: {e}") from None
        try:
            stored = self.digests.stored_ids(db, keys)
        except (DigestIndexError, plyvel.Error, RuntimeError) as e:
            raise StoreError(f"cannot read the digest index {self.digests.path}: {why(e)}") from None
        fresh: dict[bytes, Row] = {}
        for row, key, old in zip(rows, keys, stored):
            if old is None and key not in fresh:
                fresh[key] = row
        db.execute("BEGIN IMMEDIATE")
        try:
            ids = self._insert(db, list(fresh.values()))
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
            self.bodies.sync()  # the bodies are on the disk before the rows that point at them
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        added = {key: i for key, i in zip(fresh, ids) if i is not None}
        self.digests.committed(list(added.items()))
        self._checkpoints.committed(db, len(fresh) * ROW_OCTETS)
        # new: the first of its key in the batch, and inserted
        return [fresh.pop(key, None) is row and key in added for row, key in zip(rows, keys)]

    INSERT_CHUNK = 1024
    """Rows per INSERT statement: sqlite3 lets other threads run during each statement
    and must win the GIL back after it, so one statement per row makes the store thread
    queue for the GIL behind the reactor a thousand times per commit."""

    def _insert(self, db: sqlite3.Connection, rows: Sequence[Row]) -> list[int | None]:
        """
        Insert C{rows}, several per statement; the id of each, or None for a row that
        a store made by an earlier version ignored as a duplicate.

        Ids are given out in statement order above the largest id before the insert
        (this transaction holds the write lock); when every row is new, as always
        unless that old constraint fired, no query is needed.
        """
        if not rows:
            return []
        before = db.execute("SELECT coalesce(max(id), 0) FROM alerts").fetchone()[0]
        # a row an old UNIQUE constraint ignores leaves its body unreferenced in the log
        offsets = self.bodies.append([row.record.body for row in rows])
        inserted = 0
        # the alerts of one connection share their VIA: its JSON is made once per
        # commit, not per alert (2 us each, a twelfth of the manager's work per alert)
        via_json: dict[tuple[str, ...], str] = {(): "[]"}
        for start in range(0, len(rows), self.INSERT_CHUNK):
            chunk = rows[start:start + self.INSERT_CHUNK]
            params: list[Any] = []
            for row, at in zip(chunk, offsets[start:start + self.INSERT_CHUNK]):
                r = row.record
                via = via_json.get(r.via)
                if via is None:
                    via = via_json[r.via] = json.dumps(list(r.via))
                params += (r.sensor, r.received, r.content_type, r.sha256, via, r.peer, at, len(r.body),
                           None if row.pending else json.dumps(row.summary))
            cursor = db.execute(
                "INSERT OR IGNORE INTO alerts (sensor, received, content_type, sha256, via, peer, body, body_at,"
                " body_size, idmef) VALUES " + ",".join(["(?, ?, ?, ?, ?, ?, X'', ?, ?, ?)"] * len(chunk)),
                params,
            )
            inserted += cursor.rowcount
        if inserted == len(rows):
            return list(range(before + 1, before + 1 + len(rows)))
        new = {(sensor, sha256): i for i, sensor, sha256 in
               db.execute("SELECT id, sensor, sha256 FROM alerts WHERE id > ?", (before,))}
        ids = [new.pop((row.record.sensor, row.record.sha256), None) for row in rows]
        # Only a store made by an earlier version has a constraint that may ignore a
        # row: its UNIQUE (sensor, sha256), when the digest index lacked an alert the
        # file holds.  A row ignored for any other reason must not be answered as a
        # retransmission: that would lose it.
        for row, i in zip(rows, ids):
            if i is None:
                r = row.record
                if db.execute("SELECT 1 FROM alerts WHERE sensor = ? AND sha256 = ? LIMIT 1",
                              (r.sensor, r.sha256)).fetchone() is None:
                    raise StoreError(f"an alert from {r.sensor} (sha256 {r.sha256}) could not be inserted")
                self.log.warn("the store's UNIQUE (sensor, sha256) constraint found an alert from {sensor}"
                              " (sha256 {sha256}) that the digest index lacked", sensor=r.sensor, sha256=r.sha256)
        return ids

    # Summaries written after the alerts' commit.  SQL NULL in C{idmef} means "not
    # summarised yet"; a body that has no summary holds the JSON text C{null}.

    def pending_summaries(self, limit: int) -> list[tuple[int, bytes]]:
        """Up to C{limit} alerts stored without their summary, oldest first."""
        assert self._db is not None
        rows = self._db.execute(
            "SELECT id, body, body_at, body_size, sha256 FROM alerts WHERE idmef IS NULL ORDER BY id LIMIT ?",
            (limit,),
        ).fetchall()
        pending = []
        with BodyReader(self.bodies.path) as bodies:
            for i, in_row, at, size, sha256 in rows:
                try:
                    pending.append((i, bodies.body(i, in_row, at, size, sha256)))
                except BodyDamaged as e:
                    # "no summary", so that the pass goes on past it; reading the alert
                    # says the same as this.  A log that cannot be read at all fails the
                    # pass instead, and the next pass tries again.
                    self.log.error("no summary for {why}", why=str(e))
                    pending.append((i, b""))
        return pending

    def write_summaries(self, summaries: Sequence[tuple[int, dict[str, Any] | None]]) -> None:
        """Set C{(id, summary)} summaries (None: the body has none, JSON C{null}), in one transaction."""
        assert self._db is not None
        db = self._db
        texts = [(i, json.dumps(summary)) for i, summary in summaries]
        # no fsync for these: the next alert commit's fsync carries them (WAL), and a
        # summary lost in a crash is computed again
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("UPDATE alerts SET idmef = ? WHERE id = ? AND idmef IS NULL", [(j, i) for i, j in texts])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        finally:
            db.execute("PRAGMA synchronous=FULL")
        # each UPDATE writes its row again, body and all; the bodies are not at hand
        self._checkpoints.committed(db, sum(len(j) for _, j in texts))

    def close(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.close()
            self._checkpoints = None
        self.bodies.close()
        self.digests.close()
        if self._db is not None:
            self._db.close()
            self._db = None


class _Group:
    """The alerts of one L{GroupCommitStore.add_many} call, settled one by one."""

    __slots__ = ("deferred", "remaining", "results")

    def __init__(self, count: int) -> None:
        self.results: list[Any] = [None] * count
        self.remaining = count
        self.deferred: Deferred[list[Any]] = Deferred()

    def settle(self, index: int, result: bool | StoreError) -> None:
        self.results[index] = result
        self.remaining -= 1
        if not self.remaining:
            self.deferred.callback(self.results)


_Entry = tuple[AlertRecord, _Group, int]


class GroupCommitStore:
    """
    The manager's store: C{add} returns a Deferred that fires once the alert is
    durable, with True for a new alert and False for a retransmitted one.

    The IDMEF summary costs far more than storing the alert (about 100 us per 1 KiB
    alert with its JSON and its UPDATE, against a few tens for the rest), and the 200
    depends only on the raw alert being durable.  With a backend that can write
    summaries later (C{defers_summaries}, C{pending_summaries}, C{write_summaries}),
    alerts are committed
    without it and summarised afterwards on the same thread, in batches of
    L{SUMMARY_BATCH}, once a batch has gathered or L{SUMMARY_DELAY} seconds after a
    commit; when no alert waits for a commit (after a commit of L{SUMMARY_LARGE_COMMIT}
    alerts or more, once none has been queued or answered for L{SUMMARY_QUIET} seconds),
    and otherwise once every L{SUMMARY_EVERY} commits, so that a saturated manager
    spends its time on acknowledgements and catches up on summaries when the load drops.
    Summaries are written without an fsync of their own (the next commit's carries them;
    a summary lost in a crash is computed again).  Heartbeats are summarised in their
    commit (they update the sensor's heartbeat time; a cheap byte test finds them).
    Readers summarise whatever is still pending (L{read_alerts}); after a crash, the
    pass resumes on the next start.
    """

    log = Logger()
    SUMMARY_BATCH = 64
    SUMMARY_EVERY = 16
    SUMMARY_DELAY = 0.25
    SUMMARY_QUIET = 0.005
    """Seconds without an alert queued or answered before a pass may start after a
    large commit: longer than a sensor (or a chain of proxies) on the same network
    takes to send its next alerts once it has its answers, far shorter than anyone
    waits for a summary.  Senders further away look quiet between their windows and
    get the passes between commits they always had.  Short, because while large
    commits come closer together than this, summaries advance only every
    L{SUMMARY_EVERY} commits (4 alerts a commit): at 16 alerts every 5 ms, 3,200 a
    second, they fall behind by some 2,400 a second until the load pauses, although
    passes alone write about 9,000 a second at 1 KiB (4,500 before the summary's parse
    went to C)."""
    SUMMARY_LARGE_COMMIT = 16
    """A commit of this many alerts or more says that senders keep windows of alerts in
    flight and will send again as soon as they have the answers: a pass then waits for
    L{SUMMARY_QUIET}.  After smaller commits a pass may start as soon as the queue is
    empty (a few alerts a commit: the load is light, and passes kept small keep the
    latency low)."""

    def __init__(
        self, backend: Any, reactor: Any, max_batch: int = 4096, max_backlog_bytes: int = 256 * 1024 * 1024
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
        self._queues: collections.OrderedDict[str, collections.deque[_Entry]] = collections.OrderedDict()
        self._queued = 0
        self._seen: Seen = {}
        self._committing = False
        self._closing: Deferred[None] | None = None
        self._shut = False
        self.commits = 0
        self.committed = 0
        self.commit_observers: list[Any] = []
        """Called as C{observer(alerts, seconds)} after each committed batch."""
        self._defer_summaries = False  # the backend says, once open (L{_open_backend})
        self._summaries_pending = False
        self._unsummarised = 0  # alerts committed since the last pass found none left
        self._summary_timer: Any = None
        self._quiet_timer: Any = None
        self._last_activity = 0.0  # reactor time of the last alert queued or answered
        self._last_commit = 0  # alerts in the last commit
        self._summaries_overdue = False
        self._commits_since_summaries = 0
        self._summary_waiters: list[Deferred[None]] = []

    @property
    def backlog(self) -> int:
        """Alerts waiting for a commit to start."""
        return self._queued

    def open(self) -> Deferred[None]:
        self._pool.start()
        d = self._in_thread(self._open_backend)

        def opened(state: tuple[bool, bool]) -> None:
            self._open = True
            self._defer_summaries, pending = state
            self._summaries_pending = self._summaries_overdue = pending
            # alerts may have queued while the database was being opened
            self._kick()

        return d.addCallback(opened)

    def _open_backend(self) -> tuple[bool, bool]:
        """
        Open the database; whether it can take summaries after the commit (a backend
        says so once it has seen its database), and whether alerts wait for theirs
        (after a crash).
        """
        self.backend.open()
        try:
            defer = bool(getattr(self.backend, "defers_summaries", False))
            return defer, defer and bool(self.backend.pending_summaries(1))
        except BaseException:
            self.backend.close()  # not open as far as the rest knows: close() would skip it
            raise

    def _in_thread(self, f: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def seen(self, sensor: str, peer: str | None, via: Sequence[str]) -> None:
        """Note that C{sensor} completed a connection; written with the next batch."""
        self._seen[sensor] = (utcnow(), peer, tuple(via))
        self._kick()

    def add(self, record: AlertRecord) -> Deferred[bool]:
        def one(results: list[bool | StoreError]) -> bool:
            if isinstance(results[0], StoreError):
                raise results[0]
            return results[0]

        return self.add_many([record]).addCallback(one)

    def add_many(self, records: Sequence[AlertRecord]) -> Deferred[list[bool | StoreError]]:
        """
        Queue C{records}; fires once every one of them is settled, with True (new),
        False (a retransmission) or the L{StoreError} that kept it out, for each.

        One Deferred for what a connection read at once, instead of one per alert:
        at tens of thousands of alerts a second, Deferreds and their callbacks were a
        fifth of the reactor's work.
        """
        group = _Group(len(records))
        queued = self._queued
        queue = None  # a connection's records share their sensor: its queue, found once
        sensor = ""
        for i, record in enumerate(records):
            if self._closing is not None:
                group.settle(i, StoreError("the store is shutting down"))
            elif self._backlog_bytes + len(record.body) > self._max_backlog_bytes and self._queued:
                group.settle(i, StoreError(f"more than {self._max_backlog_bytes} octets wait for a commit"))
            else:
                self._backlog_bytes += len(record.body)
                if queue is None or record.sensor != sensor:
                    sensor = record.sensor
                    queue = self._queues.get(sensor)
                    if queue is None:
                        queue = self._queues[sensor] = collections.deque()
                queue.append((record, group, i))
                self._queued += 1
        if not records:
            group.deferred.callback([])
        if self._queued != queued:
            self._last_activity = self._reactor.seconds()
            self._kick()
        return group.deferred

    def _take_batch(self) -> list[_Entry]:
        """
        Up to max_batch alerts: all that wait when they fit, else an equal share from
        each sensor's queue in turn, so that one busy sensor cannot crowd the others out.
        """
        batch: list[_Entry]
        if self._queued <= self._max_batch:
            # 16 sensors with windows of 256 fit: one list, not a round of the sensors
            # per alert
            batch = [entry for queue in self._queues.values() for entry in queue]
            self._queues.clear()
            self._queued = 0
            self._backlog_bytes = 0
            return batch
        batch = []
        while self._queues and len(batch) < self._max_batch:
            share = max(1, (self._max_batch - len(batch)) // len(self._queues))
            for sensor in list(self._queues):
                queue = self._queues[sensor]
                batch.extend([queue.popleft() for _ in range(min(share, len(queue), self._max_batch - len(batch)))])
                if not queue:
                    del self._queues[sensor]
                if len(batch) >= self._max_batch:
                    break
        self._queued -= len(batch)
        self._backlog_bytes -= sum(len(r.body) for r, _, _ in batch)
        return batch

    def _kick(self) -> None:
        if not self._open and self._closing is not None:
            # never opened (or open failed): nothing queued can be committed any more
            self._fail_queue(StoreError(f"the store {self.backend} is not open"))
        if self._committing or not self._open or not (self._queued or self._seen or self._summaries_due()):
            if self._closing is not None and not self._committing and not self._queued:
                self._finish_close()
            else:
                self._wake_when_quiet()
            return
        if self._summaries_due():
            self._summarise()
            return
        batch = self._take_batch()
        seen, self._seen = self._seen, {}
        self._committing = True
        started = time.monotonic()
        d = self._in_thread(self._commit, [r for r, _, _ in batch], seen)

        def answer(outcomes: Sequence[bool | StoreError]) -> None:
            for (_, group, i), outcome in zip(batch, outcomes):
                group.settle(i, outcome)

        def committed(results: list[bool]) -> None:
            # The next commit starts before this batch's answers are written, so that
            # the store's thread commits while the reactor answers (and the alerts that
            # arrived meanwhile are already waiting); when closing, answers go first so
            # that every one is written before the close completes.
            seconds = time.monotonic() - started

            def note() -> None:
                self._last_activity = self._reactor.seconds()  # the answers go out now
                if batch:  # a commit that only notes a connection says nothing of the load
                    self._last_commit = len(batch)
                self.commits += 1
                self._commits_since_summaries += 1
                if self._defer_summaries and batch:
                    self._summaries_pending = True
                    self._unsummarised += len(batch)
                    if self._summary_timer is None and self._closing is None:
                        self._summary_timer = self._reactor.callLater(self.SUMMARY_DELAY, self._summary_time)
                self.committed += sum(results)
                for observe in self.commit_observers:
                    try:
                        observe(len(batch), seconds)
                    except Exception:
                        self.log.failure("commit observer {observer!r} failed", observer=observe)

            if self._closing is None:
                self._each(note, next_batch, lambda: answer(results))
            else:
                self._each(note, lambda: answer(results), next_batch)

        def failed(failure: Any) -> None:
            self.log.error(
                "store commit of {count} alerts failed ({kind}: {why}); answering 503",
                count=len(batch), kind=failure.type.__name__, why=failure.getErrorMessage(),
            )
            error = StoreError(f"commit failed: {failure.getErrorMessage()}")
            self._each(lambda: answer([error] * len(batch)), next_batch)

        def next_batch() -> None:
            self._committing = False
            self._kick()

        d.addCallbacks(committed, failed)

    def _each(self, *steps: Callable[[], None]) -> None:
        """Run every step even if one fails: a bug in one must neither leave a batch
        unanswered (its sensors would wait for an ack that never comes) nor stop the
        next commit."""
        for step in steps:
            try:
                step()
            except Exception:
                self.log.failure("store step {step!r} failed", step=step)

    def _commit(self, records: list[AlertRecord], seen: Seen) -> list[bool]:
        from .idmef import summarize

        if not self._defer_summaries:
            rows = [Row(r, summarize(r.body)) for r in records]  # type: ignore[arg-type]
        else:
            rows = [
                # find, not in: "x in bytes" first tries x as an integer and formats a
                # TypeError for every alert before it searches
                Row(r, summarize(r.body)) if r.body.find(b"Heartbeat") >= 0 else Row(r, None, pending=True)  # type: ignore[arg-type]
                for r in records
            ]
        return self.backend.commit(rows, seen)

    # -- summaries after the commit ---------------------------------------------------

    def _summary_time(self) -> None:
        self._summary_timer = None
        self._summaries_overdue = True
        self._kick()

    def summarised(self) -> Deferred[None]:
        """Fires once every alert committed so far has its summary written.

        For readers that filter on summary fields (the dashboard's severity and
        classification filters): asking moves a summary pass ahead of the next commit.
        Under a steady stream of alerts, passes and commits alternate until the
        summaries catch up, so that a reader never holds back acknowledgements; a
        reader that stops waiting cancels the Deferred, and its question is withdrawn.
        """
        d: Deferred[None] = Deferred(canceller=self._withdraw)
        if not self._defer_summaries or not self._summaries_pending or self._closing is not None:
            d.callback(None)
            return d
        self._summary_waiters.append(d)
        self._kick()
        return d

    def _withdraw(self, d: Deferred[None]) -> None:
        if d in self._summary_waiters:
            self._summary_waiters.remove(d)

    def _summaries_caught_up(self) -> None:
        waiters, self._summary_waiters = self._summary_waiters, []
        for d in waiters:
            d.callback(None)

    def _summaries_due(self, ignore_quiet: bool = False) -> bool:
        """Whether a summary pass should run now; with C{ignore_quiet}, whether it
        would, were it not for the quiet wait after a large commit."""
        if not self._summaries_pending or self._closing is not None:
            return False
        if self._summary_waiters:
            return not self._queued or self._commits_since_summaries >= 1
        if not self._summaries_overdue and self._unsummarised < self.SUMMARY_BATCH:
            return False
        if self._commits_since_summaries >= self.SUMMARY_EVERY:
            return True
        if self._queued:
            return False
        return ignore_quiet or self._last_commit < self.SUMMARY_LARGE_COMMIT or self._quiet_left() <= 0

    def _quiet_left(self) -> float:
        """
        Seconds until the store has been quiet for L{SUMMARY_QUIET}.

        After a large commit an empty queue is not a quiet store: the queue is empty
        because its sensors are waiting for the answers, and a pass started then (64
        alerts take some 7 ms, 15-25 ms when this rule was made) holds back the alerts
        they send next.  With one sensor keeping a window of alerts in flight, that was
        every commit.  With this rule one sensor went 13,798 -> 17,564 alerts/s at 1 KiB
        and 8,439 -> 11,358 at 4 KiB (medians of 3); at 1,000 alerts/s from 16 sensors
        (small commits) the median acknowledgement stayed at 3.1 ms (3 pairs).
        """
        return self._last_activity + self.SUMMARY_QUIET - self._reactor.seconds()

    def _wake_when_quiet(self) -> None:
        """Come back once the store has been quiet, if only the quiet rule keeps a due
        pass waiting: nothing else would call L{_kick} when no alert comes."""
        if (self._quiet_timer is None and self._open and not self._committing
                and self._summaries_due(ignore_quiet=True) and not self._summaries_due()):
            # never longer than SUMMARY_QUIET, should the clock be set back
            self._quiet_timer = self._reactor.callLater(
                max(0.0, min(self._quiet_left(), self.SUMMARY_QUIET)), self._quiet_time)

    def _quiet_time(self) -> None:
        """The quiet wait is over: a pass may be due (L{_kick} decides, and may wait again)."""
        self._quiet_timer = None
        self._kick()

    def _summarise(self) -> None:
        self._committing = True
        self._commits_since_summaries = 0
        d = self._in_thread(self._summarise_batch, self.SUMMARY_BATCH)

        def done(count: int) -> None:
            self._unsummarised = max(0, self._unsummarised - count)
            if count < self.SUMMARY_BATCH:
                self._summaries_pending = self._summaries_overdue = False
                self._unsummarised = 0
                self._summaries_caught_up()

        def failed(failure: Any) -> None:
            # summaries are a convenience (readers compute missing ones): log, go on
            self._summaries_pending = self._summaries_overdue = False
            self.log.error("writing alert summaries failed ({why}); readers will compute them",
                           why=failure.getErrorMessage())
            self._summaries_caught_up()

        def next_batch(_: Any) -> None:
            self._committing = False
            self._kick()

        d.addCallbacks(done, failed)
        d.addBoth(next_batch)

    def _summarise_batch(self, limit: int) -> int:
        """Summarise up to C{limit} alerts stored without a summary; how many there were."""
        from .idmef import summarize

        pending = self.backend.pending_summaries(limit)
        if pending:
            self.backend.write_summaries([(i, summarize(bytes(body))) for i, body in pending])
        return len(pending)

    def _fail_queue(self, error: StoreError) -> None:
        queues, self._queues = self._queues, collections.OrderedDict()
        self._queued = self._backlog_bytes = 0
        for queue in queues.values():
            for _, group, i in queue:
                group.settle(i, error)

    def close(self) -> Deferred[None]:
        """Commit what is queued, then close the database and stop the thread."""
        if self._closing is None:
            self._closing = Deferred()
            self._kick()
        return self._closing

    def _finish_close(self) -> None:
        self._summaries_caught_up()  # readers then summarise what is left themselves
        for timer in (self._summary_timer, self._quiet_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._summary_timer = self._quiet_timer = None
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


def _unreadable(path: Path, error: sqlite3.Error) -> str:
    """
    Why C{path} cannot be read, in the reader's terms.  A store in WAL mode that no
    manager has open has no C{-wal} and C{-shm} beside it, and SQLite must create both
    before it reads, even read-only.  An operator of the manager's group, who may read
    the files but not write in their directory, otherwise saw only "attempt to write a
    readonly database"; a reader of a copy on a read-only filesystem, "unable to open
    database file".
    """
    real = path.resolve()  # SQLite keeps the WAL's files beside the real file
    wal, shm = real.with_name(real.name + "-wal"), real.with_name(real.name + "-shm")
    if (getattr(error, "sqlite_errorname", "") in ("SQLITE_READONLY_DIRECTORY", "SQLITE_CANTOPEN")
            and not (wal.exists() and shm.exists()) and os.access(real, os.R_OK)):
        return (f"no manager has it open, and SQLite must create {wal.name} and {shm.name} in {real.parent} before"
                " anyone reads it, which this user may not do there (or the filesystem is read-only); read it while"
                " the manager runs, as root or as the user the manager runs as (the Debian package's: sudo -u iapd"
                " iapctl ...), or read a copy of its files made somewhere writable")
    return str(error)


def open_reader(path: Path) -> sqlite3.Connection:
    """A read-only connection, so that readers (iapctl, the dashboard) can never write to a running manager's store."""
    if not path.exists():
        raise StoreError(f"no store at {path} (has the manager run with this configuration?)")
    db: sqlite3.Connection | None = None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        db.row_factory = sqlite3.Row
        db.execute("SELECT 1 FROM alerts LIMIT 1")
        if "body_at" not in {row[1] for row in db.execute("PRAGMA table_info(alerts)")}:
            # a store no manager of this version has opened yet, which a reader must not
            # change: the same rows, every body in its row.  Unqualified names find the
            # temporary schema first, and a read-only connection may have one.
            db.execute("CREATE TEMP VIEW alerts AS SELECT *, NULL AS body_at, NULL AS body_size FROM main.alerts")
    except sqlite3.Error as e:
        if db is not None:
            db.close()
        raise StoreError(f"cannot read store {path}: {_unreadable(path, e)}") from None
    return db


def alert_dict(row: Any, body: bytes | None, *, received: str, via: list[str], idmef: Any) -> dict[str, Any]:
    """
    An alert as C{iapctl --json} prints it (DESIGN.md section 7), from a database row
    whose database-specific fields (and C{body}, when it is wanted) the caller has
    already decoded.
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
    if body is not None:
        out["body"] = body
    return out


PENDING_BODY = "CASE WHEN idmef IS NULL THEN body END AS pending_body"
"""For readers, the body of an alert stored and not yet summarised, to summarise it
(SQLite and PostgreSQL; PostgreSQL's JSON null reads as None like SQL NULL, so this
column, not C{idmef}, tells the two apart)."""


BODY_COLUMNS = f"coalesce(body_size, length(body)) AS size, body_at, body_size, {PENDING_BODY}"
"""For SQLite readers: what L{alert_from_row} needs besides the alert's own fields."""


def alert_from_row(row: sqlite3.Row, with_body: bool, bodies: BodyReader) -> dict[str, Any]:
    """
    One SQLite row (L{BODY_COLUMNS}, and C{body} when C{with_body}) in the field names
    of C{iapctl alerts --json}, summarising it if the manager has not yet; C{bodies}
    reads the store's body log.
    """
    def body(in_row: bytes) -> bytes:
        try:
            return bodies.body(row["id"], in_row, row["body_at"], row["body_size"], row["sha256"])
        except BodyLogError as e:
            raise StoreError(str(e)) from None

    if row["idmef"] is None:
        # stored, not summarised yet (the manager catches up when it has time)
        from .idmef import summarize

        try:
            idmef: Any = summarize(body(row["pending_body"]))
        except StoreError:
            idmef = None  # a listing goes on past a damaged body; reading the body says why
    else:
        idmef = json.loads(row["idmef"])
    return alert_dict(row, body(row["body"]) if with_body else None, received=row["received"],
                      via=json.loads(row["via"]), idmef=idmef)


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
    db = open_reader(path)
    try:
        rows = db.execute(
            f"SELECT id, sensor, received, content_type, sha256, via, peer, idmef, {BODY_COLUMNS}"
            + (", body" if with_body else "")
            + f" FROM alerts{where}{tail}",
            args,
        ).fetchall()
    finally:
        db.close()
    with BodyReader(log_path(path)) as bodies:
        alerts = [alert_from_row(r, with_body, bodies) for r in rows]
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
    db = open_reader(path)
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

