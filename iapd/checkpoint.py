"""
WAL checkpoints of an SQLite store, copied on a thread of their own.

A checkpoint copies what the write-ahead log holds into the database file and fsyncs
it.  Left to SQLite (C{wal_autocheckpoint}), the commit that pushes the log past its
limit does that copy itself, on the store's thread, while the next batch waits: with
4 KiB alerts, about every other commit copied 64 MiB before the store could go on.
Here a second connection, on its own thread, copies the log (once 1 MiB has been
written since the last copy: under load, after every commit) while the
store's thread is already inserting and committing the next batch, so the disk and
the processor work at the same time.

That alone is not enough.  SQLite starts the log over only when, as a write begins,
every frame in it has been copied; under a steady stream of commits the background
copy is always one commit behind, so the log would never start over and would grow
without bound.  So once a background copy has found L{WalCheckpointer.limit} pages in
the log, or the log's file has grown to twice that, the store's thread waits for the
copy under way and copies what is left itself, and its next write starts the log over.
So the log may reach about twice the limit and a commit, where SQLite's own
checkpoints would stop at the limit and a commit.

Checkpoints change nothing about durability: every commit has fsync'd the log before
its alerts are answered.  If the background copy fails, the writer goes back to
SQLite's own checkpoints, as before.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

from twisted.logger import Logger

from .digests import why


FRAME = 4096 + 24
"""A WAL frame: a page (SQLite's default size, which iapd keeps) and its header."""


class WalCheckpointer:
    """
    Copies the WAL of the SQLite file at C{path} into the database in the background.

    L{start}, L{committed} and L{close} are called on the store's thread (L{committed}
    after each write transaction, with the store's own connection); the background
    copies run on the checkpoint thread.
    """

    log = Logger()

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.limit = limit
        """Pages in the log past which the store's thread finishes the copy itself."""
        self._wal = Path(str(path) + "-wal")
        self.passes = 0
        """Background copies done (for tests and curiosity)."""
        self.finished = 0
        """Copies the store's thread finished itself, past the limit."""
        self._frames = 0  # pages in the log at the last copy
        self._written = 0  # octets committed since a copy was last asked for
        self._lock = threading.Lock()  # one copy at a time, whichever thread runs it
        self._wake = threading.Event()
        self._stopping = False
        self._failed: str | None = None
        self._fell_back = False
        self._db: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Open the second connection and start the thread; raises C{sqlite3.Error}."""
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        try:
            # the copy fsyncs the database file after writing it, as SQLite's own does
            db.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error:
            db.close()
            raise
        self._db = db
        self._thread = threading.Thread(target=self._run, name="iapd-checkpoint", daemon=True)
        self._thread.start()

    def committed(self, db: sqlite3.Connection, written: int) -> None:
        """
        After a write transaction on the store's connection C{db}, which wrote about
        C{written} octets: have the log copied when enough has gathered.
        """
        if self._failed is not None:
            if not self._fell_back:
                try:
                    db.execute(f"PRAGMA wal_autocheckpoint={self.limit}")
                except sqlite3.Error as e:  # tried again after the next commit
                    self.log.error("checkpoints of {path} cannot be handed back to SQLite: {why}",
                                   path=str(self.path), why=why(e))
                    return
                self._fell_back = True
                self.log.error("background checkpoints of {path} failed ({why}); the store's thread"
                               " checkpoints from now on", path=str(self.path), why=self._failed)
            return
        try:
            size = os.stat(self._wal).st_size
        except OSError:
            size = 0
        # The log as the last copy found it; or its file, should copies be slow to come
        # round: a log that is started over stays at its size, so a file of twice the
        # limit means the log has not been started over for that long.
        if self._frames < self.limit and size <= 2 * self.limit * FRAME:
            # A copy of its own for every commit would cost a slow trickle of alerts
            # two more fsyncs each (and copy a page written by many commits many
            # times): ask for one once a sixty-fourth of the limit (1 MiB) has been
            # written, which under load every commit does.
            self._written += written
            if self._written >= self.limit * FRAME // 64:
                self._written = 0
                self._wake.set()
            return
        try:
            with self._lock:  # waits for a copy under way: it copies most of what is left
                busy, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                self.finished += 1
                # All copied: the next write starts the log over.  Otherwise (another
                # process checkpointing, busy with -1 frames; or a reader still reading
                # old pages) the next commit tries again, as SQLite's own would.
                if not busy and 0 <= frames == copied:
                    self._frames = 0
        except sqlite3.Error as e:
            # the transaction is committed and must be answered as such; the next
            # commit tries again
            self.log.error("checkpoint of {path} failed: {why}", path=str(self.path), why=why(e))

    def _run(self) -> None:
        assert self._db is not None
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            try:
                with self._lock:
                    busy, frames, copied = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if frames >= 0:  # -1: another process was checkpointing
                        self._frames = frames
            except Exception as e:
                self._failed = why(e)
                return
            self.passes += 1

    def close(self) -> None:
        """Stop the thread and close its connection (before the store's own, which
        then makes the last checkpoint and removes the log)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._db is not None:
            self._db.close()
            self._db = None
