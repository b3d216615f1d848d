"""
C{twistd iap-proxy -c proxy.yaml}: a relay for IAP across a security perimeter.
"""

from __future__ import annotations

from pathlib import Path

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from .config import ConfigError, ProxyConfig, load_proxy
from .proxy import ProxyFactory, ProxySettings, Route
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
            raise usage.UsageError("-c proxy.yaml is required: a proxy needs routes")
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


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    config: ProxyConfig = options.proxy_config
    top = service.MultiService()
    factory = ProxyFactory(settings_from(config), reactor)
    add_listeners(top, reactor, config.listen, factory)
    log.info(
        "proxy {identity}: listening on {listen}, routes {routes}",
        identity=config.identity, listen=list(config.listen),
        routes=[f"{m} -> {u}" for m, u in config.routes],
    )
    return top
