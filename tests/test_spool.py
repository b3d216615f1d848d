"""
The sensor's spool on real files: durability, recovery, quarantine, bounds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.trial import unittest

from iapd.spool import Spool, SpoolFiles, SpoolFull, encode

IDEF = "application/x-idef-alert"


def fill(files: SpoolFiles, n: int, start: int = 0) -> list[int]:
    return [e.seq for e in files.append([(IDEF, b"alert %d" % i) for i in range(start, start + n)])]


def bodies(files: SpoolFiles, entries: list[Any]) -> list[bytes]:
    return [r.body for r in files.read(entries)]


def test_recovery_returns_unacknowledged_in_order(tmp_path: Path) -> None:
    files = SpoolFiles(tmp_path)
    assert files.recover() == []
    assert fill(files, 5) == [1, 2, 3, 4, 5]
    files.close()
    again = SpoolFiles(tmp_path)
    pending = again.recover()
    assert [e.seq for e in pending] == [1, 2, 3, 4, 5]
    assert bodies(again, pending) == [b"alert %d" % i for i in range(5)]
    assert fill(again, 1, 5) == [6]


def test_acknowledged_records_are_not_resent_and_segments_go(tmp_path: Path) -> None:
    files = SpoolFiles(tmp_path, segment_bytes=200)
    for i in range(30):  # one batch each: segments rotate between batches
        fill(files, 1, i)
    segments = sorted(tmp_path.glob("seg-*.log"))
    assert len(segments) > 3  # rotated
    files.flush_acks(25)
    files.close()
    assert len(sorted(tmp_path.glob("seg-*.log"))) < len(segments)
    again = SpoolFiles(tmp_path, segment_bytes=200)
    pending = again.recover()
    assert [e.seq for e in pending] == [26, 27, 28, 29, 30]
    assert bodies(again, pending) == [b"alert %d" % i for i in range(25, 30)]


def test_corrupt_record_is_quarantined_and_the_rest_kept(tmp_path: Path) -> None:
    files = SpoolFiles(tmp_path)
    entries = files.append([(IDEF, b"alert %d" % i) for i in range(10)])
    files.close()
    victim = entries[4]
    with open(victim.segment, "r+b") as f:
        f.seek(victim.offset + victim.size - 2)
        f.write(b"XX")  # flip bytes in record 5's body
    again = SpoolFiles(tmp_path)
    pending = again.recover()
    assert [e.seq for e in pending] == [1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert bodies(again, pending) == [b"alert %d" % i for i in range(10) if i != 4]
    [quarantined] = list((tmp_path / "quarantine").iterdir())
    assert b"alert 4"[:5] in quarantined.read_bytes()
    assert again.quarantined == 1
    # the segment was rewritten: a second recovery finds nothing more to quarantine
    third = SpoolFiles(tmp_path)
    assert [e.seq for e in third.recover()] == [1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert third.quarantined == 0


def test_garbage_between_records_is_quarantined(tmp_path: Path) -> None:
    files = SpoolFiles(tmp_path)
    fill(files, 2)
    files.close()
    [segment] = tmp_path.glob("seg-*.log")
    with open(segment, "ab") as f:
        f.write(b"\x00garbage IAPS not a record\xff" * 3)
        f.write(encode(3, IDEF, b"after the garbage"))
    again = SpoolFiles(tmp_path)
    pending = again.recover()
    assert bodies(again, pending) == [b"alert 0", b"alert 1", b"after the garbage"]
    assert again.quarantined == 1


def test_incomplete_final_record_is_dropped(tmp_path: Path) -> None:
    files = SpoolFiles(tmp_path)
    fill(files, 3)
    files.close()
    [segment] = tmp_path.glob("seg-*.log")
    whole = encode(4, IDEF, b"interrupted by a crash")
    with open(segment, "ab") as f:
        f.write(whole[:-5])
    again = SpoolFiles(tmp_path)
    assert [e.seq for e in again.recover()] == [1, 2, 3]
    # the torn bytes are kept aside all the same (a damaged length field looks alike)
    [kept] = list((tmp_path / "quarantine").iterdir())
    assert "tail" in kept.name and kept.read_bytes() == whole[:-5]
    assert fill(again, 1) == [4]  # the number is free again: it was never accepted
    again.close()
    assert [e.seq for e in SpoolFiles(tmp_path).recover()] == [1, 2, 3, 4]


def test_unusable_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    from iapd.spool import SpoolError

    with pytest.raises(SpoolError, match="cannot use spool directory"):
        SpoolFiles(tmp_path / "file" / "spool").recover()


class SpoolTests(unittest.TestCase):
    @inlineCallbacks
    def test_appends_share_fsyncs_and_full_is_refused(self) -> Any:
        spool = Spool(Path(self.mktemp()), reactor, max_bytes=2000)
        yield spool.open()
        results = yield DeferredList([spool.append(IDEF, b"x" * 100) for _ in range(30)], consumeErrors=True)
        accepted = [r for ok, r in results if ok]
        refused = [r for ok, r in results if not ok]
        self.assertTrue(accepted and refused)
        self.assertEqual(accepted, list(range(1, len(accepted) + 1)))
        for failure in refused:
            self.assertIsInstance(failure.value, SpoolFull)
        self.assertLessEqual(spool.pending_bytes, 2000)
        # acknowledging frees room
        spool.ack(accepted[-1])
        seq = yield spool.append(IDEF, b"y")
        self.assertEqual(seq, len(accepted) + 1)
        yield spool.close()
        again = SpoolFiles(spool.files.directory)
        self.assertEqual([e.seq for e in again.recover()], [seq])


def test_failed_write_leaves_the_segment_and_numbers_as_they_were(tmp_path: Path) -> None:
    """A write that fails (EIO, disk full) must not shift later records' offsets."""
    files = SpoolFiles(tmp_path)
    fill(files, 2)
    real = files._current

    class Failing:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def write(self, data: bytes) -> int:
            self.inner.write(data[: len(data) // 2])  # half reaches the file, then EIO
            raise OSError(5, "Input/output error")

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    files._current = Failing(real)
    with pytest.raises(OSError):
        files.append([(IDEF, b"lost in the failure")])
    assert [e.seq for e in files.append([(IDEF, b"after the failure")])] == [3]
    files.close()
    again = SpoolFiles(tmp_path)
    pending = again.recover()
    assert bodies(again, pending) == [b"alert 0", b"alert 1", b"after the failure"]
    assert again.quarantined == 0


def test_directory_input_keeps_a_file_replaced_after_it_was_read(tmp_path: Path) -> None:
    """A producer renaming a new alert onto a name already read must not lose it."""
    import os

    from iapd.inputs import _unlink_unchanged

    taken, replaced = tmp_path / "taken.xml", tmp_path / "replaced.xml"
    for path in (taken, replaced):
        path.write_bytes(b"first")
    identities = {}
    for path in (taken, replaced):
        st = path.stat()
        identities[path] = (st.st_ino, st.st_size, st.st_mtime_ns)
    (tmp_path / "new.tmp").write_bytes(b"a newer alert")
    os.replace(tmp_path / "new.tmp", replaced)
    _unlink_unchanged([(taken, identities[taken]), (replaced, identities[replaced])])
    assert not taken.exists()
    assert replaced.read_bytes() == b"a newer alert"
