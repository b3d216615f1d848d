"""
The sensor daemon: inputs -> spool -> forwarder -> manager, plus heartbeats.

Start order matters for the no-loss promise: the spool is recovered first (what a
previous run left is delivered before anything new), inputs start only once the spool
can take alerts, and at stop the inputs stop first and the spool closes last, after its
acknowledgements are written.
"""

from __future__ import annotations

import datetime
import uuid
import xml.etree.ElementTree as ET
from typing import Any

import attr
from twisted.application import service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, DeferredList, gatherResults, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .client import SensorFactory, SensorProtocol, SensorSettings
from .config import SensorConfig, load_sensor
from .forwarder import Forwarder
from .inputs import DirectoryInput, EveInput, SocketInput
from .messages import IDEF_ALERT
from .metrics import SensorMetrics
from .reload import load_again, warn_restart_keys, web_reloaded
from .services import stop_failed
from .spool import Spool, SpoolFull
from .web.site import metrics_root, protected_site

log = Logger(namespace="iapd.sensor")

# What a SIGHUP cannot change: the wiring built at start.
RESTART_KEYS = (
    "identity", "manager", "connect", "listen", "spool", "spool_max_bytes", "window", "inputs", "heartbeat",
    "content_type", "web",
)
IDMEF_NS = "http://iana.org/idmef"


def heartbeat_message(identity: str, interval: float, now: datetime.datetime | None = None) -> bytes:
    """An IDMEF Heartbeat (RFC 4765 4.2.3) announcing C{interval}, from C{identity}."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    ET.register_namespace("idmef", IDMEF_NS)

    def q(tag: str) -> str:
        return f"{{{IDMEF_NS}}}{tag}"

    root = ET.Element(q("IDMEF-Message"), {"version": "1.0"})
    beat = ET.SubElement(root, q("Heartbeat"), {"messageid": f"hb-{uuid.uuid4()}"})
    ET.SubElement(beat, q("Analyzer"), {"analyzerid": identity, "name": "iap-sensor", "model": "iapd"})
    ET.SubElement(beat, q("CreateTime")).text = now.isoformat(timespec="microseconds")
    ET.SubElement(beat, q("HeartbeatInterval")).text = str(int(interval))
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


class _InboundFactory(SensorFactory):
    """Connections a manager opens to this sensor (draft 6.1) join the forwarder."""

    inbound = True

    def __init__(self, forwarder: Forwarder) -> None:
        super().__init__(forwarder.settings, forwarder.reactor)
        self.reload(forwarder)

    def reload(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder
        self.settings = forwarder.settings
        self._tls = forwarder.factory.tls_options()  # one TLS context, one session cache

    def buildProtocol(self, addr: Any) -> SensorProtocol:
        proto = super().buildProtocol(addr)
        proto.ready.addCallbacks(
            self.forwarder.attach,
            lambda f: log.warn("inbound connection from {addr}: {why}", addr=addr, why=f.getErrorMessage()),
        )
        return proto


class SensorService(service.Service):
    """Everything a sensor runs, started and stopped in the order that loses nothing."""

    def __init__(self, config: SensorConfig, material: Any, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        assert config.spool is not None
        self.spool = Spool(config.spool, reactor, max_bytes=config.spool_max_bytes)
        settings = SensorSettings(
            manager=config.manager, material=material, window=config.window,
            setup_timeout=config.setup_timeout, ack_timeout=config.ack_timeout,
        )
        connect = endpoints.clientFromString(reactor, config.connect) if config.connect else None
        self.forwarder = Forwarder(reactor, self.spool, settings, connect)
        self.inputs: list[Any] = []
        for spec in config.inputs:
            if spec.type == "directory":
                self.inputs.append(DirectoryInput(reactor, self.spool, spec.path, spec.content_type))
            elif spec.type == "socket":
                self.inputs.append(SocketInput(reactor, self.spool, spec.path, spec.mode))
            else:
                self.inputs.append(EveInput(reactor, self.spool, spec.path, config.identity))
        self._heartbeat: LoopingCall | None = None
        self._listening: Any = None
        self._inbound: _InboundFactory | None = None
        self._web: Any = None
        self.metrics = SensorMetrics(self.spool, self.forwarder)
        # built now, so that web.tls files that cannot be used stop the start with a
        # ConfigError instead of failing once the spool is open
        self._web_factory = (
            protected_site(metrics_root(self.metrics), config.web, config, reactor) if config.web is not None else None
        )
        self.ready: Deferred[None] = Deferred()

    def startService(self) -> None:
        super().startService()
        d = self.spool.open()
        d.addCallback(self._start_rest)

        def failed(failure: Any) -> None:
            log.critical("cannot open the spool {path}: {why}; stopping", path=str(self.config.spool),
                         why=failure.getErrorMessage())
            stop_failed(self.reactor)

        d.addErrback(failed)

    def _start_rest(self, _: Any) -> Deferred[Any]:
        self.forwarder.start()
        starts = [maybeDeferred(i.start) for i in self.inputs]
        if self.config.listen:
            self._inbound = _InboundFactory(self.forwarder)
            listening = endpoints.serverFromString(self.reactor, self.config.listen).listen(self._inbound)
            starts.append(listening.addCallback(lambda port: setattr(self, "_listening", port)))
        if self.config.web is not None:
            web = endpoints.serverFromString(self.reactor, self.config.web.listen).listen(self._web_factory)
            starts.append(web.addCallback(lambda port: setattr(self, "_web", port)))
        if self.config.heartbeat:
            self._heartbeat = LoopingCall(self._beat)
            self._heartbeat.clock = self.reactor
            self._heartbeat.start(self.config.heartbeat, now=True)
        log.info(
            "sensor {identity}: delivering to {manager} via {hop}{listen}, spool {spool} ({depth} waiting),"
            " {n} inputs, heartbeat {hb}",
            identity=self.config.identity, manager=self.config.manager, hop=self.config.connect or "-",
            listen=f", listening on {self.config.listen}" if self.config.listen else "",
            spool=str(self.config.spool), depth=self.spool.depth, n=len(self.inputs),
            hb=f"every {self.config.heartbeat:g}s" if self.config.heartbeat else "off",
        )
        return gatherResults(starts, consumeErrors=True).addCallback(lambda _: self.ready.callback(None))

    def reload(self) -> None:
        """SIGHUP: re-read sensor.yaml's TLS files; the next connection uses them."""
        path = self.config.path
        web = self._web_factory.tls if self._web_factory is not None else None
        loaded = load_again(path, load_sensor, failed=self.metrics.reloads.labels("failed").inc, web=web)
        if loaded is None:
            return
        config, material = loaded
        settings = attr.evolve(self.forwarder.settings, material=material)
        self.forwarder.reload(settings)
        if self._inbound is not None:
            self._inbound.reload(self.forwarder)
        if web is not None:
            web_reloaded(web)
        self.metrics.reloads.labels("ok").inc()
        log.info(
            "reloaded {path}: certificate {subject} (valid until {until}); the next connection uses it",
            path=str(path), subject=material.certificate.subject.rfc4514_string(),
            until=f"{material.not_after():%Y-%m-%d %H:%M} UTC",
        )
        warn_restart_keys(self.config, config, RESTART_KEYS, path)
        self.config = attr.evolve(self.config, tls=config.tls)

    def _beat(self) -> None:
        body = heartbeat_message(self.config.identity, self.config.heartbeat)
        self.spool.append(IDEF_ALERT, body).addErrback(
            lambda f: f.trap(SpoolFull) and log.warn("heartbeat skipped: spool full")
        )

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        stops = [maybeDeferred(i.stop) for i in self.inputs]
        for port in (self._listening, self._web):
            if port is not None:
                stops.append(maybeDeferred(port.stopListening))
        stops.append(maybeDeferred(self.forwarder.stop))
        d = DeferredList(stops, consumeErrors=True)
        return d.addBoth(lambda _: self.spool.close())


