"""
What iapd.tls sends above a certificate, under whichever stack runs this.

    PYTHONPATH=. /usr/bin/python3 -m tests.chaincheck

Not a test module: tests/test_tlschain.py runs it under this interpreter and under
Debian's /usr/bin/python3, which the .deb runs iapd on and which has no pytest.  There
cryptography 38 cannot parse the role OIDs' extensions, iapd.x509compat reads them
itself and leaves the key identifiers out, and pyOpenSSL 23 and Twisted 22.4 make the
connections: the choices must still come out the same.  Prints one JSON object: for
each CA file, which CA is sent above the sensor's certificate; for two memory-BIO
handshakes made with iapd's own contexts, what each end received above the other's
certificate; and where the libraries came from.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from iapd.tls import chain_to_send, client_options, load_material, server_options

from .certs import TwoLevelPKI, handshake, make_ca, make_test_pki, pem


class _TLSProtocol:
    """What Twisted's client creators read of the protocol a connection is for."""

    class factory:
        wrappedFactory = None


def main() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        one = make_test_pki(Path(d, "one"))
        Path(d, "two").mkdir()
        two = TwoLevelPKI(Path(d, "two"))
        _, other = make_ca("iapd test intermediate CA", (two.root_key, two.root))
        _, expired = make_ca("iapd test intermediate CA", (two.root_key, two.root), key=two.intermediate_key,
                             expired=True)
        _, short = make_ca("iapd test intermediate CA", (two.root_key, two.root), key=two.intermediate_key, days=1)
        label = {c.fingerprint(two.root.signature_hash_algorithm): name  # type: ignore[arg-type]
                 for name, c in (("root", two.root), ("intermediate", two.intermediate), ("other", other),
                                 ("expired", expired), ("short-lived", short))}

        def labels(certs: Any) -> list[str]:
            return [label.get(c.fingerprint(two.root.signature_hash_algorithm), c.subject.rfc4514_string())
                    for c in certs]

        sent: dict[str, list[str]] = {"iap-pki": labels(chain_to_send(load_material(*one.sensor, one.ca)))}
        for case, cas in (("renewed, other first", (two.root, other, two.intermediate)),
                          ("expired copy first", (two.root, expired, two.intermediate)),
                          ("no root, other first", (other, two.intermediate)),
                          ("no root, expired copy first", (expired, two.intermediate)),
                          ("short-lived copy first", (two.root, short, two.intermediate))):
            Path(d, "cas.crt").write_bytes(pem(*cas))
            sent[case] = labels(chain_to_send(load_material(Path(d, "two", "sensor.crt"), Path(d, "two", "sensor.key"),
                                                            Path(d, "cas.crt"))))

        received: dict[str, dict[str, list[str]]] = {}
        for case, manager, sensor in (
            ("iap-pki", load_material(*one.manager, one.ca), load_material(*one.sensor, one.ca)),
            ("intermediate", two.material("manager", "manager+intermediate+root.crt", "root.crt"),
             two.material("sensor", "sensor.crt", "root+intermediate.crt")),
        ):
            from OpenSSL import SSL

            server = SSL.Connection(server_options(manager).getContext(), None)
            server.set_accept_state()
            client = client_options(sensor, "manager.test").clientConnectionForTLS(_TLSProtocol())
            client.set_connect_state()
            handshake(client, server)
            received[case] = {
                # the server's list leaves out the client's own certificate, the client's does not
                "manager": labels(c.to_cryptography() for c in server.get_peer_cert_chain() or []),
                "sensor": labels(c.to_cryptography() for c in (client.get_peer_cert_chain() or [])[1:]),
            }
        import cryptography
        import OpenSSL

        from iapd.x509compat import LARGE_ARCS

        return {"sent": sent, "received": received,
                "libraries": {"cryptography": cryptography.__file__, "OpenSSL": OpenSSL.__file__,
                              "large_arcs": LARGE_ARCS}}


if __name__ == "__main__":
    print(json.dumps(main()))
