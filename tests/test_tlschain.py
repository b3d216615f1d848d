"""
Which certificates each end of a handshake sends after its own (iapd.tls.chain_to_send).

Left to itself, OpenSSL completes a missing chain from the trust store and sends the
self-signed root with it; the manager then kept a parsed copy of the sensor's CA for as
long as each sensor stayed connected (4.5 KiB each).  Now every end sends its
certificate and the intermediates between it and a root, never the root: these tests
look at what actually crossed real TLS, on both sides, with iap-pki's one-level PKI and
with an intermediate CA given either in the certificate file or only in the CA file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import attr
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks

from iapd import pki, tls
from iapd.client import SensorSettings, deliver
from iapd.roles import SENSOR_USAGES
from iapd.tls import MAX_CHAIN, TLSMaterial, chain_to_send, client_options, load_material
from iapd.web.config import WebConfig, WebTLS
from iapd.web.tlsweb import web_tls_options

from .certs import TwoLevelPKI, handshake, make_ca, make_test_pki, pem
from .support import IDEF, OK, SERVER_VERIFY, UPGRADE, VERIFY, ManagerTestCase, setup_bytes


@pytest.fixture(scope="module")
def two_level(tmp_path_factory: pytest.TempPathFactory) -> TwoLevelPKI:
    return TwoLevelPKI(tmp_path_factory.mktemp("two-level"))


# -- what is chosen ----------------------------------------------------------------------


def test_iap_pki_sends_nomake_ca(tmp_path: Path) -> None:
    """iap-pki's leaves are signed by the root itself: nothing goes after them."""
    test_pki = make_test_pki(tmp_path)
    assert chain_to_send(load_material(*test_pki.sensor, test_pki.ca)) == ()
    assert chain_to_send(load_material(*test_pki.manager, test_pki.ca)) == ()


@pytest.mark.parametrize("certificate_file, ca_file", [
    ("sensor.crt", "root+intermediate.crt"),  # found in the CA file
    ("sensor+intermediate.crt", "root.crt"),  # given in the certificate file
    ("sensor+intermediate+root.crt", "root.crt"),  # given, root and all
    ("sensor+intermediate+root.crt", "root+intermediate.crt"),
    ("sensor+root.crt", "root+intermediate.crt"),  # a file chain of the root alone: the CA file's
])
def test_intermediate_sent_root_never(two_level: TwoLevelPKI, certificate_file: str, ca_file: str) -> None:
    assert chain_to_send(two_level.material("sensor", certificate_file, ca_file)) == (two_level.intermediate,)


def test_issuer_not_in_ca_file(two_level: TwoLevelPKI, tmp_path: Path) -> None:
    """A sensor that trusts only the manager's CA, another than its own: its leaf alone."""
    other = tmp_path / "other.crt"
    other.write_bytes(pem(make_ca("another CA")[1]))
    d = two_level.directory
    assert chain_to_send(load_material(d / "sensor.crt", d / "sensor.key", other)) == ()


def _with_cas(two_level: TwoLevelPKI, tmp_path: Path, *cas: x509.Certificate) -> TLSMaterial:
    (tmp_path / "cas.crt").write_bytes(pem(*cas))
    d = two_level.directory
    return load_material(d / "sensor.crt", d / "sensor.key", tmp_path / "cas.crt")


def test_renewed_intermediate_of_the_same_name(two_level: TwoLevelPKI, tmp_path: Path) -> None:
    """Two CAs of one name in the CA file, the one that did not sign the leaf first:
    the one that did is sent (OpenSSL's chain, by signature)."""
    _, other = make_ca("iapd test intermediate CA", (two_level.root_key, two_level.root))
    material = _with_cas(two_level, tmp_path, two_level.root, other, two_level.intermediate)
    assert chain_to_send(material) == (two_level.intermediate,)


def test_expired_copy_of_the_intermediate_listed_first(two_level: TwoLevelPKI, tmp_path: Path) -> None:
    """The intermediate renewed with the same key, its expired certificate still first
    in the CA file: the valid one is sent, as OpenSSL's own chain did."""
    _, expired = make_ca("iapd test intermediate CA", (two_level.root_key, two_level.root),
                     key=two_level.intermediate_key, expired=True)
    material = _with_cas(two_level, tmp_path, two_level.root, expired, two_level.intermediate)
    assert chain_to_send(material) == (two_level.intermediate,)


def test_no_root_in_the_ca_file_key_identifiers_choose(two_level: TwoLevelPKI, tmp_path: Path) -> None:
    """A CA file with intermediates but no root: OpenSSL finds no chain, and of two CAs
    with the issuer's name the one whose key identifier the leaf names is sent."""
    _, other = make_ca("iapd test intermediate CA", (two_level.root_key, two_level.root))
    material = _with_cas(two_level, tmp_path, other, two_level.intermediate)
    assert chain_to_send(material) == (two_level.intermediate,)


def test_ca_file_whose_cas_certify_each_other(tmp_path: Path) -> None:
    """Two CAs cross-signed in a ring, neither self-signed: the search ends."""
    a_key = ec.generate_private_key(ec.SECP256R1())
    b_key = ec.generate_private_key(ec.SECP256R1())
    _, b_self = make_ca("ring CA B", key=b_key)
    _, a = make_ca("ring CA A", (b_key, b_self), key=a_key)
    _, b = make_ca("ring CA B", (a_key, a), key=b_key)
    leaf_key, leaf = pki.make_certificate(a_key, a, "sensor1.test", SENSOR_USAGES)
    crt, key = pki.write_pair(tmp_path, "sensor", leaf_key, leaf)
    cas = tmp_path / "ring.crt"
    cas.write_bytes(pem(a, b))
    assert chain_to_send(load_material(crt, key, cas)) == (a, b)


@pytest.mark.parametrize("with_root", [True, False])
def test_long_line_of_cas(tmp_path: Path, with_root: bool) -> None:
    """A line of intermediates longer than any real PKI's: sent whole where OpenSSL
    chains it to a root, as OpenSSL's own chain did; without the root the search by
    name stops after MAX_CHAIN of them."""
    signer = make_ca("line root")
    cas = [signer[1]]
    for i in range(MAX_CHAIN + 2):
        signer = make_ca(f"line CA {i}", signer)
        cas.append(signer[1])
    leaf_key, leaf = pki.make_certificate(signer[0], signer[1], "sensor1.test", SENSOR_USAGES)
    crt, key = pki.write_pair(tmp_path, "sensor", leaf_key, leaf)
    (tmp_path / "line.crt").write_bytes(pem(*(cas if with_root else cas[1:])))
    intermediates = tuple(reversed(cas[1:]))
    expected = intermediates if with_root else intermediates[:MAX_CHAIN]
    assert chain_to_send(load_material(crt, key, tmp_path / "line.crt")) == expected


@pytest.mark.parametrize("with_root", [True, False])
def test_of_two_copies_the_one_that_lasts(two_level: TwoLevelPKI, tmp_path: Path, with_root: bool) -> None:
    """The intermediate renewed with its key, both copies valid now: the chain is chosen
    when the files are read, so the copy sent is the one that expires last, whichever
    the CA file lists first, found through OpenSSL or by name."""
    short = make_ca("iapd test intermediate CA", (two_level.root_key, two_level.root), key=two_level.intermediate_key,
                    days=1)[1]
    root = (two_level.root,) if with_root else ()
    for cas in ((short, two_level.intermediate), (two_level.intermediate, short)):
        assert chain_to_send(_with_cas(two_level, tmp_path, *root, *cas)) == (two_level.intermediate,)


def test_no_root_expired_copy_first(two_level: TwoLevelPKI, tmp_path: Path) -> None:
    """No root in the CA file, an expired copy of the intermediate first: the search by
    name prefers the copy valid now, as OpenSSL does."""
    expired = make_ca("iapd test intermediate CA", (two_level.root_key, two_level.root),
                      key=two_level.intermediate_key, expired=True)[1]
    assert chain_to_send(_with_cas(two_level, tmp_path, expired, two_level.intermediate)) == (two_level.intermediate,)


def test_key_rollover_certificate_is_sent(two_level: TwoLevelPKI, tmp_path: Path) -> None:
    """A CA's key-rollover certificate (its own name as issuer, signed by its old key)
    in the certificate file is an intermediate, not a root: it is sent."""
    rollover = make_ca("iapd test intermediate CA", (ec.generate_private_key(ec.SECP256R1()), two_level.intermediate),
                       key=ec.generate_private_key(ec.SECP256R1()))[1]
    assert rollover.subject == rollover.issuer
    d = two_level.directory
    (tmp_path / "sensor.crt").write_bytes(pem(two_level.leaf["sensor"], rollover, two_level.root))
    material = load_material(tmp_path / "sensor.crt", d / "sensor.key", d / "root.crt")
    assert chain_to_send(material) == (rollover,)


def _logged(during: Any) -> tuple[Any, list[str]]:
    """C{during()}'s value, and the messages Twisted's log got meanwhile."""
    from twisted.logger import formatEvent, globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        return during(), [formatEvent(e) for e in events]
    finally:
        globalLogPublisher.removeObserver(events.append)


def test_a_surprise_is_logged_and_the_file_chain_sent(two_level: TwoLevelPKI, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(cert: x509.Certificate) -> bool:
        raise TypeError("a surprise")

    monkeypatch.setattr(tls, "_self_signed", broken)
    material = two_level.material("sensor", "sensor+intermediate+root.crt", "root.crt")
    chain, messages = _logged(lambda: chain_to_send(material))
    assert chain == (two_level.intermediate, two_level.root)
    assert any(m.startswith("cannot choose the CAs to send above CN=sensor1.test") for m in messages), messages


def test_openssl_failing_oddly_is_logged_and_names_chosen(two_level: TwoLevelPKI,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a chain OpenSSL cannot find (that is silent: an expired certificate of ours,
    or another end's CA file), but an error from the library itself."""
    def broken(*args: Any) -> Any:
        raise AttributeError("get_verified_chain")

    monkeypatch.setattr(tls.crypto, "X509StoreContext", broken)
    material = two_level.material("sensor", "sensor.crt", "root+intermediate.crt")
    chain, messages = _logged(lambda: chain_to_send(material))
    assert chain == (two_level.intermediate,)
    assert any(m.startswith("cannot have OpenSSL chain CN=sensor1.test") for m in messages), messages
    monkeypatch.undo()
    # the CA file lacks the intermediate: no chain, no word in the log, nothing sent
    assert _logged(lambda: chain_to_send(two_level.material("sensor", "sensor.crt", "root.crt"))) == ((), [])


# -- what crosses a real handshake -------------------------------------------------------


class HandshakeChainTests(ManagerTestCase):
    """A real manager on loopback, real TLS, real SQLite; each test starts its own."""

    @inlineCallbacks
    def setUp(self) -> Any:
        self.tmp = Path(self.mktemp())
        self.tmp.mkdir(parents=True)
        self.db_path = self.tmp / "alerts.db"
        self.two_level = TwoLevelPKI(self.tmp)
        yield None

    @inlineCallbacks
    def data_phase(self, material: TLSMaterial, connections: int = 1) -> Any:
        """A sensor with C{material} taken through setup, TLS and both verifies; the
        OpenSSL connections of both ends (the manager's newest of C{connections})."""
        peer = yield self.raw_peer()
        peer.transport.write(setup_bytes())
        yield peer.until_contains(OK)
        peer.take()
        peer.transport.write(UPGRADE)
        yield peer.until_contains(b"IAP/0.2 101\r\n\r\n")
        peer.take()
        peer.transport.startTLS(client_options(material, "manager.test"))
        peer.transport.write(VERIFY)
        yield peer.until_contains(OK + SERVER_VERIFY)
        self.assertEqual(len(self.factory.connections), connections)
        newest = max(self.factory.connections, key=lambda p: p.conn_id)
        manager_side = newest.transport.getHandle()
        return peer.transport.getHandle(), manager_side

    @staticmethod
    def names(chain: Any) -> list[str]:
        return [c.to_cryptography().subject.rfc4514_string() for c in chain or []]

    @inlineCallbacks
    def test_iap_pki_each_end_sends_its_certificate_alone(self) -> Any:
        yield self.start_manager()
        sensor_side, manager_side = yield self.data_phase(load_material(*self.pki.sensor, self.pki.ca))
        # the server's peer chain leaves out the leaf (OpenSSL): the sensor's CA was there
        self.assertEqual(self.names(manager_side.get_peer_cert_chain()), [])
        self.assertEqual(manager_side.get_peer_certificate().to_cryptography().subject.rfc4514_string(),
                         "CN=sensor1.test")
        self.assertEqual(self.names(sensor_side.get_peer_cert_chain()), ["CN=manager.test"])

    @inlineCallbacks
    def test_pyopenssl_without_the_binding_warns_once_and_still_connects(self) -> Any:
        """
        A pyOpenSSL whose bindings lack the call that sets a connection's mode (here
        hidden from the import): the sensor says so once in its log, sends its CA as
        OpenSSL would, and the connection works as before.
        """
        import sys

        from twisted.logger import formatEvent, globalLogPublisher

        real = sys.modules["OpenSSL._util"]
        sys.modules["OpenSSL._util"] = None  # type: ignore[assignment]  # its import now raises ImportError
        self.addCleanup(sys.modules.__setitem__, "OpenSSL._util", real)
        self.patch(tls._OwnChainOnly, "warned", False)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        yield self.start_manager()
        material = load_material(*self.pki.sensor, self.pki.ca)
        sensor_side, manager_side = yield self.data_phase(material)
        self.assertEqual(self.names(manager_side.get_peer_cert_chain()), ["CN=iapd test CA"])
        yield self.data_phase(material, connections=2)
        warnings = [formatEvent(e) for e in events if "cannot set a connection's mode" in formatEvent(e)]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("handshakes send the CA certificate too", warnings[0])

    @inlineCallbacks
    def test_intermediates_cross_without_the_root(self) -> Any:
        """
        The manager trusts the root alone and has its intermediate in its certificate
        file, the root too; the sensor trusts the root and the intermediate and has its
        leaf alone.  Each verifies the other only if the intermediate crossed, and the
        root crossed neither way.  Then an alert is delivered as the sensor daemon
        delivers it, and stored.
        """
        t = self.two_level
        yield self.start_manager(material=t.material("manager", "manager+intermediate+root.crt", "root.crt"))
        sensor = t.material("sensor", "sensor.crt", "root+intermediate.crt")
        sensor_side, manager_side = yield self.data_phase(sensor)
        intermediate = "CN=iapd test intermediate CA"
        self.assertEqual(self.names(manager_side.get_peer_cert_chain()), [intermediate])
        self.assertEqual(self.names(sensor_side.get_peer_cert_chain()), ["CN=manager.test", intermediate])

        outcomes = yield deliver(reactor, self.endpoint(), SensorSettings(manager="manager.test", material=sensor),
                                 [(IDEF, b"through an intermediate")])
        self.assertEqual([o.code for o in outcomes], [200])
        self.assertEqual([a["body"] for a in self.stored()], [b"through an intermediate"])

    @inlineCallbacks
    def test_after_a_reload(self) -> Any:
        """A manager reloaded onto a certificate under an intermediate sends it from
        the next connection on, and not the root."""
        yield self.start_manager()
        yield self.data_phase(load_material(*self.pki.sensor, self.pki.ca))
        t = self.two_level
        self.factory.reload(attr.evolve(self.factory.settings, material=t.material(
            "manager", "manager.crt", "root+intermediate.crt")))
        sensor_side, manager_side = yield self.data_phase(t.material("sensor", "sensor+intermediate.crt", "root.crt"),
                                                          connections=2)
        intermediate = "CN=iapd test intermediate CA"
        self.assertEqual(self.names(sensor_side.get_peer_cert_chain()), ["CN=manager.test", intermediate])
        self.assertEqual(self.names(manager_side.get_peer_cert_chain()), [intermediate])

    @inlineCallbacks
    def test_no_intermediate_no_handshake(self) -> Any:
        """The control: a sensor whose files do not hold the intermediate is refused by
        a manager that trusts only the root, and nothing is stored."""
        t = self.two_level
        yield self.start_manager(material=t.material("manager", "manager+intermediate.crt", "root.crt"))

        sensor = t.material("sensor", "sensor.crt", "root.crt")
        self.assertEqual(chain_to_send(sensor), ())
        outcomes = yield deliver(reactor, self.endpoint(), SensorSettings(manager="manager.test", material=sensor),
                                 [(IDEF, b"never stored")])
        self.assertNotEqual([o.code for o in outcomes], [200])
        self.assertEqual(self.stored(), [])


def test_dashboard_sends_no_root() -> None:
    """The dashboard's HTTPS with client certificates (its trust store is the CA file)
    sends its own certificate alone, like the IAP listener."""
    with tempfile.TemporaryDirectory() as d:
        test_pki = make_test_pki(Path(d))
        crt, key = test_pki.manager
        options, _ = web_tls_options(
            WebConfig(listen="tcp:0", tls=WebTLS(crt, key, test_pki.ca), client_certificates=("*",)), "test"
        )
        server = SSL.Connection(options.getContext(), None)
        server.set_accept_state()
        client_context = SSL.Context(SSL.TLS_METHOD)
        client_context.load_verify_locations(str(test_pki.ca))
        client_context.use_certificate_file(str(test_pki.sensor[0]))
        client_context.use_privatekey_file(str(test_pki.sensor[1]))
        client = SSL.Connection(client_context, None)
        client.set_connect_state()
        handshake(client, server)
        assert [c.to_cryptography().subject.rfc4514_string() for c in client.get_peer_cert_chain()] == [
            "CN=manager.test"
        ]


# -- the same choices on Debian's stack --------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
DEBIAN_PYTHON = "/usr/bin/python3"
CHOSEN = {
    "sent": {"iap-pki": [], "renewed, other first": ["intermediate"], "expired copy first": ["intermediate"],
             "no root, other first": ["intermediate"], "no root, expired copy first": ["intermediate"],
             "short-lived copy first": ["intermediate"]},
    "received": {"iap-pki": {"manager": [], "sensor": []},
                 "intermediate": {"manager": ["intermediate"], "sensor": ["intermediate"]}},
}


def _chaincheck(python: str) -> Any:
    """What tests/chaincheck.py prints under C{python}, its user site left out."""
    done = subprocess.run([python, "-s", "-m", "tests.chaincheck"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_choices_on_this_stack() -> None:
    found = _chaincheck(sys.executable)
    assert {k: found[k] for k in CHOSEN} == CHOSEN


def test_choices_on_debians_stack() -> None:
    """
    Under Debian's interpreter and libraries, as the .deb runs: cryptography 38 reads
    the key identifiers through iapd.x509compat's own parser (the role OIDs defeat its
    own), and pyOpenSSL 23 and Twisted 22.4 make the connections.
    """
    probe = subprocess.run([DEBIAN_PYTHON, "-c", "import attr, cryptography, OpenSSL, twisted, service_identity"],
                           capture_output=True, text=True, timeout=60) if Path(DEBIAN_PYTHON).exists() else None
    if probe is None or probe.returncode != 0:
        problem = f"{DEBIAN_PYTHON} lacks the .deb's libraries (.ci/run installs them)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(problem)
        pytest.skip(problem)
    found = _chaincheck(DEBIAN_PYTHON)
    assert {k: found[k] for k in CHOSEN} == CHOSEN
    # Debian's own packages, not a pip install in /usr/local shadowing them
    libraries = found["libraries"]
    assert libraries["cryptography"].startswith("/usr/lib/python3/dist-packages/"), libraries
    assert libraries["OpenSSL"].startswith("/usr/lib/python3/dist-packages/"), libraries
