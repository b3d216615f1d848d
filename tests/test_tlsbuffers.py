"""
Quiet connections give their TLS buffers back (iapd/tlsbuffers.py), and lose nothing.

The first tests take two real pyOpenSSL connections over memory BIOs (the manager's
context and a sensor's, as iapd makes them) and swap the manager side's BIOs at the
awkward moments: ciphertext waiting on either side, a record half read.  The sweep's
own tests drive it with a clock: a pass over many connections goes on over several
turns of the reactor.  The rest run a real manager (TCP on 127.0.0.1, TLS, SQLite):
bursts, a sweep, more alerts; a record cut in two by the sweep, sent by a peer that
does its own TLS (Python's ssl module) so the test decides where the cut falls;
connections that keep talking or are still in setup are left alone; a pass spread over
turns while the sensors go on sending.
"""

from __future__ import annotations

import ctypes
import ssl
import tempfile
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.application import service
from twisted.internet import reactor
from twisted.internet.base import DelayedCall
from twisted.internet.defer import inlineCallbacks
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, capturedLogs

from iapd import manager as manager_module
from iapd import tlsbuffers
from iapd.tls import (
    load_material,
    server_options,
    tls_profile,
    to_pyopenssl,
    trust_root,
)
from iapd.tlsbuffers import IdleBufferRelease, release, unsupported_reason

from .certs import make_test_pki
from .support import (
    OK,
    SERVER_VERIFY,
    UPGRADE,
    VERIFY,
    ManagerTestCase,
    content,
    setup_bytes,
)

WAIT = 10.0

pytestmark = pytest.mark.skipif(
    unsupported_reason() is not None, reason=f"buffers are not released here: {unsupported_reason()}"
)


# -- two connections in memory ---------------------------------------------------------


@pytest.fixture(scope="module")
def contexts() -> Any:
    from OpenSSL import crypto

    with tempfile.TemporaryDirectory() as d:
        pki = make_test_pki(Path(d))
        manager = load_material(*pki.manager, pki.ca)
        sensor = load_material(*pki.sensor, pki.ca)
        sensor_context = CertificateOptions(
            privateKey=crypto.load_privatekey(crypto.FILETYPE_PEM, sensor.key_pem),
            certificate=to_pyopenssl(sensor.certificate), trustRoot=trust_root(sensor), **tls_profile(),
        ).getContext()
        yield server_options(manager).getContext(), sensor_context


def move(source: Any, sink: Any) -> bool:
    try:
        data = source.bio_read(1 << 20)
    except SSL.WantReadError:
        return False
    sink.bio_write(data)
    return bool(data)


def pump(client: Any, server: Any) -> None:
    """Records back and forth until neither side has more to say (bounded)."""
    for _ in range(32):
        for end in (client, server):
            try:
                end.do_handshake()
            except SSL.WantReadError:
                pass
        if not (move(client, server) | move(server, client)):
            return
    raise AssertionError("the in-memory connection did not settle")


def read_all(connection: Any) -> bytes:
    got = b""
    for _ in range(1000):
        try:
            got += connection.recv(65536)
        except SSL.WantReadError:
            return got
    raise AssertionError("more than 1000 reads")


@pytest.fixture
def pair(contexts: Any) -> tuple[Any, Any]:
    manager_context, sensor_context = contexts
    server = SSL.Connection(manager_context, None)
    server.set_accept_state()
    client = SSL.Connection(sensor_context, None)
    client.set_connect_state()
    pump(client, server)
    assert server.get_peer_certificate() is not None
    return client, server


def test_after_the_handshake_the_conversation_goes_on(pair: tuple[Any, Any]) -> None:
    client, server = pair
    before = (server._into_ssl, server._from_ssl)
    assert release(server) is True
    assert (server._into_ssl, server._from_ssl) != before
    client.send(b"alert" * 1000)
    pump(client, server)
    assert read_all(server) == b"alert" * 1000
    server.send(b"IAP/0.2 200\r\n\r\n")
    pump(client, server)
    assert read_all(client) == b"IAP/0.2 200\r\n\r\n"


def test_ciphertext_waiting_to_be_read_is_kept(pair: tuple[Any, Any]) -> None:
    """Three records in the manager's incoming BIO, one read: the other two survive."""
    client, server = pair
    for letter in b"ABC":
        client.send(bytes([letter]) * 10000)
    server.bio_write(client.bio_read(1 << 20))
    first = server.recv(10000)
    assert first == b"A" * 10000
    assert release(server) is True
    assert read_all(server) == b"B" * 10000 + b"C" * 10000


def test_half_a_record_already_read_is_kept(pair: tuple[Any, Any]) -> None:
    """OpenSSL holds the first half of a record itself; the second comes after the swap."""
    client, server = pair
    client.send(b"D" * 12000)
    wire = client.bio_read(1 << 20)
    server.bio_write(wire[: len(wire) // 2])
    assert read_all(server) == b""
    assert release(server) is True
    server.bio_write(wire[len(wire) // 2:])
    assert read_all(server) == b"D" * 12000


def test_ciphertext_waiting_to_be_sent_is_kept(pair: tuple[Any, Any]) -> None:
    client, server = pair
    server.send(b"IAP/0.2 200\r\n\r\n" * 300)
    assert release(server) is True
    move(server, client)
    assert read_all(client) == b"IAP/0.2 200\r\n\r\n" * 300


def test_released_twice_in_a_row(pair: tuple[Any, Any]) -> None:
    client, server = pair
    assert release(server) and release(server)
    client.send(b"x")
    pump(client, server)
    assert read_all(server) == b"x"


def test_a_connection_over_a_socket_is_left_alone(contexts: Any) -> None:
    import socket

    a, b = socket.socketpair()
    try:
        connection = SSL.Connection(contexts[0], a)
        assert release(connection) is False
    finally:
        a.close()
        b.close()


def c_heap_in_use() -> int:
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc's mallinfo2")
def test_the_old_buffers_are_freed(contexts: Any) -> None:
    """What a 64 KiB read made the manager's incoming BIO grow to is handed back to malloc."""
    manager_context, sensor_context = contexts
    servers = []
    for _ in range(8):
        server = SSL.Connection(manager_context, None)
        server.set_accept_state()
        client = SSL.Connection(sensor_context, None)
        client.set_connect_state()
        pump(client, server)
        client.sendall(b"z" * 65536)
        server.bio_write(client.bio_read(1 << 20))  # one socket read's worth, in one write
        assert read_all(server) == b"z" * 65536
        servers.append(server)
    before = c_heap_in_use()
    for server in servers:
        assert release(server)
    freed = before - c_heap_in_use()
    assert freed > 8 * 64 * 1024, f"only {freed} octets freed for 8 connections"


def test_with_an_untested_pyopenssl_nothing_is_touched(pair: tuple[Any, Any], monkeypatch: Any) -> None:
    client, server = pair
    monkeypatch.setattr(tlsbuffers, "_UNSUPPORTED", "pyOpenSSL 99.0 is not one of the releases iapd was tested with")
    bios = (server._into_ssl, server._from_ssl)
    assert release(server) is False
    assert (server._into_ssl, server._from_ssl) == bios
    clock = Clock()
    sweeper = IdleBufferRelease([], clock)
    with capturedLogs() as events:
        sweeper.startService()
    assert not clock.getDelayedCalls()  # no sweeps at all
    warned = [e for e in events if e["log_level"] == LogLevel.warn]
    assert len(warned) == 1
    assert warned[0]["log_format"].startswith("TLS buffers of quiet connections are kept, not given back")
    assert warned[0]["why"] == "pyOpenSSL 99.0 is not one of the releases iapd was tested with"
    sweeper.stopService()


@pytest.mark.parametrize(("version", "why"), [
    ("26.4.0", None),
    ("23.0.0", None),
    ("22.1.0", "pyOpenSSL 22.1.0 is not one of the releases iapd was tested with (23.x to 26.x)"),
    ("27.0.0", "pyOpenSSL 27.0.0 is not one of the releases iapd was tested with (23.x to 26.x)"),
    ("main", "pyOpenSSL 'main' has no version number this understands"),
])
def test_only_tested_pyopenssl_releases(version: str, why: str | None) -> None:
    """A later pyOpenSSL might free the BIOs itself: they would be freed twice."""
    assert unsupported_reason(version) == why


class ThreadedClock(Clock):
    """A clock whose "threads" run at once, and are counted."""

    def __init__(self) -> None:
        super().__init__()
        self.in_thread = 0

    def callInThread(self, f: Any, *args: Any, **kw: Any) -> None:
        self.in_thread += 1
        f(*args, **kw)


def test_the_sweep_runs_every_interval_until_stopped() -> None:
    class Connection:
        def __init__(self) -> None:
            self.asked = 0

        def release_idle_buffers(self) -> bool:
            self.asked += 1
            return self.asked % 2 == 0

    clock = ThreadedClock()
    connections = [Connection(), Connection()]
    sweeper = IdleBufferRelease(connections, clock, interval=5.0)
    sweeper.startService()
    clock.advance(4.9)
    assert [c.asked for c in connections] == [0, 0]
    clock.advance(0.1)
    assert [c.asked for c in connections] == [1, 1] and sweeper.released == 0
    assert clock.in_thread == 0  # nothing given back, nothing to return to the system
    clock.advance(5.0)
    assert sweeper.released == 2
    assert clock.in_thread == 1  # one malloc_trim for the sweep, off the reactor's turn
    sweeper.stopService()
    clock.advance(50.0)
    assert [c.asked for c in connections] == [2, 2] and not clock.getDelayedCalls()


def test_one_trim_at_a_time() -> None:
    """A sweep while the last one's malloc_trim still runs does not start a second."""
    class Later(Clock):
        def __init__(self) -> None:
            super().__init__()
            self.queued: list[Any] = []

        def callInThread(self, f: Any, *args: Any, **kw: Any) -> None:
            self.queued.append(lambda: f(*args, **kw))

    class Connection:
        def release_idle_buffers(self) -> bool:
            return True

    clock = Later()
    sweeper = IdleBufferRelease([Connection()], clock)
    assert sweeper.sweep() == 1 and len(clock.queued) == 1
    assert sweeper.sweep() == 1 and len(clock.queued) == 1  # the first has not run yet
    clock.queued.pop()()
    assert sweeper.sweep() == 1 and len(clock.queued) == 1


class TurnClock(ThreadedClock):
    """A clock that runs what is called for the next turn (C{callLater(0, ...)}) only when told."""

    def __init__(self) -> None:
        super().__init__()
        self.next_turn: list[DelayedCall] = []

    def callLater(self, delay: float, f: Any, *args: Any, **kw: Any) -> DelayedCall:
        if delay:
            return super().callLater(delay, f, *args, **kw)
        call = DelayedCall(self.seconds(), f, args, kw, self.next_turn.remove, lambda c: None, seconds=self.seconds)
        self.next_turn.append(call)
        return call

    def turn(self) -> None:
        calls, self.next_turn = self.next_turn, []
        for call in calls:
            call.called = 1
            call.func(*call.args, **call.kw)


def test_a_pass_over_many_connections_is_spread_over_turns_of_the_reactor(monkeypatch: Any) -> None:
    """
    Thousands of connections going quiet together must not hold the reactor for a
    quarter of a second: SLICE releases, then the rest of the pass in later turns.
    """
    monkeypatch.setattr(tlsbuffers, "SLICE", 3)
    monkeypatch.setattr(tlsbuffers, "SLICE_VISITS", 5)

    class Connection:
        def __init__(self, gives: bool) -> None:
            self.gives, self.asked = gives, 0

        def release_idle_buffers(self) -> bool:
            self.asked += 1
            return self.gives

    clock = TurnClock()
    quiet = [Connection(True) for _ in range(7)]
    busy = [Connection(False) for _ in range(6)]
    connections = quiet + busy
    sweeper = IdleBufferRelease(connections, clock, interval=5.0)
    sweeper.startService()
    clock.advance(5.0)
    assert [c.asked for c in connections] == [1, 1, 1] + [0] * 10  # three released: this turn is over
    assert sweeper.released == 3 and clock.in_thread == 0  # no trim before the pass is done
    closed = quiet[4]
    connections.remove(closed)  # closed before its turn came
    clock.turn()
    assert [c.asked for c in quiet] == [1, 1, 1, 1, 0, 1, 1] and sweeper.released == 6
    clock.turn()
    assert [c.asked for c in busy] == [1, 1, 1, 1, 1, 0]  # five looked at, none gave back: over too
    assert sweeper.released == 6 and clock.in_thread == 0
    clock.turn()
    assert [c.asked for c in busy] == [1] * 6 and clock.in_thread == 1  # done: one trim for the pass
    assert closed.asked == 0
    assert not clock.next_turn and clock.getDelayedCalls()[0].getTime() == 10.0  # only the next tick


class Asked:
    """A connection that gives its buffers back when asked, or raises C{error}."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.asked, self.error = 0, error

    def release_idle_buffers(self) -> bool:
        self.asked += 1
        if self.error is not None:
            raise self.error
        return True


def test_a_tick_during_a_pass_starts_none_and_stopping_ends_it(monkeypatch: Any) -> None:
    monkeypatch.setattr(tlsbuffers, "SLICE", 1)
    clock = TurnClock()
    connections = [Asked() for _ in range(3)]
    sweeper = IdleBufferRelease(connections, clock, interval=5.0)
    sweeper.startService()
    clock.advance(5.0)
    assert [c.asked for c in connections] == [1, 0, 0]
    clock.advance(5.0)  # the next tick, the pass still going: no second one over the same connections
    assert [c.asked for c in connections] == [1, 0, 0]
    assert sweeper.sweep() == 0
    clock.turn()
    assert [c.asked for c in connections] == [1, 1, 0]
    sweeper.stopService()
    assert not clock.next_turn and not clock.getDelayedCalls()  # the rest of the pass went with it
    clock.turn()
    assert [c.asked for c in connections] == [1, 1, 0] and clock.in_thread == 0
    assert sweeper.sweep() == 1 and [c.asked for c in connections] == [2, 1, 0]  # a new pass, from the start


def test_an_error_in_a_later_turn_ends_the_pass(monkeypatch: Any) -> None:
    """
    Out of memory: the rest of the pass is dropped, the sweeps go on.  Anything else:
    the sweeps stop, as when it comes in the first turn.  Either way what was given
    back before is returned to the system.
    """
    monkeypatch.setattr(tlsbuffers, "SLICE", 1)
    for error in (MemoryError("BIO_new failed"), RuntimeError("SSL_set_bio went wrong")):
        clock = TurnClock()
        connections = [Asked(), Asked(), Asked(error), Asked()]
        sweeper = IdleBufferRelease(connections, clock, interval=5.0)
        sweeper.startService()
        with capturedLogs() as events:
            clock.advance(5.0)
            clock.turn()
            clock.turn()
        assert [c.asked for c in connections] == [1, 1, 1, 0] and sweeper.released == 2
        assert not clock.next_turn and clock.in_thread == 1  # the pass is over, its trim done
        logged = [e for e in events if e["log_level"] in (LogLevel.warn, LogLevel.critical)]
        assert len(logged) == 1
        connections[2].error = None
        clock.advance(5.0)
        if isinstance(error, MemoryError):
            assert logged[0]["log_level"] == LogLevel.warn and logged[0]["error"] == "BIO_new failed"
            assert [c.asked for c in connections] == [2, 1, 1, 0]  # the next tick: a new pass
        else:
            assert logged[0]["log_level"] == LogLevel.critical
            assert [c.asked for c in connections] == [1, 1, 1, 0] and not clock.getDelayedCalls()
        sweeper.stopService()


def test_an_unexpected_error_stops_the_sweeps_and_says_so() -> None:
    class Connection:
        def __init__(self, fails: bool) -> None:
            self.fails, self.asked = fails, 0

        def release_idle_buffers(self) -> bool:
            self.asked += 1
            if self.fails:
                raise RuntimeError("SSL_set_bio went wrong")
            return False

    clock = ThreadedClock()
    connections = [Connection(fails=True)]
    sweeper = IdleBufferRelease(connections, clock, interval=5.0)
    sweeper.startService()
    with capturedLogs() as events:
        clock.advance(5.0)
    assert [c.asked for c in connections] == [1]
    failures = [e for e in events if e["log_level"] == LogLevel.critical]
    assert len(failures) == 1 and "no more sweeps until restart" in failures[0]["log_format"]
    assert failures[0]["log_failure"].check(RuntimeError)
    clock.advance(60.0)
    assert [c.asked for c in connections] == [1] and not clock.getDelayedCalls()
    sweeper.stopService()


def test_the_manager_daemon_sweeps_its_connections(tmp_path: Path) -> None:
    from iapd import manager_tap

    with tempfile.TemporaryDirectory() as d:
        make_test_pki(Path(d))
        config = tmp_path / "manager.yaml"
        config.write_text(
            'identity: manager.test\nlisten: ["tcp:0:interface=127.0.0.1"]\n'
            f"tls: {{certificate: {d}/manager.test.crt, key: {d}/manager.test.key, ca: {d}/ca.crt}}\n"
            f"store: sqlite:///{tmp_path}/alerts.db\n"
        )
        options = manager_tap.Options()
        options.parseOptions(["-c", str(config)])
        top = manager_tap.makeService(options)
    sweeper = top.getServiceNamed("tls-buffers")
    listeners = [s for s in top if isinstance(s, service.Service) and hasattr(s, "factory")]
    assert isinstance(sweeper, IdleBufferRelease) and sweeper.interval == tlsbuffers.INTERVAL
    assert listeners and all(s.factory.connections is sweeper.connections for s in listeners)


# -- a real manager --------------------------------------------------------------------


class MemoryTLSPeer:
    """
    The sensor's TLS done by hand (Python's ssl over memory BIOs) on a plain TCP peer,
    so that a test can write any part of a record when it likes.
    """

    def __init__(self, raw: Any, pki: Any) -> None:
        crt, key = pki.sensor
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
        context.load_cert_chain(str(crt), str(key))
        self.raw, self.incoming, self.outgoing = raw, ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="manager.test")
        self.plain = b""

    def ciphertext(self) -> bytes:
        return self.outgoing.read()

    @inlineCallbacks
    def handshake(self) -> Any:
        for _ in range(20):
            try:
                self.tls.do_handshake()
                self.raw.transport.write(self.ciphertext())
                return
            except ssl.SSLWantReadError:
                self.raw.transport.write(self.ciphertext())
            yield self.raw.until_length(1).addTimeout(WAIT, reactor)
            self.incoming.write(self.raw.take())
        raise AssertionError("no handshake after 20 flights")

    def write(self, data: bytes) -> None:
        self.tls.write(data)
        self.raw.transport.write(self.ciphertext())

    @inlineCallbacks
    def until(self, wanted: bytes) -> Any:
        """Decrypt until C{wanted} has come; returns everything decrypted up to it."""
        for _ in range(200):
            try:
                while True:
                    self.plain += self.tls.read(65536)
            except ssl.SSLWantReadError:
                pass
            if wanted in self.plain:
                got, self.plain = self.plain.split(wanted, 1)
                return got + wanted
            yield self.raw.until_length(1).addTimeout(WAIT, reactor)
            self.incoming.write(self.raw.take())
        raise AssertionError(f"{wanted!r} did not come in 200 reads")


class ManagerBufferTests(ManagerTestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        yield super().setUp()
        self.sweeper = IdleBufferRelease(self.factory.connections, reactor)

    def only_connection(self) -> Any:
        (connection,) = self.factory.connections
        return connection

    def bios(self) -> tuple[Any, Any]:
        handle = self.only_connection().transport.getHandle()
        return handle._into_ssl, handle._from_ssl

    @inlineCallbacks
    def ready_peer(self) -> Any:
        peer = yield self.tls_peer()
        peer.transport.write(VERIFY)
        yield peer.until_length(len(OK + SERVER_VERIFY)).addTimeout(WAIT, reactor)
        self.assertEqual(peer.take(), OK + SERVER_VERIFY)
        peer.transport.write(OK)
        return peer

    @inlineCallbacks
    def send(self, peer: Any, bodies: list[bytes]) -> Any:
        peer.transport.write(b"".join(content(body) for body in bodies))
        yield peer.until_length(len(OK) * len(bodies)).addTimeout(WAIT, reactor)
        self.assertEqual(peer.take(), OK * len(bodies))

    def bodies(self) -> list[bytes]:
        return [row["body"] for row in self.stored()]

    @inlineCallbacks
    def test_a_burst_then_quiet_then_more_alerts(self) -> Any:
        peer = yield self.ready_peer()
        burst = [b"%05d" % i + b"x" * 4091 for i in range(64)]
        yield self.send(peer, burst)
        before = self.bios()
        self.assertEqual(self.sweeper.sweep(), 0)  # heard since the last sweep
        self.assertEqual(self.bios(), before)
        self.assertEqual(self.sweeper.sweep(), 1)  # quiet for a whole interval
        self.assertNotEqual(self.bios(), before)
        self.assertEqual(self.sweeper.sweep(), 0)  # given back already, nothing heard since
        yield self.send(peer, [b"after the release"])
        self.assertEqual(self.bodies(), burst + [b"after the release"])
        self.assertTrue(peer.connected_)

    @inlineCallbacks
    def test_a_connection_that_keeps_talking_keeps_its_buffers(self) -> Any:
        peer = yield self.ready_peer()
        bios = self.bios()
        for i in range(3):
            yield self.send(peer, [b"alert %d" % i])
            self.assertEqual(self.sweeper.sweep(), 0)
        self.assertEqual(self.bios(), bios)
        self.assertEqual(self.sweeper.sweep(), 1)

    @inlineCallbacks
    def test_a_connection_heard_at_every_sweep_gives_back_once_a_minute(self) -> Any:
        peer = yield self.ready_peer()
        yield self.send(peer, [b"%04d" % i + b"b" * 4092 for i in range(64)])
        self.sweeper.sweep()
        bios = self.bios()
        for i in range(tlsbuffers.BUSY_SWEEPS - 2):
            yield self.send(peer, [b"steady %d" % i])
            self.assertEqual(self.sweeper.sweep(), 0)
        self.assertEqual(self.bios(), bios)
        yield self.send(peer, [b"the busy limit"])
        self.assertEqual(self.sweeper.sweep(), 1)  # heard at BUSY_SWEEPS sweeps in a row
        self.assertNotEqual(self.bios(), bios)
        yield self.send(peer, [b"after"])
        self.assertEqual(len(self.bodies()), 64 + tlsbuffers.BUSY_SWEEPS - 2 + 2)

    @inlineCallbacks
    def test_a_pass_goes_on_in_later_turns_while_sensors_are_served(self) -> Any:
        """The reactor polls its sockets between two slices of a pass."""
        self.patch(tlsbuffers, "SLICE", 1)
        polls = [0]
        do_iteration = reactor.doIteration

        def counting(delay: Any) -> Any:
            polls[0] += 1
            return do_iteration(delay)

        released_at: list[int] = []

        def recording(handle: Any) -> bool:
            released_at.append(polls[0])
            return release(handle)

        self.patch(reactor, "doIteration", counting)
        self.patch(manager_module, "release", recording)
        peers = []
        for n in range(3):
            peer = yield self.ready_peer()
            yield self.send(peer, [b"%d-%04d" % (n, i) + b"c" * 4090 for i in range(16)])
            peers.append(peer)
        handles = [c.transport.getHandle() for c in self.factory.connections]
        before = [(h._into_ssl, h._from_ssl) for h in handles]
        self.assertEqual(self.sweeper.sweep(), 0)  # heard since the last sweep
        # from a timed call, as the service's own ticks are
        self.assertEqual((yield deferLater(reactor, 0, self.sweeper.sweep)), 1)  # one, and the rest later
        for _ in range(100):
            if self.sweeper._going is None:  # the pass is over
                break
            yield deferLater(reactor, 0, lambda: None)
        self.assertEqual(self.sweeper.released, 3)
        self.assertEqual(len(released_at), 3)
        self.assertTrue(released_at[0] < released_at[1] < released_at[2], released_at)
        self.assertTrue(all((h._into_ssl, h._from_ssl) != b for h, b in zip(handles, before)))
        for n, peer in enumerate(peers):
            yield self.send(peer, [b"after the pass %d" % n])
        self.assertEqual(len(self.bodies()), 3 * 16 + 3)

    @inlineCallbacks
    def test_out_of_memory_leaves_the_connection_to_the_next_sweep(self) -> Any:
        peer = yield self.ready_peer()
        yield self.send(peer, [b"%04d" % i + b"m" * 4092 for i in range(16)])
        failures = [MemoryError("BIO_new failed")]

        def failing_once(handle: Any) -> bool:
            if failures:
                raise failures.pop()
            return release(handle)

        self.patch(manager_module, "release", failing_once)
        bios = self.bios()
        self.sweeper.sweep()  # heard since the last sweep
        with capturedLogs() as events:
            self.assertEqual(self.sweeper.sweep(), 0)
        self.assertEqual([e["error"] for e in events if e["log_level"] == LogLevel.warn], ["BIO_new failed"])
        self.assertEqual(self.bios(), bios)
        self.assertEqual(self.sweeper.sweep(), 1)  # still quiet, still holding: asked again
        self.assertNotEqual(self.bios(), bios)
        yield self.send(peer, [b"after"])
        self.assertEqual(len(self.bodies()), 17)

    @inlineCallbacks
    def test_connections_still_in_setup_are_left_alone(self) -> Any:
        plain = yield self.raw_peer()
        plain.transport.write(setup_bytes())
        yield plain.until_contains(OK).addTimeout(WAIT, reactor)
        handshaken = yield self.tls_peer()  # TLS done, version verify not yet
        yield handshaken.handshake.addTimeout(WAIT, reactor)
        for _ in range(3):
            self.assertEqual(self.sweeper.sweep(), 0)
        handshaken.transport.write(VERIFY)
        yield handshaken.until_length(len(OK + SERVER_VERIFY)).addTimeout(WAIT, reactor)
        self.assertEqual(handshaken.take(), OK + SERVER_VERIFY)
        handshaken.transport.write(OK)
        yield self.send(handshaken, [b"after setup"])
        self.assertEqual(self.bodies(), [b"after setup"])

    @inlineCallbacks
    def test_a_record_cut_in_two_by_the_release(self) -> Any:
        """Half an alert's record arrives, the buffers go back, the other half follows."""
        raw = yield self.raw_peer()
        raw.transport.write(setup_bytes())
        yield raw.until_contains(OK).addTimeout(WAIT, reactor)
        raw.take()
        raw.transport.write(UPGRADE)
        yield raw.until_contains(b"IAP/0.2 101\r\n\r\n").addTimeout(WAIT, reactor)
        raw.take()
        peer = MemoryTLSPeer(raw, self.pki)
        yield peer.handshake()
        peer.write(VERIFY)
        self.assertEqual((yield peer.until(SERVER_VERIFY)), OK + SERVER_VERIFY)
        peer.write(OK)
        body = b"<alert>" + b"y" * 12000 + b"</alert>"
        peer.tls.write(content(body))
        wire = peer.ciphertext()
        manager_side = self.only_connection()
        self.sweeper.sweep()
        self.sweeper.sweep()  # whatever the setup left: given back
        self.assertFalse(manager_side._heard)
        raw.transport.write(wire[: len(wire) // 2])
        for _ in range(500):  # until the manager has read the first half
            if manager_side._heard:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertTrue(manager_side._heard)
        before = self.bios()
        self.assertEqual(self.sweeper.sweep(), 0)
        self.assertEqual(self.sweeper.sweep(), 1)
        self.assertNotEqual(self.bios(), before)
        self.assertEqual(self.bodies(), [])
        raw.transport.write(wire[len(wire) // 2:])
        self.assertEqual((yield peer.until(OK)), OK)
        self.assertEqual(self.bodies(), [body])
