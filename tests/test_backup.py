"""
C{iapd.backup} in process, against a store a writer commits to meanwhile: the order of
the copies (database, then as much log as its rows need) with commits landing at the
worst moments, stores made by an earlier version, and damage only C{--verify} finds.
The command as users run it is in test_commands.py.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Any, Iterator

import pytest

from iapd import backup
from iapd.bodylog import log_path
from iapd.store import AlertRecord, Row, SQLiteBackend, StoreError, read_alerts

from .test_digests import OLD_SCHEMA


def batch(tag: str, count: int) -> list[Row]:
    return [Row(AlertRecord(sensor="s1.test", content_type="application/idmef+xml",
                            body=f"{tag} alert {i} ".encode() * (i + 1),
                            received="2026-11-24T10:00:00.000000+00:00"), None, pending=True)
            for i in range(count)]


def bodies(rows: list[Row]) -> list[bytes]:
    return [row.record.body for row in rows]


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[SQLiteBackend]:
    """The manager's own store code, open on a store, as a running manager holds it."""
    store = SQLiteBackend(tmp_path / "alerts.db")
    store.open()
    try:
        yield store
    finally:
        store.close()


class Interleaved:
    """The source connection of a backup, on which a commit lands just before the copy starts."""

    def __init__(self, db: sqlite3.Connection, before: Any) -> None:
        self._db, self._before = db, before

    def backup(self, target: sqlite3.Connection) -> None:
        self._before()
        self._db.backup(target)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def test_commits_during_the_backup_are_in_neither_file_or_in_both(writer: SQLiteBackend, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A commit just before the database is copied is in the copy, bodies and all; one
    after it and before the log is copied is in neither: the copy's log ends where its
    last row's body does.  Sizing the log before copying the database fails here.
    """
    a, b, c = batch("a", 20), batch("b", 15), batch("c", 10)
    writer.commit(a, {})
    real_open, real_copy_log = backup.open_reader, backup._copy_log
    sources = []

    def open_reader(path: Path) -> Any:
        db = real_open(path)
        if sources:  # the copy, for --verify
            return db
        sources.append(path)
        return Interleaved(db, lambda: writer.commit(b, {}))

    def copy_log(*args: Any) -> int:
        writer.commit(c, {})
        return real_copy_log(*args)

    monkeypatch.setattr(backup, "open_reader", open_reader)
    monkeypatch.setattr(backup, "_copy_log", copy_log)
    done = backup.backup_store(tmp_path / "alerts.db", tmp_path / "copy.db", verify=True)

    assert (done.alerts, done.last_id, done.damaged) == (35, 35, ())
    expected = bodies(a) + bodies(b)
    assert log_path(tmp_path / "copy.db").read_bytes() == b"".join(expected) == \
        log_path(tmp_path / "alerts.db").read_bytes()[:done.log_octets]
    assert done.log_octets < log_path(tmp_path / "alerts.db").stat().st_size  # c's bodies are not in it
    assert [x["body"] for x in read_alerts(tmp_path / "copy.db", with_body=True)] == expected
    # a manager opens the copy (its start check compares the log with the rows) and goes on
    restored = SQLiteBackend(tmp_path / "copy.db")
    restored.open()
    try:
        assert restored.commit(c + a[:1], {}) == [True] * 10 + [False]
    finally:
        restored.close()
    assert [x["body"] for x in read_alerts(tmp_path / "copy.db", with_body=True)] == expected + bodies(c)


def test_an_earlier_versions_store(tmp_path: Path) -> None:
    """Bodies in their rows, no body log: an empty log beside the copy; --verify checks the rows' bodies."""
    store = tmp_path / "old.db"
    with sqlite3.connect(store) as db:
        db.executescript(OLD_SCHEMA)
        for i, body in enumerate((b"old one", b"old two", b"old three")):
            db.execute("INSERT INTO alerts (sensor, received, content_type, sha256, via, peer, body)"
                       " VALUES ('s1.test', '2026-11-24T10:00:00+00:00', 'text/plain', ?, '[]', '', ?)",
                       (hashlib.sha256(body).hexdigest(), body))
        db.execute("UPDATE alerts SET body = ? WHERE id = 2", (b"old TWO",))
    before = store.read_bytes()
    done = backup.backup_store(store, tmp_path / "copy.db", verify=True)
    assert store.read_bytes() == before and not log_path(store).exists()  # the store is only read
    assert (done.alerts, done.log_octets) == (3, 0) and log_path(tmp_path / "copy.db").read_bytes() == b""
    assert done.damaged == ("alert 2: its body does not match its SHA-256",)
    assert [x["body"] for x in read_alerts(tmp_path / "copy.db", with_body=True)] == \
        [b"old one", b"old TWO", b"old three"]


def test_a_damaged_database_page_is_reported(writer: SQLiteBackend, tmp_path: Path) -> None:
    writer.commit(batch("a", 300), {})
    writer.close()
    store = tmp_path / "alerts.db"
    with sqlite3.connect(store) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page = db.execute("PRAGMA page_size").fetchone()[0]
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'alerts'").fetchone()[0]
    with open(store, "r+b") as f:
        # a leaf of the alerts table: past its root, zeroed in the middle
        f.seek((root + 1) * page + 100)
        f.write(b"\xff" * 64)
    done = backup.backup_store(store, tmp_path / "copy.db", verify=True)
    assert done.damaged and all(problem.startswith("database: ") for problem in done.damaged), done.damaged


@pytest.mark.parametrize("where", ["unsearchable", "loop", "long name"])
def test_a_destination_that_cannot_be_used_is_an_error_not_a_traceback(writer: SQLiteBackend, tmp_path: Path,
                                                                        where: str) -> None:
    writer.commit(batch("a", 3), {})
    if where == "unsearchable":
        dest = tmp_path / "no-such-dir" / "deeper" / "copy.db"
        (tmp_path / "no-such-dir").write_text("a file, not a directory")
        expected = "cannot write a backup"
    elif where == "loop":
        (tmp_path / "x").symlink_to(tmp_path / "y")
        (tmp_path / "y").symlink_to(tmp_path / "x")
        dest = tmp_path / "x"
        expected = "Symlink loop"
    else:
        dest = tmp_path / ("n" * 300) / "copy.db"
        expected = "File name too long"
    with pytest.raises(StoreError, match=expected):
        backup.backup_store(tmp_path / "alerts.db", dest)
    assert not list(tmp_path.glob(".*partial*"))


@pytest.fixture
def manager_yaml(writer: SQLiteBackend, tmp_path: Path) -> Path:
    """A manager configuration whose store is the writer's."""
    from .certs import make_test_pki

    pki = make_test_pki(tmp_path / "pki")
    config = tmp_path / "manager.yaml"
    config.write_text(
        'identity: manager.test\nlisten: ["tcp:5603:interface=127.0.0.1"]\n'
        f"tls: {{certificate: {pki.manager[0]}, key: {pki.manager[1]}, ca: {pki.ca}}}\n"
        'store: "sqlite:///alerts.db"\n'
    )
    return config


def interrupt(*args: Any) -> Any:
    raise KeyboardInterrupt  # what Python raises in the main thread on Ctrl-C


def test_ctrl_c_during_the_copy_leaves_nothing(writer: SQLiteBackend, manager_yaml: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    from iapd.ctl import main

    writer.commit(batch("a", 5), {})
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(backup, "_copy_log", interrupt)  # after the database copy was made
    assert main(["-c", str(manager_yaml), "backup", str(out / "copy.db")]) == 130
    assert capsys.readouterr().err == "iapctl: interrupted: no backup written\n"
    assert list(out.iterdir()) == []


def test_ctrl_c_during_the_check_keeps_the_backup(writer: SQLiteBackend, manager_yaml: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    from iapd.ctl import main

    writer.commit(batch("a", 5), {})
    monkeypatch.setattr(backup, "_verify", interrupt)
    assert main(["-c", str(manager_yaml), "backup", "--verify", str(tmp_path / "copy.db")]) == 2
    copy = tmp_path / "copy.db"
    assert capsys.readouterr().err == (f"iapctl: error: the backup is written ({copy} and {copy}-bodies);"
                                       " its check was interrupted\n")
    assert [x["body"] for x in read_alerts(copy, with_body=True)] == bodies(batch("a", 5))
