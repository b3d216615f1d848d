"""
Shared test machinery: a real manager on a free loopback port with a real SQLite file,
and a raw byte-level peer that can start real TLS when a test tells it to.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.trial import unittest
from zope.interface import implementer

from iapd.client import SensorSettings
from iapd.manager import ManagerFactory, ManagerSettings
from iapd.store import SQLiteStore, read_alerts
from iapd.tls import TLSMaterial, load_material

from .certs import TestPKI, make_test_pki

IDEF = "application/x-idef-alert"


def content(body: bytes, content_type: str = IDEF) -> bytes:
    return f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body + b"\r\n\r\n"


def setup_bytes(host: str = "manager.test") -> bytes:
    return f"IAP/0.2 CONNECT {host}\r\n\r\n".encode()


UPGRADE = b"IAP/0.2 Upgrade: TLS/1.0\r\n\r\n"
VERIFY = b"IAP/0.2 IAP-Version: 0.2\r\nIAP-Role: Sender\r\n\r\n"
OK = b"IAP/0.2 200\r\n\r\n"
SERVER_VERIFY = b"IAP/0.2 IAP-Version: 0.2\r\n\r\n"


@implementer(IHandshakeListener)
class RawPeer(Protocol):
    """
    A peer that writes exactly the bytes a test gives it and records what comes back.

    C{expect(n)} waits until at least n octets have arrived since the last C{take};
    C{lost} fires when the connection ends, with its reason.
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.lost: Deferred[Any] = Deferred()
        self.handshake: Deferred[None] = Deferred()
        self._waiters: list[tuple[Callable[[bytes], bool], Deferred[bytes]]] = []
        self.connected_ = False

    def connectionMade(self) -> None:
        self.connected_ = True

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        self._check()

    def handshakeCompleted(self) -> None:
        self.handshake.callback(None)

    def _check(self) -> None:
        for waiter in list(self._waiters):
            test, d = waiter
            if test(self.buffer):
                self._waiters.remove(waiter)
                d.callback(self.buffer)

    def until(self, test: Callable[[bytes], bool]) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self._waiters.append((test, d))
        self._check()
        return d

    def until_contains(self, needle: bytes) -> Deferred[bytes]:
        return self.until(lambda b: needle in b)

    def until_length(self, n: int) -> Deferred[bytes]:
        return self.until(lambda b: len(b) >= n)

    def take(self) -> bytes:
        data, self.buffer = self.buffer, b""
        return data

    def connectionLost(self, reason: Any = None) -> None:
        self.connected_ = False
        for _, d in self._waiters:
            d.errback(ConnectionError(f"connection lost while waiting; received {self.buffer!r}"))
        self._waiters = []
        self.lost.callback(reason.value if reason is not None else None)


class ManagerTestCase(unittest.TestCase):
    """
    Starts a real manager (real TCP on 127.0.0.1, real TLS, real SQLite file) per test.

    Subclasses may override C{settings_overrides} or call C{start_manager} themselves.
    """

    manager_cert = "manager"
    settings_overrides: dict[str, Any] = {}
    timeout = 60

    _pki_dir: Any = None
    pki: TestPKI

    @classmethod
    def setUpClass(cls) -> None:
        cls._pki_dir = tempfile.TemporaryDirectory()
        cls.pki = make_test_pki(Path(cls._pki_dir.name))

    @classmethod
    def tearDownClass(cls) -> None:
        cls._pki_dir.cleanup()

    def mktemp(self) -> str:
        """
        A fresh path in the system temporary directory, removed after the test: trial's
        default is relative to the working directory, which under pytest is the
        repository itself.
        """
        directory = tempfile.mkdtemp(prefix="iapd-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        return f"{directory}/temp"

    @inlineCallbacks
    def setUp(self) -> Any:
        self.tmp = Path(self.mktemp())
        self.tmp.mkdir(parents=True)
        self.db_path = self.tmp / "alerts.db"
        yield self.start_manager(**self.settings_overrides)

    @inlineCallbacks
    def start_manager(self, cert: str | None = None, material: TLSMaterial | None = None, **overrides: Any) -> Any:
        """A manager with the test PKI's certificate C{cert}, or with C{material}."""
        if material is None:
            crt, key = getattr(self.pki, cert or self.manager_cert)
            material = load_material(crt, key, self.pki.ca)
        settings = ManagerSettings(identity="manager.test", material=material, **overrides)
        self.store = SQLiteStore(self.db_path, reactor)
        yield self.store.open()
        self.addCleanup(self.store.close)
        self.factory = ManagerFactory(settings, self.store, reactor)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.addCleanup(self._drop_connections)

    def _drop_connections(self) -> None:
        for proto in list(self.factory.connections):
            proto.transport.abortConnection()

    @property
    def port_number(self) -> int:
        return self.port.getHost().port

    def endpoint(self) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(reactor, "127.0.0.1", self.port_number)

    def sensor_settings(self, cert: str = "sensor", manager: str = "manager.test", **kw: Any) -> SensorSettings:
        crt, key = getattr(self.pki, cert)
        return SensorSettings(manager=manager, material=load_material(crt, key, self.pki.ca), **kw)

    @inlineCallbacks
    def raw_peer(self) -> Any:
        peer = RawPeer()
        yield connectProtocol(self.endpoint(), peer)
        self.addCleanup(lambda: peer.transport.abortConnection() if peer.connected_ else None)
        return peer

    def stored(self, **kw: Any) -> list[dict[str, Any]]:
        if not self.db_path.exists():
            return []
        return read_alerts(self.db_path, with_body=True, **kw)

    @inlineCallbacks
    def tls_peer(self, cert: str | None = "sensor", host: str = "manager.test") -> Any:
        """A raw peer taken through setup and a real TLS handshake, before verify."""
        from twisted.internet import ssl

        from iapd.tls import client_options

        peer = yield self.raw_peer()
        peer.transport.write(setup_bytes(host))
        yield peer.until_contains(OK)
        assert peer.take() == OK
        peer.transport.write(UPGRADE)
        yield peer.until_contains(b"IAP/0.2 101\r\n\r\n")
        assert peer.take() == b"IAP/0.2 101\r\n\r\n"
        if cert is None:
            options = ssl.optionsForClientTLS(
                host, trustRoot=ssl.Certificate.loadPEM(self.pki.ca.read_bytes())
            )
        else:
            crt, key = getattr(self.pki, cert)
            options = client_options(load_material(crt, key, self.pki.ca), host)
        peer.transport.startTLS(options)
        return peer
