"""
The draft's section 5.4 transcript, byte for byte, over real TCP and real TLS.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone

from iapd import pki
from iapd.manager import ManagerFactory, ManagerSettings
from iapd.store import SQLiteStore, read_alerts
from iapd.tls import client_options, load_material

from .support import ManagerTestCase, RawPeer


class TranscriptTests(ManagerTestCase):
    @inlineCallbacks
    def setUp(self) -> Any:
        # The transcript's manager is M.DOM.ORG: give it a certificate of that name.
        self.tmp_pki = self.pki.ca.parent
        if not (self.tmp_pki / "M.DOM.ORG.crt").exists():
            pki.issue(self.tmp_pki, "manager", "M.DOM.ORG")
        self.tmp = Path(self.mktemp())
        self.tmp.mkdir(parents=True)
        self.db_path = self.tmp / "alerts.db"
        settings = ManagerSettings(
            identity="M.DOM.ORG",
            material=load_material(self.tmp_pki / "M.DOM.ORG.crt", self.tmp_pki / "M.DOM.ORG.key", self.pki.ca),
        )
        self.store = SQLiteStore(self.db_path, reactor)
        yield self.store.open()
        self.addCleanup(self.store.close)
        self.factory = ManagerFactory(settings, self.store, reactor)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.addCleanup(self._drop_connections)

    @inlineCallbacks
    def test_section_5_4(self) -> Any:
        """
        The manager's side of the draft's example, as it arrives through proxy P: every
        byte the manager writes is compared, and the 64 octets of 0xFF are stored.
        """
        peer = RawPeer()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port_number), peer)
        self.addCleanup(lambda: peer.transport.abortConnection() if peer.connected_ else None)

        peer.transport.write(b"IAP/0.2 CONNECT M.DOM.ORG\r\nIAP/0.2 VIA P.DOM.ORG\r\n\r\n")
        yield peer.until_length(len(b"IAP/0.2 200\r\n\r\n"))
        self.assertEqual(peer.take(), b"IAP/0.2 200\r\n\r\n")

        peer.transport.write(b"IAP/0.2 Upgrade: TLS/1.0\r\n\r\n")
        yield peer.until_length(len(b"IAP/0.2 101\r\n\r\n"))
        self.assertEqual(peer.take(), b"IAP/0.2 101\r\n\r\n")

        crt, key = self.pki.sensor
        peer.transport.startTLS(client_options(load_material(crt, key, self.pki.ca), "M.DOM.ORG"))
        peer.transport.write(b"IAP/0.2 IAP-Version: 0.2\r\nIAP-Role: Sender\r\n\r\n")
        expected = b"IAP/0.2 200\r\n\r\nIAP/0.2 IAP-Version: 0.2\r\n\r\n"
        yield peer.until_length(len(expected))
        self.assertEqual(peer.take(), expected)

        peer.transport.write(b"IAP/0.2 200\r\n\r\n")
        peer.transport.write(
            b"Content-Type: application/x-idef-alert\r\nContent-Length: 64\r\n\r\n" + b"\xff" * 64 + b"\r\n\r\n"
        )
        yield peer.until_length(len(b"IAP/0.2 200\r\n\r\n"))
        self.assertEqual(peer.take(), b"IAP/0.2 200\r\n\r\n")

        [alert] = read_alerts(self.db_path, with_body=True)
        self.assertEqual(alert["body"], b"\xff" * 64)
        self.assertEqual(alert["sensor"], "sensor1.test")
        self.assertEqual(alert["via"], ["P.DOM.ORG"])
        self.assertEqual(alert["content_type"], "application/x-idef-alert")
        self.assertEqual(alert["sha256"], hashlib.sha256(b"\xff" * 64).hexdigest())
        self.assertIsNone(alert["idmef"])

        # termination: our close_notify is answered and the connection ends cleanly
        peer.transport.loseConnection()
        why = yield peer.lost
        self.assertIsInstance(why, ConnectionDone)
