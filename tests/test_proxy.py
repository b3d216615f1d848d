"""
The proxy's setup phase and relay, in process, over real TCP and real TLS end to end.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater

from iapd.client import deliver
from iapd.proxy import ProxyFactory, ProxySettings, Route

from .processes import free_port
from .support import IDEF, OK, ManagerTestCase, RawPeer, content

WAIT = 20.0


class Upstream:
    """A fake next hop on a real port: records what arrives, answers what it is told."""

    def __init__(self, answer: bytes | None) -> None:
        self.answer = answer
        self.peers: list[RawPeer] = []
        self.connected: Deferred[RawPeer] = Deferred()
        outer = self

        class Answering(RawPeer):
            def dataReceived(self, data: bytes) -> None:
                first = not self.buffer
                super().dataReceived(data)
                if first and outer.answer is not None and b"\r\n\r\n" in self.buffer:
                    self.transport.write(outer.answer)

        def build() -> RawPeer:
            peer = Answering()
            self.peers.append(peer)
            if not self.connected.called:
                self.connected.callback(peer)
            return peer

        self.factory = Factory.forProtocol(build)


class ProxyCase(ManagerTestCase):
    timeout = 60

    def start_proxy(self, upstream_port: int | None = None, **overrides: Any) -> int:
        port = upstream_port if upstream_port is not None else self.port_number
        settings = ProxySettings(
            identity=overrides.pop("identity", "p.test"),
            routes=overrides.pop("routes", (Route("manager.test", f"tcp:host=127.0.0.1:port={port}"),)),
            **overrides,
        )
        self.proxy = ProxyFactory(settings, reactor)
        listening = reactor.listenTCP(0, self.proxy, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.addCleanup(self._drop_proxy_connections)
        return listening.getHost().port

    def _drop_proxy_connections(self) -> None:
        for proto in list(self.proxy.connections):
            for t in (proto.transport, proto.upstream.transport if proto.upstream else None):
                if t is not None and t.connected:
                    t.abortConnection()

    def start_upstream(self, answer: bytes | None) -> tuple[Upstream, int]:
        upstream = Upstream(answer)
        listening = reactor.listenTCP(0, upstream.factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)

        def drop() -> None:
            for peer in upstream.peers:
                if peer.connected_:
                    peer.transport.abortConnection()

        self.addCleanup(drop)
        return upstream, listening.getHost().port

    @inlineCallbacks
    def client(self, port: int) -> Any:
        peer = RawPeer()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), peer)
        self.addCleanup(lambda: peer.transport.abortConnection() if peer.connected_ else None)
        return peer

    @inlineCallbacks
    def refused(self, port: int, request: bytes, expected: bytes) -> Any:
        """Send C{request}; the proxy answers exactly C{expected} and closes."""
        peer = yield self.client(port)
        peer.transport.write(request)
        yield peer.lost.addTimeout(WAIT, reactor)
        self.assertEqual(peer.buffer, expected)


class ProxySetupTests(ProxyCase):
    @inlineCallbacks
    def test_appends_via_in_the_clients_version_and_relays_the_answer(self) -> Any:
        upstream, port = self.start_upstream(b"IAP/0.3 200 OK then\r\n\r\n")
        proxy = self.start_proxy(port)
        peer = yield self.client(proxy)
        peer.transport.write(b"IAP/0.3 CONNECT manager.test\r\nIAP/0.3 VIA outer.test\r\n\r\n")
        hop = yield upstream.connected
        yield hop.until_contains(b"\r\n\r\n").addTimeout(WAIT, reactor)
        self.assertEqual(
            hop.buffer, b"IAP/0.3 CONNECT manager.test\r\nIAP/0.3 VIA outer.test\r\nIAP/0.3 VIA p.test\r\n\r\n"
        )
        # relayed unchanged, reason phrase and all
        yield peer.until_length(len(b"IAP/0.3 200 OK then\r\n\r\n")).addTimeout(WAIT, reactor)
        self.assertEqual(peer.take(), b"IAP/0.3 200 OK then\r\n\r\n")
        # then a blind pipe both ways
        peer.transport.write(b"\x16\x03\x01 anything at all \xff\x00")
        yield hop.until_contains(b"\xff\x00").addTimeout(WAIT, reactor)
        hop.transport.write(b"\x00back")
        yield peer.until_contains(b"\x00back").addTimeout(WAIT, reactor)

    @inlineCallbacks
    def test_loop_is_502(self) -> Any:
        proxy = self.start_proxy()
        yield self.refused(proxy, b"IAP/0.2 CONNECT manager.test\r\nIAP/0.2 VIA P.TEST\r\n\r\n", b"IAP/0.2 502\r\n\r\n")
        yield self.refused(proxy, b"IAP/0.2 CONNECT p.test\r\n\r\n", b"IAP/0.2 502\r\n\r\n")

    @inlineCallbacks
    def test_no_route_is_403(self) -> Any:
        proxy = self.start_proxy()
        yield self.refused(proxy, b"IAP/0.2 CONNECT elsewhere.example\r\n\r\n", b"IAP/0.2 403\r\n\r\n")
        # a glob is anchored: a longer name ending elsewhere does not match
        yield self.refused(proxy, b"IAP/0.2 CONNECT manager.test.evil.example\r\n\r\n", b"IAP/0.2 403\r\n\r\n")

    @inlineCallbacks
    def test_source_outside_allow_networks_is_403(self) -> Any:
        proxy = self.start_proxy(allow_networks=(ipaddress.ip_network("10.0.0.0/8"),))
        yield self.refused(proxy, b"IAP/0.2 CONNECT manager.test\r\n\r\n", b"IAP/0.2 403\r\n\r\n")

    @inlineCallbacks
    def test_malformed_request_is_400(self) -> Any:
        proxy = self.start_proxy()
        yield self.refused(proxy, b"HELLO there\r\n\r\n", b"IAP/0.2 400\r\n\r\n")
        yield self.refused(proxy, b"IAP/0.2 Upgrade: TLS/1.0\r\n\r\n", b"IAP/0.2 400\r\n\r\n")
        yield self.refused(proxy, b"IAP/0.2 CONNECT " + b"a" * 2000 + b"\r\n", b"IAP/0.2 400\r\n\r\n")

    @inlineCallbacks
    def test_unreachable_next_hop_is_502(self) -> Any:
        proxy = self.start_proxy(free_port())
        yield self.refused(proxy, b"IAP/0.2 CONNECT manager.test\r\n\r\n", b"IAP/0.2 502\r\n\r\n")

    @inlineCallbacks
    def test_silent_next_hop_is_502_after_the_deadline(self) -> Any:
        _, port = self.start_upstream(None)
        proxy = self.start_proxy(port, setup_timeout=1.0)
        yield self.refused(proxy, b"IAP/0.2 CONNECT manager.test\r\n\r\n", b"IAP/0.2 502\r\n\r\n")

    @inlineCallbacks
    def test_next_hop_garbage_is_502(self) -> Any:
        _, port = self.start_upstream(b"HTTP/1.1 200 OK\r\n\r\n")
        proxy = self.start_proxy(port)
        yield self.refused(proxy, b"IAP/0.2 CONNECT manager.test\r\n\r\n", b"IAP/0.2 502\r\n\r\n")

    @inlineCallbacks
    def test_refusal_from_the_manager_is_relayed_unchanged(self) -> Any:
        _, port = self.start_upstream(b"IAP/0.2 403 Forbidden\r\n\r\n")
        proxy = self.start_proxy(port)
        yield self.refused(proxy, b"IAP/0.2 CONNECT manager.test\r\n\r\n", b"IAP/0.2 403 Forbidden\r\n\r\n")

    @inlineCallbacks
    def test_silent_client_is_dropped_at_the_deadline(self) -> Any:
        proxy = self.start_proxy(setup_timeout=1.0)
        peer = yield self.client(proxy)
        peer.transport.write(b"IAP/0.2 CONN")
        yield peer.lost.addTimeout(WAIT, reactor)
        self.assertEqual(peer.buffer, b"")


class ProxyEndToEndTests(ProxyCase):
    @inlineCallbacks
    def test_alerts_through_the_proxy(self) -> Any:
        proxy = self.start_proxy()
        bodies = [b"alert %d " % i + b"\xff" * (i % 300) for i in range(500)]
        outcomes = yield deliver(
            reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", proxy), self.sensor_settings(window=64),
            [(IDEF, b) for b in bodies],
        ).addTimeout(60, reactor)
        self.assertEqual([o.code for o in outcomes], [200] * len(bodies))
        stored = self.stored()
        self.assertEqual([a["body"] for a in stored], bodies)
        self.assertEqual({tuple(a["via"]) for a in stored}, {("p.test",)})

    @inlineCallbacks
    def test_manager_refusal_reaches_the_sensor_through_the_proxy(self) -> Any:
        proxy = self.start_proxy(routes=(Route("*", f"tcp:host=127.0.0.1:port={self.port_number}"),))
        outcomes = yield deliver(
            reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", proxy),
            self.sensor_settings(manager="other.test"), [(IDEF, b"x")],
        ).addTimeout(WAIT, reactor)
        self.assertEqual(outcomes[0].code, 403)
        self.assertEqual(self.stored(), [])

    @inlineCallbacks
    def test_bytes_sent_before_the_answer_are_forwarded_after_it(self) -> Any:
        """A sensor that pipelines its upgrade request behind CONNECT still works."""
        proxy = self.start_proxy()
        peer = yield self.client(proxy)
        peer.transport.write(b"IAP/0.2 CONNECT manager.test\r\n\r\nIAP/0.2 Upgrade: TLS/1.0\r\n\r\n")
        yield peer.until_contains(b"IAP/0.2 101\r\n\r\n").addTimeout(WAIT, reactor)
        self.assertEqual(peer.take(), OK + b"IAP/0.2 101\r\n\r\n")

    @inlineCallbacks
    def test_relay_ends_when_either_side_closes(self) -> Any:
        upstream, port = self.start_upstream(OK)
        proxy = self.start_proxy(port)
        peer = yield self.client(proxy)
        peer.transport.write(b"IAP/0.2 CONNECT manager.test\r\n\r\n")
        hop = yield upstream.connected
        yield peer.until_contains(OK).addTimeout(WAIT, reactor)
        peer.transport.write(content(b"last words"))
        yield hop.until_contains(b"last words").addTimeout(WAIT, reactor)
        hop.transport.loseConnection()
        yield peer.lost.addTimeout(WAIT, reactor)
        self.assertEqual(self.proxy.connections, set())


class RelayIntegrityTests(ProxyCase):
    @inlineCallbacks
    def test_megabytes_both_ways_arrive_intact_and_in_order(self) -> Any:
        """
        The relay writes straight to the socket when nothing is queued and queues the
        rest: under a burst far larger than any buffer, every byte still arrives once
        and in order, in both directions.
        """
        import hashlib
        import os

        upstream, port = self.start_upstream(OK)
        proxy = self.start_proxy(port)
        peer = yield self.client(proxy)
        peer.transport.write(b"IAP/0.2 CONNECT manager.test\r\n\r\n")
        hop = yield upstream.connected
        yield peer.until_contains(OK).addTimeout(WAIT, reactor)
        peer.take()
        yield hop.until_contains(b"\r\n\r\n").addTimeout(WAIT, reactor)
        hop.take()
        up = os.urandom(8 * 1024 * 1024)
        down = os.urandom(8 * 1024 * 1024)
        # neither end reads for a while: the proxy's sends come back short, then blocked
        hop.transport.pauseProducing()
        peer.transport.pauseProducing()
        for i in range(0, len(up), 100_000):
            peer.transport.write(up[i : i + 100_000])
            hop.transport.write(down[i : i + 100_000])
        yield deferLater(reactor, 0.5)
        hop.transport.resumeProducing()
        peer.transport.resumeProducing()
        yield hop.until_length(len(up)).addTimeout(60, reactor)
        yield peer.until_length(len(down)).addTimeout(60, reactor)
        self.assertEqual(hashlib.sha256(hop.buffer).hexdigest(), hashlib.sha256(up).hexdigest())
        self.assertEqual(hashlib.sha256(peer.buffer).hexdigest(), hashlib.sha256(down).hexdigest())


class ConnectionLimitTests(ProxyCase):
    @inlineCallbacks
    def test_one_source_cannot_take_every_descriptor(self) -> Any:
        proxy = self.start_proxy(max_per_source=2)
        held = []
        for _ in range(2):
            peer = yield self.client(proxy)
            held.append(peer)
        yield deferLater(reactor, 0.1)  # the proxy has seen both
        yield self.refused(proxy, b"IAP/0.2 CONNECT manager.test\r\n\r\n", b"IAP/0.2 503\r\n\r\n")
        # once one closes, the source may connect again
        held[0].transport.loseConnection()
        yield held[0].lost
        yield deferLater(reactor, 0.1)
        peer = yield self.client(proxy)
        peer.transport.write(b"IAP/0.2 CONNECT manager.test\r\n\r\n")
        yield peer.until_contains(OK).addTimeout(WAIT, reactor)
        self.assertEqual(self.proxy.per_source, {"127.0.0.1": 2})
        # every connection gone, refused or not: nothing is left counted
        for p in (held[1], peer):
            p.transport.loseConnection()
            yield p.lost
        for _ in range(100):
            if not self.proxy.connections:
                break
            yield deferLater(reactor, 0.02)
        self.assertEqual(self.proxy.connections, set())
        self.assertEqual(self.proxy.per_source, {})
