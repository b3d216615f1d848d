"""
The sensor side (iapd.client: SensorProtocol, deliver()) against the real manager, over
real loopback TCP and real TLS: what every alert's Outcome says, and what got stored.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol

from iapd.client import Outcome, deliver
from iapd.manager import ManagerFactory
from iapd.tls import load_material, server_options

from .support import IDEF, ManagerTestCase

WAIT = 20.0


class SensorCase(ManagerTestCase):
    timeout = 60


    def deliver(self, alerts: list[tuple[str, bytes]], endpoint: Any = None, **settings: Any) -> Any:
        """deliver() to the test manager, failing the test if it does not finish in time."""
        d = deliver(reactor, endpoint or self.endpoint(), self.sensor_settings(**settings), alerts)
        return d.addTimeout(WAIT, reactor)

    def bodies(self) -> list[bytes]:
        return [a["body"] for a in self.stored()]

    def assert_all_failed(self, outcomes: list[Outcome], count: int, code: int | None, *words: str) -> None:
        """C{count} outcomes, none acknowledged, each with C{code} and a reason naming C{words}."""
        self.assertEqual(len(outcomes), count)
        for outcome in outcomes:
            self.assertFalse(outcome.acknowledged)
            self.assertEqual(outcome.code, code, outcome)
            for word in words:
                self.assertIn(word.lower(), outcome.reason.lower(), outcome)


def alerts(n: int, prefix: bytes = b"alert") -> list[tuple[str, bytes]]:
    return [(IDEF, b"%s %04d" % (prefix, i)) for i in range(n)]


class DeliveryTests(SensorCase):
    @inlineCallbacks
    def test_pipelined_thousand_alerts(self) -> Any:
        """1000 alerts through a window of 64: all 200, stored once each, in order."""
        batch = alerts(1000)
        outcomes = yield self.deliver(batch, window=64)
        self.assertEqual(len(outcomes), 1000)
        self.assertEqual({o.code for o in outcomes}, {200})
        self.assertTrue(all(o.acknowledged for o in outcomes))
        self.assertEqual(self.bodies(), [body for _, body in batch])
        self.assertEqual({a["sensor"] for a in self.stored()}, {"sensor1.test"})

    @inlineCallbacks
    def test_window_of_one(self) -> Any:
        batch = alerts(20)
        outcomes = yield self.deliver(batch, window=1)
        self.assertEqual([o.code for o in outcomes], [200] * 20)
        self.assertEqual(self.bodies(), [body for _, body in batch])

    @inlineCallbacks
    def test_unaccepted_content_type(self) -> Any:
        """Only the text/plain alert is refused (415); its neighbours are stored."""
        batch = [(IDEF, b"first"), ("text/plain", b"second"), (IDEF, b"third")]
        outcomes = yield self.deliver(batch)
        self.assertEqual([o.code for o in outcomes], [200, 415, 200])
        self.assertEqual([o.acknowledged for o in outcomes], [True, False, True])
        self.assertEqual(self.bodies(), [b"first", b"third"])

    @inlineCallbacks
    def test_retransmission_acknowledged_and_stored_once(self) -> Any:
        first = yield self.deliver([(IDEF, b"again")])
        second = yield self.deliver([(IDEF, b"again")])
        self.assertEqual([o.code for o in first + second], [200, 200])
        self.assertEqual(self.bodies(), [b"again"])

    @inlineCallbacks
    def test_empty_batch(self) -> Any:
        outcomes = yield self.deliver([])
        self.assertEqual(outcomes, [])
        self.assertEqual(self.stored(), [])


class ContentTooLargeTests(SensorCase):
    settings_overrides = {"max_content_length": 100}

    @inlineCallbacks
    def test_alert_too_large(self) -> Any:
        """
        413 closes the connection: the alert before is acknowledged, the large one gets
        413, and the one pipelined behind it is not acknowledged (the sensor keeps it).
        """
        batch = [(IDEF, b"small"), (IDEF, b"L" * 101), (IDEF, b"behind")]
        outcomes = yield self.deliver(batch)
        self.assertEqual([o.code for o in outcomes], [200, 413, None])
        self.assertFalse(outcomes[2].acknowledged)
        self.assertTrue(outcomes[2].reason)
        self.assertEqual(self.bodies(), [b"small"])


class WrongHostTests(SensorCase):
    @inlineCallbacks
    def test_connect_to_wrong_host(self) -> Any:
        """The sensor CONNECTs to a host the manager is not: every outcome is 403."""
        outcomes = yield self.deliver(alerts(3), manager="other-manager.test")
        self.assert_all_failed(outcomes, 3, 403, "CONNECT other-manager.test")
        self.assertEqual(self.stored(), [])


class UnreachableTests(SensorCase):
    @inlineCallbacks
    def test_unreachable_port(self) -> Any:
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        number = port.getHost().port
        yield port.stopListening()
        outcomes = yield self.deliver(alerts(3), endpoint=TCP4ClientEndpoint(reactor, "127.0.0.1", number))
        self.assert_all_failed(outcomes, 3, None, "cannot connect")
        self.assertEqual(self.stored(), [])


class ManagerCertificateWithoutConsumerTests(SensorCase):
    """
    The manager runs with a certificate of the right CA and name but without
    IAP_ALERT_CONSUMER (manager_as_sensor): it answers 500 to the upgrade.
    """

    manager_cert = "manager_as_sensor"

    @inlineCallbacks
    def test_upgrade_refused_500(self) -> Any:
        outcomes = yield self.deliver(alerts(3))
        self.assert_all_failed(outcomes, 3, 500, "TLS upgrade refused")
        self.assertEqual(self.stored(), [])


class RogueManagerFactory(ManagerFactory):
    """
    A manager whose configured material is good (so it answers 101) but whose TLS
    context serves another certificate: what a sensor sees from a misconfigured or
    impersonating manager.  Everything else is the real manager.
    """

    served: Any = None

    def tls_options(self) -> Any:
        return server_options(self.served)


class ServedCertificateTests(SensorCase):
    """The sensor's own checks of the certificate the manager presents in TLS."""

    @inlineCallbacks
    def serve(self, cert: str) -> Any:
        yield self.port.stopListening()
        crt, key = getattr(self.pki, cert)
        factory = RogueManagerFactory(self.factory.settings, self.store, reactor)
        factory.served = load_material(crt, key, self.pki.ca)
        self.factory = factory
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    @inlineCallbacks
    def test_served_certificate_lacks_consumer_role(self) -> Any:
        """A valid chain and name, serverAuth, but no IAP_ALERT_CONSUMER: refused after TLS."""
        yield self.serve("manager_no_consumer")
        outcomes = yield self.deliver(alerts(3))
        self.assert_all_failed(outcomes, 3, None, "IAP_ALERT_CONSUMER")
        self.assertEqual(self.stored(), [])
        self.assertEqual(self.factory.connections, set())


class ManagerWrongNameTests(SensorCase):
    """The manager's certificate names other-manager.test; the sensor asked for manager.test."""

    manager_cert = "manager_wrong_name"

    @inlineCallbacks
    def test_hostname_mismatch(self) -> Any:
        outcomes = yield self.deliver(alerts(3))
        self.assert_all_failed(outcomes, 3, None, "manager.test")
        for outcome in outcomes:
            self.assertRegex(outcome.reason, r"(?i)does not match|hostname|TLS")
        self.assertEqual(self.stored(), [])


class ManagerOtherCATests(SensorCase):
    """The manager's certificate is signed by a CA the sensor does not trust."""

    manager_cert = "manager_other_ca"

    @inlineCallbacks
    def test_untrusted_manager_certificate(self) -> Any:
        outcomes = yield self.deliver(alerts(3))
        self.assert_all_failed(outcomes, 3, None, "TLS handshake failed")
        for outcome in outcomes:
            self.assertIn("certificate verify failed", outcome.reason)
        self.assertEqual(self.stored(), [])


class AcknowledgementTimeoutTests(SensorCase):
    @inlineCallbacks
    def test_stalled_manager_does_not_hang_the_sensor(self) -> Any:
        """
        The store is locked by another process-level writer, so commits stall: the
        sensor gives up after ack_timeout and reports the alerts as not acknowledged.
        """
        import sqlite3

        locker = sqlite3.connect(self.db_path, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            outcomes = yield self.deliver([(IDEF, b"stalled %d" % i) for i in range(5)], ack_timeout=1.0)
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        self.assertEqual([o.code for o in outcomes], [None] * 5)
        self.assertIn("no acknowledgement within 1s", outcomes[0].reason)


class InboundTests(SensorCase):
    @inlineCallbacks
    def test_a_stranger_connecting_first_does_not_lock_out_the_manager(self) -> Any:
        from twisted.internet.endpoints import TCP4ServerEndpoint

        from iapd.client import deliver_inbound

        from .processes import free_port
        from .support import RawPeer

        port = free_port()
        outcome = deliver_inbound(
            reactor, TCP4ServerEndpoint(reactor, port, interface="127.0.0.1"),
            self.sensor_settings(), [(IDEF, b"inbound")], wait=30,
        )
        stranger = RawPeer()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), stranger)
        stranger.transport.write(b"IAP/0.2 200\r\n\r\n")  # not a manager, not TLS
        # the real manager dials in (draft 6.1) after the stranger
        dialed = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(self.factory.for_dialing())
        self.addCleanup(lambda: dialed.transport.abortConnection())
        outcomes = yield outcome.addTimeout(WAIT, reactor)
        self.assertEqual([o.code for o in outcomes], [200])
        self.assertEqual(self.bodies(), [b"inbound"])
        stranger.transport.abortConnection()


class ResumptionTests(SensorCase):
    @inlineCallbacks
    def test_second_connection_resumes_the_tls_session(self) -> Any:
        from iapd.client import SensorFactory

        factory = SensorFactory(self.sensor_settings(), reactor)
        flags = []
        for i in range(2):
            proto = yield self.endpoint().connect(factory)
            yield proto.ready
            flags.append(proto.resumed)
            outcome = yield proto.send(IDEF, b"resumed %d" % i)
            self.assertEqual(outcome.code, 200)
            proto.transport.loseConnection()
            yield proto.closed
        self.assertEqual(flags, [False, True])
        self.assertEqual(self.bodies(), [b"resumed 0", b"resumed 1"])


class UrgentDataTests(SensorCase):
    @inlineCallbacks
    def test_urgent_data_from_the_manager_side_ends_the_connection(self) -> Any:
        """Draft 6.2 binds both endpoints: the sensor drops a connection that carries it."""
        import socket as socketlib

        from twisted.internet.protocol import Factory

        from .support import RawPeer

        peers: list[RawPeer] = []

        class Urgent(RawPeer):
            def dataReceived(self, data: bytes) -> None:
                super().dataReceived(data)
                if b"\r\n\r\n" in self.buffer and not getattr(self, "sent", False):
                    self.sent = True
                    self.transport.socket.send(b"!", socketlib.MSG_OOB)

        def build() -> RawPeer:
            peers.append(Urgent())
            return peers[-1]

        port = reactor.listenTCP(0, Factory.forProtocol(build), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        outcomes = yield deliver(
            reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
            self.sensor_settings(), [(IDEF, b"x")],
        ).addTimeout(WAIT, reactor)
        self.assertIsNone(outcomes[0].code)
        self.assertIn("urgent data", outcomes[0].reason)
        for peer in peers:
            if peer.connected_:
                peer.transport.abortConnection()
