"""
The manager's side of IAP/0.2 (DESIGN.md sections 2-5), byte for byte, over real
loopback TCP, real TLS and a real SQLite store.

Every refusal is checked three ways: the exact bytes the peer receives, whether the
connection is then closed or kept, and that nothing was stored.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from typing import Any
from unittest import mock

import attr
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater

from iapd.store import read_sensors

from .support import (
    IDEF,
    OK,
    SERVER_VERIFY,
    UPGRADE,
    VERIFY,
    ManagerTestCase,
    RawPeer,
    content,
    setup_bytes,
)

WAIT = 10.0
"""Upper bound, in seconds, on any single wait for bytes or for a close."""

S101 = b"IAP/0.2 101\r\n\r\n"
S400 = b"IAP/0.2 400\r\n\r\n"
S403 = b"IAP/0.2 403\r\n\r\n"
S411 = b"IAP/0.2 411\r\n\r\n"
S413 = b"IAP/0.2 413\r\n\r\n"
S415 = b"IAP/0.2 415\r\n\r\n"
S500 = b"IAP/0.2 500\r\n\r\n"
S505 = b"IAP/0.2 505\r\n\r\n"

IDMEF_ALERT = b"""<?xml version="1.0" encoding="UTF-8"?>
<idmef:IDMEF-Message version="1.0" xmlns:idmef="http://iana.org/idmef">
  <idmef:Alert messageid="iapd-test-0001">
    <idmef:Analyzer analyzerid="hq-dmz-analyzer01" name="sensor01" model="Hugin"/>
    <idmef:CreateTime ntpstamp="0xbc723b45.0xef449129">2000-03-09T10:01:25.93464-05:00</idmef:CreateTime>
    <idmef:Source ident="a1">
      <idmef:Node ident="a1-1">
        <idmef:Address ident="a1-2" category="ipv4-addr">
          <idmef:address>192.0.2.200</idmef:address>
        </idmef:Address>
      </idmef:Node>
    </idmef:Source>
    <idmef:Target ident="d1">
      <idmef:Node ident="d1-1" category="dns">
        <idmef:name>www.example.com</idmef:name>
      </idmef:Node>
    </idmef:Target>
    <idmef:Classification text="Teardrop detected"/>
    <idmef:Assessment>
      <idmef:Impact severity="high" completion="failed" type="dos"/>
    </idmef:Assessment>
  </idmef:Alert>
</idmef:IDMEF-Message>
"""


def within(d: Deferred[Any], seconds: float = WAIT) -> Deferred[Any]:
    """C{d}, failed with a TimeoutError if it has not fired after C{seconds}."""
    return d.addTimeout(seconds, reactor)


class ManagerCase(ManagerTestCase):
    """ManagerTestCase plus the sequences the tests below repeat."""

    timeout = 45


    @inlineCallbacks
    def expect(self, peer: RawPeer, expected: bytes) -> Any:
        """Wait for len(expected) octets and check they are exactly C{expected}."""
        yield within(peer.until_length(len(expected)))
        self.assertEqual(peer.take(), expected)

    @inlineCallbacks
    def assert_closed_after(self, peer: RawPeer, expected: bytes) -> Any:
        """The connection ends and, until then, the peer received exactly C{expected}."""
        yield within(peer.lost)
        self.assertFalse(peer.connected_)
        self.assertEqual(peer.take(), expected)

    @inlineCallbacks
    def connect_and_send(self, data: bytes) -> Any:
        """A fresh plaintext connection that has written C{data}."""
        peer = yield self.raw_peer()
        peer.transport.write(data)
        return peer

    @inlineCallbacks
    def after_connect(self) -> Any:
        """A plaintext connection whose CONNECT was answered 200."""
        peer = yield self.connect_and_send(setup_bytes())
        yield self.expect(peer, OK)
        return peer

    @inlineCallbacks
    def ready_peer(self, cert: str = "sensor", verify: bytes = VERIFY) -> Any:
        """A peer through setup, TLS and both version verifies: in the data phase."""
        peer = yield self.tls_peer(cert=cert)
        peer.transport.write(verify)
        yield self.expect(peer, OK + SERVER_VERIFY)
        peer.transport.write(OK)
        return peer

    @inlineCallbacks
    def send_alert(self, peer: RawPeer, body: bytes, content_type: str = IDEF) -> Any:
        """Send one alert and check that it is answered exactly 200."""
        peer.transport.write(content(body, content_type))
        yield self.expect(peer, OK)

    @inlineCallbacks
    def assert_kept(self, peer: RawPeer) -> Any:
        """The connection still carries alerts: a valid one is answered 200 and stored."""
        self.assertTrue(peer.connected_)
        yield self.send_alert(peer, b"alert after the refusal")
        self.assertTrue(peer.connected_)
        self.assertEqual(self.bodies(), [b"alert after the refusal"])

    def count_store_groups(self) -> list[int]:
        """The size of each group of alerts handed to the store from now on (the real
        store still stores them)."""
        groups: list[int] = []
        real = self.store.add_many

        def counting(records: Any) -> Any:
            groups.append(len(records))
            return real(records)

        self.store.add_many = counting  # type: ignore[method-assign]
        return groups

    def bodies(self) -> list[bytes]:
        return [a["body"] for a in self.stored()]

    def assert_nothing_stored(self) -> None:
        self.assertEqual(self.stored(), [])

    @inlineCallbacks
    def assert_setup_refused(self, data: bytes, expected: bytes) -> Any:
        """Plaintext C{data} is answered exactly C{expected}, then the manager closes."""
        peer = yield self.connect_and_send(data)
        yield self.assert_closed_after(peer, expected)
        self.assert_nothing_stored()

    @inlineCallbacks
    def assert_handshake_refused(self, cert: str | None) -> Any:
        """
        A TLS client with C{cert} never reaches IAP: the manager sends no IAP byte, the
        connection ends, and an alert written right behind the verify is not stored.
        """
        peer = yield self.tls_peer(cert=cert)
        peer.transport.write(VERIFY + OK + content(b"should never be stored"))
        yield self.assert_closed_after(peer, b"")
        self.assert_nothing_stored()

    @inlineCallbacks
    def assert_role_refused(self, cert: str) -> Any:
        """TLS completes with C{cert}, then the manager answers 403 inside TLS and closes."""
        peer = yield self.tls_peer(cert=cert)
        peer.transport.write(VERIFY + OK + content(b"should never be stored"))
        yield self.assert_closed_after(peer, S403)
        self.assert_nothing_stored()


# -- setup phase (plaintext) -----------------------------------------------------------


class SetupTests(ManagerCase):
    @inlineCallbacks
    def test_connect_answered_200(self) -> Any:
        """The good path's first step, as a control for the refusals below."""
        peer = yield self.connect_and_send(setup_bytes())
        yield self.expect(peer, OK)
        self.assertTrue(peer.connected_)

    def test_garbage_line(self) -> Any:
        return self.assert_setup_refused(b"HELLO manager.test\r\n\r\n", S400)

    def test_non_ascii_octet(self) -> Any:
        return self.assert_setup_refused(b"IAP/0.2 CONNECT manager.t\xe9st\r\n\r\n", S400)

    def test_control_character(self) -> Any:
        return self.assert_setup_refused(b"IAP/0.2 CONNECT manager.test\x00\r\n\r\n", S400)

    def test_line_over_1024_octets(self) -> Any:
        """A 1025-octet line is refused as soon as it is too long (lineLengthExceeded)."""
        return self.assert_setup_refused(b"IAP/0.2 CONNECT " + b"a" * (1025 - 16) + b"\r\n\r\n", S400)

    def test_unterminated_line_over_1024_octets(self) -> Any:
        """No CRLF at all: the manager does not wait for one beyond the line limit."""
        return self.assert_setup_refused(b"IAP/0.2 CONNECT " + b"a" * 1100, S400)

    def test_more_than_64_lines(self) -> Any:
        """CONNECT and 64 VIA lines: 65 lines in one setup message."""
        vias = b"".join(b"IAP/0.2 VIA proxy%d.test\r\n" % i for i in range(64))
        return self.assert_setup_refused(b"IAP/0.2 CONNECT manager.test\r\n" + vias + b"\r\n", S400)

    @inlineCallbacks
    def test_64_lines_accepted(self) -> Any:
        """CONNECT and 63 VIA lines is exactly the limit: 200."""
        vias = b"".join(b"IAP/0.2 VIA proxy%d.test\r\n" % i for i in range(63))
        peer = yield self.connect_and_send(b"IAP/0.2 CONNECT manager.test\r\n" + vias + b"\r\n")
        yield self.expect(peer, OK)
        self.assertTrue(peer.connected_)

    def test_via_version_differs_from_connect(self) -> Any:
        return self.assert_setup_refused(
            b"IAP/0.2 CONNECT manager.test\r\nIAP/0.3 VIA proxy.test\r\n\r\n", S400
        )

    def test_unknown_version(self) -> Any:
        return self.assert_setup_refused(b"IAP/0.3 CONNECT manager.test\r\n\r\n", S505)

    def test_connect_to_another_host(self) -> Any:
        return self.assert_setup_refused(setup_bytes("other-manager.test"), S403)

    @inlineCallbacks
    def test_connect_host_matches_case_insensitively(self) -> Any:
        peer = yield self.connect_and_send(setup_bytes("MANAGER.TEST"))
        yield self.expect(peer, OK)
        self.assertTrue(peer.connected_)

    @inlineCallbacks
    def test_anything_but_upgrade_after_200(self) -> Any:
        """A version verify in plaintext, before any TLS: 400 and close."""
        peer = yield self.after_connect()
        peer.transport.write(VERIFY)
        yield self.assert_closed_after(peer, S400)
        self.assert_nothing_stored()

    @inlineCallbacks
    def test_alert_before_tls(self) -> Any:
        """An alert in plaintext after the 200 is not an upgrade: 400, close, not stored."""
        peer = yield self.after_connect()
        peer.transport.write(content(b"plaintext alert"))
        yield self.assert_closed_after(peer, S400)
        self.assert_nothing_stored()

    @inlineCallbacks
    def test_second_connect_after_200(self) -> Any:
        peer = yield self.after_connect()
        peer.transport.write(setup_bytes())
        yield self.assert_closed_after(peer, S400)
        self.assert_nothing_stored()

    @inlineCallbacks
    def test_unknown_upgrade_token(self) -> Any:
        peer = yield self.after_connect()
        peer.transport.write(b"IAP/0.2 Upgrade: TLS/9.9\r\n\r\n")
        yield self.assert_closed_after(peer, S400)
        self.assert_nothing_stored()

    @inlineCallbacks
    def test_upgrade_answered_101(self) -> Any:
        """Control for the upgrade refusals: the good certificate gets 101."""
        peer = yield self.after_connect()
        peer.transport.write(UPGRADE)
        yield self.expect(peer, S101)
        self.assertTrue(peer.connected_)


class NetworkPolicyTests(ManagerCase):
    settings_overrides = {"allow_networks": (ipaddress.ip_network("10.0.0.0/8"),)}

    @inlineCallbacks
    def test_source_outside_allow_networks(self) -> Any:
        """127.0.0.1 is not in 10.0.0.0/8: 403 at once, before any request, then close."""
        peer = yield self.raw_peer()
        yield self.assert_closed_after(peer, S403)
        self.assert_nothing_stored()


class ManagerWithoutConsumerRoleTests(ManagerCase):
    """The manager's certificate lacks IAP_ALERT_CONSUMER: no upgrade is possible."""

    manager_cert = "manager_no_consumer"

    @inlineCallbacks
    def test_upgrade_answered_500(self) -> Any:
        peer = yield self.after_connect()
        peer.transport.write(UPGRADE)
        yield self.assert_closed_after(peer, S500)
        self.assert_nothing_stored()


class ManagerWithoutCertificateTests(ManagerCase):
    """A manager with no TLS material at all: the upgrade is answered 500."""

    @inlineCallbacks
    def setUp(self) -> Any:
        yield super().setUp()
        self.factory.reload(attr.evolve(self.factory.settings, material=None))

    @inlineCallbacks
    def test_upgrade_answered_500(self) -> Any:
        peer = yield self.after_connect()
        peer.transport.write(UPGRADE)
        yield self.assert_closed_after(peer, S500)
        self.assert_nothing_stored()


class StartTLSInjectionTests(ManagerCase):
    @inlineCallbacks
    def test_plaintext_behind_upgrade_request(self) -> Any:
        """
        The upgrade request and a plaintext verify in the same write: no 101 is ever
        sent, the connection is closed, nothing is stored.
        """
        peer = yield self.after_connect()
        peer.transport.write(UPGRADE + VERIFY + OK + content(b"injected"))
        yield self.assert_closed_after(peer, b"")
        self.assert_nothing_stored()

    @inlineCallbacks
    def test_single_octet_behind_upgrade_request(self) -> Any:
        peer = yield self.after_connect()
        peer.transport.write(UPGRADE + b"X")
        yield self.assert_closed_after(peer, b"")
        self.assert_nothing_stored()

    @inlineCallbacks
    def test_connect_and_upgrade_in_one_write_then_plaintext(self) -> Any:
        """
        Everything pipelined before TLS: the connection is dropped and no 101 is sent.
        (Whether the 200 to the CONNECT gets out before the abort is not specified.)
        """
        peer = yield self.connect_and_send(setup_bytes() + UPGRADE + VERIFY)
        yield within(peer.lost)
        self.assertIn(peer.take(), (b"", OK))
        self.assert_nothing_stored()


class SetupDeadlineTests(ManagerCase):
    settings_overrides = {"setup_timeout": 1.0}

    @inlineCallbacks
    def test_slow_drip_connect(self) -> Any:
        """
        A CONNECT written one octet every 0.3 s would take about 10 s; the 1 s setup
        deadline closes the connection long before, and no 200 is sent.
        """
        peer = yield self.raw_peer()
        data = setup_bytes()
        sent = 0
        pending: list[Any] = []

        def drip() -> None:
            nonlocal sent
            if not peer.connected_ or sent >= len(data):
                return
            peer.transport.write(data[sent : sent + 1])
            sent += 1
            pending[:] = [reactor.callLater(0.3, drip)]

        self.addCleanup(lambda: [c.cancel() for c in pending if c.active()])
        drip()
        yield within(peer.lost, 3 * len(data) * 0.3)
        self.assertLess(sent, len(data))
        self.assertNotIn(OK, peer.buffer)
        self.assertEqual(peer.take(), b"")
        self.assert_nothing_stored()

    @inlineCallbacks
    def test_idle_connection_closed(self) -> Any:
        """A connection that sends nothing is closed by the deadline, without a word."""
        peer = yield self.raw_peer()
        yield self.assert_closed_after(peer, b"")
        self.assert_nothing_stored()

    @inlineCallbacks
    def test_stalled_after_101(self) -> Any:
        """101 received but no TLS handshake ever started: closed by the deadline."""
        peer = yield self.after_connect()
        peer.transport.write(UPGRADE)
        yield self.expect(peer, S101)
        yield self.assert_closed_after(peer, b"")
        self.assert_nothing_stored()

    @inlineCallbacks
    def test_stalled_after_tls(self) -> Any:
        """TLS done but no version verify: the setup deadline still applies."""
        peer = yield self.tls_peer()
        yield within(peer.handshake)
        yield self.assert_closed_after(peer, b"")
        self.assert_nothing_stored()

    @inlineCallbacks
    def test_data_phase_outlives_the_deadline(self) -> Any:
        """Once both verifies are done the deadline no longer applies."""
        peer = yield self.ready_peer()
        yield deferLater(reactor, 1.5, lambda: None)
        self.assertTrue(peer.connected_)
        yield self.send_alert(peer, b"late but fine")
        self.assertEqual(self.bodies(), [b"late but fine"])


# -- client certificates ---------------------------------------------------------------


class ClientCertificateTests(ManagerCase):
    def test_no_client_certificate(self) -> Any:
        return self.assert_handshake_refused(None)

    def test_certificate_from_another_ca(self) -> Any:
        return self.assert_handshake_refused("sensor_other_ca")

    def test_expired_certificate(self) -> Any:
        return self.assert_handshake_refused("sensor_expired")

    def test_certificate_without_generator_role(self) -> Any:
        return self.assert_role_refused("sensor_no_role")

    def test_generator_role_in_noncritical_eku(self) -> Any:
        return self.assert_role_refused("sensor_noncritical")

    def test_malformed_extension_is_refused(self) -> Any:
        """An EKU whose DER is cut short: OpenSSL already refuses it in the handshake
        (and L{iapd.roles.role_problem} would answer 403 if it did not: test_roles)."""
        return self.assert_handshake_refused("sensor_bad_eku")

    def test_wildcard_identity_is_refused(self) -> Any:
        """SAN *.test would match allow-list globs literally: no identity at all."""
        return self.assert_role_refused("sensor_wildcard")

    def test_unicode_case_trick_is_refused(self) -> Any:
        """CN with a Kelvin sign lower-cases to kiosk.test under Unicode rules."""
        return self.assert_role_refused("sensor_kelvin")

    def test_ca_certificate_is_refused_as_a_sensor(self) -> Any:
        """
        A CA certificate with the sensor role could mint any sensor.  Under this test
        CA (path length 0) OpenSSL already refuses it in the handshake; under a CA
        without that limit iapd's own check refuses it (tests/test_roles.py).
        """
        return self.assert_handshake_refused("sensor_ca")

    @inlineCallbacks
    def test_good_sensor_certificate(self) -> Any:
        """Control: sensor1.test is accepted and its alerts stored under its identity."""
        peer = yield self.ready_peer()
        yield self.send_alert(peer, b"from sensor1")
        [alert] = self.stored()
        self.assertEqual(alert["sensor"], "sensor1.test")
        self.assertEqual(alert["body"], b"from sensor1")
        self.assertEqual([s["sensor"] for s in read_sensors(self.db_path)], ["sensor1.test"])

    @inlineCallbacks
    def assert_stored_as(self, cert: str, identity: str) -> Any:
        """An alert from the sensor with C{cert} is stored once, under C{identity}."""
        peer = yield self.ready_peer(cert=cert)
        body = f"from the sensor with {cert}".encode()
        yield self.send_alert(peer, body)
        [alert] = self.stored()
        self.assertEqual(alert["sensor"], identity)
        self.assertEqual(alert["body"], body)

    def test_sensor_role_certificate_named_like_the_manager(self) -> Any:
        """
        A certificate with clientAuth + IAP_ALERT_GENERATOR from the trusted CA is a
        sensor certificate whatever its name (DESIGN.md 3, 4): accepted, identity
        manager.test.
        """
        return self.assert_stored_as("manager_as_sensor", "manager.test")

    def test_identity_from_cn_without_san(self) -> Any:
        return self.assert_stored_as("sensor_cn_only", "sensor-cn.test")

    def test_ed25519_sensor_certificate(self) -> Any:
        """A sensor's key need not be P-256 (an Ed25519 connection keeps 2 KiB less)."""
        return self.assert_stored_as("sensor_ed25519", "ed25519.test")


class AllowSensorsTests(ManagerCase):
    settings_overrides = {"allow_sensors": ("sensor2.*",)}

    def test_sensor_outside_allow_sensors(self) -> Any:
        return self.assert_role_refused("sensor")

    @inlineCallbacks
    def test_sensor_inside_allow_sensors(self) -> Any:
        peer = yield self.ready_peer(cert="sensor2")
        yield self.send_alert(peer, b"from sensor2")
        [alert] = self.stored()
        self.assertEqual(alert["sensor"], "sensor2.test")


# -- version verify (inside TLS) -------------------------------------------------------


class VerifyTests(ManagerCase):
    @inlineCallbacks
    def test_server_verify_bytes(self) -> Any:
        peer = yield self.tls_peer()
        peer.transport.write(VERIFY)
        yield self.expect(peer, OK + SERVER_VERIFY)
        self.assertTrue(peer.connected_)

    @inlineCallbacks
    def test_other_iap_version(self) -> Any:
        peer = yield self.tls_peer()
        peer.transport.write(b"IAP/0.2 IAP-Version: 0.3\r\nIAP-Role: Sender\r\n\r\n")
        yield self.assert_closed_after(peer, S505)
        self.assert_nothing_stored()

    @inlineCallbacks
    def test_other_protocol_version_in_verify(self) -> Any:
        peer = yield self.tls_peer()
        peer.transport.write(b"IAP/0.3 IAP-Version: 0.2\r\nIAP-Role: Sender\r\n\r\n")
        yield self.assert_closed_after(peer, S505)
        self.assert_nothing_stored()

    @inlineCallbacks
    def test_verify_without_sender_role_line(self) -> Any:
        peer = yield self.ready_peer(verify=b"IAP/0.2 IAP-Version: 0.2\r\n\r\n")
        yield self.send_alert(peer, b"verified without IAP-Role")
        self.assertEqual(self.bodies(), [b"verified without IAP-Role"])

    @inlineCallbacks
    def test_alert_instead_of_verify(self) -> Any:
        """Inside TLS but without the version verify, an alert is a 400 and not stored."""
        peer = yield self.tls_peer()
        peer.transport.write(content(b"too early"))
        yield self.assert_closed_after(peer, S400)
        self.assert_nothing_stored()

    @inlineCallbacks
    def test_alert_without_acknowledging_server_verify(self) -> Any:
        """Both verifies are needed: an alert in place of the client's 200 is refused."""
        peer = yield self.tls_peer()
        peer.transport.write(VERIFY)
        yield self.expect(peer, OK + SERVER_VERIFY)
        peer.transport.write(content(b"too early"))
        yield self.assert_closed_after(peer, S400)
        self.assert_nothing_stored()

    @inlineCallbacks
    def test_verify_ack_with_reason_phrase(self) -> Any:
        """DESIGN 2: a reason phrase after a status code is accepted (here, the sensor's 200)."""
        peer = yield self.tls_peer()
        peer.transport.write(VERIFY)
        yield self.expect(peer, OK + SERVER_VERIFY)
        peer.transport.write(b"IAP/0.2 200 OK\r\n\r\n")
        yield self.send_alert(peer, b"after a 200 with a reason phrase")
        self.assertEqual(self.bodies(), [b"after a 200 with a reason phrase"])

    @inlineCallbacks
    def test_client_refuses_server_verify(self) -> Any:
        """The sensor answers 505 to our verify: close, nothing stored."""
        peer = yield self.tls_peer()
        peer.transport.write(VERIFY)
        yield self.expect(peer, OK + SERVER_VERIFY)
        peer.transport.write(S505 + content(b"after a refused verify"))
        yield self.assert_closed_after(peer, b"")
        self.assert_nothing_stored()


# -- data phase ------------------------------------------------------------------------


class DataPhaseTests(ManagerCase):
    settings_overrides = {"max_content_length": 1000}

    @inlineCallbacks
    def test_missing_content_length(self) -> Any:
        peer = yield self.ready_peer()
        peer.transport.write(b"Content-Type: application/x-idef-alert\r\n\r\nbody\r\n\r\n")
        yield self.assert_closed_after(peer, S411)
        self.assert_nothing_stored()

    @inlineCallbacks
    def test_content_length_above_limit(self) -> Any:
        peer = yield self.ready_peer()
        peer.transport.write(content(b"x" * 1001))
        yield self.assert_closed_after(peer, S413)
        self.assert_nothing_stored()

    @inlineCallbacks
    def test_content_length_above_limit_without_body(self) -> Any:
        """413 is decided on the header: the manager does not wait for the body."""
        peer = yield self.ready_peer()
        peer.transport.write(b"Content-Type: application/x-idef-alert\r\nContent-Length: 99999999\r\n\r\n")
        yield self.assert_closed_after(peer, S413)
        self.assert_nothing_stored()

    @inlineCallbacks
    def test_content_length_at_limit(self) -> Any:
        peer = yield self.ready_peer()
        yield self.send_alert(peer, b"y" * 1000)
        self.assertEqual(self.bodies(), [b"y" * 1000])

    @inlineCallbacks
    def test_non_digit_content_length(self) -> Any:
        peer = yield self.ready_peer()
        peer.transport.write(b"Content-Type: application/x-idef-alert\r\nContent-Length: 4a\r\n\r\nbody\r\n\r\n")
        yield self.assert_closed_after(peer, S400)
        self.assert_nothing_stored()

    @inlineCallbacks
    def test_negative_content_length(self) -> Any:
        peer = yield self.ready_peer()
        peer.transport.write(b"Content-Type: application/x-idef-alert\r\nContent-Length: -4\r\n\r\nbody\r\n\r\n")
        yield self.assert_closed_after(peer, S400)
        self.assert_nothing_stored()

    @inlineCallbacks
    def test_content_length_given_twice(self) -> Any:
        peer = yield self.ready_peer()
        peer.transport.write(
            b"Content-Type: application/x-idef-alert\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nbody\r\n\r\n"
        )
        yield self.assert_closed_after(peer, S400)
        self.assert_nothing_stored()

    @inlineCallbacks
    def test_header_block_without_end(self) -> Any:
        """Header octets beyond the limit with no empty line: 400 and close, no waiting."""
        peer = yield self.ready_peer()
        padding = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 900) for i in range(10))
        self.assertGreater(len(padding), 8192)
        peer.transport.write(b"Content-Type: application/x-idef-alert\r\n" + padding)
        yield self.assert_closed_after(peer, S400)
        self.assert_nothing_stored()

    @inlineCallbacks
    def test_header_names_case_insensitive(self) -> Any:
        peer = yield self.ready_peer()
        peer.transport.write(b"content-type: application/x-idef-alert\r\nCONTENT-LENGTH: 4\r\n\r\nbody\r\n\r\n")
        yield self.expect(peer, OK)
        self.assertEqual(self.bodies(), [b"body"])

    @inlineCallbacks
    def test_body_not_followed_by_crlf_crlf(self) -> Any:
        """Content-Length says 4 but the body is longer: framing is lost."""
        peer = yield self.ready_peer()
        peer.transport.write(b"Content-Type: application/x-idef-alert\r\nContent-Length: 4\r\n\r\nbody longer\r\n\r\n")
        yield self.assert_closed_after(peer, S400)
        self.assert_nothing_stored()

    @inlineCallbacks
    def test_unaccepted_content_type_keeps_connection(self) -> Any:
        peer = yield self.ready_peer()
        peer.transport.write(content(b"plain text", "text/plain"))
        yield self.expect(peer, S415)
        self.assert_nothing_stored()
        yield self.assert_kept(peer)

    @inlineCallbacks
    def test_missing_content_type_keeps_connection(self) -> Any:
        peer = yield self.ready_peer()
        peer.transport.write(b"Content-Length: 4\r\n\r\nbody\r\n\r\n")
        yield self.expect(peer, S400)
        self.assert_nothing_stored()
        yield self.assert_kept(peer)

    @inlineCallbacks
    def test_refusals_answered_in_order(self) -> Any:
        """A 415 between two good alerts in one write: 200, 415, 200, in that order."""
        peer = yield self.ready_peer()
        peer.transport.write(content(b"first") + content(b"refused", "text/plain") + content(b"third"))
        yield self.expect(peer, OK + S415 + OK)
        self.assertEqual(self.bodies(), [b"first", b"third"])
        self.assertTrue(peer.connected_)

    @inlineCallbacks
    def test_content_type_parameters_and_case(self) -> Any:
        """The media type is compared without parameters and case-insensitively."""
        peer = yield self.ready_peer()
        yield self.send_alert(peer, b"with charset", "Application/X-IDEF-Alert; charset=utf-8")
        [alert] = self.stored()
        self.assertEqual(alert["body"], b"with charset")

    @inlineCallbacks
    def test_alert_in_one_octet_writes(self) -> Any:
        peer = yield self.ready_peer()
        data = content(b"dripped alert")
        for i in range(len(data)):
            peer.transport.write(data[i : i + 1])
            yield deferLater(reactor, 0, lambda: None)
        yield self.expect(peer, OK)
        self.assertEqual(self.bodies(), [b"dripped alert"])

    @inlineCallbacks
    def test_fifty_alerts_in_one_write(self) -> Any:
        peer = yield self.ready_peer()
        bodies = [b"alert %02d" % i for i in range(50)]
        peer.transport.write(b"".join(content(b) for b in bodies))
        yield self.expect(peer, OK * 50)
        self.assertEqual(self.bodies(), bodies)
        self.assertTrue(peer.connected_)

    @inlineCallbacks
    def test_alerts_of_one_read_go_to_the_store_together(self) -> Any:
        """
        TLS hands over what one socket read brought one record (16 KiB at most) at a
        time; the manager gives the store the alerts of all of them as one group.
        """
        groups = self.count_store_groups()
        peer = yield self.ready_peer()
        bodies = [b"%04d" % i + b"x" * 996 for i in range(256)]  # at the limit, 1000
        peer.transport.write(b"".join(content(b) for b in bodies))
        yield self.expect(peer, OK * 256)
        self.assertEqual(self.bodies(), bodies)
        self.assertEqual(sum(groups), 256)
        per_record = 16384 // len(content(bodies[0])) + 1  # alerts a record can end
        self.assertGreater(max(groups), per_record, groups)

    @inlineCallbacks
    def test_broken_framing_after_alerts_of_several_records_in_one_read(self) -> Any:
        """
        Alerts over several TLS records, broken framing, more alerts, in one write:
        the alerts before the break are stored and answered 200 in order, then 400
        and close; nothing after the break is stored.
        """
        peer = yield self.ready_peer()
        before = [b"before %02d " % i + b"b" * 980 for i in range(40)]  # 3 records
        after = [b"after %02d" % i for i in range(40)]
        broken = b"Content-Type: application/x-idef-alert\r\nContent-Length: x\r\n\r\n"
        peer.transport.write(b"".join(content(b) for b in before) + broken + b"".join(content(b) for b in after))
        yield self.assert_closed_after(peer, OK * 40 + S400)
        self.assertEqual(self.bodies(), before)

    @inlineCallbacks
    def test_a_tls_layer_that_cannot_be_wrapped_is_read_per_record(self) -> Any:
        """Should Twisted's TLS protocol refuse the wrapper, reads go on, record by record."""
        from twisted.protocols.tls import TLSMemoryBIOProtocol

        def refuse(obj: Any, name: str, value: Any) -> None:
            if name == "dataReceived":
                raise AttributeError(name)
            object.__setattr__(obj, name, value)

        groups = self.count_store_groups()
        with mock.patch.object(TLSMemoryBIOProtocol, "__setattr__", refuse):
            peer = yield self.ready_peer()
            bodies = [b"%04d" % i + b"x" * 996 for i in range(64)]
            peer.transport.write(b"".join(content(b) for b in bodies))
            yield self.expect(peer, OK * 64)
        self.assertEqual(self.bodies(), bodies)
        self.assertLessEqual(max(groups), 16384 // len(content(bodies[0])) + 1, groups)

    @inlineCallbacks
    def test_alerts_behind_the_verify_ack(self) -> Any:
        """The client's 200 and its first alerts in the same write."""
        peer = yield self.tls_peer()
        peer.transport.write(VERIFY)
        yield self.expect(peer, OK + SERVER_VERIFY)
        peer.transport.write(OK + content(b"one") + content(b"two"))
        yield self.expect(peer, OK + OK)
        self.assertEqual(self.bodies(), [b"one", b"two"])

    @inlineCallbacks
    def test_records_metadata(self) -> Any:
        peer = yield self.ready_peer()
        body = b"\x00\xffbinary body\r\n\r\n"
        yield self.send_alert(peer, body)
        [alert] = self.stored()
        self.assertEqual(alert["body"], body)
        self.assertEqual(alert["sensor"], "sensor1.test")
        self.assertEqual(alert["content_type"], IDEF)
        self.assertEqual(alert["sha256"], hashlib.sha256(body).hexdigest())
        self.assertEqual(alert["via"], [])
        self.assertIsNone(alert["idmef"])

    @inlineCallbacks
    def test_idmef_alert_summarised(self) -> Any:
        peer = yield self.ready_peer()
        yield self.send_alert(peer, IDMEF_ALERT)
        [alert] = self.stored()
        self.assertEqual(alert["body"], IDMEF_ALERT)
        summary = alert["idmef"]
        self.assertIsNotNone(summary)
        self.assertEqual(summary["classification"], "Teardrop detected")
        self.assertEqual(summary["messageid"], "iapd-test-0001")
        self.assertEqual(summary["severity"], "high")
        self.assertEqual(summary["source"], ["192.0.2.200"])
        self.assertEqual(summary["target"], ["www.example.com"])


# -- retransmission (exactly once in the store) ---------------------------------------


class RetransmissionTests(ManagerCase):
    @inlineCallbacks
    def test_same_body_stored_once(self) -> Any:
        """Twice on one connection, once more on another: three 200s, one row."""
        first = yield self.ready_peer()
        yield self.send_alert(first, b"retransmitted")
        yield self.send_alert(first, b"retransmitted")
        second = yield self.ready_peer()
        yield self.send_alert(second, b"retransmitted")
        [alert] = self.stored()
        self.assertEqual(alert["body"], b"retransmitted")
        self.assertEqual(alert["sensor"], "sensor1.test")

    @inlineCallbacks
    def test_same_body_in_one_write(self) -> Any:
        """A retransmission pipelined behind the original, in the same commit batch."""
        peer = yield self.ready_peer()
        peer.transport.write(content(b"twice") + content(b"twice"))
        yield self.expect(peer, OK + OK)
        self.assertEqual(self.bodies(), [b"twice"])

    @inlineCallbacks
    def test_same_body_from_another_sensor(self) -> Any:
        one = yield self.ready_peer("sensor")
        yield self.send_alert(one, b"seen by both")
        two = yield self.ready_peer("sensor2")
        yield self.send_alert(two, b"seen by both")
        alerts = self.stored()
        self.assertEqual([(a["sensor"], a["body"]) for a in alerts],
                         [("sensor1.test", b"seen by both"), ("sensor2.test", b"seen by both")])


# -- TCP urgent data (draft 6.2) -------------------------------------------------------


class UrgentDataTests(ManagerCase):
    def send_urgent(self, peer: RawPeer) -> None:
        peer.transport.socket.send(b"!", socket.MSG_OOB)

    @inlineCallbacks
    def test_urgent_data_during_setup(self) -> Any:
        peer = yield self.after_connect()
        self.send_urgent(peer)
        yield self.assert_closed_after(peer, b"")
        self.assert_nothing_stored()

    @inlineCallbacks
    def test_urgent_data_before_connect(self) -> Any:
        peer = yield self.raw_peer()
        self.send_urgent(peer)
        yield self.assert_closed_after(peer, b"")
        self.assert_nothing_stored()

    @inlineCallbacks
    def test_urgent_data_in_data_phase(self) -> Any:
        peer = yield self.ready_peer()
        yield self.send_alert(peer, b"before the urgent byte")
        self.send_urgent(peer)
        yield self.assert_closed_after(peer, b"")
        self.assertEqual(self.bodies(), [b"before the urgent byte"])

    @inlineCallbacks
    def test_nothing_stored_after_urgent_data(self) -> Any:
        """An alert written right behind the urgent byte is not stored."""
        peer = yield self.ready_peer()
        yield self.send_alert(peer, b"before the urgent byte")
        self.send_urgent(peer)
        peer.transport.write(content(b"after the urgent byte"))
        yield within(peer.lost)
        self.assertNotIn(OK, peer.take())
        self.assertEqual(self.bodies(), [b"before the urgent byte"])


class UrgentWatcherLifecycleTests(ManagerCase):
    @inlineCallbacks
    def test_closed_connections_are_no_longer_watched(self) -> Any:
        """The watcher forgets a socket when its connection ends (no stale protocols)."""
        peers = []
        for _ in range(3):
            peer = yield self.connect_and_send(setup_bytes())
            yield within(peer.until_contains(OK))
            peers.append(peer)
        self.assertEqual(self.factory.urgent.watched, 3)
        for peer in peers:
            peer.transport.loseConnection()
            yield within(peer.lost)
        # the manager side has seen the closes once its protocols are gone
        for _ in range(100):
            if not self.factory.connections:
                break
            yield deferLater(reactor, 0.05)
        self.assertEqual(self.factory.connections, set())
        self.assertEqual(self.factory.urgent.watched, 0)
