"""
C{twistd iap-proxy -c proxy.yaml}: a relay for IAP across a security perimeter.
"""

from __future__ import annotations

from pathlib import Path

import attr

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from .config import ConfigError, ProxyConfig, load_proxy
from .proxy import ProxyFactory, ProxySettings, Route
from .reload import ReloadOnHangup, load_again, warn_restart_keys
from .sdnotify import ReadyNotifier
from .services import add_listeners, configuration_error

log = Logger(namespace="iapd.proxy")


class Options(usage.Options):
    synopsis = "-c proxy.yaml"
    longdesc = (
        "Run an IAP/0.2 proxy: take part in the plaintext setup (VIA, loop detection, "
        "routing), then relay the TLS session between sensor and manager blindly."
    )
    optParameters = [["config", "c", None, "the proxy's YAML configuration file"]]

    def postOptions(self) -> None:
        if self["config"] is None:
            raise SystemExit("twistd iap-proxy: -c proxy.yaml is required: a proxy needs routes (see twistd iap-proxy --help)")
        try:
            self.proxy_config = load_proxy(Path(self["config"]))
        except ConfigError as e:
            configuration_error("iap-proxy", e)


def settings_from(config: ProxyConfig) -> ProxySettings:
    return ProxySettings(
        identity=config.identity,
        routes=tuple(Route(match, upstream) for match, upstream in config.routes),
        allow_networks=config.allow_networks,
        setup_timeout=config.setup_timeout,
        max_connections=config.max_connections,
        max_per_source=config.max_per_source,
    )


class ProxyReload:
    """SIGHUP: new routes, allow-lists and limits for new connections; relays in
    progress keep their next hop."""

    def __init__(self, factory: ProxyFactory, config: ProxyConfig) -> None:
        self.factory = factory
        self.config = config

    def __call__(self) -> None:
        path = self.config.path
        loaded = load_again(path, load_proxy, tls=False)
        if loaded is None:
            return
        config, _ = loaded
        # identity and listen are wiring: they stay as started (see the warning below)
        self.factory.settings = settings_from(attr.evolve(config, identity=self.config.identity))
        log.info(
            "reloaded {path}: routes {routes}, allow.networks {networks}; {open} open connections keep their hops",
            path=str(path), routes=[f"{m} -> {u}" for m, u in config.routes],
            networks=[str(n) for n in config.allow_networks], open=len(self.factory.connections),
        )
        warn_restart_keys(self.config, config, ("identity", "listen"), path)
        self.config = attr.evolve(config, identity=self.config.identity, listen=self.config.listen)


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    config: ProxyConfig = options.proxy_config
    top = service.MultiService()
    factory = ProxyFactory(settings_from(config), reactor)
    # before the listeners: they bind before the reactor runs (ReloadOnHangup)
    ReloadOnHangup(reactor, ProxyReload(factory, config), "proxy").setServiceParent(top)
    add_listeners(top, reactor, config.listen, factory)
    ReadyNotifier(reactor, "proxy").setServiceParent(top)  # last
    log.info(
        "proxy {identity}: listening on {listen}, routes {routes}",
        identity=config.identity, listen=list(config.listen),
        routes=[f"{m} -> {u}" for m, u in config.routes],
    )
    return top
