"""
The sensor (IAP client) side of a connection, and a one-shot delivery API on top of it.

The client speaks first, whoever opened the TCP connection (draft 6.1), and is the TLS
client.  It checks what the manager cannot prove in plaintext: during the handshake
service_identity matches the manager certificate against the host written in CONNECT;
after it, the certificate must carry IAP_ALERT_CONSUMER, and the version verify inside
TLS must repeat the CONNECT version (a downgrade of the plaintext setup is caught here).

Alerts are pipelined up to a window and answered in order, so each response settles the
oldest alert in flight.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

import attr
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    ITLSTransport,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import messages as m
from .errors import IAPFailure, WireError
from .parser import MAX_LINE, MAX_SETUP_LINES, describe
from .roles import IAP_ALERT_CONSUMER, role_problem
from .setupreceiver import SetupReceiver
from .tls import TLSMaterial, client_options, peer_certificate, session_reused
from .urgent import UrgentDataWatcher


@attr.s(auto_attribs=True)
class SensorSettings:
    """What a sensor needs to deliver: built from sensor.yaml."""

    manager: str
    material: TLSMaterial
    window: int = 256
    setup_timeout: float = 10.0
    ack_timeout: float = 60.0
    """Longest wait for the next acknowledgement while alerts are in flight."""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Outcome:
    """The fate of one alert: acknowledged (code 200) or not, and why."""

    code: int | None
    reason: str = ""

    @property
    def acknowledged(self) -> bool:
        return self.code == 200


class ClientState:
    CONNECT_SENT = "CONNECT_SENT"
    UPGRADE_SENT = "UPGRADE_SENT"
    UPGRADE_ACCEPTED = "UPGRADE_ACCEPTED"
    HANDSHAKE = "HANDSHAKE"
    VERIFY_SENT = "VERIFY_SENT"
    SERVER_VERIFY = "SERVER_VERIFY"
    READY = "READY"
    CLOSED = "CLOSED"


def describe_connection_failure(reason: Failure) -> str:
    """One line for a user: why the connection ended before or during TLS."""
    value = reason.value
    from OpenSSL import SSL

    if isinstance(value, SSL.Error):
        details = []
        for item in value.args[0] if value.args and isinstance(value.args[0], list) else []:
            if isinstance(item, tuple) and item:
                details.append(str(item[-1]))
        text = ", ".join(details) or str(value)
        return f"TLS handshake failed: {text}"
    name = type(value).__name__
    if name == "VerificationError":
        return f"manager certificate does not match the CONNECT host: {value}"
    return reason.getErrorMessage() or name


@implementer(IHandshakeListener)
class SensorProtocol(SetupReceiver):
    """
    Drive one connection to READY, then carry alerts.

    C{ready} fires when the data phase begins, or fails with L{IAPFailure} saying what
    the manager (or a proxy) answered; C{closed} fires when the connection is gone.
    """

    log = Logger()

    def __init__(self, settings: SensorSettings, reactor: Any) -> None:
        self.settings = settings
        self.reactor = reactor
        self.state = ClientState.CONNECT_SENT
        self.ready: Deferred[SensorProtocol] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self._queue: collections.deque[tuple[bytes, Deferred[Outcome]]] = collections.deque()
        self._in_flight: collections.deque[Deferred[Outcome]] = collections.deque()
        self._failure: IAPFailure | None = None
        self._handshake_buffer = b""
        self._deadline: Any = None
        self._ack_timer: Any = None
        self.resumed: bool | None = None
        """Whether the TLS handshake resumed an earlier session (draft 6.7)."""
        self._urgent_fd: int | None = None

    def connectionMade(self) -> None:
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass
        # draft 6.2: an endpoint terminates a connection that carries urgent data
        self._urgent_fd = self.factory.urgent.watch(
            self.transport, lambda: self._abort(IAPFailure("TCP urgent data received (draft 6.2)"), hard=True)
        )
        self._deadline = self.reactor.callLater(self.settings.setup_timeout, self._setup_expired)
        self.transport.write(m.ConnectRequest(m.PROTOCOL, self.settings.manager).to_bytes())

    # -- setup ---------------------------------------------------------------------

    def setup_active(self) -> bool:
        return self.state not in (ClientState.CLOSED, ClientState.UPGRADE_ACCEPTED)

    def setup_failed(self, error: WireError) -> None:
        self._abort(IAPFailure(f"malformed message from peer: {error.reason}"))

    def setup_received(self, message: Any, lines: list[bytes]) -> None:
        if self.state == ClientState.READY:
            self._acknowledged(message)
            return
        handler: Callable[[Any], None] = getattr(self, "_on_" + self.state.lower(), self._unexpected)
        handler(message)

    def _unexpected(self, message: object) -> None:
        self._abort(IAPFailure(f"unexpected {describe(type(message))} in state {self.state}"))

    def _response(self, message: object, expected: int, step: str) -> bool:
        if not isinstance(message, m.Response):
            self._abort(IAPFailure(f"expected a response to {step}, got {describe(type(message))}"))
            return False
        if message.code != expected:
            why = f"{step} refused" + (f" ({message.reason})" if message.reason else "")
            self._abort(IAPFailure(why, message.code))
            return False
        return True

    def _on_connect_sent(self, message: object) -> None:
        if self._response(message, 200, f"CONNECT {self.settings.manager}"):
            self.state = ClientState.UPGRADE_SENT
            self.transport.write(m.UpgradeRequest(m.PROTOCOL).to_bytes())

    def _on_upgrade_sent(self, message: object) -> None:
        if not self._response(message, 101, "TLS upgrade"):
            return
        if not ITLSTransport.providedBy(self.transport):
            self._abort(IAPFailure("transport cannot start TLS"))
            return
        self.state = ClientState.UPGRADE_ACCEPTED
        self.setRawMode()

    def dataReceived(self, data: bytes) -> None:
        SetupReceiver.dataReceived(self, data)
        if self.state == ClientState.UPGRADE_ACCEPTED:
            self.state = ClientState.HANDSHAKE
            # the sensor is the TLS client even on a connection the manager dialed
            self.transport.startTLS(self.factory.tls_options(), normal=not self.factory.inbound)

    def rawDataReceived(self, data: bytes) -> None:
        if self.state == ClientState.UPGRADE_ACCEPTED:
            # plaintext after 101 and before our handshake: someone is injecting
            self._abort(IAPFailure(f"{len(data)} plaintext octets after 101 (injection); dropped"))
        elif self.state == ClientState.HANDSHAKE:
            self._handshake_buffer += data
            if len(self._handshake_buffer) > MAX_LINE * MAX_SETUP_LINES:
                self._abort(IAPFailure("manager sent too much before the handshake completed"))

    def handshakeCompleted(self) -> None:
        if self.state != ClientState.HANDSHAKE:
            return
        cert = peer_certificate(self.transport)
        problem = "is missing" if cert is None else role_problem(cert, IAP_ALERT_CONSUMER)
        if problem is not None:
            self._abort(IAPFailure(f"manager certificate {problem}"))
            return
        tls = self.factory.tls_options()
        self.resumed = tls.remember(self.transport) if isinstance(tls, ResumingCreator) else None
        self.state = ClientState.VERIFY_SENT
        self.transport.write(m.VersionVerify(m.PROTOCOL, m.IAP_VERSION, sender=True).to_bytes())
        extra, self._handshake_buffer = self._handshake_buffer, b""
        self.setLineMode(extra)

    def _on_verify_sent(self, message: object) -> None:
        if self._response(message, 200, "version verify"):
            self.state = ClientState.SERVER_VERIFY

    def _on_server_verify(self, message: object) -> None:
        if not isinstance(message, m.VersionVerify):
            self._abort(IAPFailure(f"expected the manager's version verify, got {describe(type(message))}"))
            return
        if message.version != m.PROTOCOL or message.iap_version != m.IAP_VERSION:
            self.transport.write(m.status(505))
            self._abort(
                IAPFailure(f"manager verifies {message.version} IAP-Version {message.iap_version}, we speak {m.PROTOCOL}", 505),
            )
            return
        self.transport.write(m.ok())
        tls = self.factory.tls_options()
        if isinstance(tls, ResumingCreator):
            # TLS 1.3 tickets arrive after the handshake, before the manager's verify
            tls.remember(self.transport)
        self.state = ClientState.READY
        if self._deadline.active():
            self._deadline.cancel()
        self.ready.callback(self)
        self._pump()

    # -- data ------------------------------------------------------------------------

    def send(self, content_type: str, body: bytes) -> Deferred[Outcome]:
        """Queue one alert; the Deferred fires with its L{Outcome}."""
        d: Deferred[Outcome] = Deferred()
        if self.state == ClientState.CLOSED:
            d.callback(Outcome(None, str(self._failure or "connection closed")))
            return d
        self._queue.append((m.Content(content_type, body).to_bytes(), d))
        if self.state == ClientState.READY:
            self._pump()
        return d

    def _pump(self) -> None:
        out = []
        while self._queue and len(self._in_flight) < self.settings.window:
            data, d = self._queue.popleft()
            out.append(data)
            self._in_flight.append(d)
        if out:
            self.transport.write(b"".join(out))
        self._arm_ack_timer()

    def _arm_ack_timer(self) -> None:
        """Keep a timer running while anything is in flight, restarted by each answer."""
        if self._ack_timer is not None and self._ack_timer.active():
            self._ack_timer.cancel()
        self._ack_timer = None
        if self._in_flight and self.state == ClientState.READY:
            self._ack_timer = self.reactor.callLater(self.settings.ack_timeout, self._ack_expired)

    def _ack_expired(self) -> None:
        self._ack_timer = None
        self._abort(IAPFailure(f"no acknowledgement within {self.settings.ack_timeout:g}s"), hard=True)

    def _acknowledged(self, message: object) -> None:
        if not isinstance(message, m.Response) or not self._in_flight:
            self._abort(IAPFailure(f"unexpected {describe(type(message))} from manager in data phase"))
            return
        d = self._in_flight.popleft()
        d.callback(Outcome(message.code, message.reason or ""))
        if self.state == ClientState.READY:
            self._pump()

    @property
    def outstanding(self) -> int:
        return len(self._queue) + len(self._in_flight)

    def close(self) -> Deferred[None]:
        """Close gracefully (TLS close_notify) once every alert has its answer."""
        self.transport.loseConnection()
        return self.closed

    # -- endings ---------------------------------------------------------------------

    def _setup_expired(self) -> None:
        self._abort(IAPFailure(f"setup not completed within {self.settings.setup_timeout}s (state {self.state})"))

    def _abort(self, failure: IAPFailure, hard: bool = False) -> None:
        if self.state == ClientState.CLOSED:
            return
        self._failure = failure
        self.log.warn("connection to {manager}: {failure}", manager=self.settings.manager, failure=str(failure))
        self.state = ClientState.CLOSED
        if hard:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.factory.urgent.unwatch(self._urgent_fd)
        for timer in (self._deadline, self._ack_timer):
            if timer is not None and timer.active():
                timer.cancel()
        was = self.state
        self.state = ClientState.CLOSED
        if self._failure is None:
            if was in (ClientState.HANDSHAKE, ClientState.VERIFY_SENT, ClientState.UPGRADE_ACCEPTED):
                self._failure = IAPFailure(describe_connection_failure(reason) if reason else "connection lost")
            elif was != ClientState.READY:
                self._failure = IAPFailure(f"connection closed by peer in state {was}")
            else:
                self._failure = IAPFailure("connection closed before acknowledgement")
        if not self.ready.called:
            self.ready.errback(self._failure)
        pending = list(self._in_flight) + [d for _, d in self._queue]
        self._in_flight.clear()
        self._queue.clear()
        for d in pending:
            d.callback(Outcome(None, str(self._failure)))
        self.closed.callback(None)


class SensorFactory(Factory):
    """Builds sensor connections; keeps one TLS client context for all of them."""

    noisy = False
    inbound = False
    """True when the manager opened the TCP connections this factory serves."""

    def __init__(self, settings: SensorSettings, reactor: Any) -> None:
        self.settings = settings
        self.reactor = reactor
        self.urgent = UrgentDataWatcher(reactor)
        self._tls: Any = None

    def buildProtocol(self, addr: Any) -> SensorProtocol:
        p = SensorProtocol(self.settings, self.reactor)
        p.factory = self
        return p

    def tls_options(self) -> Any:
        if self._tls is None:
            self._tls = ResumingCreator(client_options(self.settings.material, self.settings.manager))
        return self._tls


@implementer(IOpenSSLClientConnectionCreator)
class ResumingCreator:
    """
    Client TLS connections that offer the last session back (draft 6.7).

    Twisted's options make a fresh OpenSSL connection each time and never offer a
    session; this wrapper keeps the session of the last completed handshake and sets it
    on the next connection, which must come from the same Context (NOTES.md).  A full
    mutual-auth handshake costs the manager about 1.5 ms of CPU; a resumed one much less,
    which matters when thousands of sensors reconnect at once.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.session: Any = None

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:
        connection = self.inner.clientConnectionForTLS(tlsProtocol)
        if self.session is not None:
            try:
                connection.set_session(self.session)
            except (ValueError, Exception):  # a session from another Context: start afresh
                self.session = None
        return connection

    def remember(self, transport: Any) -> bool | None:
        """Keep C{transport}'s session; returns whether this handshake resumed one."""
        try:
            handle = transport.getHandle()
            self.session = handle.get_session()
        except Exception:  # not a pyOpenSSL transport: nothing to keep
            return None
        return session_reused(handle)




def deliver_ready(proto: SensorProtocol, alerts: Sequence[tuple[str, bytes]]) -> Deferred[list[Outcome]]:
    """Deliver C{alerts} over a connection in the data phase, then close it."""
    sends = [proto.send(ct, body) for ct, body in alerts]
    gathered = DeferredList(sends, consumeErrors=True) if sends else succeed([])

    def done(results: list[tuple[bool, Any]]) -> Deferred[list[Outcome]]:
        outcomes = [r if ok else Outcome(None, r.getErrorMessage()) for ok, r in results]
        if proto.state != ClientState.CLOSED:
            proto.transport.loseConnection()
        return proto.closed.addCallback(lambda _: outcomes)

    return gathered.addCallback(done)


def deliver_on(proto: SensorProtocol, alerts: Sequence[tuple[str, bytes]]) -> Deferred[list[Outcome]]:
    """
    Deliver C{alerts} over a connection that is being set up, then close it.

    Fires with one L{Outcome} per alert, in order; never fails: a setup that was
    refused gives every alert an outcome naming the status code and the reason.
    """

    def connected(_: Any) -> Deferred[list[Outcome]]:
        return deliver_ready(proto, alerts)

    def refused(failure: Failure) -> Deferred[list[Outcome]]:
        value = failure.value
        if isinstance(value, IAPFailure):
            outcome = Outcome(value.code, value.reason)
        else:
            outcome = Outcome(None, str(value))
        return proto.closed.addCallback(lambda _: [outcome for _ in alerts])

    return proto.ready.addCallbacks(connected, refused)


def deliver(
    reactor: Any, endpoint: Any, settings: SensorSettings, alerts: Sequence[tuple[str, bytes]]
) -> Deferred[list[Outcome]]:
    """Connect once through C{endpoint}, deliver C{alerts} pipelined, close."""
    factory = SensorFactory(settings, reactor)

    def unreachable(failure: Failure) -> list[Outcome]:
        why = failure.getErrorMessage()
        return [Outcome(None, f"cannot connect: {why}") for _ in alerts]

    return endpoint.connect(factory).addCallbacks(lambda proto: deliver_on(proto, alerts), unreachable)


class _InboundFactory(SensorFactory):
    """
    Serves inbound connections until one reaches READY; that one carries the alerts.

    A stranger connecting first must not lock the real manager out: every connection
    gets the whole IAP setup with certificate checks, and only a manager that passes
    them wins.  At most C{MAX_TRIES} setups run at once.
    """

    inbound = True
    MAX_TRIES = 8
    log = Logger()

    def __init__(self, settings: SensorSettings, reactor: Any) -> None:
        super().__init__(settings, reactor)
        self.first: Deferred[SensorProtocol] = Deferred()
        self._trying: set[SensorProtocol] = set()

    def buildProtocol(self, addr: Any) -> SensorProtocol | None:  # type: ignore[override]
        if self.first.called or len(self._trying) >= self.MAX_TRIES:
            return None
        proto = super().buildProtocol(addr)
        self._trying.add(proto)

        def won(_: Any) -> None:
            self._trying.discard(proto)
            if not self.first.called:
                self.first.callback(proto)
            else:
                proto.transport.loseConnection()

        def lost(failure: Failure) -> None:
            self._trying.discard(proto)
            self.log.warn("inbound connection from {addr} failed: {why}", addr=addr, why=failure.getErrorMessage())

        proto.ready.addCallbacks(won, lost)
        return proto


def deliver_inbound(
    reactor: Any, endpoint: Any, settings: SensorSettings, alerts: Sequence[tuple[str, bytes]], wait: float
) -> Deferred[list[Outcome]]:
    """
    Listen on C{endpoint} until a manager dials in (draft 6.1), then deliver over that
    connection.  The sensor still speaks first and is still the TLS client.
    """
    factory = _InboundFactory(settings, reactor)

    def listening(port: Any) -> Deferred[list[Outcome]]:
        first = factory.first
        first.addTimeout(wait, reactor)

        def stop_listening(result: Any) -> Deferred[Any]:
            return port.stopListening().addCallback(lambda _: result)

        def no_manager(failure: Failure) -> list[Outcome]:
            return [Outcome(None, f"no manager connected within {wait:g}s") for _ in alerts]

        d = first.addCallbacks(lambda proto: deliver_ready(proto, alerts), no_manager)
        return d.addBoth(stop_listening)

    def cannot_listen(failure: Failure) -> list[Outcome]:
        return [Outcome(None, f"cannot listen: {failure.getErrorMessage()}") for _ in alerts]

    return endpoint.listen(factory).addCallbacks(listening, cannot_listen)
