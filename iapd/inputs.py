"""
Where the sensor daemon takes alerts from.  Each input hands alerts to the spool and
lets go of them only once the spool has them on disk.

  directory   other programs drop one alert per file (written elsewhere and renamed in,
              or named *.tmp / .* while being written); a file is removed only after
              its alert is in the spool.  A crash between the two makes the file be
              read again: the manager's deduplication keeps the store exactly-once.
  socket      a Unix socket where local programs write alerts framed as IAP content
              (Content-Type, Content-Length, body, CRLF CRLF); each is answered
              IAP/0.2 200 once spooled, 503 when the spool is full.
  eve         Suricata's eve.json: alert events become IDMEF with the original JSON
              inside (see iapd.eve); the position read is kept next to the spool.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from twisted.internet import endpoints
from twisted.internet.defer import Deferred, FirstError, gatherResults, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from . import messages as m
from .errors import WireError
from .eve import EveTail, eve_to_idmef, rotated
from .parser import ContentReader, Refused
from .spool import MAX_BODY, Spool, SpoolFull, TooLarge

log = Logger()


class DirectoryInput:
    """Polls a directory for alert files (portable, and cheap at half a second)."""

    def __init__(self, reactor: Any, spool: Spool, path: Path, content_type: str,
                 interval: float = 0.5, per_scan: int = 1000) -> None:
        self.reactor, self.spool, self.path, self.content_type = reactor, spool, Path(path), content_type
        self.interval, self.per_scan = interval, per_scan
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor
        self._busy: Deferred[Any] | None = None
        self._warned: set[str] = set()

    def start(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self._loop.start(self.interval, now=True)

    def _tick(self) -> None:
        if self._busy is None:
            self.scan()

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def scan(self) -> Deferred[Any]:
        """Take what the directory holds; fires when it is spooled (or the scan in progress is)."""
        if self._busy is not None:
            return _chained(self._busy)
        d = deferToThread(self._read_some)
        d.addCallback(self._spool_files)

        def done(_: Any) -> None:
            self._busy = None

        d.addErrback(lambda f: log.error("directory input {path}: {why}", path=str(self.path),
                                         why=f.getErrorMessage()))
        d.addBoth(done)
        self._busy = d
        return _chained(d)

    def _read_some(self) -> list[tuple[Path, bytes]]:
        names = []
        with os.scandir(self.path) as it:
            for entry in it:
                if entry.name.startswith(".") or entry.name.endswith(".tmp") or not entry.is_file(follow_symlinks=False):
                    continue
                names.append((entry.stat().st_mtime, entry.name))
        names.sort()
        out = []
        budget = 64 * 1024 * 1024  # read at most this much per scan
        for _, name in names[: self.per_scan]:
            path = self.path / name
            try:
                st = path.stat()
                size = st.st_size
                if out and size > budget:
                    break
                if size > min(MAX_BODY, self.spool.max_bytes):
                    _warn_once(self._warned, name, "directory input: {path} ({size} octets) can never fit in the"
                               " spool; left in place", path=str(path), size=size)
                    continue
                with open(path, "rb") as f:
                    identity = os.fstat(f.fileno())
                    body = f.read()
                out.append((path, body, (identity.st_ino, identity.st_size, identity.st_mtime_ns)))
                budget -= len(body)
            except FileNotFoundError:
                continue
        return out

    def _spool_files(self, files: list[tuple[Path, bytes, tuple[int, int, int]]]) -> Deferred[Any]:
        """Append every file's alert (sharing fsyncs), then remove those now spooled."""
        appends = [
            self.spool.append(self.content_type, body).addCallbacks(
                lambda _, path=path, ident=ident: (path, ident), self._not_taken, errbackArgs=(path,)
            )
            for path, body, ident in files
        ]

        def remove(results: list[Any]) -> Deferred[Any]:
            return deferToThread(_unlink_unchanged, [r for r in results if r is not None])

        return gatherResults(appends).addCallback(remove)

    def _not_taken(self, failure: Any, path: Path) -> None:
        """Not spooled: the file stays for a later scan (full spool) or for good (too large)."""
        if failure.check(TooLarge):
            self._too_large(failure, path)
        elif not failure.check(SpoolFull):
            log.error("directory input: {path} not spooled: {why}", path=str(path), why=failure.getErrorMessage())
        return None

    def _too_large(self, failure: Any, path: Path) -> None:
        """A file that can never fit is left where it is; the others go on."""
        _warn_once(self._warned, path.name, "directory input: {path} is left in place: {why}",
                   path=str(path), why=failure.getErrorMessage())


def _warn_once(warned: set[str], key: str, message: str, **fields: Any) -> None:
    if key not in warned:
        warned.add(key)
        log.error(message, **fields)


def _chained(d: Deferred[Any]) -> Deferred[Any]:
    """A Deferred that fires with C{d}, without taking C{d}'s result from others."""
    out: Deferred[Any] = Deferred()
    d.addBoth(lambda result: (out.callback(None), result)[1])
    return out


def _unlink_unchanged(taken: list[tuple[Path, tuple[int, int, int]]]) -> None:
    """
    Remove files whose alerts are spooled, unless a producer has since put a new file
    under the same name (then it is read, and removed, on a later scan).
    """
    for path, (ino, size, mtime) in taken:
        try:
            st = path.stat()
            if (st.st_ino, st.st_size, st.st_mtime_ns) == (ino, size, mtime):
                path.unlink()
        except FileNotFoundError:
            pass


class _Anything(frozenset):  # type: ignore[type-arg]
    """The local socket accepts every content type; the manager decides."""

    def __contains__(self, item: object) -> bool:
        return True


class SocketInputProtocol(Protocol):
    """One local producer: framed alerts in, one status per alert out, in order."""

    def connectionMade(self) -> None:
        self.reader = ContentReader(MAX_BODY, _Anything())
        self._tail: Deferred[Any] = succeed(None)
        self._closed = False

    def dataReceived(self, data: bytes) -> None:
        for event in self.reader.feed(data):
            if isinstance(event, m.Content):
                self._answer(self.factory.spool.append(event.content_type, event.body))
            elif isinstance(event, Refused):
                self._answer(succeed(event.error.code))
            else:
                assert isinstance(event, WireError)
                self._answer(succeed(event.code), fatal=True)
                break

    def _answer(self, outcome: Deferred[Any], fatal: bool = False) -> None:
        def code(result: Any) -> int:
            return result if isinstance(result, int) and result >= 400 else 200

        def refused(failure: Any) -> int:
            if failure.check(TooLarge):
                return 413  # never: the producer should not try again
            return 503  # spool full or failing: the producer keeps the alert

        outcome.addCallbacks(code, refused)

        def write(_: Any) -> Deferred[Any]:
            def send(status: int) -> None:
                if not self._closed:
                    self.transport.write(m.status(status))
                    if fatal:
                        self.transport.loseConnection()
            return outcome.addCallback(send)

        self._tail = self._tail.addCallback(write)

    def connectionLost(self, reason: Any = None) -> None:
        self._closed = True


class SocketInput:
    def __init__(self, reactor: Any, spool: Spool, path: Path, mode: int) -> None:
        self.reactor, self.spool, self.path, self.mode = reactor, spool, Path(path), mode
        self.port: Any = None

    def start(self) -> Deferred[Any]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket():
            self.path.unlink()  # left by a previous run
        factory = Factory.forProtocol(SocketInputProtocol)
        factory.spool = self.spool  # type: ignore[attr-defined]
        endpoint = endpoints.UNIXServerEndpoint(self.reactor, str(self.path), mode=self.mode)

        def listening(port: Any) -> None:
            self.port = port

        return endpoint.listen(factory).addCallback(listening)

    def stop(self) -> Deferred[Any] | None:
        return self.port.stopListening() if self.port is not None else None


class EveInput:
    """Tails eve.json, converting alert events; the read position survives restarts."""

    def __init__(self, reactor: Any, spool: Spool, path: Path, analyzer_id: str, interval: float = 0.5) -> None:
        self.reactor, self.spool, self.path, self.analyzer_id = reactor, spool, Path(path), analyzer_id
        tag = hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:16]
        self.state_file = Path(spool.files.directory) / f"eve-{tag}.offset"
        self.tail = EveTail()
        self.offset = 0
        self.inode: int | None = None
        self._file: Any = None
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor
        self._busy: Deferred[Any] | None = None

    def start(self) -> None:
        try:
            inode, offset = self.state_file.read_text().split()
            self.inode, self.offset = int(inode), int(offset)
        except (OSError, ValueError):
            pass  # first run (or an unreadable state): read the file from its start
        self._loop.start(0.5, now=True)

    def _tick(self) -> None:
        if self._busy is None:
            self.poll()

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        if self._file is not None and self._busy is None:
            self._file.close()
            self._file = None

    def poll(self) -> Deferred[Any]:
        """Read what was appended; fires when it is spooled (or the poll in progress is)."""
        if self._busy is not None:
            return _chained(self._busy)
        d = deferToThread(self._read)
        d.addCallback(self._convert)

        def done(_: Any) -> None:
            self._busy = None

        d.addErrback(lambda f: log.error("eve input {path}: {why}", path=str(self.path), why=f.getErrorMessage()))
        d.addBoth(done)
        self._busy = d
        return _chained(d)

    def _read(self) -> tuple[int, bytes] | None:
        """
        The next bytes of the file being tailed.  The file stays open across polls, so
        that after a rotation (move and create) what Suricata still wrote to the old
        file is read to its end before the new file is started.
        """
        try:
            st: os.stat_result | None = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if self._file is None:
            if st is None:
                return None
            self._file = open(self.path, "rb")
            opened = os.fstat(self._file.fileno())
            if rotated(self.inode, self.offset, opened):
                if self.inode is not None:
                    log.info("eve input {path}: not the file read before; reading it from its start",
                             path=str(self.path))
                self.offset, self.tail = 0, EveTail()
            self.inode = opened.st_ino
        elif os.fstat(self._file.fileno()).st_size < self.offset:
            log.info("eve input {path}: the file was truncated; reading it from its start", path=str(self.path))
            self.offset, self.tail = 0, EveTail()
        self._file.seek(self.offset + self.tail.buffered)
        data = self._file.read(4 * 1024 * 1024)
        if not data and st is not None and st.st_ino != self.inode:
            # the old file is drained and the path names a new one: move over to it
            log.info("eve input {path}: the file was rotated; reading the new one from its start",
                     path=str(self.path))
            self._file.close()
            self._file = open(self.path, "rb")
            self.inode = os.fstat(self._file.fileno()).st_ino
            self.offset, self.tail = 0, EveTail()
            data = self._file.read(4 * 1024 * 1024)
        return self.offset, data

    def _convert(self, read: tuple[int, bytes] | None) -> Deferred[Any] | None:
        if read is None:
            return None
        start, data = read
        lines = list(self.tail.feed(data))
        end = start + self.tail.offset_after_last_line
        appends = []
        for line in lines:
            alert = eve_to_idmef(line, self.analyzer_id)
            if alert is not None:
                appends.append(self.spool.append(m.IDEF_ALERT, alert).addErrback(self._too_large))
        # all appended together share fsyncs; the offset moves only if every one was taken
        d: Deferred[Any] = gatherResults(appends, consumeErrors=True).addErrback(
            lambda f: f.value.subFailure if isinstance(f.value, FirstError) else f
        )

        def save(_: Any) -> Deferred[Any]:
            self.offset = end
            self.tail.rebase()
            return deferToThread(self._save)

        def not_taken(failure: Any) -> None:
            # re-read from the saved offset next time: nothing past it is skipped
            self.tail = EveTail()
            if not failure.check(SpoolFull):
                log.error("eve input {path}: cannot spool: {why}", path=str(self.path), why=failure.getErrorMessage())

        return d.addCallbacks(save, not_taken)

    def _too_large(self, failure: Any) -> None:
        failure.trap(TooLarge)
        log.error("eve input {path}: an alert event is skipped: {why}", path=str(self.path),
                  why=failure.getErrorMessage())

    def _save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(f"{self.inode} {self.offset}\n")
        os.replace(tmp, self.state_file)
