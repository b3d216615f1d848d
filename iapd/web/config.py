"""
The C{web:} section of manager.yaml (and of sensor.yaml, whose listener serves only
C{/metrics}): where the dashboard listens and who may read it.

::

    web:
      listen: "tcp:8443"                  # a Twisted server endpoint string
      tls: {certificate: web.crt, key: web.key}   # or: tls: manager (the manager's own pair)
      auth:
        client_certificates: ["alice.soc.example.org", "*.ops.example.org"]
        user: admin                         # HTTP Basic user name (default admin)
        password_hash: "$scrypt$ln=15,r=8,p=1$...$..."   # python3 -m iapd.web.password
      hosts: ["soc-dashboard.example.org"]  # Host names served without web.auth (default: loopback only)

The dashboard shows every stored alert, so the rules are strict, and each refusal names
the key (table).  A dashboard without C{web.auth} also answers only requests whose Host
is C{localhost}, a loopback address or one of C{web.hosts}: a web page whose name an
attacker rebinds to 127.0.0.1 (DNS rebinding) gets 421, not the alerts::

  web.listen bound to          web.tls   web.auth            result
  -------------------------    -------   -----------------   ---------------------------
  loopback or a UNIX socket    any       any                 accepted
  anything else                no        any                 refused: set tls and auth
  anything else                yes       none                refused: set auth
  anything else                yes       certs and/or pw     accepted (both: both needed)
  any                          no        client_certificates refused: needs web.tls
  any                          any       password, no tls    accepted on loopback only

Client certificates must chain to C{web.tls.ca} (default: the manager's C{tls.ca}, the
CA that signs sensors), carry clientAuth, and name an identity (DNS SAN, else CN) that
matches one of the C{client_certificates} globs.  A sensor certificate (one carrying
IAP_ALERT_GENERATOR) is refused whatever its name: a sensor's key lives on an exposed
host and must not open every other sensor's alerts.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import attr

from .password import hash_problem

_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?\Z|\[[0-9A-Fa-f:.]{2,45}\]\Z")

WEB_KEYS = ("listen", "tls", "auth", "hosts")
TLS_KEYS = ("certificate", "key", "ca")
AUTH_KEYS = ("client_certificates", "user", "password_hash")


@attr.s(frozen=True, auto_attribs=True)
class WebTLS:
    """The dashboard's own certificate and key, and the CAs its clients chain to."""

    certificate: Path
    key: Path
    ca: Path


@attr.s(frozen=True, auto_attribs=True)
class WebConfig:
    """The whole C{web:} section, checked."""

    listen: str
    tls: WebTLS | None = None
    client_certificates: tuple[str, ...] = ()
    user: str = "admin"
    password_hash: str | None = None
    loopback: bool = True
    hosts: tuple[str, ...] = ()  # Host header names accepted besides localhost and loopback addresses

    @property
    def authenticated(self) -> bool:
        return bool(self.client_certificates) or self.password_hash is not None


def listens_on_loopback(text: str) -> bool | None:
    """
    Whether a server endpoint string can only be reached from this host: a TCP
    endpoint bound to a loopback address, or a UNIX socket.  None for an endpoint this
    cannot tell (systemd sockets, plugins): treated as reachable from anywhere.
    """
    from twisted.internet import endpoints, reactor

    endpoint = endpoints.serverFromString(reactor, text)
    if isinstance(endpoint, endpoints.UNIXServerEndpoint):
        return True
    if isinstance(endpoint, (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint)):
        interface = getattr(endpoint, "_interface", "")
        if interface == "localhost":
            return True
        try:
            return ipaddress.ip_address(interface).is_loopback
        except ValueError:
            return False  # '' (every IPv4 interface) or a host name
    return None


def load_web(
    top: Any, base: Path, manager_ca: Path, *, own_tls: str | None = "manager",
    shows: str = "the dashboard shows every stored alert",
) -> WebConfig | None:
    """
    Parse C{web:} from C{top}, an C{iapd.config._Reader} of manager.yaml or
    sensor.yaml; None when there is no C{web.listen} (no web listener at all).

    The sensor's C{web:} (only C{/metrics}) follows the same rules as the manager's: a
    listener reachable from the network is one more way into a perimeter host.
    C{own_tls} is the word that stands for the daemon's own IAP key pair in C{web.tls}
    (None: no such word; a sensor certificate is a client certificate, not a web
    server's), C{shows} says in refusals what the listener would expose.
    """
    from ..config import endpoint_problem

    web = top.sub("web", WEB_KEYS)
    listen = web.get("listen", None)
    if listen is None:
        for key in ("tls", "auth"):
            if web.get(key, None) is not None:
                raise web.fail(key, "is set but web.listen is not: there is no web listener to apply it to")
        return None
    if not isinstance(listen, str):
        raise web.fail("listen", f"must be one server endpoint string, got {listen!r}")
    if listen.split(":", 1)[0].lower() == "ssl":
        raise web.fail("listen", f"{listen!r}: use a tcp: endpoint and set web.tls (certificate, key) for HTTPS")
    problem = endpoint_problem("server")(listen)
    if problem:
        raise web.fail("listen", f"{listen!r}: {problem}")
    loopback = listens_on_loopback(listen) is True

    tls: WebTLS | None = None
    raw_tls = web.get("tls", None)
    if raw_tls is not None:
        if own_tls is not None and raw_tls == own_tls:
            manager_tls = top.sub("tls", ("certificate", "key", "ca"), required=True)
            tls = WebTLS(manager_tls.path("certificate", base), manager_tls.path("key", base), manager_ca)
        elif isinstance(raw_tls, dict):
            t = web.sub("tls", TLS_KEYS)
            ca = t.path("ca", base) if t.get("ca", None) is not None else manager_ca
            tls = WebTLS(t.path("certificate", base), t.path("key", base), ca)
        else:
            word = f" or the word {own_tls}" if own_tls is not None else ""
            raise web.fail("tls", f"must be {{certificate: ..., key: ...}}{word}, got {raw_tls!r}")

    auth = web.sub("auth", AUTH_KEYS)
    patterns = auth.strings("client_certificates", [])
    for pattern in patterns:
        if not pattern or pattern != pattern.strip():
            raise auth.fail("client_certificates", f"{pattern!r}: must be an identity or a glob like '*.soc.example.org'")
    user = auth.get("user", "admin")
    if not isinstance(user, str) or not user or ":" in user or not user.isprintable():
        raise auth.fail("user", f"must be a user name without ':', got {user!r}")
    password_hash = auth.get("password_hash", None)
    if password_hash is not None:
        problem = hash_problem(password_hash)
        if problem:
            raise auth.fail("password_hash", problem)
        password_hash = password_hash.strip()

    if patterns and tls is None:
        raise auth.fail("client_certificates", "needs web.tls: client certificates are asked for in the TLS handshake")
    if password_hash is not None and tls is None and not loopback:
        raise auth.fail(
            "password_hash",
            f"HTTP Basic would send the password in clear: set web.tls, or bind web.listen to loopback ({listen!r} is not)",
        )
    if not loopback and (tls is None or not (patterns or password_hash)):
        raise web.fail(
            "listen",
            f"{listen!r} is reachable beyond loopback, and {shows}: set web.tls and"
            " web.auth (client_certificates or password_hash), or bind to loopback (interface=127.0.0.1)",
        )
    hosts = web.strings("hosts", [])
    for host in hosts:
        if not _HOST.match(host):
            raise web.fail("hosts", f"{host!r}: must be a host name or address as browsers write it in Host")
    return WebConfig(
        listen=listen, tls=tls, client_certificates=tuple(p.lower() for p in patterns), user=user,
        password_hash=password_hash, loopback=loopback, hosts=tuple(h.lower() for h in hosts),
    )
