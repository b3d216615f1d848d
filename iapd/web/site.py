"""
The resource tree behind C{web.listen}, and the headers every answer carries.

Alerts are attacker-controlled input, so every page is served under a strict
Content-Security-Policy and with MIME sniffing and framing turned off, whatever
resource produced it; the headers are set in one place, the L{Site}'s request factory,
so that no resource can forget them.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from ..metrics import CONTENT_TYPE_LATEST

SECURITY_HEADERS = {
    b"Content-Security-Policy": (
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        b"connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    b"X-Content-Type-Options": b"nosniff",
    b"X-Frame-Options": b"DENY",
    b"Referrer-Policy": b"no-referrer",
    b"Cache-Control": b"no-store",
}


READ_METHODS = (b"GET", b"HEAD")

MAX_REQUEST_BODY = 64 * 1024
"""Nothing served here reads a request body: a larger one closes the connection."""


class SecureRequest(Request):
    """
    A request whose answer always carries L{SECURITY_HEADERS}, on a site that is
    read-only as a whole: any method but GET and HEAD is answered 405 before any
    resource sees it (twisted.web alone would answer 501 to most), so nothing a
    cross-site request could send changes anything.
    """

    _body_octets = 0

    def handleContentChunk(self, data: bytes) -> None:
        self._body_octets += len(data)
        if self._body_octets > MAX_REQUEST_BODY:
            transport = self.channel.transport
            getattr(transport, "abortConnection", transport.loseConnection)()
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        for name, value in SECURITY_HEADERS.items():
            self.responseHeaders.setRawHeaders(name, [value])
        if self.isSecure():
            self.responseHeaders.setRawHeaders(b"Strict-Transport-Security", [b"max-age=31536000"])
        if self.method not in READ_METHODS:
            self.setResponseCode(405)
            self.setHeader(b"Allow", b"GET, HEAD")
            self.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            self.write(b"Method Not Allowed: this site is read-only (GET and HEAD)\n")
            self.finish()
            return
        if not fetch_allowed(self):
            self.setResponseCode(403)
            self.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            self.write(b"Forbidden: cross-site requests may only open a page (navigate), not read or load one\n")
            self.finish()
            return
        super().process()


def fetch_allowed(request: Request) -> bool:
    """Whether a browser's request may reach a resource (a resource isolation policy).

    Reads are harmless in themselves, but a hostile page open in the operator's browser
    could make it load costly API queries (an <img> pointing at /api/events with a
    pathological filter), carrying the cached password with them.  Browsers say where
    a request comes from in Sec-Fetch-Site: requests from this origin, typed addresses
    and bookmarks (none) and top-level navigations (a link in a ticket) pass; anything
    else a foreign page starts is refused.  Clients that send no such header (curl,
    Prometheus, old browsers) are not browsers acting for a foreign page and pass.
    """
    site = request.getHeader(b"sec-fetch-site")
    if site is None or site in (b"same-origin", b"none"):
        return True
    return request.getHeader(b"sec-fetch-mode") == b"navigate" and request.getHeader(b"sec-fetch-dest") == b"document"


class MetricsResource(Resource):
    """C{GET /metrics}: the Prometheus text exposition of one daemon's counters."""

    isLeaf = True

    def __init__(self, metrics: Any) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self.metrics.exposition()


class NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"Not Found\n"


class Root(Resource):
    """C{/}: children are mounted by name; an unknown path is a plain 404."""

    def getChild(self, path: bytes, request: Request) -> Resource:
        return NotFound()


def metrics_root(metrics: Any) -> Resource:
    """The root of a daemon that serves only C{/metrics}: the sensor."""
    root = Root()
    root.putChild(b"metrics", MetricsResource(metrics))
    return root


STATIC_TYPES = {
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
}


class StaticFiles(Resource):
    """
    C{/static/NAME}: the dashboard's script and style sheet, read from the package once.

    Only the files shipped in C{iapd/web/static} exist; there is no directory listing.
    """

    def __init__(self) -> None:
        super().__init__()
        folder = resources.files("iapd.web").joinpath("static")
        for entry in folder.iterdir():
            suffix = "." + entry.name.rsplit(".", 1)[-1]
            if suffix in STATIC_TYPES:
                self.putChild(entry.name.encode("ascii"), _StaticFile(entry.read_bytes(), STATIC_TYPES[suffix]))

    def getChild(self, path: bytes, request: Request) -> Resource:
        return NotFound()


class _StaticFile(Resource):
    isLeaf = True

    def __init__(self, data: bytes, content_type: bytes) -> None:
        super().__init__()
        self.data = data
        self.content_type = content_type

    def render_GET(self, request: Request) -> bytes:
        if [p for p in request.postpath if p]:
            request.setResponseCode(404)
            return b""
        request.setHeader(b"Content-Type", self.content_type)
        return self.data


def manager_root(metrics: Any, store: Any, config: Any, reactor: Any) -> Resource:
    """
    The manager's tree: C{/metrics}, and the dashboard and API next to it::

        /                     redirect to /alerts
        /alerts               alert list: filters, chart, live updates
        /alerts/N             one alert: IDMEF summary, sensor, VIA path, raw body
        /sensors              sensors: last seen, heartbeat, alert counts
        /static/...           dashboard.js, dashboard.css
        /api/...              the JSON API (iapd.web.api, docs/openapi.yaml)
        /metrics              Prometheus

    The root carries the event hub as C{root.hub}, for tests and shutdown.
    """
    from .api import api_root, in_thread
    from .events import EventHub
    from .pages import AlertsPage, Redirect, SensorsPage
    from .readers import StoreReader

    root = metrics_root(metrics)
    reader = StoreReader.for_config(config)
    hub = EventHub(reader, reactor)
    hub.attach(store)
    run = in_thread(reactor, store)
    root.putChild(b"", Redirect())
    root.putChild(b"alerts", AlertsPage(reader, run))
    root.putChild(b"sensors", SensorsPage(reader, run))
    static = StaticFiles()
    root.putChild(b"static", static)
    root.putChild(b"favicon.ico", static.children[b"favicon.svg"])  # what browsers ask for unprompted
    root.putChild(b"api", api_root(reader, hub, reactor, store))
    root.hub = hub  # type: ignore[attr-defined]
    return root


def manager_site(metrics: Any, store: Any, config: Any, reactor: Any) -> Any:
    """
    The factory to listen with on C{web.listen}: the L{Site} of L{manager_root},
    behind L{iapd.web.auth.AuthGate} when C{web.auth} is set, inside TLS when
    C{web.tls} is set.  Raises L{iapd.config.ConfigError} naming C{web.tls} when its
    files cannot be used.
    """
    return protected_site(manager_root(metrics, store, config, reactor), getattr(config, "web", None), config, reactor)


def protected_site(resource: Resource, web: Any, config: Any, reactor: Any) -> Any:
    """
    C{resource} as every iapd web listener serves it (the manager's dashboard, the
    sensor's C{/metrics}): behind L{iapd.web.auth.AuthGate} when C{web.auth} is set,
    else behind the Host check; inside TLS when C{web.tls} is set; with bounded
    connections.  Raises L{iapd.config.ConfigError} naming C{web.tls} when its files
    cannot be used.
    """
    if web is not None and web.authenticated:
        from .auth import AuthGate

        resource = AuthGate(resource, web, reactor)
    else:
        from .auth import HostGate

        resource = HostGate(resource, web.hosts if web is not None else ())
    site = make_site(resource)
    if web is None or web.tls is None:
        return ConnectionLimit(site)
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from .tlsweb import ReloadableWebTLS

    tls = ReloadableWebTLS(web, str(config.path))
    return ConnectionLimit(TLSMemoryBIOFactory(tls, False, site), tls)


MAX_CONNECTIONS = 256
MAX_CONNECTIONS_PER_ADDRESS = 32


class ConnectionLimit(WrappingFactory):
    """
    At most L{MAX_CONNECTIONS} web connections, L{MAX_CONNECTIONS_PER_ADDRESS} from one
    address; others are closed at once.  The dashboard shares the manager's process
    and so its file descriptors: connections held open by anyone who can reach
    C{web.listen} (before any authentication, a byte every minute keeps one) must not
    leave the manager unable to accept a sensor or open its store.
    """

    def __init__(self, wrapped: Any, tls: Any = None) -> None:
        super().__init__(wrapped)
        self.per_address: dict[str, int] = {}
        self.tls = tls
        """The L{iapd.web.tlsweb.ReloadableWebTLS} of an HTTPS listener, for SIGHUP."""

    def buildProtocol(self, addr: Any) -> Any:
        host = getattr(addr, "host", None) or str(addr)
        if len(self.protocols) >= MAX_CONNECTIONS or self.per_address.get(host, 0) >= MAX_CONNECTIONS_PER_ADDRESS:
            return None
        protocol = super().buildProtocol(addr)
        if protocol is not None:
            self.per_address[host] = self.per_address.get(host, 0) + 1
            protocol._limit_host = host
        return protocol

    def logPrefix(self) -> str:
        # the wrapped factory's own ("QuietSite starting on 8080"): logs stay as they were
        wrapped = self.wrappedFactory
        return str(wrapped.logPrefix()) if hasattr(wrapped, "logPrefix") else wrapped.__class__.__name__

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        host = getattr(p, "_limit_host", None)
        if host is not None:
            left = self.per_address.pop(host, 1) - 1
            if left > 0:
                self.per_address[host] = left


class QuietSite(Site):
    """A L{Site} that does not write an access-log line for every Prometheus scrape."""

    requestFactory = SecureRequest
    noisy = False

    def log(self, request: Request) -> None:
        if request.path != b"/metrics":
            super().log(request)


def make_site(root: Resource) -> Site:
    return QuietSite(root)
