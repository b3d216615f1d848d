"""
The manager (IAP server) side of a connection: setup, upgrade, verify, then alerts.

The protocol class is glue: setup messages are collected by L{SetupReceiver} (a
C{LineReceiver}) and parsed by L{iapd.parser.parse_setup}; the data phase runs in raw
mode through an incremental L{iapd.parser.ContentReader}.  Decisions per state:

  state        expects                 on success             on error
  CONNECT      CONNECT [+ VIA]         200 -> UPGRADE         400 / 403 / 505, close
  UPGRADE      Upgrade: TLS/1.0        101, startTLS          400 / 500, close
  HANDSHAKE    (TLS handshake)         role check -> VERIFY   403 inside TLS, close
  VERIFY       IAP-Version verify      200 + our verify       505, close
  VERIFY_ACK   200 from the client     -> DATA                close
  DATA         alerts                  200 after commit       415, 503 kept; 400/411/413 close

Plaintext left in the buffer after the upgrade request is a STARTTLS injection: the
connection is dropped without answering.  The whole setup has one deadline.
"""

from __future__ import annotations

import copy
import fnmatch
import ipaddress
import itertools
from typing import Any, Callable

import attr
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, ITLSTransport
from twisted.internet.protocol import ServerFactory
from zope.interface import implementer

from . import messages as m
from .errors import WireError, bad_request
from .logs import ContextLogger
from .metrics import ManagerMetrics
from .parser import MAX_LINE, MAX_SETUP_LINES, ContentReader, Refused, describe
from .roles import IAP_ALERT_GENERATOR, identity_of, role_problem
from .setupreceiver import SetupReceiver, describe_peer
from .store import AlertRecord, utcnow
from .tls import (
    TLSMaterial,
    manager_unusable_reason,
    peer_certificate,
    server_options,
    session_reused,
)
from .tlsbuffers import BUSY_SWEEPS, release
from .urgent import UrgentDataWatcher

ANY_NETWORK = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))

# Back-pressure: a connection stops being read while this much awaits commit.
MAX_IN_FLIGHT = 4096
MAX_IN_FLIGHT_BYTES = 32 * 1024 * 1024


def network_allowed(networks: tuple[Any, ...], host: str) -> bool:
    """
    Whether a peer address lies in one of C{networks}; IPv4-mapped IPv6 addresses
    count as the IPv4 address they carry, so a dual-stack listener cannot be used to
    slip past an IPv4 allow-list.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in net for net in networks if net.version == address.version)


@attr.s(auto_attribs=True)
class ManagerSettings:
    """What a manager needs to answer connections; built from manager.yaml."""

    identity: str
    material: TLSMaterial | None
    setup_timeout: float = 10.0
    max_content_length: int = 1048576
    allow_sensors: tuple[str, ...] = ("*",)
    allow_networks: tuple[Any, ...] = ANY_NETWORK
    content_types: frozenset[str] = frozenset([m.IDEF_ALERT])

    def network_allowed(self, host: str) -> bool:
        return network_allowed(self.allow_networks, host)

    def sensor_allowed(self, identity: str) -> bool:
        return any(fnmatch.fnmatchcase(identity, p.lower()) for p in self.allow_sensors)

    def is_me(self, host: str) -> bool:
        return host.lower().rstrip(".") == self.identity.lower().rstrip(".")


class State:
    CONNECT = "CONNECT"
    UPGRADE = "UPGRADE"
    UPGRADE_REQUESTED = "UPGRADE_REQUESTED"
    HANDSHAKE = "HANDSHAKE"
    VERIFY = "VERIFY"
    VERIFY_ACK = "VERIFY_ACK"
    DATA = "DATA"
    CLOSED = "CLOSED"


class _Pending:
    """The place of one alert, or of several read together, in the in-order response queue."""

    __slots__ = ("count", "fatal", "reason", "response", "size")

    def __init__(self, size: int = 0, count: int = 0) -> None:
        self.response: bytes | None = None
        self.fatal = False
        self.size = size
        self.reason = ""
        self.count = count  # alerts waiting for the store


@implementer(IHandshakeListener)
class ManagerProtocol(SetupReceiver):
    """One sensor connection, from CONNECT to close."""

    factory: "ManagerFactory"
    __slots__ = (
        "_close_reason", "_deadline", "_gathering", "_handshake_buffer", "_heard", "_holding", "_in_flight",
        "_in_flight_bytes", "_paused", "_pending", "_reader", "_store_failing", "_unread", "_urgent_fd", "conn_id",
        "duplicates", "log", "peer", "peer_host", "rejected", "sensor", "state", "stored", "version", "via",
    )

    def _log_context(self) -> dict[str, Any]:
        return {"conn": self.conn_id, "peer": self.peer, "sensor": self.sensor}

    def connectionMade(self) -> None:
        f = self.factory
        self.conn_id = f.next_connection_id()
        self.peer_host, self.peer = describe_peer(self.transport)
        self.log = ContextLogger("iapd.manager.connection", self._log_context)
        f.metrics.connections_total.inc()
        self.state = State.CONNECT
        self.sensor: str | None = None
        self.via: tuple[str, ...] = ()
        self.version = m.PROTOCOL
        self.stored = self.duplicates = self.rejected = 0
        self._handshake_buffer = b""
        self._reader: ContentReader | None = None
        self._pending: list[_Pending] = []
        self._in_flight_bytes = 0
        self._in_flight = 0
        self._paused = False
        self._close_reason = "peer closed"
        self._urgent_fd: int | None = None
        self._store_failing = False
        self._unread: list[bytes] = []
        self._gathering = False
        self._heard = False  # see release_idle_buffers
        self._holding = 0
        self._deadline: IDelayedCall | None = f.reactor.callLater(f.settings.setup_timeout, self._setup_expired)
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass
        self.log.info("connection {conn} from {peer}", conn=self.conn_id, peer=self.peer)
        if not f.dialing and self.peer_host and not f.settings.network_allowed(self.peer_host):
            self._fail(WireError(403, f"source address {self.peer_host} is outside allow.networks"))
            return
        self._urgent_fd = f.urgent.watch(self.transport, self._urgent)
        f.connections.add(self)

    # -- setup phase: whole messages, one state each -------------------------------

    def setup_active(self) -> bool:
        return self.state not in (State.CLOSED, State.UPGRADE_REQUESTED)

    def setup_received(self, message: Any, lines: list[bytes]) -> None:
        handler: Callable[[Any], None] = getattr(self, "_on_" + self.state.lower())
        handler(message)

    def setup_failed(self, error: WireError) -> None:
        self._fail(error)

    def _expect(self, message: object, kind: type) -> bool:
        if isinstance(message, kind):
            return True
        self._fail(bad_request(f"expected {describe(kind)} in state {self.state}, got {describe(type(message))}"))
        return False

    def _on_connect(self, message: object) -> None:
        if not self._expect(message, m.ConnectRequest):
            return
        assert isinstance(message, m.ConnectRequest)
        if message.version != m.PROTOCOL:
            self._fail(WireError(505, f"{message.version} is not supported; this manager speaks {m.PROTOCOL}"))
            return
        if not self.factory.settings.is_me(message.host):
            me = self.factory.settings.identity
            self._fail(WireError(403, f"CONNECT names {message.host!r}, this manager is {me!r}"))
            return
        self.version, self.via = message.version, message.via
        self.state = State.UPGRADE
        self.transport.write(m.ok())

    def _on_upgrade(self, message: object) -> None:
        if not self._expect(message, m.UpgradeRequest):
            return
        assert isinstance(message, m.UpgradeRequest)
        if message.version != self.version:
            self._fail(WireError(505, f"upgrade request says {message.version}, CONNECT said {self.version}"))
            return
        if message.token != "TLS/1.0":
            self._fail(bad_request(f"unknown upgrade token {message.token!r} (expected TLS/1.0)"))
            return
        unusable = manager_unusable_reason(self.factory.settings.material)
        if unusable is None and not ITLSTransport.providedBy(self.transport):
            unusable = "the transport cannot start TLS"
        if unusable is not None:
            self.log.error("upgrade refused on connection {conn}: {reason}", conn=self.conn_id, reason=unusable)
            self._fail(WireError(500, unusable))
            return
        # Answer only once this read is over: if anything follows the request in the
        # buffer, it is plaintext that an attacker placed before the handshake.
        self.state = State.UPGRADE_REQUESTED
        self.setRawMode()

    def dataReceived(self, data: bytes) -> None:
        SetupReceiver.dataReceived(self, data)
        if self.state == State.UPGRADE_REQUESTED:
            self.state = State.HANDSHAKE
            self.transport.write(m.status(101))
            # the manager is the TLS server even on a connection it dialed (draft 6.1)
            self.transport.startTLS(self.factory.tls_options(), normal=not self.factory.dialing)
            self._gather_each_read()

    def _gather_each_read(self) -> None:
        """
        Have what one socket read brings reach the data phase at once.

        TLS hands it over one record (16 KiB at most) at a time: a 64 KiB read was four
        groups of alerts, each with its Deferred, its store hand-off and its answer (a
        TLS record and a send of its own); at 4 KiB an alert, a record holds only four.
        startTLS put Twisted's TLS protocol between the TCP transport and this one
        (C{transport.protocol}).  Its C{dataReceived} is wrapped, as startTLS itself
        wraps the transport's C{getHandle}, so that the records of one read are
        gathered and read together once it is decrypted: at the same point of the
        reactor's turn as before, not after it (a C{callLater(0)} let the store see an
        empty queue and start a summary pass with alerts already read).
        """
        tls = getattr(self.transport, "protocol", None)
        if tls is None or tls is self:
            return  # no TLS layer under this protocol: each read arrives whole already
        decrypt = tls.dataReceived

        def dataReceived(data: bytes) -> None:
            self._heard = True
            self._gathering = True
            try:
                decrypt(data)
            finally:
                self._gathering = False
                self._read_unread()

        try:
            tls.dataReceived = dataReceived
        except AttributeError:  # a TLS layer that cannot be wrapped: per record, as before
            return

    def rawDataReceived(self, data: bytes) -> None:
        if self.state == State.DATA:
            if self._gathering:
                self._unread.append(data)
            else:
                self._data_received(data)
        elif self.state == State.UPGRADE_REQUESTED:
            self.log.warn(
                "connection {conn} from {peer}: {n} plaintext octets after the upgrade request;"
                " dropping it (STARTTLS injection)",
                conn=self.conn_id, peer=self.peer, n=len(data),
            )
            self.state = State.CLOSED
            self._close_reason = "plaintext after upgrade request"
            self.transport.abortConnection()
        elif self.state == State.HANDSHAKE:
            self._handshake_buffer += data
            if len(self._handshake_buffer) > MAX_LINE * MAX_SETUP_LINES:
                self._fail(bad_request("too much data before the handshake completed"))

    def handshakeCompleted(self) -> None:
        if self.state != State.HANDSHAKE:
            return
        cert = peer_certificate(self.transport)
        if cert is None:
            self._fail(WireError(403, "no client certificate"))
            return
        problem = role_problem(cert, IAP_ALERT_GENERATOR)
        if problem is not None:
            self._fail(WireError(403, f"client certificate {cert.subject.rfc4514_string()!r} {problem}"))
            return
        identity = identity_of(cert)
        assert identity is not None
        if not self.factory.settings.sensor_allowed(identity):
            self._fail(WireError(403, f"sensor {identity!r} is not in allow.sensors"))
            return
        self.sensor = identity
        self.state = State.VERIFY
        extra, self._handshake_buffer = self._handshake_buffer, b""
        self.setLineMode(extra)

    def _on_verify(self, message: object) -> None:
        if not self._expect(message, m.VersionVerify):
            return
        assert isinstance(message, m.VersionVerify)
        if message.version != self.version or f"IAP/{message.iap_version}" != self.version:
            # the plaintext CONNECT may have been downgraded; this check is inside TLS
            said = f"{message.version} IAP-Version {message.iap_version}"
            self._fail(WireError(505, f"verify says {said}, CONNECT said {self.version}"))
            return
        self.state = State.VERIFY_ACK
        self.transport.write(m.ok(self.version) + m.VersionVerify(self.version, self.version[4:]).to_bytes())

    def _on_verify_ack(self, message: object) -> None:
        if not self._expect(message, m.Response):
            return
        assert isinstance(message, m.Response)
        if message.code != 200:
            self.log.warn(
                "sensor {sensor} refused our version verify with {code}", sensor=self.sensor, code=message.code
            )
            self._close(f"sensor answered {message.code} to our verify")
            return
        self._stop_deadline()
        self.state = State.DATA
        settings = self.factory.settings
        self._reader = ContentReader(settings.max_content_length, settings.content_types)
        self.factory.store.seen(self.sensor or "", self.peer, self.via)
        try:
            resumed = session_reused(self.transport.getHandle())
        except Exception:
            resumed = None
        self.log.info(
            "sensor {sensor} ready on connection {conn} from {peer} via {via}{resumed}",
            sensor=self.sensor, conn=self.conn_id, peer=self.peer, via=list(self.via),
            resumed=" (TLS session resumed)" if resumed else "",
        )
        self.setRawMode()

    # -- data phase ------------------------------------------------------------------

    def _read_unread(self) -> None:
        """The data phase's share of one socket read, gathered (L{_gather_each_read})."""
        unread, self._unread = self._unread, []
        if self.state == State.DATA and unread:
            self._data_received(unread[0] if len(unread) == 1 else b"".join(unread))

    def _data_received(self, data: bytes) -> None:
        assert self._reader is not None
        metrics = self.factory.metrics
        alerts: list[m.Content] = []  # read together, stored together, answered together
        received = 0
        for event in self._reader.feed(data):
            received += 1
            if isinstance(event, m.Content):
                alerts.append(event)
                continue
            if alerts:
                self._alerts(alerts)
                alerts = []
            if isinstance(event, Refused):
                self.rejected += 1
                metrics.alerts_rejected.labels(event.error.code).inc()
                self.log.warn(
                    "alert from {sensor} refused with {code}: {reason}",
                    sensor=self.sensor, code=event.error.code, reason=event.error.reason,
                )
                slot = _Pending()
                slot.response = m.status(event.error.code, self.version)
                self._pending.append(slot)
            else:
                self.rejected += 1
                metrics.alerts_rejected.labels(event.code).inc()
                slot = _Pending()
                slot.response = m.status(event.code, self.version)
                slot.fatal = True
                slot.reason = str(event)
                self._pending.append(slot)
                self.log.warn("sensor {sensor} broke framing: {error}; closing", sensor=self.sensor, error=str(event))
                break
        if alerts:
            self._alerts(alerts)
        if received:
            metrics.alerts_received.inc(received)  # once per read: each inc takes a lock
        self._flush()
        self._apply_backpressure()

    def _alerts(self, contents: list[m.Content]) -> None:
        """
        Hand alerts read together to the store as one group: one Deferred and one
        answer write for the group, not one per alert (draft order is kept: the group
        holds one place in the response queue).
        """
        slot = _Pending(sum(len(c.body) for c in contents), len(contents))
        self._pending.append(slot)
        self._in_flight_bytes += slot.size
        self._in_flight += slot.count
        received = utcnow()
        sensor, via, peer = self.sensor or "", self.via, self.peer
        d = self.factory.store.add_many([
            AlertRecord(sensor=sensor, content_type=c.content_type, body=c.body, via=via, peer=peer, received=received)
            for c in contents
        ])

        metrics = self.factory.metrics

        def settled(results: list[Any]) -> None:
            ok = m.ok(self.version)
            stored = results.count(True)
            duplicates = results.count(False)
            if stored + duplicates == len(results):  # the usual case: all committed
                self._store_failing = False
                self._answered(slot, ok * len(results), stored, duplicates)
                return
            answers = []
            stored = duplicates = 0
            for result in results:
                if result is True or result is False:
                    self._store_failing = False
                    if result:
                        stored += 1
                    else:
                        duplicates += 1
                    answers.append(ok)
                else:
                    if not self._store_failing:  # once per outage and connection, not per alert
                        self._store_failing = True
                        self.log.error(
                            "store unavailable, answering 503 to {sensor} on connection {conn}: {why}",
                            sensor=self.sensor, conn=self.conn_id, why=str(result),
                        )
                    self.rejected += 1
                    metrics.alerts_rejected.labels(503).inc()
                    answers.append(m.status(503, self.version))
            self._answered(slot, b"".join(answers), stored, duplicates)

        d.addCallback(settled)

    def _answered(self, slot: _Pending, response: bytes, stored: int, duplicates: int) -> None:
        self.stored += stored
        self.duplicates += duplicates
        metrics = self.factory.metrics
        if stored:
            metrics.alerts_stored.inc(stored)
        if duplicates:
            metrics.alerts_duplicate.inc(duplicates)
        slot.response = response
        self._settle(slot)

    def _settle(self, slot: _Pending) -> None:
        self._in_flight_bytes -= slot.size
        self._in_flight -= slot.count
        self._flush()
        self._apply_backpressure()

    def _flush(self) -> None:
        """Write every response whose turn has come; responses keep alert order."""
        pending = self._pending
        out = []
        for slot in pending:
            if slot.response is None:
                break
            out.append(slot.response)
            if slot.fatal:
                pending.clear()  # before the write and the close, which could flush again
                if self.state != State.CLOSED:
                    self.transport.write(b"".join(out))
                    self._close(slot.reason)
                return
        if not out:
            return
        # one cut per flush: a list emptied this way gives its memory back, where a
        # deque keeps a 64-place block for every idle connection
        del pending[:len(out)]
        if self.state != State.CLOSED:
            self.transport.write(b"".join(out))

    @property
    def in_flight(self) -> int:
        """Alerts read from this connection and not yet committed."""
        return self._in_flight

    def _apply_backpressure(self) -> None:
        if self.state != State.DATA:
            return
        heavy = self._in_flight >= MAX_IN_FLIGHT or self._in_flight_bytes >= MAX_IN_FLIGHT_BYTES
        if heavy and not self._paused:
            self._paused = True
            self.transport.pauseProducing()
        elif self._paused and self._in_flight < MAX_IN_FLIGHT // 2 and self._in_flight_bytes < MAX_IN_FLIGHT_BYTES // 2:
            self._paused = False
            self.transport.resumeProducing()

    def release_idle_buffers(self) -> bool:
        """
        Called by L{IdleBufferRelease} every few seconds: a connection in the data phase
        that has had no read for a whole interval gives back what its TLS buffers grew
        to (L{iapd.tlsbuffers}), once, until it is heard again; one heard at every sweep
        does so every L{BUSY_SWEEPS}.  Returns whether it did.

        C{_holding} counts the sweeps that found it heard since it last gave them back
        (0: nothing to give).  The state is enough to tell an open connection: the
        manager's own closes set it, and the peer's end in C{connectionLost}, which
        takes it out of the sweep at once.
        """
        heard, self._heard = self._heard, False
        if heard:
            self._holding += 1
            if self._holding < BUSY_SWEEPS:
                return False
        elif not self._holding:
            return False
        if self.state != State.DATA:
            return False
        released = release(self.transport.getHandle())  # on MemoryError, asked again next sweep
        self._holding = 0
        return released

    # -- endings ---------------------------------------------------------------------

    def _fail(self, error: WireError) -> None:
        """Answer C{error}'s status code (inside TLS if it is up) and close."""
        if self.state == State.CLOSED:
            return
        if self.state != State.DATA:
            self.factory.metrics.setup_failures.labels(error.code).inc()
        self.log.warn(
            "connection {conn} from {peer}{who}: {error}; closing",
            conn=self.conn_id, peer=self.peer, who=f" ({self.sensor})" if self.sensor else "", error=str(error),
        )
        self.transport.write(m.status(error.code, self.version if self.version else m.PROTOCOL))
        self._close(str(error))

    def _close(self, reason: str) -> None:
        self.state = State.CLOSED
        self._close_reason = reason
        self.transport.loseConnection()

    def _stop_deadline(self) -> None:
        # dropped, not only cancelled: the cancelled call object would stay for as long
        # as the connection lasts
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _setup_expired(self) -> None:
        if self.state in (State.DATA, State.CLOSED):
            return
        self.log.warn(
            "connection {conn} from {peer}: setup not completed within {t}s (in state {state}); closing",
            conn=self.conn_id, peer=self.peer, t=self.factory.settings.setup_timeout, state=self.state,
        )
        self.factory.metrics.setup_failures.labels("timeout").inc()
        self.state = State.CLOSED
        self._close_reason = "setup deadline"
        self.transport.abortConnection()

    def _urgent(self) -> None:
        if self.state != State.DATA:
            self.factory.metrics.setup_failures.labels("urgent").inc()
        self.log.warn(
            "connection {conn} from {peer}: TCP urgent data received (draft 6.2); closing",
            conn=self.conn_id, peer=self.peer,
        )
        self.state = State.CLOSED
        self._close_reason = "urgent data"
        self.transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if self._unread:  # defensive: Twisted ends connections after a read, not in one
            self._read_unread()
        self._stop_deadline()
        self.factory.urgent.unwatch(self._urgent_fd)
        self.factory.connections.discard(self)
        unanswered = sum(slot.count for slot in self._pending if slot.response is None)
        self.state = State.CLOSED
        self.log.info(
            "connection {conn} from {peer} closed ({why}): {stored} stored, {dup} duplicate, {rej} refused"
            "{more}",
            conn=self.conn_id, peer=self.peer, why=self._close_reason, stored=self.stored,
            dup=self.duplicates, rej=self.rejected,
            more=f", {unanswered} committing (the sensor will resend them)" if unanswered else "",
        )


class ManagerFactory(ServerFactory):
    """Shared state of a manager's connections: settings, store, TLS context."""

    protocol = ManagerProtocol
    noisy = False

    dialing = False
    """True for connections the manager opened itself (draft 6.1): their peer is an
    address the operator configured, so C{allow.networks} does not apply."""

    def __init__(
        self, settings: ManagerSettings, store: Any, reactor: Any, metrics: ManagerMetrics | None = None
    ) -> None:
        # one cell shared with the dialing twin, so that a reload reaches both
        self._live = [settings]
        self.store = store
        self.reactor = reactor
        self.urgent = UrgentDataWatcher(reactor)
        self.connections: set[ManagerProtocol] = set()
        self._ids = itertools.count(1)
        self._tls: Any = None
        self._tls_for: TLSMaterial | None = None
        self.metrics = metrics if metrics is not None else ManagerMetrics()
        self.metrics.watch_connections(
            self.connections, lambda: sum(1 for c in self.connections if c.state == State.DATA)
        )
        if hasattr(store, "commit_observers"):
            self.metrics.watch_store(store)

    @property
    def settings(self) -> ManagerSettings:
        return self._live[0]

    def reload(self, settings: ManagerSettings) -> None:
        """Use C{settings} for connections from now on.

        Connections already past setup keep going on the session they negotiated: the
        draft's key rollover notes (seeds/002) ask that new material take effect for
        new sessions without cutting the established ones.  Connections still in setup
        read the new allow-lists at their next step.
        """
        self._live[0] = settings

    def for_dialing(self) -> "ManagerFactory":
        """A factory for outgoing connections sharing this one's state and counters."""
        twin = copy.copy(self)
        twin.dialing = True
        return twin

    def next_connection_id(self) -> int:
        return next(self._ids)

    def tls_options(self) -> Any:
        """The server TLS context, rebuilt only when the material changes."""
        material = self.settings.material
        if self._tls is None or self._tls_for is not material:
            assert material is not None
            self._tls, self._tls_for = server_options(material), material
        return self._tls

