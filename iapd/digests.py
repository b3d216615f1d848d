"""
The exactly-once check of an SQLite store: the digest of every alert it holds, kept in
a LevelDB directory beside the file (C{alerts.db-digests}).

Why not a UNIQUE (sensor, sha256) index in SQLite, as stores made by earlier versions
have: a SHA-256 is random, so each new alert lands on its own leaf of a B-tree, and
every commit wrote a 4 KiB page per alert to the WAL and again to the database at the
checkpoint, two thirds of the store's time and more as the store grows
(C{bench/store.py}).  LevelDB is a log-structured merge tree: a new digest is appended
to a log and merged later in sorted runs, a few hundred octets written per alert, and a
lookup of a digest that is not there, as nearly every lookup is, is answered by a
Bloom filter.

The SQLite file is the record and the index only ever follows it:

  - The index is written after the alerts' commit, in one LevelDB batch with its
    I{watermark} (the highest alert id it covers, and that alert's key), without an
    fsync.  Every L{CHECKPOINT_EVERY} ids, and at a clean close, the memtable is
    flushed to a synced table and the watermark recorded as I{durable}.
  - When the store opens after a clean close, the index carries on from its
    watermark; after any other stop (a crash, a SIGKILL, a power cut that may have
    lost or reordered the unsynced log) it trusts only its durable watermark and adds
    every alert after it from the file again.
  - The index is rebuilt from the file when it is missing, damaged, built from
    another file (a token in the file's C{iapd_meta} table), ahead of the file, or
    when the alert at its watermark is not the one in the file (the file was replaced
    by a copy that went its own way).
  - A digest found in the index counts as a retransmission only when the row it
    names is in the file with the same sensor and digest, so whatever state the index
    is in, it can never make the manager drop a new alert.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import plyvel
from twisted.logger import Logger

from .digestfilter import DigestFilter

_WATERMARK = b"\x00watermark"
"""The highest alert id in the index and its key (sensor names never start with NUL)."""
_DURABLE = b"\x00durable"
"""A watermark known to be on the disk: everything up to it is in synced tables."""
_CLEAN = b"\x00clean"
"""The watermark at the last clean close; removed (synced) when the store opens."""
_STORE = b"\x00store"
"""The token of the SQLite file the index was built from (its C{iapd_meta} row)."""
_METADATA = frozenset({_WATERMARK, _DURABLE, _CLEAN, _STORE})

CHECKPOINT_EVERY = 131_072
"""Alert ids between durable watermarks: at most this many alerts (some seconds of
work) are added from the file again after a crash."""
CATCH_UP_CHUNK = 10_000
FILL_CHUNK = 20_000
"""Keys read from the index per step while the filter is filled: the store's thread may
wait for one step (some 20 ms) to add the keys of its commit."""

_NOWHERE = (b"\xff\xff", b"\xff\xff\xff")
"""A key range holding no key: compacting it only flushes the memtable."""


class DigestIndexError(Exception):
    """The index cannot be opened or brought up to date; the message says why."""


def digest_key(sensor: str, sha256: str) -> bytes:
    """The index key of an alert: its sensor and the 32 octets of its digest."""
    return sensor.encode() + b"\x00" + bytes.fromhex(sha256)


def why(error: BaseException) -> str:
    """An exception's message: plyvel's carry LevelDB's status as octets."""
    args = [a.decode(errors="replace") if isinstance(a, bytes) else str(a) for a in error.args]
    return "; ".join(args) or type(error).__name__


def _mark(alert_id: int, key: bytes) -> bytes:
    return alert_id.to_bytes(8, "big") + key


def _unmark(value: bytes | None) -> tuple[int, bytes]:
    return (int.from_bytes(value[:8], "big"), value[8:]) if value else (0, b"")


def _row_key(db: sqlite3.Connection, alert_id: int) -> bytes | None:
    row = db.execute("SELECT sensor, sha256 FROM alerts WHERE id = ?", (alert_id,)).fetchone()
    try:
        return digest_key(*row) if row else None
    except (ValueError, UnicodeError):
        return None


class DigestIndex:
    """
    Which (sensor, digest) pairs an SQLite store holds, and under which alert id.

    Every method runs on the store's own thread, with that thread's connection.

    In front of it, a L{DigestFilter} in memory answers for most new alerts.  It is
    filled from the index by a thread of its own after each open (or rebuild), reading
    with checksums: until it is full, every lookup goes to LevelDB, and damage it meets
    has the index rebuilt at the next lookup.  Every key the index is given goes to the
    filter first, so that a filter that is full never lacks one; should it fail to take
    one, it is dropped, and lookups go to LevelDB again.  (That thread runs L{_fill}
    only; L{wait_filter} and L{filter_state} may be asked from any thread.)
    """

    log = Logger()

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: plyvel.DB | None = None
        self._filter: DigestFilter | None = None
        self._filling: threading.Thread | None = None
        self._stop_filling = threading.Event()
        self._covered = (0, b"")  # the watermark: ids up to this one are in the index
        self._durable = 0
        self._stored = 0  # the highest id committed to the file, as far as we know

    # -- opening ----------------------------------------------------------------------

    def open(self, db: sqlite3.Connection) -> None:
        """Open the index and bring it up to date with the file; rebuild it if it does not match."""
        self._open_index(db)
        self._start_filter()

    def _open_index(self, db: sqlite3.Connection) -> None:
        try:
            # first, so that a second manager is told so before it touches the file
            self._db = self._open_leveldb()
        except plyvel.CorruptionError as e:
            self._rebuild(db, f"the index is damaged ({why(e)})")
            return
        try:
            self._open_checked(db)
        except plyvel.CorruptionError as e:
            self._rebuild(db, f"the index is damaged ({why(e)})")

    def _open_checked(self, db: sqlite3.Connection) -> None:
        assert self._db is not None
        token = self._token(db)
        stored = db.execute("SELECT coalesce(max(id), 0) FROM alerts").fetchone()[0]
        found = self._db.get(_STORE)
        watermark = self._db.get(_WATERMARK)
        clean = self._db.get(_CLEAN)
        start = _unmark(watermark if clean is not None and clean == watermark else self._db.get(_DURABLE))
        if found is None:
            if stored:
                self._rebuild(db, "the store has no index yet (made by an earlier version, restored from a backup,"
                                  " or the index was removed)")
                return
            self._db.put(_STORE, token.encode(), sync=True)
        elif found != token.encode():
            self._rebuild(db, "the index was built from another store file")
            return
        elif _unmark(watermark)[0] > stored:
            self._rebuild(db, f"the index covers alerts up to id {_unmark(watermark)[0]} but the store ends at"
                              f" {stored} (was the store restored from an older copy?)")
            return
        elif start[1] and _row_key(db, start[0]) != start[1]:
            self._rebuild(db, f"the alert with id {start[0]} in the store is not the one the index has"
                              " (was the store replaced by another copy?)")
            return
        if clean is not None:
            self._db.delete(_CLEAN, sync=True)
        self._covered, self._durable, self._stored = start, start[0], stored
        if start[0] < stored:
            if clean is None:
                self.log.warn("the store was not closed cleanly: adding the {count} alerts after id {start}"
                              " to the digest index {path} again", count=stored - start[0], start=start[0],
                              path=str(self.path))
            else:
                self.log.warn("adding the {count} alerts after id {start} to the digest index {path}: they were"
                              " stored without it (by an earlier version?)", count=stored - start[0],
                              start=start[0], path=str(self.path))
            self._catch_up(db)

    def _token(self, db: sqlite3.Connection) -> str:
        """
        The random token naming this SQLite file, made on first use: an index built
        from another file (a store replaced by one from elsewhere) is told apart.
        Read first, so that an open normally takes no write lock on the file.
        """
        row = db.execute("SELECT value FROM iapd_meta WHERE key = 'store'").fetchone()
        if row is None:
            db.execute("INSERT OR IGNORE INTO iapd_meta (key, value) VALUES ('store', ?)", (secrets.token_hex(16),))
            row = db.execute("SELECT value FROM iapd_meta WHERE key = 'store'").fetchone()
        return row[0]

    def _open_leveldb(self) -> plyvel.DB:
        try:
            # paranoid_checks: damage found in the log fails the open (and the index is
            # rebuilt) instead of being skipped.  No compression: a key is a sensor name
            # (which LevelDB's prefix encoding already shares) and a random digest, which
            # Snappy cannot shrink but still tried on every block it wrote: 3.8% of the
            # manager's CPU at 1 KiB, 22.7 -> 21.95 us per alert without it (16 sensors,
            # 4 rounds each, every round lower).  Tables written with it stay readable.
            return plyvel.DB(str(self.path), create_if_missing=True, paranoid_checks=True, bloom_filter_bits=10,
                             write_buffer_size=8 << 20, lru_cache_size=8 << 20, compression=None)
        except plyvel.IOError as e:
            message = why(e)
            if message.startswith("IO error: lock ") and (
                "already held" in message or "temporarily unavailable" in message
            ):
                raise DigestIndexError(
                    f"the digest index {self.path} is in use by another process"
                    " (is another manager running with this store?)"
                ) from None
            raise DigestIndexError(f"cannot open the digest index {self.path}: {message}") from None

    def _rebuild(self, db: sqlite3.Connection, reason: str) -> None:
        count = db.execute("SELECT count(*) FROM alerts").fetchone()[0]
        self.log.warn("rebuilding the digest index {path} from the {count} alerts in the store: {why}",
                      path=str(self.path), count=count, why=reason)
        self._close_leveldb()
        try:
            plyvel.destroy_db(str(self.path))
        except plyvel.Error as e:
            raise DigestIndexError(f"cannot remove the digest index {self.path} to rebuild it: {why(e)}") from None
        self._db = self._open_leveldb()
        self._covered, self._durable = (0, b""), 0
        self._stored = db.execute("SELECT coalesce(max(id), 0) FROM alerts").fetchone()[0]
        self._catch_up(db)
        self._checkpoint()
        # the token last: an index whose rebuild was cut short is rebuilt again
        self._db.put(_STORE, self._token(db).encode(), sync=True)
        self.log.info("the digest index {path} covers the {count} alerts in the store", path=str(self.path),
                      count=count)

    # -- keeping up with the file ---------------------------------------------------

    def _catch_up(self, db: sqlite3.Connection) -> None:
        """Add the alerts of the file past the watermark, in order, a chunk per batch."""
        cursor = db.execute("SELECT id, sensor, sha256 FROM alerts WHERE id > ? ORDER BY id", (self._covered[0],))
        while rows := cursor.fetchmany(CATCH_UP_CHUNK):
            entries = []
            for alert_id, sensor, sha256 in rows:
                try:
                    entries.append((digest_key(sensor, sha256), alert_id))
                except (ValueError, UnicodeError):
                    self.log.warn("alert {id} in the store has no valid digest ({sha256!r}); it cannot be"
                                  " recognised if it is sent again", id=alert_id, sha256=sha256)
            last_id = rows[-1][0]
            self._write(entries, last_id, entries[-1][0] if entries and entries[-1][1] == last_id else b"")
        self._stored = max(self._stored, self._covered[0])

    def _write(self, entries: Sequence[tuple[bytes, int]], last_id: int, last_key: bytes) -> None:
        assert self._db is not None
        self._to_filter([key for key, _ in entries])
        watermark = _mark(last_id, last_key)
        with self._db.write_batch() as batch:
            for key, alert_id in entries:
                batch.put(key, alert_id.to_bytes(8, "big"))
            batch.put(_WATERMARK, watermark)
        self._covered = (last_id, last_key)
        if last_id - self._durable >= CHECKPOINT_EVERY:
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Flush what the index holds to synced tables, and record the watermark as durable."""
        assert self._db is not None
        self._db.compact_range(start=_NOWHERE[0], stop=_NOWHERE[1])
        self._db.put(_DURABLE, _mark(*self._covered), sync=True)
        self._durable = self._covered[0]

    def stored_ids(self, db: sqlite3.Connection, keys: Sequence[bytes]) -> list[int | None]:
        """
        For each key, the id of the stored alert it names, or None when it is new.

        A hit is confirmed against the file (one lookup by id, only for hits, which
        retransmissions are), so the index never says "stored" wrongly.  If the index
        fails (damage found while reading, or a LevelDB background error that stops
        its writes), it is rebuilt from the file and asked again.
        """
        if self._db is None:
            raise DigestIndexError(f"the digest index {self.path} is not open (a rebuild failed: see the log;"
                                   " restart the manager once the cause is fixed)")
        try:
            return self._stored_ids(db, keys)
        except plyvel.Error as e:
            self._rebuild(db, f"the index failed ({why(e)})")
            self._start_filter()
            return self._stored_ids(db, keys)

    def _stored_ids(self, db: sqlite3.Connection, keys: Sequence[bytes]) -> list[int | None]:
        assert self._db is not None
        if self._filter is not None and self._filter.damage is not None:
            self._rebuild(db, f"the index is damaged ({self._filter.damage}; found while filling the filter)")
            self._start_filter()
        if self._covered[0] < self._stored:
            # the last index write failed (logged): the file is the record, catch up
            self._catch_up(db)
        get = self._db.get
        maybe = self._ask_filter(keys)
        if maybe is not None:
            found = [int.from_bytes(value, "big") if held and (value := get(key, verify_checksums=True)) else None
                     for key, held in zip(keys, maybe)]
        else:
            found = [int.from_bytes(value, "big") if (value := get(key, verify_checksums=True)) else None
                     for key in keys]
        hits = sorted({i for i in found if i is not None})
        if not hits:
            return found
        rows: dict[int, bytes] = {}
        for start in range(0, len(hits), 500):
            chunk = hits[start:start + 500]
            for alert_id, sensor, sha256 in db.execute(
                f"SELECT id, sensor, sha256 FROM alerts WHERE id IN ({','.join('?' * len(chunk))})", chunk
            ):
                rows[alert_id] = digest_key(sensor, sha256)
        return [i if i is not None and rows.get(i) == key else None for i, key in zip(found, keys)]

    def committed(self, entries: Sequence[tuple[bytes, int]]) -> None:
        """
        Record alerts the file has just committed, in id order.

        A failure is logged, not raised: the alerts are committed and must be answered
        200; the next lookup catches up from the file (or rebuilds the index).
        """
        if not entries:
            return
        last_key, last_id = entries[-1]
        self._stored = max(self._stored, last_id)
        if self._db is None:
            return
        try:
            self._write(entries, last_id, last_key)
        except Exception as e:
            self.log.error("writing the digest index {path} failed ({why}); it will be caught up from the store",
                           path=str(self.path), why=why(e))

    # -- closing ----------------------------------------------------------------------

    def close(self) -> None:
        """Make the index durable and mark the close clean, so the next open trusts it."""
        if self._db is None:
            return
        try:
            if self._covered[0] >= self._stored:
                self._checkpoint()
                self._db.put(_CLEAN, _mark(*self._covered), sync=True)
        except Exception as e:
            self.log.error("closing the digest index {path} cleanly failed ({why}); the next start checks the"
                           " alerts after id {id} again", path=str(self.path), why=why(e), id=self._durable)
        self._close_leveldb()

    def _close_leveldb(self) -> None:
        self._stop_filter()  # its thread reads the index
        if self._db is not None:
            try:
                self._db.close()
            finally:
                self._db = None

    # -- the filter in front --------------------------------------------------------

    def _start_filter(self) -> None:
        """A new filter, filled from what the index holds now by a thread of its own."""
        self._stop_filter()
        if self._db is None:
            return
        try:
            target = DigestFilter(expected=self._stored + self._stored // 4)
            # taken here, on the store's thread: the keys written from now on go to the
            # filter through _write, those written before are in this snapshot
            keys = self._db.raw_iterator(verify_checksums=True, fill_cache=False)
        except Exception as e:
            self.log.error("the digest filter could not be made ({why}); lookups go to the index", why=why(e))
            return
        self._filter = target
        self._stop_filling = threading.Event()
        self._filling = threading.Thread(target=self._fill, args=(target, keys, self._stop_filling),
                                         name="iapd-digest-filter", daemon=True)
        self._filling.start()

    def _fill(self, target: DigestFilter, keys: Any, stop: threading.Event) -> None:
        """
        Add every key of the snapshot C{keys} to C{target}, a chunk at a time.  A raw
        iterator with checksums, because it reports LevelDB's status at every step: a
        block that cannot be read stops the filling (and has the index rebuilt) instead
        of leaving a filter called full without that block's keys.
        """
        started = time.monotonic()
        try:
            keys.seek_to_first()
            while keys.valid():
                if stop.is_set():
                    return
                chunk = []
                while len(chunk) < FILL_CHUNK and keys.valid():
                    key = keys.key()
                    if key not in _METADATA:
                        chunk.append(key)
                    keys.next()
                target.add(chunk)
        except plyvel.CorruptionError as e:
            target.damage = why(e)
            self.log.error("the digest index {path} is damaged ({why}): it is rebuilt from the store at the next"
                           " lookup", path=str(self.path), why=why(e))
            return
        except Exception as e:
            target.failed = True
            self.log.error("filling the digest filter from {path} failed ({why}); lookups go to the index",
                           path=str(self.path), why=why(e))
            return
        finally:
            keys.close()
        target.full = True
        self.log.info("the digest filter holds {count} digests in {mib:.1f} MiB (filled in {seconds:.1f} s)",
                      count=target.count, mib=target.nbytes / 2**20, seconds=time.monotonic() - started)

    def _stop_filter(self) -> None:
        """Stop filling (before the index closes) and drop the filter."""
        self._filter = None
        filling, self._filling = self._filling, None
        if filling is not None:
            self._stop_filling.set()
            filling.join()

    def _to_filter(self, keys: list[bytes]) -> None:
        target = self._filter
        if target is None:
            return
        if target.failed:
            self._stop_filter()  # it will never be used: no need to keep it growing
            return
        try:
            target.add(keys)
        except Exception as e:  # a filter that lacks a key must not be used
            self.log.error("the digest filter could not take {count} digests ({why}); lookups go to the index"
                           " until the next start", count=len(keys), why=why(e))
            self._stop_filter()

    def _ask_filter(self, keys: Sequence[bytes]) -> list[bool] | None:
        """Which keys the index may hold, by the filter; None when it cannot say."""
        target = self._filter
        if target is None or not target.full:
            return None
        try:
            return target.might_contain(keys)
        except Exception as e:
            self.log.error("the digest filter could not be asked ({why}); lookups go to the index until the next"
                           " start", why=why(e))
            self._stop_filter()
            return None

    def wait_filter(self, timeout: float) -> bool:
        """Wait until the filter has been filled, or could not be; whether it is full."""
        filling, target = self._filling, self._filter
        if filling is not None:
            filling.join(timeout)
        return target is not None and target.full

    @property
    def state(self) -> dict[str, Any]:
        """Where the index stands, for tests and diagnostics."""
        return {"covered": self._covered[0], "durable": self._durable, "stored": self._stored}

    @property
    def filter_state(self) -> str:
        """C{full} (lookups of new alerts skip LevelDB), C{filling}, C{damaged}, C{failed} or C{none}."""
        target = self._filter
        if target is None:
            return "none"
        return ("full" if target.full else "damaged" if target.damage is not None else "failed" if target.failed
                else "filling")
