"""
The SQLite store's digest index (iapd.digests): exactly-once must hold whatever state
the index is left in.  The SQLite file is the record; the index may be behind (a crash
between the commit and the index write), ahead (the file restored from an older copy),
built from another file, damaged or missing, and in every case a retransmission is
still not stored twice and no new alert is taken for a retransmission.

Real SQLite files and real LevelDB directories throughout; the crash test kills a real
process with SIGKILL while it commits.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable

import plyvel
import pytest
from twisted.logger import globalLogPublisher

from iapd.digests import digest_key
from iapd.store import SCHEMA, AlertRecord, Row, SQLiteBackend, StoreError, body_digest, read_alerts

SENSORS = ("a.test", "b.test")

OLD_SCHEMA = SCHEMA.replace("    idmef TEXT,\n    body_at INTEGER,\n    body_size INTEGER\n);",
                            "    idmef TEXT,\n    UNIQUE (sensor, sha256)\n);", 1)
"""The alerts table as earlier versions made it: with its UNIQUE (sensor, sha256), bodies in their rows."""
assert OLD_SCHEMA != SCHEMA


def rows(start: int, count: int) -> list[Row]:
    """C{count} distinct alerts, numbered from C{start}, from two sensors."""
    return [
        Row(AlertRecord(sensor=SENSORS[i % 2], content_type="application/idmef+xml", body=b"alert %d" % i,
                        received="2026-11-23T10:00:00.000000+00:00"), None, pending=True)
        for i in range(start, start + count)
    ]


def stored(path: Path) -> tuple[int, int]:
    """Rows in the file, and distinct (sensor, digest) pairs among them."""
    with sqlite3.connect(path) as db:
        return db.execute("SELECT count(*), count(DISTINCT sensor || ' ' || sha256) FROM alerts").fetchone()


def commit(path: Path, batch: list[Row]) -> list[bool]:
    backend = SQLiteBackend(path)
    backend.open()
    try:
        return backend.commit(batch, {})
    finally:
        backend.close()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "alerts.db"


@pytest.fixture
def logged() -> Any:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def text(events: list[dict[str, Any]]) -> str:
    from twisted.logger import formatEvent

    return "\n".join(formatEvent(e) for e in events)


def test_the_index_lives_beside_the_file_and_answers_across_restarts(path: Path) -> None:
    assert commit(path, rows(0, 100)) == [True] * 100
    assert (path.parent / "alerts.db-digests").is_dir()
    assert commit(path, rows(50, 100)) == [False] * 50 + [True] * 50
    assert stored(path) == (150, 150)


def test_equal_alerts_in_one_batch_are_stored_once(path: Path) -> None:
    batch = rows(0, 3) + rows(1, 1) + rows(0, 1)
    assert commit(path, batch) == [True, True, True, False, False]
    assert stored(path) == (3, 3)


def crash(backend: SQLiteBackend) -> None:
    """Let go of a backend as a killed process would: no clean close of its index."""
    backend.digests._close_leveldb()
    assert backend._db is not None
    backend._db.close()
    backend._db = None


def test_alerts_committed_past_the_watermark_are_caught_up(path: Path, logged: Any) -> None:
    """What a crash between the commit and the index write leaves: rows the index lacks."""
    commit(path, rows(0, 10))
    backend = SQLiteBackend(path)
    backend.open()
    db = backend._db
    assert db is not None
    # the second batch's commit, without the index write that would have followed it
    db.execute("BEGIN IMMEDIATE")
    backend._insert(db, rows(10, 10))
    db.execute("COMMIT")
    crash(backend)
    assert commit(path, rows(0, 25)) == [False] * 20 + [True] * 5
    assert stored(path) == (25, 25)
    assert "the store was not closed cleanly: adding the 10 alerts after id 10 to the digest index" in text(logged)


def test_after_a_crash_only_the_durable_watermark_is_trusted(path: Path, logged: Any, monkeypatch: Any) -> None:
    """A power cut may lose the unsynced end of LevelDB's log, or a piece of it, below a
    watermark that survived: after an unclean stop everything past the last durable
    watermark is added from the file again."""
    monkeypatch.setattr("iapd.digests.CHECKPOINT_EVERY", 100)
    backend = SQLiteBackend(path)
    backend.open()
    assert backend.commit(rows(0, 150), {}) == [True] * 150
    assert backend.commit(rows(150, 30), {}) == [True] * 30
    assert backend.digests.state == {"covered": 180, "durable": 150, "stored": 180}
    ldb = backend.digests._db
    assert ldb is not None
    for row in rows(150, 30):  # what a lost piece of the log would leave: a hole below the watermark
        ldb.delete(digest_key(row.record.sensor, row.record.sha256))
    crash(backend)
    assert commit(path, rows(140, 50)) == [False] * 40 + [True] * 10
    assert stored(path) == (190, 190)
    assert "not closed cleanly: adding the 30 alerts after id 150" in text(logged)


def test_a_clean_close_is_trusted_and_alerts_stored_without_the_index_are_added(path: Path, logged: Any) -> None:
    """Alerts an earlier version stored into the file after a clean close (a downgrade
    and back) are added to the index at the next open."""
    commit(path, rows(0, 10))
    with sqlite3.connect(path) as db:
        for row in rows(10, 5):
            r = row.record
            db.execute("INSERT INTO alerts (sensor, received, content_type, sha256, via, body) VALUES (?, ?, ?, ?, '[]', ?)",
                       (r.sensor, r.received, r.content_type, r.sha256, r.body))
    assert commit(path, rows(0, 16)) == [False] * 15 + [True]
    assert stored(path) == (16, 16)
    assert "adding the 5 alerts after id 10 to the digest index" in text(logged)
    assert "stored without it (by an earlier version?)" in text(logged)
    assert "not closed cleanly" not in text(logged) and "rebuilding" not in text(logged)


def test_a_failed_index_write_is_caught_up_before_the_next_lookup(path: Path, logged: Any) -> None:
    """The alerts are committed when the index write fails: that is logged, not raised
    (they must be answered 200), and the next lookup adds them from the file."""
    backend = SQLiteBackend(path)
    backend.open()
    try:
        db, index = backend._db, backend.digests
        assert db is not None and index._db is not None
        db.execute("BEGIN IMMEDIATE")
        ids = backend._insert(db, rows(0, 10))
        db.execute("COMMIT")
        index._db.close()  # every use of it fails from now on
        index.committed([(digest_key(r.record.sensor, r.record.sha256), i) for r, i in zip(rows(0, 10), ids)])
        assert "writing the digest index" in text(logged) and "it will be caught up from the store" in text(logged)
        with pytest.raises(StoreError, match="cannot read the digest index .*alerts.db-digests: Database is closed"):
            backend.commit(rows(10, 1), {})  # nothing committed: answered 503
        index._db = index._open_leveldb()
        assert backend.commit(rows(5, 10), {}) == [False] * 5 + [True] * 5
    finally:
        backend.close()
    assert stored(path) == (15, 15)


def test_an_index_ahead_of_its_file_is_rebuilt_and_loses_nothing(path: Path, tmp_path: Path, logged: Any) -> None:
    """The file restored from an older copy: the index knows alerts the file no longer has."""
    commit(path, rows(0, 10))
    shutil.copy(path, tmp_path / "backup.db")
    commit(path, rows(10, 10))
    shutil.copy(tmp_path / "backup.db", path)
    # a retransmission of an alert the restored file lacks must be stored, not dropped
    assert commit(path, rows(5, 15)) == [False] * 5 + [True] * 10
    assert stored(path) == (20, 20)
    assert "the index covers alerts up to id 20 but the store ends at 10" in text(logged)


def test_an_index_built_from_another_file_is_rebuilt(path: Path, tmp_path: Path, logged: Any) -> None:
    other = tmp_path / "other" / "alerts.db"
    commit(other, rows(100, 30))
    commit(path, rows(0, 10))
    shutil.copy(other, path)  # another store's file, with more alerts than the index covers,
    shutil.copy(other.with_name("alerts.db-bodies"), path.with_name("alerts.db-bodies"))  # and its body log
    assert commit(path, rows(100, 30) + rows(0, 1)) == [False] * 30 + [True]
    assert stored(path) == (31, 31)
    assert "the index was built from another store file" in text(logged)


def test_a_file_replaced_by_a_copy_that_went_its_own_way_is_reindexed(path: Path, tmp_path: Path, logged: Any) -> None:
    """A standby ran on a copy and stored other alerts under the same ids; its file, now
    longer than the index's watermark, is copied back."""
    commit(path, rows(0, 10))
    standby = tmp_path / "standby" / "alerts.db"
    standby.parent.mkdir()
    for copy in (standby, standby.with_name("alerts.db-bodies")):  # the file and its body log
        shutil.copy(path.with_name(copy.name), copy)
    commit(path, rows(10, 10))  # ids 11-20 here
    commit(standby, rows(100, 15))  # ids 11-25 there, other alerts
    for copy in (path, path.with_name("alerts.db-bodies")):
        shutil.copy(standby.with_name(copy.name), copy)
    assert commit(path, rows(100, 15) + rows(10, 1)) == [False] * 15 + [True]
    assert stored(path) == (26, 26)
    assert "the alert with id 20 in the store is not the one the index has" in text(logged)


def test_an_old_stores_unique_constraint_catches_what_the_index_lacks(path: Path, logged: Any) -> None:
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
    backend = SQLiteBackend(path)
    backend.open()
    try:
        assert backend.commit(rows(0, 5), {}) == [True] * 5
        ldb = backend.digests._db
        assert ldb is not None
        lost = rows(2, 1)[0].record
        ldb.delete(digest_key(lost.sensor, lost.sha256))
        assert backend.commit(rows(0, 6), {}) == [False] * 5 + [True]
    finally:
        backend.close()
    assert stored(path) == (6, 6)
    assert "UNIQUE (sensor, sha256) constraint found an alert from a.test" in text(logged)


def test_a_row_the_insert_ignores_for_another_reason_is_an_error_not_a_duplicate(path: Path) -> None:
    """Answering such an alert 200 as a retransmission would lose it: it is a 503."""
    commit(path, rows(0, 1))
    with sqlite3.connect(path) as db:
        db.execute(f"CREATE TRIGGER refuse BEFORE INSERT ON alerts WHEN NEW.sha256 = '{body_digest(b'alert 7')}'"
                   " BEGIN SELECT RAISE(IGNORE); END")
    with pytest.raises(StoreError, match=r"an alert from b.test \(sha256 [0-9a-f]{64}\) could not be inserted"):
        commit(path, rows(6, 2))
    assert stored(path) == (1, 1)  # the batch is rolled back whole
    with sqlite3.connect(path) as db:
        db.execute("DROP TRIGGER refuse")
    assert commit(path, rows(6, 2)) == [True, True]


def test_a_damaged_entry_cannot_make_a_new_alert_a_retransmission(path: Path) -> None:
    """An index entry naming a row that holds another alert: the row decides."""
    commit(path, rows(0, 3))
    ldb = plyvel.DB(str(path.parent / "alerts.db-digests"))
    new = rows(7, 1)[0].record
    ldb.put(digest_key(new.sensor, new.sha256), (1).to_bytes(8, "big"))
    ldb.close()
    assert commit(path, rows(7, 1)) == [True]
    assert stored(path) == (4, 4)


@pytest.mark.parametrize("damage", ["CURRENT", "MANIFEST", "log", "table"])
def test_a_damaged_index_is_rebuilt(path: Path, logged: Any, damage: str) -> None:
    commit(path, rows(0, 50))
    index = path.parent / "alerts.db-digests"
    name = {"CURRENT": "CURRENT", "MANIFEST": "MANIFEST-*", "log": "*.log", "table": "*.ldb"}[damage]
    assert list(index.glob(name)), f"no {name} in {sorted(p.name for p in index.iterdir())}"
    for victim in index.glob(name):
        data = bytearray(victim.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 16] = b"\xff" * 16 if len(data) > 32 else b"garbage"
        victim.write_bytes(bytes(data))
    assert commit(path, rows(25, 50)) == [False] * 25 + [True] * 25
    assert stored(path) == (75, 75)
    assert "rebuilding the digest index" in text(logged)


def damage_tables(path: Path, span: Callable[[int], tuple[int, int]], larger_than: int) -> None:
    """Overwrite the octets C{span(size)} (start, end) of every table of the index, as a
    failing disk would, while no manager runs."""
    tables = list((path.parent / "alerts.db-digests").glob("*.ldb"))
    assert tables
    for table in tables:
        size = table.stat().st_size
        assert size > larger_than
        start, end = span(size)
        with table.open("r+b") as f:
            f.seek(start)
            f.write(b"\x5a" * (end - start))


def test_damaged_table_blocks_are_found_and_the_index_rebuilt(path: Path, logged: Any) -> None:
    """Blocks of the index's tables damaged in place, as a failing disk would, while no
    manager runs: the next start (or the first lookup that meets the damage) rebuilds
    the index from the file, and retransmissions are still recognised."""
    commit(path, rows(0, 3000))
    damage_tables(path, lambda size: (8192, size - 300), larger_than=16384)
    backend = SQLiteBackend(path)
    backend.open()
    try:
        assert backend.commit(rows(2990, 20), {}) == [False] * 10 + [True] * 10
        assert "rebuilding the digest index" in text(logged) and "damaged" in text(logged)
        assert backend.commit(rows(0, 5), {}) == [False] * 5
    finally:
        backend.close()
    assert stored(path) == (3010, 3010)


# -- the filter in front of the index ---------------------------------------------


def keys_of(batch: list[Row]) -> list[bytes]:
    return [digest_key(row.record.sensor, row.record.sha256) for row in batch]


def test_the_filter_is_filled_from_the_index_and_answers_for_new_alerts(path: Path, logged: Any) -> None:
    assert commit(path, rows(0, 500)) == [True] * 500
    backend = SQLiteBackend(path)
    backend.open()
    try:
        digests = backend.digests
        assert digests.wait_filter(30) and digests.filter_state == "full"
        assert digests._filter is not None
        assert digests._filter.might_contain(keys_of(rows(0, 500))) == [True] * 500
        assert sum(digests._filter.might_contain(keys_of(rows(500, 1000)))) < 50  # the rest: false positives
        # retransmissions are still found (the filter says maybe, the index says where)
        assert backend.commit(rows(490, 20), {}) == [False] * 10 + [True] * 10
    finally:
        backend.close()
    assert stored(path) == (510, 510)
    assert "the digest filter holds 500 digests" in text(logged)


@pytest.fixture
def held_filter(monkeypatch: Any) -> Any:
    """The filter's thread waits at its start until the test lets it go."""
    from iapd import digests as module

    release = threading.Event()
    fill = module.DigestIndex._fill

    def held(self: Any, target: Any, keys: Any, stop: threading.Event) -> None:
        for _ in range(3000):  # until released, or until the index closes
            if release.is_set() or stop.is_set():
                break
            time.sleep(0.01)
        fill(self, target, keys, stop)

    monkeypatch.setattr(module.DigestIndex, "_fill", held)
    yield release
    release.set()


def test_while_the_filter_fills_lookups_go_to_the_index_and_nothing_is_lost(path: Path, held_filter: Any) -> None:
    """Alerts committed while the filter is filled from a snapshot of the index go to
    the filter too: once full, it still knows them, and their retransmissions are found."""
    assert commit(path, rows(0, 300)) == [True] * 300
    backend = SQLiteBackend(path)
    backend.open()
    try:
        digests = backend.digests
        assert digests.filter_state == "filling"
        # answered by LevelDB meanwhile, old and new alike
        assert backend.commit(rows(290, 20), {}) == [False] * 10 + [True] * 10
        assert backend.commit(rows(310, 100), {}) == [True] * 100  # after the snapshot
        held_filter.set()
        assert digests.wait_filter(30) and digests.filter_state == "full"
        assert backend.commit(rows(0, 420), {}) == [False] * 410 + [True] * 10
    finally:
        backend.close()
    assert stored(path) == (420, 420)


def test_a_filter_that_cannot_take_a_key_is_dropped(path: Path, logged: Any, monkeypatch: Any) -> None:
    """A filter that lacks a key would take its retransmission for a new alert: it is
    no longer used, and the index answers every lookup."""
    from iapd.digestfilter import DigestFilter

    assert commit(path, rows(0, 100)) == [True] * 100
    backend = SQLiteBackend(path)
    backend.open()
    try:
        assert backend.digests.wait_filter(30)

        def no_room(self: Any, keys: Any) -> None:
            raise MemoryError("no room for a new generation")

        monkeypatch.setattr(DigestFilter, "add", no_room)
        assert backend.commit(rows(100, 50), {}) == [True] * 50
        assert backend.digests.filter_state == "none"
        assert backend.commit(rows(0, 160), {}) == [False] * 150 + [True] * 10
    finally:
        backend.close()
    assert stored(path) == (160, 160)
    assert "the digest filter could not take 50 digests (no room for a new generation); lookups go to the index" \
        in text(logged)


def test_damage_the_filter_meets_has_the_index_rebuilt(path: Path, logged: Any) -> None:
    """Data blocks damaged while no manager ran, which the open does not read (the middle
    of each table: its index and filter blocks are at its end, the watermarks in its
    first block): filling the filter reads every block with its checksum, and the next
    lookup rebuilds the index instead of trusting a filter that lacks their keys."""
    commit(path, rows(0, 3000))
    damage_tables(path, lambda size: (size // 3, 2 * size // 3), larger_than=65536)
    backend = SQLiteBackend(path)
    backend.open()
    try:
        digests = backend.digests
        assert not digests.wait_filter(30)
        assert digests.filter_state == "damaged"
        assert "is damaged" in text(logged) and "rebuilt from the store at the next lookup" in text(logged)
        assert backend.commit(rows(2990, 20), {}) == [False] * 10 + [True] * 10
        assert "rebuilding the digest index" in text(logged)
        assert digests.wait_filter(30) and digests.filter_state == "full"
        assert backend.commit(rows(0, 3020), {}) == [False] * 3010 + [True] * 10
    finally:
        backend.close()
    assert stored(path) == (3020, 3020)


def test_a_rebuilt_index_gets_a_new_filter(path: Path, logged: Any) -> None:
    assert commit(path, rows(0, 200)) == [True] * 200
    shutil.rmtree(path.parent / "alerts.db-digests")
    backend = SQLiteBackend(path)
    backend.open()
    try:
        assert backend.digests.wait_filter(30)
        assert backend.commit(rows(150, 100), {}) == [False] * 50 + [True] * 50
    finally:
        backend.close()
    assert stored(path) == (250, 250)
    assert "rebuilding the digest index" in text(logged)


def test_a_missing_index_is_rebuilt(path: Path, logged: Any) -> None:
    commit(path, rows(0, 20))
    shutil.rmtree(path.parent / "alerts.db-digests")
    assert commit(path, rows(10, 20)) == [False] * 10 + [True] * 10
    assert stored(path) == (30, 30)
    assert "rebuilding the digest index" in text(logged) and "the store has no index yet" in text(logged)


def test_a_store_made_by_an_earlier_version_gets_an_index(path: Path, logged: Any) -> None:
    """Earlier versions kept a UNIQUE (sensor, sha256) constraint in the table and no index."""
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA.split("CREATE TABLE IF NOT EXISTS iapd_meta")[0])
        for row in rows(0, 40):
            r = row.record
            db.execute("INSERT INTO alerts (sensor, received, content_type, sha256, via, body) VALUES (?, ?, ?, ?, '[]', ?)",
                       (r.sensor, r.received, r.content_type, r.sha256, r.body))
    assert commit(path, rows(30, 20)) == [False] * 10 + [True] * 10
    assert stored(path) == (50, 50)
    assert "made by an earlier version" in text(logged)


def test_a_second_manager_on_the_same_store_is_refused(path: Path) -> None:
    """Two writers would each keep their own index: the second, in another process, is refused."""
    first = SQLiteBackend(path)
    first.open()
    try:
        second = subprocess.run(
            [sys.executable, "-c", OPEN_ONLY, str(path), str(Path(__file__).resolve().parents[1])],
            capture_output=True, text=True, timeout=60,
        )
        assert second.returncode == 3, second.stderr
        assert "is in use by another process (is another manager running with this store?)" in second.stdout
        with pytest.raises(StoreError, match="is in use by another process"):  # and in this one
            SQLiteBackend(path).open()
        assert first.commit(rows(0, 5), {}) == [True] * 5  # the first is unharmed
    finally:
        first.close()
    assert stored(path) == (5, 5)


OPEN_ONLY = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from iapd.store import SQLiteBackend, StoreError
    try:
        SQLiteBackend(Path(sys.argv[1])).open()
    except StoreError as e:
        print(e)
        sys.exit(3)
""")


def test_an_index_that_cannot_be_made_is_a_clear_error(path: Path) -> None:
    (path.parent).mkdir(parents=True, exist_ok=True)
    (path.parent / "alerts.db-digests").write_text("not a directory\n")
    with pytest.raises(StoreError, match=r"cannot open SQLite store .*alerts.db: cannot open the digest index"):
        SQLiteBackend(path).open()


CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from tests.test_digests import rows
    from iapd import store
    from iapd.store import SQLiteBackend

    if sys.argv[3] != "default":
        store.WAL_PAGES = int(sys.argv[3])
    backend = SQLiteBackend(Path(sys.argv[1]))
    backend.open()
    checkpoints = backend._checkpoints
    n = 0
    while n < 1_000_000:
        backend.commit(rows(n, 200), {})
        print(n + 200, checkpoints.passes, checkpoints.finished, flush=True)
        n += 200
""")


@pytest.mark.parametrize("wal_pages", ["default", "16"])
def test_sigkill_while_committing_neither_loses_nor_doubles(path: Path, wal_pages: str) -> None:
    """A real process committing batches as fast as it can, killed mid-flight; then every
    batch it may have committed comes again, as the sensors would send it.  With a WAL
    limit of 16 pages the kill lands among background checkpoints and ones the
    committing thread finishes itself."""
    root = str(Path(__file__).resolve().parents[1])
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), root, wal_pages], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None
        acknowledged = passes = finished = 0
        for line in child.stdout:
            acknowledged, passes, finished = map(int, line.split())
            if acknowledged >= 4000:
                os.kill(child.pid, signal.SIGKILL)
                break
        acknowledged = max([acknowledged] + [int(line.split()[0]) for line in child.stdout.read().splitlines()])
    finally:
        child.kill()
        child.wait(30)
    assert acknowledged >= 4000
    if wal_pages != "default":
        assert passes > 0 and finished > 0
    count, distinct = stored(path)
    # every batch acknowledged is there, and at most the one in flight besides
    assert count == distinct and count % 200 == 0 and acknowledged <= count <= acknowledged + 200
    again = commit(path, rows(0, count + 200))
    assert again == [False] * count + [True] * 200
    assert stored(path) == (count + 200, count + 200)
    # the bodies the killed process appended, flushed or not, and the ones appended
    # after them since: each row reads its own, checked against its digest
    assert [a["body"] for a in read_alerts(path, with_body=True)] == [b"alert %d" % i for i in range(count + 200)]
