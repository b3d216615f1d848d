"""
Giving back the memory a quiet TLS connection's buffers hold.

Twisted's TLS runs OpenSSL over two memory BIOs per connection: what the socket
brings is written into one, what OpenSSL has encrypted is read out of the other.  A
memory BIO's buffer only ever grows: it keeps the size of the most it has held.  A
socket read of 64 KiB is written into it whole, so a sensor that once sent a burst keeps
about 85 KiB of C heap on the manager for as long as it stays connected (126.5 KiB
per connection in all, against 43 KiB for one that never did), and the handshake's flights
leave 3.5-5 KiB behind on every connection (C{bench/tls_memory.py}).  OpenSSL's
C{SSL_MODE_RELEASE_BUFFERS}, which Twisted sets, frees OpenSSL's own record buffers,
not the BIOs'.  So a manager's memory grew with the number of sensors that had ever
been busy, not with the number busy now.

Nothing in pyOpenSSL's API shrinks a BIO, so a quiet connection gets two new, empty
ones: C{SSL_set_bio} hands them to OpenSSL and frees the old ones, after any bytes
still in the old ones have been moved across (a partial record read ahead, ciphertext
not yet written).  That reaches into the pyOpenSSL C{Connection}'s private attributes
(C{_ssl}, C{_into_ssl}, C{_from_ssl}), so it is done only with the pyOpenSSL releases
whose C{Connection} is known to leave its BIOs to C{SSL_free} (L{TESTED_MAJORS}): with
any other L{release} does nothing, and L{IdleBufferRelease} says so once when it
starts.  A later pyOpenSSL that freed the BIOs itself would otherwise free them twice.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Collection, Iterator
from typing import Any, Protocol

import OpenSSL
from twisted.application import service
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

TESTED_MAJORS = range(23, 27)
"""pyOpenSSL major versions whose C{Connection} makes its memory BIOs the same way
(C{BIO_new}, handed to C{SSL_set_bio}, never freed from Python): read in 23.0, 24.0,
24.3, 25.0, 25.3 and 26.4.  The test suite runs with pip's latest; C{bench/tls_memory.py}
(CI runs it) gives back and then uses connections on Debian 12's 23.0 as well."""

INTERVAL = 5.0
"""Seconds between sweeps: a connection is given back its buffers after one whole
interval without a read, so 5 to 10 seconds after its last one."""

BUSY_SWEEPS = 12
"""A connection heard at every sweep is given its buffers back every this many sweeps
(a minute), so that a sensor sending a little all the time does not keep what one
burst made them grow to."""

SLICE = 128
"""Connections given their buffers back in one turn of the reactor, at most: a release
takes 12-45 us (more after a burst, when the old buffers are large), so 1.5-6 ms of
the reactor's time (L{IdleBufferRelease.sweep})."""

SLICE_VISITS = 4096
"""Connections looked at in one turn of the reactor, at most, whether they give anything
back or not (1-2 ms)."""

_CHUNK = 65536


def unsupported_reason(version: str = OpenSSL.__version__) -> str | None:
    """Why L{release} cannot be used with pyOpenSSL C{version}, or None if it can."""
    try:
        major = int(version.split(".")[0])
    except ValueError:
        return f"pyOpenSSL {version!r} has no version number this understands"
    if major not in TESTED_MAJORS:
        return (f"pyOpenSSL {version} is not one of the releases iapd was tested with"
                f" ({TESTED_MAJORS.start}.x to {TESTED_MAJORS.stop - 1}.x)")
    try:
        from OpenSSL import SSL
        from OpenSSL._util import lib

        if not all(hasattr(lib, name) for name in ("BIO_new", "BIO_s_mem", "BIO_read", "BIO_write", "SSL_set_bio")):
            return "the OpenSSL bindings lack a function it needs"
        probe = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        if not all(getattr(probe, name, None) is not None for name in ("_ssl", "_into_ssl", "_from_ssl")):
            return "pyOpenSSL's Connection keeps its memory BIOs differently"
    except Exception as e:  # whatever this pyOpenSSL does differently must not stop the manager
        return f"pyOpenSSL could not be probed ({type(e).__name__}: {e})"
    return None


_UNSUPPORTED = unsupported_reason()


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's C{malloc_trim}, or None on a C library without it."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_malloc_trim = _find_malloc_trim()


def _drain(bio: Any) -> bytes:
    from OpenSSL._util import ffi, lib

    buf = ffi.new("char[]", _CHUNK)
    parts = []
    while True:
        n = lib.BIO_read(bio, buf, _CHUNK)
        if n <= 0:
            return b"".join(parts)
        parts.append(ffi.buffer(buf, n)[:])


def _new_bio() -> Any:
    from OpenSSL._util import ffi, lib

    bio = lib.BIO_new(lib.BIO_s_mem())
    if bio == ffi.NULL:
        raise MemoryError("BIO_new failed")
    return bio


def _put(bio: Any, data: bytes) -> bool:
    from OpenSSL._util import lib

    return not data or lib.BIO_write(bio, data, len(data)) == len(data)


def release(connection: Any) -> bool:
    """
    Give C{connection}'s two memory BIOs back and go on with two new ones.

    C{connection} is a pyOpenSSL C{Connection} over memory BIOs, as Twisted's TLS
    makes them, still open: not after C{bio_shutdown} (its end-of-file mark is not
    carried over), and not while OpenSSL is working on it, which in a reactor means
    anywhere but inside one of its own calls.  Returns whether it was done: not with
    an untested pyOpenSSL, nor on a connection over a socket.  The bytes the old BIOs
    held are in the new ones, in the same order (with Twisted's TLS there are none
    between two of its calls: it reads until OpenSSL wants more, and sends what
    OpenSSL wrote at once).  If memory runs out (C{MemoryError}), the connection keeps
    its old BIOs and what was read out of them; only if it runs out while they are
    being read can bytes be lost, and then TLS fails on that connection, which closes,
    and its sensor sends again whatever was not answered.
    """
    if _UNSUPPORTED is not None or getattr(connection, "_socket", True) is not None:
        return False
    old_in, old_out = connection._into_ssl, connection._from_ssl
    if old_in is None or old_out is None:
        return False
    from OpenSSL._util import lib

    into = _new_bio()
    try:
        out = _new_bio()
    except MemoryError:
        lib.BIO_free(into)
        raise
    pending_in = pending_out = b""
    try:
        # reading the old BIOs empties them: from here, a failure puts back what was read
        pending_in = _drain(old_in)
        pending_out = _drain(old_out)
        if not (_put(into, pending_in) and _put(out, pending_out)):
            raise MemoryError("BIO_write failed")
    except BaseException:
        lib.BIO_free(into)
        lib.BIO_free(out)
        _put(old_in, pending_in)
        _put(old_out, pending_out)
        raise
    lib.SSL_set_bio(connection._ssl, into, out)  # frees the old pair
    connection._into_ssl, connection._from_ssl = into, out
    return True


class ReleasesBuffers(Protocol):
    """What L{IdleBufferRelease} asks of a connection."""

    def release_idle_buffers(self) -> bool: ...


class IdleBufferRelease(service.Service):
    """
    Every L{INTERVAL} seconds, asks each connection to give back its TLS buffers if it
    has had no read for a whole interval (or has been busy for L{BUSY_SWEEPS}), a few
    hundred per turn of the reactor (L{sweep}); a tick that comes while the last pass
    is still going is skipped.

    One timer for all connections rather than one each: a timer is memory too, and
    the point is to keep less per connection.
    """

    name = "tls-buffers"
    log = Logger()

    def __init__(self, connections: Collection[ReleasesBuffers], reactor: Any, interval: float = INTERVAL) -> None:
        self.connections = connections
        self.reactor = reactor
        self.interval = interval
        self.released = 0
        """Connections given back their buffers since the start (for tests and curiosity)."""
        self._loop: LoopingCall | None = None
        self._trimming = False
        self._going: IDelayedCall | None = None  # the rest of a pass, in a later turn
        self._pass_released = 0

    def startService(self) -> None:
        super().startService()
        if _UNSUPPORTED is not None:
            self.log.warn("TLS buffers of quiet connections are kept, not given back: {why}", why=_UNSUPPORTED)
            return
        if _malloc_trim is None:
            self.log.info("no malloc_trim in this C library: memory given back stays with the process, for reuse")
        self._loop = LoopingCall(self.sweep)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False)

    def stopService(self) -> Any:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._going is not None and self._going.active():
            self._going.cancel()
        self._going = None
        return super().stopService()

    def sweep(self) -> int:
        """
        Start one pass over the connections; returns how many gave their buffers back
        in this turn of the reactor (all that do, unless the pass goes on later).

        A release costs 12-45 us of the reactor's time, so 10,000 connections going
        quiet together (the end of an alert storm) would hold every other connection's
        reads and answers for up to half a second: the pass stops after L{SLICE}
        releases, or L{SLICE_VISITS} connections looked at (at worst, a few under both
        limits: about 8 ms), and goes on in a later turn, after the reactor has served
        what came in meanwhile.  A connection that closed
        meanwhile is passed over.  A tick that comes while a pass is still going does
        not start another.

        Once a pass is done, if any connection gave its buffers back, glibc is asked to
        return free memory to the system: C{free} gives back only what is at the top of
        the heap, and a connection's buffers lie among objects that stay, so without it
        the pages would stay resident (and counted against the unit) until reused.  That
        walk takes about 1 ms per thousand connections, and 8 ms per thousand 64 KiB
        buffers it returns.  It runs on a thread, one at a time: the reactor goes on with
        its Python work meanwhile, though an allocation of its own from the C heap waits
        for glibc's lock.
        """
        if self._going is not None:
            return 0
        self._pass_released = 0
        return self._slice(iter(list(self.connections)))

    def _slice(self, todo: Iterator[ReleasesBuffers]) -> int:
        self._going = None
        released = visited = 0
        done = True
        for connection in todo:
            if connection not in self.connections:
                continue  # closed since the pass began
            try:
                if connection.release_idle_buffers():
                    released += 1
            except MemoryError as e:
                self.log.warn("could not give back a connection's TLS buffers: {error}", error=str(e))
                break
            except Exception:
                # not expected from OpenSSL or pyOpenSSL: stop rather than try again on
                # thousands of connections, and say so; the connections go on as they are
                self.log.failure("giving back a connection's TLS buffers failed; no more sweeps until restart")
                if self._loop is not None and self._loop.running:
                    self._loop.stop()
                self._loop = None
                break
            visited += 1
            if released >= SLICE or visited >= SLICE_VISITS:
                self._going = self.reactor.callLater(0, self._slice, todo)
                done = False
                break
        self.released += released
        self._pass_released += released
        if done and self._pass_released and _malloc_trim is not None and not self._trimming:
            self._trimming = True
            try:
                self.reactor.callInThread(self._trim)
            except Exception:
                self._trimming = False
                raise
        return released

    def _trim(self) -> None:
        try:
            _malloc_trim(0)
        finally:
            self._trimming = False
