"""
Alert bodies in an append-only file beside the SQLite store (C{alerts.db-bodies}).

SQLite in WAL mode writes every page twice, once to the log and once more when the log
is copied into the file, and a 4 KiB body takes a page of its own and part of an
overflow page: some 9.2 KiB reached the disk per 4 KiB alert, and at 4 KiB the disk and
the store's thread set the manager's pace.  Appended to a file of their own, bodies are
written once; the row keeps where the body starts and how long it is (4.6 KiB written
per 4 KiB alert), and the summaries written after the commit rewrite a small row, not
a row that holds its body.

Order, which is what makes a 200 safe: a batch's bodies are appended, the row of each
is inserted, then the file is flushed to the disk (C{fdatasync}), and only then does
the transaction commit.  A crash in between leaves octets at the end of the file that
no row refers to; they are never read, and the next batch is appended after them.
Only the store's thread appends, and the digest index's lock keeps a second manager
off the same store.

Readers check each body they read against the SHA-256 its row holds, so a body damaged
on the disk is reported, never returned.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path
from typing import Sequence


class BodyLogError(Exception):
    """A body cannot be appended or read back intact; the message says which and why."""


class BodyDamaged(BodyLogError):
    """What the log holds where a row points is not that row's body (cut short, or changed)."""


def log_path(store: Path) -> Path:
    """The body log of the SQLite file C{store}: beside it, named after it."""
    real = store.resolve()
    return real.with_name(real.name + "-bodies")


def sync_directory(path: Path) -> None:
    """Flush a directory's entries, so that a name made in it survives a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def last_body_end(db: sqlite3.Connection) -> tuple[int, int] | None:
    """
    The last alert whose body is in the log, and where that body ends: how long the
    log must be for the database's rows.  Bodies are appended in id order, so the last
    such row ends last (only a store migrated from an earlier version with no new rows
    yet makes this a scan of the table).
    """
    row = db.execute(
        "SELECT id, body_at + body_size FROM alerts WHERE body_at IS NOT NULL ORDER BY id DESC LIMIT 1"
    ).fetchone()
    return (row[0], row[1]) if row is not None else None


class BodyLog:
    """The writing end, owned by the store's thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def open(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
            # the file's name must survive a power loss as surely as what is in it: on
            # every open, for a run killed between creating the file and this
            sync_directory(self.path.parent)
        except OSError as e:
            self.close()
            raise BodyLogError(f"cannot open the body log {self.path}: {e.strerror or e}") from None

    def append(self, bodies: Sequence[bytes]) -> list[int]:
        """
        Append C{bodies} (not yet flushed: L{sync} does that) and return the offset of
        each.  On failure the octets already appended stay, unreferenced.
        """
        if self._fd is None:
            raise BodyLogError(f"the body log {self.path} is not open")
        try:
            # the true end, past whatever a failed or crashed append left there
            at = os.lseek(self._fd, 0, os.SEEK_END)
            offsets = []
            for body in bodies:
                offsets.append(at)
                at += len(body)
            data = memoryview(b"".join(bodies))
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as e:
            raise BodyLogError(f"cannot append to the body log {self.path}: {e.strerror or e}") from None
        return offsets

    def sync(self) -> None:
        """Flush what was appended to the disk: called before the commit that refers to it."""
        if self._fd is None:
            raise BodyLogError(f"the body log {self.path} is not open")
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            raise BodyLogError(f"cannot flush the body log {self.path}: {e.strerror or e}") from None

    def size(self) -> int:
        """The log's length in octets."""
        if self._fd is None:
            raise BodyLogError(f"the body log {self.path} is not open")
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class BodyReader:
    """The reading end: opened when a row first needs it, for as long as a read lasts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> "BodyReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def body(self, alert_id: int, in_row: bytes, at: int | None, size: int | None, sha256: str) -> bytes:
        """
        The body of alert C{alert_id}: C{in_row} for a row written before the body log
        (C{at} is NULL there), else C{size} octets of the log from C{at}, checked
        against the row's digest.
        """
        if at is None:
            return bytes(in_row)
        if size is None or size < 0 or at < 0:
            raise BodyDamaged(f"alert {alert_id}: its row holds no valid place in the body log (at {at}, size {size})")
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            body = os.pread(self._fd, size, at)
        except OSError as e:
            raise BodyLogError(f"alert {alert_id}: cannot read its body from {self.path}: {e.strerror or e}") from None
        if len(body) != size:
            raise BodyDamaged(
                f"alert {alert_id}: the body log {self.path} ends before its body does"
                f" ({len(body)} of {size} octets at {at})"
            )
        if hashlib.sha256(body).hexdigest() != sha256:
            raise BodyDamaged(f"alert {alert_id}: its body in {self.path} (at {at}) does not match its SHA-256")
        return body

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
