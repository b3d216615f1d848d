"""
Where the manager's memory per idle TLS sensor goes: OpenSSL's share, measured alone.

    python3 bench/tls_memory.py           # a few seconds: 500 connections per variant
    python3 bench/tls_memory.py --smoke   # for CI: checks the harness still works

It measures this interpreter's stack, then, where Debian's /usr/bin/python3 can run
iapd, the same again on Debian's stack, which the .deb runs on (OpenSSL 3.0 on Debian
12, not the OpenSSL bundled in cryptography's wheel).

C{bench/run.py} measures the whole manager (about 40 KiB per idle sensor on pip's stack,
25 on Debian's, against a goal of 20), C{bench/floor.py} the least a Twisted TLS server
keeps for one.  This takes the connection objects apart, in one
process, with in-memory TLS between a manager context and a sensor context made as iapd
makes them (iapd/tls.py, the benchmark's own test PKI).  For each variant it keeps N manager-side connections
and prints the C heap they hold each (glibc C{mallinfo2} after C{malloc_trim}; Python's
own objects are not in it), compared with the first row, the floor:

  SSL_new, bare context     OpenSSL's connection object alone: no certificate, no BIO
  manager, before any byte  the manager's context and Twisted's two memory BIOs
  after the handshake       a mutual-auth TLS 1.3 handshake and one alert each way
  ... P-256 only            the same, the manager offering no post-quantum hybrid group
  ... no client cert        the same, the manager asking for no client certificate
  ... Ed25519 sensor        the same, the sensor's certificate made for an Ed25519 key
                            (iapctl's keys are P-256)
  ... CA sent too           the same, the sensor sending its CA certificate after its
                            own, as OpenSSL does unless told not to (before iapd did)
  ... buffers given back    after the handshake, the manager's memory BIOs given back as
                            a quiet connection's are (iapd/tlsbuffers.py), checked by a
                            second alert
  ... AES-128-GCM           the same, the manager offering only that TLS 1.3 suite
                            (OpenSSL's first choice, and so iapd's, is AES-256-GCM)
  ... ChaCha20-Poly1305     the same, with only that suite
  after a 64 KiB read       the handshake, then 64 KiB of alert in one socket read
  ... buffers given back    the same, then given back

Nothing is asserted about the sizes; the run fails if a handshake does not complete or
the manager did not get the sensor's certificate where it asked for one.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts this checkout's iapd first on the path)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
    )]


SUITES = {"AES-128-GCM": b"TLS_AES_128_GCM_SHA256", "ChaCha20-Poly1305": b"TLS_CHACHA20_POLY1305_SHA256"}
"""The variants that offer one TLS 1.3 suite, by the name OpenSSL gives it."""

_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def c_heap() -> int:
    """Octets the C heap has handed out and not taken back."""
    gc.collect()
    _libc.malloc_trim(0)
    info = _libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def pump(client: Any, server: Any) -> None:
    """Move records between two memory-BIO connections until neither has more to say."""
    from OpenSSL import SSL

    for _ in range(64):
        for end in (client, server):
            try:
                end.do_handshake()
            except SSL.WantReadError:
                pass
        moved = False
        for source, sink in ((client, server), (server, client)):
            try:
                data = source.bio_read(65536)
            except SSL.WantReadError:
                continue
            if data:
                sink.bio_write(data)
                moved = True
        if not moved:
            return
    raise common.BenchError("the in-memory handshake did not settle in 64 rounds")


def ed25519_sensor(pki_dir: Path) -> tuple[bytes, Any]:
    """
    A key and certificate for the benchmark's sensor as iapctl makes them (same name,
    roles and extensions, signed by the same CA), but for an Ed25519 key: what the
    client certificate's share is worth with the smallest key OpenSSL keeps.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from iapd import pki
    from iapd.roles import SENSOR_USAGES

    ca_key, ca_cert = pki.load_ca(pki_dir)
    key, certificate = pki.make_certificate(ca_key, ca_cert, common.SENSOR, SENSOR_USAGES,
                                            key=ed25519.Ed25519PrivateKey.generate())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return pem, certificate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--smoke", action="store_true", help="20 connections: checks the harness, figures mean little")
    parser.add_argument("--no-debian", action="store_true", help="measure this interpreter's stack only")
    args = parser.parse_args()
    count = 20 if args.smoke else args.connections

    from cryptography.hazmat.primitives.asymmetric import ec
    from OpenSSL import SSL, crypto
    from twisted.internet import ssl as tssl

    from iapd import tls, tlsbuffers

    pki = common.make_pki(Path(tempfile.mkdtemp(prefix="iapd-tlsmem-")))
    manager = tls.load_material(pki / f"{common.MANAGER}.crt", pki / f"{common.MANAGER}.key", pki / "ca.crt")
    sensor = tls.load_material(pki / f"{common.SENSOR}.crt", pki / f"{common.SENSOR}.key", pki / "ca.crt")

    def sensor_context_for(key_pem: bytes, certificate: Any, own_chain_only: bool = True) -> Any:
        """A sensor's Context as iapd.tls.client_options makes it (the benchmark's PKI has
        no intermediate CA, so no chain is given)."""
        context = tssl.CertificateOptions(
            privateKey=crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem),
            certificate=tls.to_pyopenssl(certificate),
            trustRoot=tls.trust_root(sensor),
            **tls.tls_profile(),
        ).getContext()
        return tls.send_own_chain_only(context) if own_chain_only else context

    sensor_context = sensor_context_for(sensor.key_pem, sensor.certificate)
    ed25519_context = sensor_context_for(*ed25519_sensor(pki))
    root_sending_context = sensor_context_for(sensor.key_pem, sensor.certificate, own_chain_only=False)

    def manager_context(variant: str) -> Any:
        context = tls.server_options(manager).getContext()
        if variant == "p256":
            try:
                context.set_tmp_ecdh(ec.SECP256R1())
            except AttributeError:  # an older pyOpenSSL (Debian 12's 23.0) takes its own curve objects
                context.set_tmp_ecdh(crypto.get_elliptic_curve("prime256v1"))
        if variant in SUITES:
            from OpenSSL._util import lib  # pyOpenSSL 23 has no call for TLS 1.3 suites

            if lib.SSL_CTX_set_ciphersuites(context._context, SUITES[variant]) != 1:
                raise common.BenchError(f"{variant}: OpenSSL refused the suite")
        if variant == "no client cert":
            context.set_verify(SSL.VERIFY_NONE)
        return context

    def exchange(client: Any, server: Any, alert: bytes, variant: str) -> None:
        """One alert and its answer; the alert's records reach the manager in one write,
        as a socket read hands them to Twisted's TLS."""
        client.sendall(alert)
        server.bio_write(client.bio_read(1 << 20))
        got = b""
        for _ in range(64):
            try:
                got += server.recv(65536)
            except SSL.WantReadError:
                break
        if got != alert:
            raise common.BenchError(f"{variant}: the alert did not come through")
        server.send(b"IAP/0.2 200 OK\r\n\r\n")
        pump(client, server)
        client.recv(65536)

    def connected(variant: str, burst: bool = False, release: bool = False) -> Callable[[], Any]:
        context = manager_context(variant)
        client_context = {"Ed25519 sensor": ed25519_context, "CA sent": root_sending_context}.get(variant, sensor_context)

        def one() -> Any:
            server = SSL.Connection(context, None)
            server.set_accept_state()
            client = SSL.Connection(client_context, None)
            client.set_connect_state()
            pump(client, server)
            exchange(client, server, b"x" * (65536 if burst else 1024), variant)
            if server.get_protocol_version_name() != "TLSv1.3":
                raise common.BenchError(f"{variant}: negotiated {server.get_protocol_version_name()}")
            if variant in SUITES and server.get_cipher_name() != SUITES[variant].decode():
                raise common.BenchError(f"{variant}: negotiated {server.get_cipher_name()}")
            if (server.get_peer_certificate() is None) != (variant == "no client cert"):
                raise common.BenchError(f"{variant}: the manager has the wrong idea of the sensor's certificate")
            if release:
                if not tlsbuffers.release(server):
                    raise common.BenchError(f"buffers not given back: {tlsbuffers.unsupported_reason()}")
                exchange(client, server, b"y" * 1024, f"{variant}, after giving the buffers back")
                tlsbuffers.release(server)
            return server  # the client side is dropped: only the manager's half is kept

        return one

    from OpenSSL._util import ffi, lib  # the bindings pyOpenSSL itself uses

    bare = SSL.Context(SSL.TLS_METHOD)
    fresh_context = manager_context("default")
    variants: list[tuple[str, Callable[[], Any]]] = [
        ("SSL_new, bare context", lambda: ffi.gc(lib.SSL_new(bare._context), lib.SSL_free)),
        ("manager, before any byte", lambda: SSL.Connection(fresh_context, None)),
        ("after the handshake", connected("default")),
        ("... P-256 only", connected("p256")),
        ("... no client cert", connected("no client cert")),
        ("... Ed25519 sensor", connected("Ed25519 sensor")),
        ("... CA sent too", connected("CA sent")),
        ("... buffers given back", connected("default", release=True)),
        ("... AES-128-GCM", connected("AES-128-GCM", release=True)),
        ("... ChaCha20-Poly1305", connected("ChaCha20-Poly1305", release=True)),
        ("after a 64 KiB read", connected("default", burst=True)),
        ("... buffers given back", connected("default", burst=True, release=True)),
    ]
    print(f"C heap per manager-side connection, {count} connections each"
          f" ({SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()})")
    print(f"{'variant':28} {'KiB':>7} {'vs floor':>9}")
    floor = 0.0
    for name, make in variants:
        keep = [make() for _ in range(5)]  # warm up: caches and first allocations
        before = c_heap()
        keep += [make() for _ in range(count)]
        per = (c_heap() - before) / count / 1024
        floor = floor or per
        print(f"{name:28} {per:7.1f} {per / floor:8.2f}x", flush=True)
        del keep

    if args.no_debian:
        return
    debian, why_not = common.debian_stack(common.stack())
    if debian is None:
        print(f"skipped: {why_not}")
        return
    print(f"\nThe same on Debian's stack, which the .deb runs on ({common.DEBIAN_PYTHON}):", flush=True)
    again = subprocess.run([common.DEBIAN_PYTHON, __file__, "--connections", str(count), "--no-debian"],
                           env=common.env(), timeout=600)
    if again.returncode != 0:
        raise common.BenchError(f"tls_memory.py on Debian's stack exited with {again.returncode}")


if __name__ == "__main__":
    main()
