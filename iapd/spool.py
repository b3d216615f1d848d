"""
The sensor's spool: every accepted alert stays on disk until the manager's 200 for it.

Alerts are appended to segment files and fsync'd before anyone is told they are
accepted (a directory input removes its file, a socket input answers 200).  The manager
acknowledges in order, so progress is one number, the highest acknowledged sequence,
kept in the file C{acked} (replaced atomically).  Segments whose records are all
acknowledged are deleted.  After a crash the spool resumes from C{acked}: alerts whose
200 arrived but whose acknowledgement was not yet written are sent again, and the
manager's deduplication keeps the store exactly-once.

Record layout (little-endian)::

    "IAPS" | seq u64 | type length u32 | body length u32 | crc32 u32 | type | body

The CRC covers everything after the magic except itself.  A record that fails its
checks is quarantined (its bytes copied to C{quarantine/}, the segment rewritten without
them) and the records around it are delivered; an incomplete record at the very end of
the newest segment is a write the crash interrupted, before it was acknowledged to its
producer, and is dropped.

The class L{SpoolFiles} is synchronous and touches only files; L{Spool} runs it on one
thread of its own and batches appends so that many alerts share one fsync.
"""

from __future__ import annotations

import collections
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import attr
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

MAGIC = b"IAPS"
_HEAD = struct.Struct("<4sQIII")
MAX_TYPE = 255
MAX_BODY = 64 * 1024 * 1024
SEGMENT_BYTES = 16 * 1024 * 1024
INDEX_COST = 300
"""Memory the pending index spends per alert (measured ~273 octets): charged against the
bound, so a spool of tiny alerts cannot hold gigabytes of index in memory."""

log = Logger()


class SpoolError(Exception):
    """The spool cannot be used; the message says why."""


class SpoolFull(SpoolError):
    """Accepting this alert would exceed the spool's bound: leave it with its producer."""


class TooLarge(SpoolError):
    """The alert is larger than the whole spool may hold: it can never be accepted."""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Entry:
    """Where one pending record lives on disk."""

    seq: int
    segment: Path
    offset: int
    size: int


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Record:
    seq: int
    content_type: str
    body: bytes


def _cost(content_type: str, body: bytes) -> int:
    """What one alert counts against the spool's bound: its record and its index entry."""
    return _HEAD.size + len(content_type) + len(body) + INDEX_COST


def encode(seq: int, content_type: str, body: bytes) -> bytes:
    ct = content_type.encode("ascii")
    head = struct.pack("<QII", seq, len(ct), len(body))
    crc = zlib.crc32(body, zlib.crc32(ct, zlib.crc32(head)))
    return MAGIC + head + struct.pack("<I", crc) + ct + body


def _parse(data: bytes, pos: int) -> tuple[Record, int] | str:
    """The record at C{pos} and where the next one starts, or why there is none."""
    if len(data) - pos < _HEAD.size:
        return "truncated"
    magic, seq, ct_len, body_len, crc = _HEAD.unpack_from(data, pos)
    if magic != MAGIC:
        return "bad magic"
    if ct_len > MAX_TYPE or body_len > MAX_BODY:
        return "impossible lengths"
    end = pos + _HEAD.size + ct_len + body_len
    if end > len(data):
        return "truncated"
    ct = data[pos + _HEAD.size : pos + _HEAD.size + ct_len]
    body = data[pos + _HEAD.size + ct_len : end]
    head = struct.pack("<QII", seq, ct_len, body_len)
    if zlib.crc32(body, zlib.crc32(ct, zlib.crc32(head))) != crc:
        return "checksum mismatch"
    try:
        content_type = ct.decode("ascii")
    except UnicodeDecodeError:
        return "bad content type"
    return Record(seq, content_type, bytes(body)), end


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _segment_name(first_seq: int) -> str:
    return f"seg-{first_seq:020d}.log"


class SpoolFiles:
    """
    The spool's files, synchronously.  One thread uses it; the index of what is
    pending belongs to the caller (L{Spool} keeps it on the reactor thread).
    """

    def __init__(self, directory: Path, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.acked = 0
        self.next_seq = 1
        self.quarantined = 0
        self._recovered: list[Entry] = []
        self._current: Any = None
        self._current_path: Path | None = None
        self._current_size = 0
        self._acked_written = 0

    # -- recovery ----------------------------------------------------------------------

    def recover(self) -> list[Entry]:
        """Read the directory after a start or a crash; returns what is pending, in order."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            acked_file = self.directory / "acked"
            if acked_file.exists():
                text = acked_file.read_text().strip()
                self.acked = int(text) if text.isdigit() else 0
        except OSError as e:
            raise SpoolError(f"cannot use spool directory {self.directory}: {e.strerror}") from None
        self._acked_written = self.acked
        self.next_seq = self.acked + 1
        segments = sorted(self.directory.glob("seg-*.log"))
        self._recovered = []
        for i, segment in enumerate(segments):
            self._recover_segment(segment, last=i == len(segments) - 1)
        self._drop_acked_segments()
        pending, self._recovered = self._recovered, []
        return pending

    def _recover_segment(self, segment: Path, last: bool) -> None:
        data = segment.read_bytes()
        pos = 0
        good: list[tuple[Record, int, int]] = []
        bad: list[tuple[int, int, str]] = []
        while pos < len(data):
            parsed = _parse(data, pos)
            if isinstance(parsed, tuple):
                record, end = parsed
                good.append((record, pos, end))
                pos = end
                continue
            if parsed == "truncated" and last and data.find(MAGIC, pos + 1) < 0:
                # keep the bytes anyway: a damaged length field looks the same as a torn write
                qdir = self.directory / "quarantine"
                qdir.mkdir(exist_ok=True, mode=0o700)
                (qdir / f"{segment.stem}-tail-at-{pos}.bin").write_bytes(data[pos:])
                log.warn(
                    "spool {segment}: dropping an incomplete final record ({n} octets) left by a crash"
                    " before it was accepted",
                    segment=str(segment), n=len(data) - pos,
                )
                with open(segment, "r+b") as f:
                    f.truncate(pos)
                    os.fsync(f.fileno())
                data = data[:pos]
                break
            resume = self._resync(data, pos + 1)
            bad.append((pos, resume, parsed))
            pos = resume
        if bad:
            data = self._quarantine(segment, data, bad, good)
            good = []
            pos = 0
            while pos < len(data):
                parsed = _parse(data, pos)
                assert isinstance(parsed, tuple)
                good.append((parsed[0], pos, parsed[1]))
                pos = parsed[1]
        for record, start, end in good:
            self.next_seq = max(self.next_seq, record.seq + 1)
            if record.seq > self.acked:
                self._recovered.append(Entry(record.seq, segment, start, end - start))
        if last:
            self._open_current(segment, len(data))

    @staticmethod
    def _resync(data: bytes, start: int) -> int:
        """The next offset at which a valid record begins, or the end of the data."""
        pos = data.find(MAGIC, start)
        while pos >= 0:
            if isinstance(_parse(data, pos), tuple):
                return pos
            pos = data.find(MAGIC, pos + 1)
        return len(data)

    def _quarantine(
        self, segment: Path, data: bytes, bad: list[tuple[int, int, str]], good: list[tuple[Record, int, int]]
    ) -> bytes:
        qdir = self.directory / "quarantine"
        qdir.mkdir(exist_ok=True, mode=0o700)
        for start, end, why in bad:
            target = qdir / f"{segment.stem}-at-{start}.bin"
            target.write_bytes(data[start:end])
            self.quarantined += 1
            log.error(
                "spool {segment}: {n} corrupt octets at offset {at} ({why}) moved to {target};"
                " the records around them are kept",
                segment=str(segment), n=end - start, at=start, why=why, target=str(target),
            )
        kept = b"".join(data[s:e] for _, s, e in good)
        tmp = segment.with_suffix(".rewrite")
        with open(tmp, "wb") as f:
            f.write(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, segment)
        _fsync_dir(self.directory)
        return kept

    # -- appending ---------------------------------------------------------------------

    def _open_current(self, path: Path, size: int) -> None:
        if self._current is not None:
            self._current.close()
        self._current = open(path, "ab")
        self._current_path = path
        self._current_size = size

    def append(self, items: list[tuple[str, bytes]]) -> list[Entry]:
        """Write C{items} durably (one fsync); returns where each went."""
        if self._current is None or self._current_size >= self.segment_bytes:
            self._rotate()
        assert self._current is not None and self._current_path is not None
        entries = []
        chunks = []
        offset = self._current_size
        for content_type, body in items:
            seq = self.next_seq
            self.next_seq += 1
            data = encode(seq, content_type, body)
            chunks.append(data)
            entries.append(Entry(seq, self._current_path, offset, len(data)))
            offset += len(data)
        try:
            self._current.write(b"".join(chunks))
            self._current.flush()
            os.fsync(self._current.fileno())
        except BaseException:
            # nothing of this batch was accepted: cut the file back to where it was,
            # so the next batch's offsets stay true, and give the numbers back
            self._current.close()
            with open(self._current_path, "r+b") as f:
                f.truncate(self._current_size)
                os.fsync(f.fileno())
            self._current = open(self._current_path, "ab")
            self.next_seq = entries[0].seq
            raise
        self._current_size = offset
        return entries

    def _rotate(self) -> None:
        path = self.directory / _segment_name(self.next_seq)
        self._open_current(path, 0)
        _fsync_dir(self.directory)

    # -- reading and acknowledging -----------------------------------------------------

    def read(self, entries: list[Entry]) -> list[Record]:
        out = []
        handles: dict[Path, Any] = {}
        try:
            for entry in entries:
                f = handles.get(entry.segment)
                if f is None:
                    f = handles[entry.segment] = open(entry.segment, "rb")
                f.seek(entry.offset)
                parsed = _parse(f.read(entry.size), 0)
                if not isinstance(parsed, tuple):
                    raise SpoolError(f"spool record {entry.seq} in {entry.segment} is unreadable now: {parsed}")
                out.append(parsed[0])
        finally:
            for f in handles.values():
                f.close()
        return out

    def flush_acks(self, acked: int | None = None) -> None:
        """Make durable that everything up to C{acked} was acknowledged."""
        if acked is not None and acked > self.acked:
            self.acked = acked
        if self.acked == self._acked_written:
            return
        tmp = self.directory / "acked.tmp"
        with open(tmp, "w") as f:
            f.write(f"{self.acked}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / "acked")
        _fsync_dir(self.directory)
        self._acked_written = self.acked
        self._drop_acked_segments()

    def _drop_acked_segments(self) -> None:
        """Delete segments all of whose records are acknowledged (never the current one)."""
        segments = sorted(self.directory.glob("seg-*.log"))
        for segment, following in zip(segments, segments[1:]):
            if segment == self._current_path:
                continue
            next_first = int(following.stem[4:])
            if next_first - 1 <= self._acked_written:
                segment.unlink()

    def set_aside(self, record: Record, meta: dict[str, Any]) -> None:
        directory = self.directory / "rejected"
        directory.mkdir(exist_ok=True, mode=0o700)
        stem = directory / f"{record.seq:020d}"
        for path, data in ((stem.with_suffix(".alert"), record.body),
                           (stem.with_suffix(".json"), json.dumps(meta).encode())):
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        _fsync_dir(directory)

    def close(self, acked: int | None = None) -> None:
        self.flush_acks(acked)
        if self._current is not None:
            self._current.close()
            self._current = None


class Spool:
    """
    The spool for the reactor: appends batched onto one thread, acknowledgements
    coalesced.  C{append} fires once the alert is on disk; C{SpoolFull} when the bound
    would be exceeded (the alert stays with its producer).
    """

    ACK_FLUSH_DELAY = 0.2

    def __init__(
        self, directory: Path, reactor: Any, max_bytes: int = 1 << 30, segment_bytes: int = SEGMENT_BYTES
    ) -> None:
        self.files = SpoolFiles(directory, segment_bytes)
        self.reactor = reactor
        self.max_bytes = max_bytes
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="iapd-spool")
        self.pending: collections.OrderedDict[int, Entry] = collections.OrderedDict()
        self._pending_bytes = 0
        self.acked = 0
        self._queue: list[tuple[str, bytes, Deferred[int]]] = []
        self._queued_bytes = 0
        self._writing = False
        self._ack_call: Any = None
        self._full_logged = False
        self.on_append: list[Any] = []

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes + self._queued_bytes

    @property
    def depth(self) -> int:
        """Alerts accepted and not yet acknowledged by the manager."""
        return len(self.pending) + len(self._queue)

    def _add(self, entries: list[Entry]) -> None:
        for entry in entries:
            self.pending[entry.seq] = entry
            self._pending_bytes += entry.size + INDEX_COST

    def _in_thread(self, f: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self._pool, f, *args)

    def open(self) -> Deferred[None]:
        """Recover what a previous run left; fires when the spool can be used."""
        self._pool.start()

        def recovered(entries: list[Entry]) -> None:
            self.acked = self.files.acked
            self._add(entries)
            if entries:
                log.info("spool {dir}: {n} alerts from a previous run await delivery",
                         dir=str(self.files.directory), n=len(entries))

        return self._in_thread(self.files.recover).addCallback(recovered)

    def append(self, content_type: str, body: bytes) -> Deferred[int]:
        d: Deferred[int] = Deferred()
        size = _cost(content_type, body)
        if size > self.max_bytes or len(body) > MAX_BODY:
            d.errback(TooLarge(f"an alert of {len(body)} octets can never fit in a spool of {self.max_bytes}"))
            return d
        if self.pending_bytes + size > self.max_bytes:
            if not self._full_logged:
                self._full_logged = True
                log.error(
                    "spool full ({n} octets pending, limit {limit}): new alerts stay with their producers"
                    " until the manager acknowledges some",
                    n=self.pending_bytes, limit=self.max_bytes,
                )
            d.errback(SpoolFull(f"spool holds {self.pending_bytes} octets, limit {self.max_bytes}"))
            return d
        if self._full_logged and self.pending_bytes + size < self.max_bytes * 0.9:
            self._full_logged = False
            log.info("spool has room again ({n} octets pending)", n=self.pending_bytes)
        self._queue.append((content_type, body, d))
        self._queued_bytes += size
        self._write()
        return d

    def _write(self) -> None:
        if self._writing or not self._queue:
            return
        batch, self._queue = self._queue, []
        self._writing = True
        d = self._in_thread(self.files.append, [(ct, body) for ct, body, _ in batch])

        def written(entries: list[Entry]) -> None:
            self._queued_bytes -= sum(_cost(ct, b) for ct, b, _ in batch)
            self._add(entries)
            for (_, _, waiting), entry in zip(batch, entries):
                waiting.callback(entry.seq)
            for callback in self.on_append:
                callback()

        def failed(failure: Any) -> None:
            self._queued_bytes -= sum(_cost(ct, b) for ct, b, _ in batch)
            log.error("spool write failed: {why}", why=failure.getErrorMessage())
            for _, _, waiting in batch:
                waiting.errback(SpoolError(f"spool write failed: {failure.getErrorMessage()}"))

        def done(_: Any) -> None:
            self._writing = False
            self._write()

        d.addCallbacks(written, failed).addBoth(done)

    def entries_after(self, seq: int, limit: int, max_bytes: int = 8 * 1024 * 1024) -> list[Entry]:
        """Up to C{limit} pending entries after C{seq}, read together in at most C{max_bytes}."""
        out: list[Entry] = []
        size = 0
        for entry in self.pending.values():
            if entry.seq > seq:
                if out and size + entry.size > max_bytes:
                    break
                out.append(entry)
                size += entry.size
                if len(out) >= limit:
                    break
        return out

    def set_aside(self, record: Record, meta: dict[str, Any]) -> Deferred[None]:
        """Keep a refused alert in C{rejected/} (durably, off the reactor) before it is acked."""
        return self._in_thread(self.files.set_aside, record, meta)

    def read(self, entries: list[Entry]) -> Deferred[list[Record]]:
        return self._in_thread(self.files.read, entries)

    def ack(self, seq: int) -> None:
        """The manager acknowledged everything up to C{seq}; written soon, in a batch."""
        if seq <= self.acked:
            return
        self.acked = seq
        while self.pending and next(iter(self.pending)) <= seq:
            _, entry = self.pending.popitem(last=False)
            self._pending_bytes -= entry.size + INDEX_COST
        if self._ack_call is None:
            self._ack_call = self.reactor.callLater(self.ACK_FLUSH_DELAY, self._flush_acks)

    def _flush_acks(self) -> None:
        self._ack_call = None
        self._in_thread(self.files.flush_acks, self.acked).addErrback(
            lambda f: log.error("cannot record acknowledgements: {why}", why=f.getErrorMessage())
        )

    def close(self) -> Deferred[None]:
        if self._ack_call is not None and self._ack_call.active():
            self._ack_call.cancel()
            self._ack_call = None
        d = self._in_thread(self.files.close, self.acked)

        def stop(result: Any) -> Any:
            self._pool.stop()
            return result

        return d.addBoth(stop)
