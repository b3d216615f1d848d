"""
C{twistd iap-manager}: options and the service tree of a manager.

Everything that can be checked before the reactor runs is checked in C{postOptions}, so
that a bad configuration stops twistd with one line naming the key, before it daemonizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.application.internet import (
    ClientService,
    backoffPolicy,
)
from twisted.internet import endpoints
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from . import devmode
from .config import ConfigError, ManagerConfig, load_manager
from .manager import ManagerFactory, ManagerSettings
from .metrics import ManagerMetrics
from .pgstore import PostgresStore
from .reload import ReloadOnHangup, load_again, warn_restart_keys, web_reloaded
from .sdnotify import ReadyNotifier
from .services import QuieterCollector, add_listeners, configuration_error, stop_failed
from .store import GroupCommitStore, SQLiteStore, read_alerts
from .tlsbuffers import IdleBufferRelease
from .web.site import manager_site

log = Logger(namespace="iapd.manager")


class Options(usage.Options):
    synopsis = "[-c manager.yaml]"
    longdesc = (
        "Run an IAP/0.2 manager: accept sensor connections over TLS with role "
        "certificates and store their alerts.  Without -c, run a development manager "
        f"on loopback with a throw-away PKI in ./{devmode.DEFAULT_STATE} (or $IAPD_HOME)."
    )
    optParameters = [
        ["config", "c", None, "the manager's YAML configuration file"],
        ["dev-port", None, "5603", "loopback port of the development manager (only without -c)"],
        ["dev-web-port", None, "8080", "loopback port of its dashboard (only without -c, on the first run)"],
    ]

    def postOptions(self) -> None:
        self.dev_created: list[str] = []
        self.dev_state: Path | None = None
        path = self["config"]
        if path is None:
            port, web_port = self._port("dev-port"), self._port("dev-web-port")
            self.dev_state = devmode.state_dir()
            path, self.dev_created = devmode.prepare(self.dev_state, port, web_port)
        try:
            self.manager_config = load_manager(Path(path))
            self.material = self.manager_config.tls.load(str(path))
        except ConfigError as e:
            configuration_error("iap-manager", e)


    def _port(self, name: str) -> int:
        try:
            return int(self[name])
        except ValueError:
            raise SystemExit(
                f"twistd iap-manager: --{name}: not a port number: {self[name]!r} (see twistd iap-manager --help)"
            ) from None


class StoreService(service.Service):
    """Opens the store at start; closes it last, after the listeners stopped."""

    def __init__(self, store: GroupCommitStore, reactor: Any) -> None:
        self.store = store
        self.reactor = reactor

    def startService(self) -> None:
        super().startService()
        d = self.store.open()

        def failed(failure: Any) -> None:
            log.critical("cannot open the store: {why}; stopping", why=failure.getErrorMessage())
            stop_failed(self.reactor)

        d.addErrback(failed)

    def stopService(self) -> Any:
        super().stopService()
        return self.store.close()


class DevelopmentBanner(service.Service):
    """Says loudly that this is a development manager, then proves it works."""

    def __init__(self, options: Options, reactor: Any) -> None:
        self.options = options
        self.reactor = reactor

    def startService(self) -> None:
        super().startService()
        state = self.options.dev_state
        for line in (
            "*" * 72,
            "DEVELOPMENT MODE: no -c given, so this manager runs on an embedded default.",
            f"State, configuration and a DEVELOPMENT CA live in {state}.",
            "Listening on loopback only.  Do not use these certificates in production.",
            *[f"created {what}" for what in self.options.dev_created],
            "*" * 72,
        ):
            log.warn("{line}", line=line)
        self.reactor.callLater(0.5, self._demo)

    def _demo(self) -> None:
        from .send import send_files

        state = self.options.dev_state
        assert state is not None
        config = self.options.manager_config
        d = send_files(self.reactor, state / "sensor.yaml", [str(state / "sample-alert.xml")])

        def sent(results: list[tuple[str, Any]]) -> None:
            _, outcome = results[0]
            if not outcome.acknowledged:
                log.error("the sample alert was not acknowledged: {why}", why=outcome.reason)
                return
            [alert] = read_alerts(config.store_path, sensor=devmode.SENSOR_NAME, limit=1)
            idmef = alert["idmef"] or {}
            log.warn(
                "sample alert acknowledged and stored: id {id}, sensor {sensor}, sha256 {sha}, "
                "classification {cls!r}, severity {sev}",
                id=alert["id"], sensor=alert["sensor"], sha=alert["sha256"][:16],
                cls=idmef.get("classification"), sev=idmef.get("severity"),
            )
            log.warn("send your own:  iap-send -c {state}/sensor.yaml FILE...", state=state)
            log.warn("see them:       iapctl -c {state}/manager.yaml alerts", state=state)
            if config.web_listen:
                log.warn("or in a browser: http://localhost:{port}/", port=config.web_listen.split(":")[1])

        d.addCallbacks(sent, lambda f: log.failure("sample alert failed", f))


@implementer(IStreamClientEndpoint)
class DialEndpoint:
    """A dial target that says in the log which target failed and why."""

    def __init__(self, text: str, endpoint: Any) -> None:
        self.text = text
        self.endpoint = endpoint

    def connect(self, factory: Any) -> Any:
        d = self.endpoint.connect(factory)

        def failed(failure: Any) -> Any:
            log.warn("dial {target}: {why}; retrying with backoff", target=self.text, why=failure.getErrorMessage())
            return failure

        def connected(proto: Any) -> Any:
            log.info("dial {target}: connected", target=self.text)
            return proto

        return d.addCallbacks(connected, failed)

    def __repr__(self) -> str:
        return f"<dial {self.text}>"


def settings_from(config: ManagerConfig, material: Any) -> ManagerSettings:
    return ManagerSettings(
        identity=config.identity,
        material=material,
        setup_timeout=config.setup_timeout,
        max_content_length=config.max_content_length,
        allow_sensors=config.allow_sensors,
        allow_networks=config.allow_networks,
        content_types=config.content_types,
    )


# What a SIGHUP cannot change: the wiring built at start.
RESTART_KEYS = ("listen", "store", "web", "dial")


class ManagerReload:
    """Re-reads manager.yaml and its TLS files; the running settings change only if
    everything loaded."""

    def __init__(self, factory: ManagerFactory, config: ManagerConfig, metrics: ManagerMetrics,
                 web_tls: Any = None) -> None:
        self.factory = factory
        self.config = config
        self.metrics = metrics
        self.web_tls = web_tls  # the dashboard's HTTPS, when web.tls is set

    def __call__(self) -> None:
        path = self.config.path
        loaded = load_again(path, load_manager, failed=self.metrics.reloads.labels("failed").inc, web=self.web_tls)
        if loaded is None:
            return
        config, material = loaded
        self.factory.reload(settings_from(config, material))
        if self.web_tls is not None:
            web_reloaded(self.web_tls)
        self.metrics.certificate_expiry.set(material.not_after().timestamp())
        self.metrics.reloads.labels("ok").inc()
        log.info(
            "reloaded {path}: certificate {subject} (valid until {until}), {ncas} trusted CAs, allow.sensors {sensors},"
            " allow.networks {networks}; new connections use them, {open} open connections keep their sessions",
            path=str(path), subject=material.certificate.subject.rfc4514_string(),
            until=f"{material.not_after():%Y-%m-%d %H:%M} UTC", ncas=len(material.cas),
            sensors=list(config.allow_sensors), networks=[str(n) for n in config.allow_networks],
            open=len(self.factory.connections),
        )
        warn_restart_keys(self.config, config, RESTART_KEYS, path)
        self.config = config


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    config: ManagerConfig = options.manager_config
    top = service.MultiService()
    store = (
        SQLiteStore(config.store_path, reactor) if config.store_path is not None
        else PostgresStore(config.store, reactor)
    )
    StoreService(store, reactor).setServiceParent(top)
    metrics = ManagerMetrics()
    metrics.certificate_expiry.set(options.material.not_after().timestamp())
    factory = ManagerFactory(settings_from(config, options.material), store, reactor, metrics)
    site = None
    if config.web_listen:
        try:
            site = manager_site(metrics, store, config, reactor)
        except ConfigError as e:
            configuration_error("iap-manager", e)
    # before the listeners: they bind before the reactor runs (ReloadOnHangup)
    reload = ManagerReload(factory, config, metrics, site.tls if site is not None else None)
    ReloadOnHangup(reactor, reload, "manager").setServiceParent(top)
    # gives quiet sensors' TLS buffers back (iapd.tlsbuffers)
    IdleBufferRelease(factory.connections, reactor).setServiceParent(top)
    add_listeners(top, reactor, config.listen, factory)
    for text in config.dial:
        # draft 6.1: the manager opens the TCP connection, the sensor still speaks first
        dialer = ClientService(
            DialEndpoint(text, endpoints.clientFromString(reactor, text)), factory.for_dialing(),
            retryPolicy=backoffPolicy(initialDelay=1.0, maxDelay=60.0, factor=2.0),
        )
        dialer.setServiceParent(top)
    if site is not None:
        add_listeners(top, reactor, [config.web_listen], site)
    if options.dev_state is not None:
        DevelopmentBanner(options, reactor).setServiceParent(top)
    QuieterCollector().setServiceParent(top)  # once everything has started
    ReadyNotifier(reactor, "manager").setServiceParent(top)  # last
    log.info(
        "manager {identity}: listening on {listen}, dialing {dial}, store {store}, setup timeout {t}s,"
        " max content {n} octets, web {web}",
        identity=config.identity, listen=list(config.listen), dial=list(config.dial), store=str(store.backend),
        t=config.setup_timeout, n=config.max_content_length, web=config.web_listen or "off",
    )
    return top


