"""
Who may read the dashboard: a client certificate, a password, or both (C{web.auth}).

L{AuthGate} wraps the whole resource tree (C{/metrics} included), so no resource can
be reached around it.  It consumes no path segment: after the check, the request goes
on down the tree as if the gate were not there.

  check                 how                                        refused with
  -------------------   ----------------------------------------   ---------------------
  client certificate    verified by OpenSSL in the handshake        handshake failure
                        against web.tls.ca; then here: identity
                        (DNS SAN, else CN) matches a glob of
                        web.auth.client_certificates, and it is     403
                        no sensor certificate (GENERATOR role)
  password              HTTP Basic; user compared in constant       401 + WWW-Authenticate
                        time, password checked with scrypt in a
                        thread (never on the reactor)
  too many failures     MAX_FAILURES wrong passwords in WINDOW      429, without running
                        seconds from one address (IPv6: one /64);   scrypt
                        checks under way count as failures
  too many at once      MAX_CHECKING checks under way in all        503 + Retry-After
                        (the same header: one check, shared)

A password that passed is remembered (as the SHA-256 of the whole Authorization
header, never the password) for L{REMEMBER} seconds, so scrypt runs once per login,
not once per request: a page load makes several requests (page, script, style, chart,
event stream).
"""

from __future__ import annotations

import base64
import collections
import fnmatch
import hashlib
import hmac
import ipaddress
import time
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request
from twisted.web.util import DeferredResource

from ..roles import IAP_ALERT_GENERATOR, has_role, identity_of
from ..tls import peer_certificate
from .config import WebConfig
from .password import PasswordHash

REMEMBER = 300.0
"""Seconds a checked password is remembered."""

MAX_REMEMBERED = 256
MAX_FAILURES = 10
WINDOW = 60.0
MAX_CHECKING = 4
"""Passwords checked at once (scrypt: some 32 MiB and 60 ms each); more are answered 503."""
MAX_PEERS = 10000
"""Addresses whose failures are counted; IPv6 addresses count per /64 (one host has them all)."""
REALM = b'Basic realm="iapd dashboard", charset="UTF-8"'

log = Logger(namespace="iapd.web")


class Refusal(Resource):
    """A plain-text refusal that ends the walk down the tree."""

    isLeaf = True

    def __init__(self, code: int, message: str, challenge: bool = False, retry_after: int | None = None) -> None:
        super().__init__()
        self.code = code
        self.message = message
        self.challenge = challenge
        self.retry_after = retry_after

    def render(self, request: Request) -> bytes:
        request.setResponseCode(self.code)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        if self.challenge:
            request.setHeader(b"WWW-Authenticate", REALM)
        if self.retry_after is not None:
            request.setHeader(b"Retry-After", str(self.retry_after).encode("ascii"))
        return self.message.encode("utf-8") + b"\n"


def _login_refusal() -> Refusal:
    return Refusal(401, "Authentication required", challenge=True)


def certificate_problem(cert: Any, patterns: tuple[str, ...]) -> str | None:
    """Why a verified client certificate may not read the dashboard, or None."""
    if cert is None:
        return "a client certificate is required"
    if has_role(cert, IAP_ALERT_GENERATOR):
        return "sensor certificates (IAP_ALERT_GENERATOR) may not read the dashboard"
    identity = identity_of(cert)
    if identity is None:
        return "the client certificate names no usable identity"
    if not any(fnmatch.fnmatchcase(identity, p) for p in patterns):
        return f"{identity} is not in web.auth.client_certificates"
    return None


class AuthGate(Resource):
    """The root of an authenticated site: checks, then hands the request to C{inner}."""

    def __init__(
        self, inner: Resource, web: WebConfig, reactor: Any,
        clock: Callable[[], float] = time.monotonic, run: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.patterns = web.client_certificates
        self.user = web.user.encode("utf-8")
        self.password = PasswordHash.parse(web.password_hash) if web.password_hash else None
        self.clock = clock
        self._run = run or (lambda f, *a: deferToThreadPool(reactor, reactor.getThreadPool(), f, *a))
        self._remembered: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self._failures: dict[str, collections.deque[float]] = {}
        self._pending: dict[str, int] = {}  # checks under way, per address: they count as failures until decided
        self._checking = 0
        self._waiting: dict[bytes, list[Deferred[bool]]] = {}  # headers being checked, and who else waits

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        # transparent: put the segment back for the inner tree (as twisted.web.guard does)
        request.postpath.insert(0, request.prepath.pop())
        return self._gate(request)

    def render(self, request: Request) -> bytes:
        return self._gate(request).render(request)

    def _gate(self, request: Request) -> Resource:
        if self.patterns:
            problem = certificate_problem(peer_certificate(request.channel.transport), self.patterns)
            if problem:
                log.warn("web: refused {peer}: {why}", peer=_peer(request), why=problem)
                return Refusal(403, f"Forbidden: {problem}")
        if self.password is None:
            return self.inner
        return self._basic(request)

    def _basic(self, request: Request) -> Resource:
        header = request.getHeader(b"authorization") or b""
        if not header[:6].lower() == b"basic ":
            return Refusal(401, "Authentication required", challenge=True)
        key = hashlib.sha256(header).digest()
        now = self.clock()
        until = self._remembered.get(key)
        if until is not None and until > now:
            return self.inner
        peer = _peer_key(request)
        if self._throttled(peer, now):
            return Refusal(429, "Too many failed logins from this address; wait a minute", retry_after=int(WINDOW))
        try:
            user, _, password = base64.b64decode(header[6:].strip(), validate=True).partition(b":")
            text = password.decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return Refusal(401, "Authentication required", challenge=True)
        waiting = self._waiting.get(key)
        if waiting is not None:
            # the same header is being checked (a page and its script and style, in
            # parallel, right after a login): wait for that check, do not run another
            shared: Deferred[bool] = Deferred()
            waiting.append(shared)
            return DeferredResource(shared.addCallback(lambda ok: self.inner if ok else _login_refusal()))
        if self._checking >= MAX_CHECKING:
            # many guesses at once (from many addresses): scrypt's cost stays bounded
            return Refusal(503, "Too many logins being checked; try again", retry_after=1)
        user_ok = hmac.compare_digest(hashlib.sha256(user).digest(), hashlib.sha256(self.user).digest())
        assert self.password is not None
        # counted before it is decided: guesses sent in parallel must not all pass the
        # throttle while none has failed yet
        self._checking += 1
        self._pending[peer] = self._pending.get(peer, 0) + 1
        self._waiting[key] = []
        checked = self._run(self.password.verify, text)

        def settled(result: Any) -> Any:
            self._checking -= 1
            left = self._pending.pop(peer) - 1
            if left:
                self._pending[peer] = left
            waiters = self._waiting.pop(key, [])
            if isinstance(result, Failure):
                for waiter in waiters:
                    waiter.errback(result)
                return result
            ok = user_ok and bool(result)
            if ok:
                self._remember(key, self.clock())
            else:
                self._failed(peer, self.clock())
                log.warn("web: wrong user or password from {peer}", peer=_peer(request))
            for waiter in waiters:
                waiter.callback(ok)
            return self.inner if ok else _login_refusal()

        return DeferredResource(checked.addBoth(settled))

    def _remember(self, key: bytes, now: float) -> None:
        self._remembered[key] = now + REMEMBER
        self._remembered.move_to_end(key)
        while len(self._remembered) > MAX_REMEMBERED:
            self._remembered.popitem(last=False)

    def _throttled(self, peer: str, now: float) -> bool:
        pending = self._pending.get(peer, 0)
        failures = self._failures.get(peer)
        if not failures:
            return pending >= MAX_FAILURES
        while failures and failures[0] < now - WINDOW:
            failures.popleft()
        if not failures:
            del self._failures[peer]
        return len(failures) + pending >= MAX_FAILURES

    def _failed(self, peer: str, now: float) -> None:
        if peer not in self._failures and len(self._failures) >= MAX_PEERS:
            for other in [p for p, times in self._failures.items() if times[-1] < now - WINDOW]:
                del self._failures[other]
            if len(self._failures) >= MAX_PEERS:
                self._failures.clear()  # bounded: a flood of addresses only resets the counts
        self._failures.setdefault(peer, collections.deque(maxlen=MAX_FAILURES)).append(now)


def _peer(request: Request) -> str:
    address = request.getClientAddress()
    return getattr(address, "host", None) or str(address)


def _peer_key(request: Request) -> str:
    """Whose failures a request counts to: its address, or its /64 for IPv6."""
    peer = _peer(request)
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return peer
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return peer


class HostGate(Resource):
    """
    The root of a dashboard without authentication: only requests addressed to this
    host by a local name (C{localhost}, C{*.localhost}, a loopback address) or one of
    C{web.hosts} go on; others are answered 421.

    Why: a browser on this host visiting a hostile page whose DNS name the attacker then
    points at 127.0.0.1 would send that page's requests here as same-origin ones (DNS
    rebinding); they carry the hostile name in Host, so they stop here.
    """

    def __init__(self, inner: Resource, extra: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.inner = inner
        self.extra = frozenset(extra)

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        request.postpath.insert(0, request.prepath.pop())
        return self._gate(request)

    def render(self, request: Request) -> bytes:
        return self._gate(request).render(request)

    def _gate(self, request: Request) -> Resource:
        host = host_name(request.getHeader(b"host"))
        if host is not None and (local_name(host) or host in self.extra):
            return self.inner
        return Refusal(421, "Misdirected Request: this dashboard answers only to localhost and web.hosts")


def host_name(header: bytes | None) -> str | None:
    """The host part of a Host header, lower-cased, without the port and brackets."""
    if not header:
        return None
    text = header.decode("ascii", "replace").strip().lower()
    if text.startswith("["):
        end = text.find("]")
        return text[1:end] if end > 0 else None
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def local_name(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
