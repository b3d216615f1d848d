"""
The resource tree behind C{web.listen}, and the headers every answer carries.

Alerts are attacker-controlled input, so every page is served under a strict
Content-Security-Policy and with MIME sniffing and framing turned off, whatever
resource produced it; the headers are set in one place, the L{Site}'s request factory,
so that no resource can forget them.
"""

from __future__ import annotations

from typing import Any

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


class SecureRequest(Request):
    """A request whose answer always carries L{SECURITY_HEADERS}."""

    def process(self) -> None:
        for name, value in SECURITY_HEADERS.items():
            self.responseHeaders.setRawHeaders(name, [value])
        super().process()


class MetricsResource(Resource):
    """C{GET /metrics}: the Prometheus text exposition of one daemon's counters."""

    isLeaf = True

    def __init__(self, metrics: Any) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self.metrics.exposition()


class Root(Resource):
    """C{/}: children are mounted by name; an unknown path is a plain 404."""


def metrics_root(metrics: Any) -> Resource:
    """The root of a daemon that serves only C{/metrics} (a sensor, a proxy)."""
    root = Root()
    root.putChild(b"metrics", MetricsResource(metrics))
    return root


def manager_root(metrics: Any, store: Any, config: Any, reactor: Any) -> Resource:
    """The manager's tree: C{/metrics}, and the dashboard and API next to it."""
    root = metrics_root(metrics)
    return root


class QuietSite(Site):
    """A L{Site} that does not write an access-log line for every Prometheus scrape."""

    requestFactory = SecureRequest
    noisy = False

    def log(self, request: Request) -> None:
        if request.path != b"/metrics":
            super().log(request)


def make_site(root: Resource) -> Site:
    return QuietSite(root)
