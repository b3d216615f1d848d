"""
The exactly-once check of an SQLite store: the digest of every alert it holds, kept in
a LevelDB directory beside the file (C{alerts.db-digests}).

Why not a UNIQUE (sensor, sha256) index in SQLite, as stores made by earlier versions have: a
SHA-256 is random, so each new alert lands on its own leaf of a B-tree, and every commit
wrote a 4 KiB page per alert to the WAL and again to the database at the checkpoint, two
thirds of the store's time (C{bench/store.py}).  LevelDB is a log-structured merge tree:
a new digest is appended to a log and merged later in sorted runs, a few hundred octets
written per alert, and looking up a digest that is not there, as nearly every lookup
is, is answered by a Bloom filter.

The SQLite file stays the record and the index only ever follows it.  The index is
written after the alerts' commit, without an fsync, together with the highest alert id
it covers (its watermark), in one atomic LevelDB batch; when the store opens, alerts
committed past the watermark (the manager died between the commit and the index write)
are added from the file.  A digest found in the index counts as a retransmission only
when the row it names is in the file with the same sensor and digest, so an index that
is stale, ahead of its file or damaged can never make the manager drop an alert; at
worst it is rebuilt from the file, which the log says.
"""

from __future__ import annotations

import secrets
import sqlite3
from pathlib import Path
from typing import Sequence

import plyvel
from twisted.logger import Logger

_WATERMARK = b"\x00watermark"
"""Highest alert id whose digest is in the index (sensor names never start with NUL)."""
_STORE = b"\x00store"
"""The token of the SQLite file the index was built from (its C{iapd_meta} row)."""

REBUILD_CHUNK = 10_000


class DigestIndexError(Exception):
    """The index cannot be opened or brought up to date; the message says why."""


def digest_key(sensor: str, sha256: str) -> bytes:
    """The index key of an alert: its sensor and the 32 octets of its digest."""
    return sensor.encode() + b"\x00" + bytes.fromhex(sha256)


def why(error: Exception) -> str:
    """An exception's message: plyvel's carry LevelDB's status as octets."""
    args = [a.decode(errors="replace") if isinstance(a, bytes) else str(a) for a in error.args]
    return "; ".join(args) or type(error).__name__


def _id(value: bytes | None) -> int:
    return int.from_bytes(value, "big") if value else 0


def _octets(alert_id: int) -> bytes:
    return alert_id.to_bytes(8, "big")


def store_token(db: sqlite3.Connection) -> str:
    """
    The random token naming this SQLite file, made on first use: an index built from
    another file (a store replaced by a copy from elsewhere) is told apart and rebuilt.
    """
    db.execute("INSERT OR IGNORE INTO iapd_meta (key, value) VALUES ('store', ?)", (secrets.token_hex(16),))
    return db.execute("SELECT value FROM iapd_meta WHERE key = 'store'").fetchone()[0]


class DigestIndex:
    """
    Which (sensor, digest) pairs an SQLite store holds, and under which alert id.

    Every method runs on the store's own thread, with that thread's connection.
    """

    log = Logger()

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: plyvel.DB | None = None
        self._covered = 0  # the watermark: ids up to this one are in the index
        self._stored = 0  # the highest id committed to the file, as far as we know

    def open(self, db: sqlite3.Connection) -> None:
        """Open the index and bring it up to date with the file; rebuild it if it does not match."""
        token = store_token(db)
        stored = db.execute("SELECT coalesce(max(id), 0) FROM alerts").fetchone()[0]
        try:
            self._db = self._open_leveldb()
        except plyvel.CorruptionError as e:
            self._rebuild(db, f"the index is damaged ({why(e)})")
            return
        found = self._db.get(_STORE)
        covered = _id(self._db.get(_WATERMARK))
        if found is None:
            if stored:
                self._rebuild(db, "the store has no index yet (made by an earlier version, or the index was removed)")
                return
            self._db.put(_STORE, token.encode(), sync=True)
        elif found != token.encode():
            self._rebuild(db, "the index was built from another store file")
            return
        elif covered > stored:
            self._rebuild(db, f"the index covers alerts up to id {covered} but the store ends at {stored}"
                              " (was the store restored from an older copy?)")
            return
        self._covered, self._stored = covered, stored
        if covered < stored:
            self.log.info("adding {count} alerts committed before the last stop to the digest index {path}",
                          count=stored - covered, path=str(self.path))
            self._catch_up(db)

    def _open_leveldb(self) -> plyvel.DB:
        try:
            # paranoid_checks: a log damaged in the middle (a power cut with writes
            # reordered) fails the open and the index is rebuilt, instead of LevelDB
            # skipping the damaged batch and keeping a watermark that covers it
            return plyvel.DB(str(self.path), create_if_missing=True, paranoid_checks=True, bloom_filter_bits=10,
                             write_buffer_size=8 << 20, lru_cache_size=8 << 20)
        except plyvel.IOError as e:
            if why(e).startswith("IO error: lock "):
                raise DigestIndexError(
                    f"the digest index {self.path} is in use by another process"
                    " (is another manager running with this store?)"
                ) from None
            raise DigestIndexError(f"cannot open the digest index {self.path}: {why(e)}") from None

    def _rebuild(self, db: sqlite3.Connection, why: str) -> None:
        count = db.execute("SELECT count(*) FROM alerts").fetchone()[0]
        self.log.warn("rebuilding the digest index {path} from the {count} alerts in the store: {why}",
                      path=str(self.path), count=count, why=why)
        if self._db is not None:
            self._db.close()
            self._db = None
        try:
            plyvel.destroy_db(str(self.path))
        except plyvel.Error as e:
            raise DigestIndexError(f"cannot remove the digest index {self.path} to rebuild it: {why(e)}") from None
        self._db = self._open_leveldb()
        self._covered = 0
        self._stored = db.execute("SELECT coalesce(max(id), 0) FROM alerts").fetchone()[0]
        self._catch_up(db)
        # the token last: an index whose rebuild was cut short is rebuilt again
        self._db.put(_STORE, store_token(db).encode(), sync=True)

    def _catch_up(self, db: sqlite3.Connection) -> None:
        """Add the alerts of the file past the watermark, in order, a chunk per batch."""
        assert self._db is not None
        cursor = db.execute("SELECT id, sensor, sha256 FROM alerts WHERE id > ? ORDER BY id", (self._covered,))
        while rows := cursor.fetchmany(REBUILD_CHUNK):
            with self._db.write_batch() as batch:
                for alert_id, sensor, sha256 in rows:
                    batch.put(digest_key(sensor, sha256), _octets(alert_id))
                batch.put(_WATERMARK, _octets(rows[-1][0]))
            self._covered = rows[-1][0]
        self._stored = max(self._stored, self._covered)

    def stored_ids(self, db: sqlite3.Connection, keys: Sequence[bytes]) -> list[int | None]:
        """
        For each key, the id of the stored alert it names, or None when it is new.

        A hit is confirmed against the file (one lookup by id, only for hits, which
        retransmissions are): the index can say "new" wrongly only if it is behind,
        which is caught up first, and never "stored" wrongly.
        """
        if self._db is None:
            raise DigestIndexError(f"the digest index {self.path} is not open")
        if self._covered < self._stored:
            # the last index write failed (logged): the file is the record, catch up
            self._catch_up(db)
        get = self._db.get
        found = [_id(get(key)) or None for key in keys]
        hits = {i for i in found if i is not None}
        if not hits:
            return found
        rows = {}
        for start in range(0, len(hits), 500):
            chunk = sorted(hits)[start:start + 500]
            rows.update(
                (alert_id, digest_key(sensor, sha256))
                for alert_id, sensor, sha256 in db.execute(
                    f"SELECT id, sensor, sha256 FROM alerts WHERE id IN ({','.join('?' * len(chunk))})", chunk
                )
            )
        return [i if i is not None and rows.get(i) == key else None for i, key in zip(found, keys)]

    def committed(self, entries: Sequence[tuple[bytes, int]], last_id: int) -> None:
        """
        Record alerts the file has just committed, up to id C{last_id}.

        Not synced: after a crash the watermark tells what to add from the file.  A
        failure is logged, not raised, because the alerts are committed and must be
        answered 200; the next lookup catches up from the file.
        """
        self._stored = max(self._stored, last_id)
        if self._db is None:
            return
        try:
            with self._db.write_batch() as batch:
                for key, alert_id in entries:
                    batch.put(key, _octets(alert_id))
                batch.put(_WATERMARK, _octets(last_id))
        except Exception as e:
            self.log.error("writing the digest index {path} failed ({why}); it will be caught up from the store",
                           path=str(self.path), why=why(e))
            return
        self._covered = last_id

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
