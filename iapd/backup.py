"""
C{iapctl backup}: a copy of an SQLite store and its body log that a manager can start on.

Since the bodies live in a log beside the database (L{iapd.bodylog}), a backup is two
files copied in an order: the database first, then as much of the log as the copy's
rows point at.  The log only grows and each body is on the disk before the row that
points at it commits, so a log copied after the database holds every body the copy
needs.  Done by hand, in the other order, the copy refers to bodies it lacks and the
manager refuses to start on it; this does it in the right order, while the manager
runs, and never leaves a half-made backup under the name asked for.

The database is copied with SQLite's online backup in one step: a read transaction,
so the copy is one committed state of the store and the manager keeps writing
meanwhile (WAL mode).  The digest index is not copied: a manager rebuilds it from the
file at start.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path
from typing import Any

import attr

from .bodylog import BodyDamaged, BodyLogError, BodyReader, last_body_end, log_path, sync_directory
from .digests import why
from .store import StoreError, open_reader

COPY_CHUNK = 1 << 20


@attr.s(frozen=True, auto_attribs=True)
class Backup:
    """What a backup holds: its two files, its alerts, and the bodies found damaged (with C{verify})."""

    database: Path
    bodies: Path
    alerts: int
    last_id: int | None
    log_octets: int
    damaged: tuple[str, ...] = ()
    verified: bool = False


def backup_store(store: Path, dest: Path, verify: bool = False) -> Backup:
    """
    Copy the SQLite store C{store} to C{dest} (a directory: a file of the store's name
    in it) and its body log to C{dest}'s log beside it; with C{verify}, read every
    body of the copy back against its SHA-256 and check the copy's database.

    Raises L{StoreError} with the reason when nothing was written (an existing file is
    never replaced), or when the check of a written backup could not be done.
    """
    try:
        dest = Path(os.path.abspath(dest))
        if dest.is_dir():
            dest = dest / store.name
        bodies_dest = log_path(dest)
        for path in (dest, bodies_dest):
            if os.path.lexists(path):
                raise StoreError(f"{path} already exists: a backup never replaces a file; name another")
        parent = bodies_dest.parent
        if not parent.is_dir():
            raise StoreError(f"cannot write a backup in {parent}: no such directory")
    except (OSError, RuntimeError) as e:  # RuntimeError: a symbolic link loop
        raise StoreError(f"cannot write a backup at {dest}: {getattr(e, 'strerror', None) or e}") from None
    tmp_db = parent / f".{dest.name}.partial"
    tmp_log = parent / f".{bodies_dest.name}.partial"
    made: list[Path] = []  # only what this backup made is removed if it fails
    try:
        alerts, last_id, needed = _copy_database(store, tmp_db, made)
        octets = _copy_log(log_path(store), tmp_log, needed, made)
        # the log first: a crash between the two leaves a log without its database,
        # which nothing reads, never a database without its log
        for tmp, final in ((tmp_log, bodies_dest), (tmp_db, dest)):
            _name(tmp, final)
            made.append(final)
            _unlink(tmp)
            made.remove(tmp)
        _sync_directory(parent)
    except BaseException:
        # what SQLite's copy left too, if it was cut short
        for path in [*made, *([Path(f"{tmp_db}-journal")] if tmp_db in made else [])]:
            try:
                os.unlink(path)
            except OSError:
                pass
        raise
    # the backup is whole from here on: what the check finds is reported, not undone
    try:
        damaged = _verify(dest, bodies_dest) if verify else ()
    except StoreError as e:
        raise StoreError(f"the backup is written ({dest} and {bodies_dest}) but could not be checked: {e}") from None
    except KeyboardInterrupt:
        raise StoreError(f"the backup is written ({dest} and {bodies_dest}); its check was interrupted") from None
    return Backup(dest, bodies_dest, alerts, last_id, octets, damaged, verify)


def _copy_database(store: Path, target: Path, made: list[Path]) -> tuple[int, int | None, int]:
    """Copy the database to C{target}, fsync'd; its alerts, last id, and the log octets its rows point at."""
    source = open_reader(store)
    try:
        os.close(_create(target, made))
        copy = sqlite3.connect(target)
        try:
            source.backup(copy)
            copy.execute("PRAGMA journal_mode=DELETE")
            columns = {row[1] for row in copy.execute("PRAGMA table_info(alerts)")}
            alerts, last_id = copy.execute("SELECT count(*), max(id) FROM alerts").fetchone()
            last = last_body_end(copy) if "body_at" in columns else None
            needed = last[1] if last is not None else 0
        finally:
            copy.close()
        _sync_file(target)
        return alerts, last_id, needed
    except (sqlite3.Error, OSError) as e:
        reason = getattr(e, "strerror", None) or why(e)
        raise StoreError(f"cannot copy the store {store} to {target}: {reason}") from None
    finally:
        source.close()


def _copy_log(source: Path, target: Path, needed: int, made: list[Path]) -> int:
    """The first C{needed} octets of the body log (what the copy's rows point at), fsync'd."""
    try:
        src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if needed:
            raise StoreError(f"the body log {source} is missing, and the store's rows point at {needed} octets"
                             " of it") from None
        src = None
    except OSError as e:
        raise StoreError(f"cannot read the body log {source}: {e.strerror or e}") from None
    try:
        fd = _create(target, made)
    except StoreError:
        if src is not None:
            os.close(src)
        raise
    try:
        at = 0
        while at < needed:
            assert src is not None
            chunk = os.pread(src, min(COPY_CHUNK, needed - at), at)
            if not chunk:
                raise StoreError(f"the body log {source} holds {at} octets, but the store's rows point at"
                                 f" {needed}: it is not this store's whole log (a manager would not start on"
                                 " this store either, and says how to go on)")
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
            at += len(chunk)
        os.fsync(fd)
    except OSError as e:
        raise StoreError(f"cannot copy the body log {source} to {target}: {e.strerror or e}") from None
    finally:
        os.close(fd)
        if src is not None:
            os.close(src)
    return needed


def _verify(database: Path, bodies: Path) -> tuple[str, ...]:
    """SQLite's integrity check of the copy, and every body read back against its row's SHA-256."""
    problems: list[str] = []
    try:
        db = open_reader(database)
    except StoreError as e:
        return (f"database: {e}",)
    checked = 0
    try:
        for (result,) in db.execute("PRAGMA integrity_check"):
            if result != "ok":
                problems.append(f"database: {result}")
        with BodyReader(bodies) as reader:
            rows: Any = db.execute("SELECT id, body, body_at, body_size, sha256 FROM alerts ORDER BY id")
            for row in rows:
                try:
                    body = reader.body(row["id"], row["body"], row["body_at"], row["body_size"], row["sha256"])
                    # a body an earlier version kept in its row is returned as it is: check it here
                    if row["body_at"] is None and hashlib.sha256(body).hexdigest() != row["sha256"]:
                        problems.append(f"alert {row['id']}: its body does not match its SHA-256")
                except BodyDamaged as e:
                    problems.append(str(e))
                except BodyLogError as e:
                    raise StoreError(str(e)) from None
                checked = row["id"]
    except sqlite3.Error as e:
        # pages so damaged that the rows cannot be read: what was found is the answer
        problems.append(f"database: {e} (bodies checked up to alert {checked})")
    finally:
        db.close()
    return tuple(problems)


def _create(path: Path, made: list[Path]) -> int:
    """A new file, which must not exist yet, noted in C{made}."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    except FileExistsError:
        raise StoreError(f"{path} exists: another backup is being written there, or one was cut short"
                         " (remove it if no backup is running)") from None
    except OSError as e:
        raise StoreError(f"cannot write {path}: {e.strerror or e}") from None
    made.append(path)
    return fd


def _name(tmp: Path, final: Path) -> None:
    """Give C{tmp} the name C{final}, which must still be free (a rename would replace it)."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise StoreError(f"{final} already exists: a backup never replaces a file; name another") from None
    except OSError as e:
        raise StoreError(f"cannot name the backup {final}: {e.strerror or e}") from None


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError as e:
        raise StoreError(f"cannot remove {path}: {e.strerror or e}") from None


def _sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_directory(path: Path) -> None:
    """The new names must survive a power loss as surely as the files' contents."""
    try:
        sync_directory(path)
    except OSError as e:
        raise StoreError(f"cannot flush the directory {path}: {e.strerror or e}") from None
