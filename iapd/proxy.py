"""
The proxy: an untrusted relay that takes part only in the plaintext setup phase.

It reads the sensor's CONNECT request, refuses loops (a VIA naming this proxy: 502),
sources outside C{allow.networks} and hosts no route allows (403: it is never an open
relay), appends its own C{VIA} line in the client's version, connects to the next hop
chosen by the first matching route, and relays the next hop's answer unchanged.  After
a 200 it becomes a blind byte pipe both ways: the TLS session between sensor and
manager passes through it, so it can neither read nor alter what follows.

Relaying is Twisted's producer/consumer pairing: each side's transport is registered as
the producer of the other, so a side whose write buffer fills pauses reading on the
other side, and memory stays bounded whatever the two rates are.  Relayed bytes are
never logged, copied or inspected; each chunk read is written as it is.
"""

from __future__ import annotations

import collections
import fnmatch
import itertools
from typing import Any

import attr
from twisted.internet import endpoints
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger

from . import messages as m
from .errors import WireError, bad_request
from .manager import ANY_NETWORK, network_allowed
from .parser import MAX_HEADER_BYTES, describe, parse_setup
from .setupreceiver import SetupReceiver, describe_peer

# After one side has gone, how long the other may take to flush what it still holds.
CLOSE_GRACE = 10.0


def forward(transport: Any, data: bytes) -> None:
    """
    Write C{data} on C{transport}, sending at once when nothing is queued there.

    Twisted's C{write} only queues and sends on the reactor's next pass, which costs a
    wakeup and two epoll registrations per chunk: that is most of a relay's work for
    stop-and-wait senders.  When the outgoing queue is empty the bytes can go straight
    to the socket; whatever the socket does not take is queued as usual, so ordering
    and back-pressure are unchanged.
    """
    if not transport.dataBuffer and not getattr(transport, "_tempDataLen", 1) and transport.connected \
            and not transport.disconnecting:
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)


@attr.s(frozen=True, auto_attribs=True)
class Route:
    """Hosts matching C{match} (a case-insensitive glob) go to C{upstream}."""

    match: str
    upstream: str

    def matches(self, host: str) -> bool:
        return fnmatch.fnmatchcase(host.lower().rstrip("."), self.match.lower())


@attr.s(auto_attribs=True)
class ProxySettings:
    identity: str
    routes: tuple[Route, ...]
    allow_networks: tuple[Any, ...] = ANY_NETWORK
    setup_timeout: float = 10.0
    max_connections: int = 10000
    max_per_source: int = 256

    def route_for(self, host: str) -> Route | None:
        for route in self.routes:
            if route.matches(host):
                return route
        return None

    def is_me(self, host: str) -> bool:
        return host.lower().rstrip(".") == self.identity.lower().rstrip(".")


class UpstreamProtocol(Protocol):
    """
    The proxy's connection to the next hop: first the setup answer, then relay.
    """

    def __init__(self, downstream: "ProxyProtocol") -> None:
        self.downstream = downstream
        self.relaying = False
        self._answer = b""

    def connectionMade(self) -> None:
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass

    def dataReceived(self, data: bytes) -> None:
        if self.relaying:
            forward(self.downstream.transport, data)
            return
        self._answer += data
        end = self._answer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._answer) > MAX_HEADER_BYTES:
                self.downstream.upstream_failed("next hop sent an oversized answer")
            return
        answer, rest = self._answer[: end + 4], self._answer[end + 4 :]
        self._answer = b""
        self.downstream.upstream_answered(answer, rest)

    def connectionLost(self, reason: Any = None) -> None:
        self.downstream.upstream_lost()


class ProxyProtocol(SetupReceiver):
    """One client connection: setup with the client, then a pipe to the next hop."""

    log = Logger()
    factory: "ProxyFactory"

    def connectionMade(self) -> None:
        f = self.factory
        self.conn_id = f.next_connection_id()
        self.peer_host, self.peer = describe_peer(self.transport)
        self.state = "CONNECT"
        self.version = m.PROTOCOL
        self._early = b""
        self.upstream: UpstreamProtocol | None = None
        self._connecting: Deferred[Any] | None = None
        self._grace: Any = None
        self._client_gone = self._upstream_gone = False
        self._deadline = f.reactor.callLater(f.settings.setup_timeout, self._setup_expired)
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass
        f.connections.add(self)
        f.per_source[self.peer_host] += 1
        if self.peer_host and not network_allowed(f.settings.allow_networks, self.peer_host):
            self._refuse(WireError(403, f"source address {self.peer_host} is outside allow.networks"))
            return
        # descriptors are the proxy's scarce resource: one source cannot take them all
        if len(f.connections) > f.settings.max_connections:
            self._refuse(WireError(503, f"more than {f.settings.max_connections} connections"))
        elif f.per_source[self.peer_host] > f.settings.max_per_source:
            self._refuse(WireError(503, f"more than {f.settings.max_per_source} connections from {self.peer_host}"))

    # -- setup -----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.state == "RELAY":
            assert self.upstream is not None
            forward(self.upstream.transport, data)
        elif self.state == "CONNECT":
            SetupReceiver.dataReceived(self, data)
        elif self.state == "UPSTREAM":
            # bytes sent before the next hop answered: hold them, bounded
            self._early += data
            if len(self._early) > MAX_HEADER_BYTES:
                self._refuse(bad_request("client sent too much before the setup was answered"))

    def setup_active(self) -> bool:
        return self.state == "CONNECT"

    def setup_failed(self, error: WireError) -> None:
        self._refuse(error)

    def setup_received(self, message: Any, lines: list[bytes]) -> None:
        if not isinstance(message, m.ConnectRequest):
            self._refuse(bad_request(f"expected CONNECT request, got {describe(type(message))}"))
            return
        self.version = message.version
        settings = self.factory.settings
        if any(settings.is_me(hop) for hop in message.via):
            self._refuse(WireError(502, f"loop: VIA already names this proxy ({settings.identity})"))
            return
        if settings.is_me(message.host):
            self._refuse(WireError(502, f"loop: CONNECT names this proxy ({settings.identity})"))
            return
        route = settings.route_for(message.host)
        if route is None:
            self._refuse(WireError(403, f"no route allows {message.host!r}"))
            return
        self.host = message.host
        # keep what follows the CONNECT block (nothing, from a well-behaved sensor)
        self.state = "UPSTREAM"
        self.setRawMode()
        request = b"".join(line + b"\r\n" for line in lines)
        request += f"{message.version} VIA {settings.identity}\r\n\r\n".encode("ascii")
        self._connect(route, request)

    def rawDataReceived(self, data: bytes) -> None:
        # only reached for bytes that followed the CONNECT block in the same read
        self._early += data

    def _connect(self, route: Route, request: bytes) -> None:
        f = self.factory
        try:
            endpoint = endpoints.clientFromString(f.reactor, route.upstream)
        except (ValueError, TypeError) as e:
            self._refuse(WireError(502, f"route {route.match!r} has an unusable upstream: {e}"))
            return
        self.upstream = UpstreamProtocol(self)
        d = endpoints.connectProtocol(endpoint, self.upstream)
        self._connecting = d

        def connected(upstream: UpstreamProtocol) -> None:
            self._connecting = None
            if self.state != "UPSTREAM":
                upstream.transport.abortConnection()
                return
            upstream.transport.write(request)

        def failed(failure: Any) -> None:
            self._connecting = None
            if failure.check(CancelledError):
                return
            self.upstream = None
            self._refuse(WireError(502, f"next hop {route.upstream} unreachable: {failure.getErrorMessage()}"))

        d.addCallbacks(connected, failed)
        self.log.info(
            "connection {conn} from {peer}: CONNECT {host} via {route}",
            conn=self.conn_id, peer=self.peer, host=self.host, route=route.upstream,
        )

    def upstream_answered(self, answer: bytes, rest: bytes) -> None:
        """The next hop's setup answer: relay it unchanged; on 200, become a pipe."""
        if self.state != "UPSTREAM":
            return
        lines = answer[:-4].split(b"\r\n")
        message = parse_setup(lines)
        if not isinstance(message, m.Response):
            self.upstream_failed("next hop's answer is not an IAP response")
            return
        self.transport.write(answer)
        if message.code != 200:
            self.log.info(
                "connection {conn}: next hop refused CONNECT {host} with {code}",
                conn=self.conn_id, host=self.host, code=message.code,
            )
            self._close_both(f"next hop answered {message.code}")
            return
        self._deadline.cancel()
        self.state = "RELAY"
        assert self.upstream is not None
        self.upstream.relaying = True
        up, down = self.upstream.transport, self.transport
        # each side pauses the other when its own write buffer is full
        down.registerProducer(up, True)
        up.registerProducer(down, True)
        if rest:
            down.write(rest)
        early, self._early = self._early, b""
        if early:
            up.write(early)
        self.log.info(
            "connection {conn} from {peer}: relaying to {host}", conn=self.conn_id, peer=self.peer, host=self.host
        )

    def upstream_failed(self, why: str) -> None:
        if self.state in ("UPSTREAM", "CONNECT"):
            self._refuse(WireError(502, why))

    def upstream_lost(self) -> None:
        self._upstream_gone = True
        if self.state == "UPSTREAM":
            self._refuse(WireError(502, "next hop closed the connection before answering"))
        elif self.state == "RELAY":
            self._close_both("next hop closed")
        self._both_gone()

    def _both_gone(self) -> None:
        if self._client_gone and (self.upstream is None or self._upstream_gone) and self._grace is not None:
            self._grace.cancel()
            self._grace = None

    # -- endings ---------------------------------------------------------------------

    def _refuse(self, error: WireError) -> None:
        if self.state in ("CLOSED", "RELAY"):
            return
        self.log.warn(
            "connection {conn} from {peer}: {error}; closing", conn=self.conn_id, peer=self.peer, error=str(error)
        )
        self.transport.write(m.status(error.code, self.version))
        self._close_both(str(error))

    def _close_both(self, why: str) -> None:
        if self.state == "CLOSED":
            return
        if self.state == "RELAY":
            self.log.info("connection {conn} from {peer}: relay ended ({why})", conn=self.conn_id, peer=self.peer, why=why)
        self.state = "CLOSED"
        if self._deadline.active():
            self._deadline.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        for transport in (self.transport, self.upstream.transport if self.upstream else None):
            if transport is not None and transport.connected:
                transport.loseConnection()
        # a side that cannot flush (its peer stopped reading) must not hold descriptors
        self._grace = self.factory.reactor.callLater(CLOSE_GRACE, self._abort_both)

    def _abort_both(self) -> None:
        self._grace = None
        for transport in (self.transport, self.upstream.transport if self.upstream else None):
            if transport is not None and transport.connected:
                transport.abortConnection()

    def _setup_expired(self) -> None:
        if self.state in ("CONNECT", "UPSTREAM"):
            what = "client" if self.state == "CONNECT" else "next hop"
            self.log.warn(
                "connection {conn} from {peer}: {what} did not complete setup within {t}s; closing",
                conn=self.conn_id, peer=self.peer, what=what, t=self.factory.settings.setup_timeout,
            )
            if self.state == "UPSTREAM":
                self._refuse(WireError(502, "next hop did not answer in time"))
            else:
                self.state = "CLOSED"
                self.transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        was = self.state
        self._client_gone = True
        if was != "CLOSED":
            self._close_both("client closed")
        self._both_gone()
        f = self.factory
        if self in f.connections:
            f.connections.discard(self)
            f.per_source[self.peer_host] -= 1
            if not f.per_source[self.peer_host]:
                del f.per_source[self.peer_host]


class ProxyFactory(ServerFactory):
    protocol = ProxyProtocol
    noisy = False

    def __init__(self, settings: ProxySettings, reactor: Any) -> None:
        self.settings = settings
        self.reactor = reactor
        self.connections: set[ProxyProtocol] = set()
        self.per_source: collections.Counter[str | None] = collections.Counter()
        """Connections open from each source address: counted, not searched for, when
        one more arrives (a search made accepting 10,000 sensors quadratic)."""
        self._ids = itertools.count(1)

    def next_connection_id(self) -> int:
        return next(self._ids)

