"""
What a running daemon counts, in Prometheus' text format.

Each daemon object owns its own registry instead of using prometheus_client's global
one: a test process runs several managers side by side, and a global registry would mix
their counts (and refuse the second set of metric names outright).
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["ManagerMetrics", "SensorMetrics", "CONTENT_TYPE_LATEST"]

# Group commits take from under a millisecond (SQLite, a few alerts) to seconds (a slow
# PostgreSQL server); the buckets cover both ends.
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)

    def exposition(self) -> bytes:
        """The current values, as a scrape of C{/metrics} returns them."""
        return generate_latest(self.registry)


class ManagerMetrics(_Metrics):
    """Connections, alerts by outcome, and the store's commits, of one manager."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.connections_total = Counter(
            "iap_connections", "Connections accepted or dialled (any outcome).", registry=r
        )
        self.connections_open = Gauge("iap_connections_open", "Connections open now.", registry=r)
        self.sensors_ready = Gauge(
            "iap_sensors_ready", "Connections past setup, in the data phase now.", registry=r
        )
        self.setup_failures = Counter(
            "iap_setup_failures", "Connections closed before the data phase, by status code sent.",
            ["status"], registry=r,
        )
        self.alerts_received = Counter(
            "iap_alerts_received", "Alerts read from sensors (stored, duplicate or rejected).", registry=r
        )
        self.alerts_stored = Counter("iap_alerts_stored", "New alerts committed to the store.", registry=r)
        self.alerts_duplicate = Counter(
            "iap_alerts_duplicate", "Retransmitted alerts answered 200 and not stored again.", registry=r
        )
        self.alerts_rejected = Counter(
            "iap_alerts_rejected", "Alerts answered with an error status, by status code.", ["status"], registry=r
        )
        self.commit_seconds = Histogram(
            "iap_store_commit_seconds", "Time from handing a batch to the store thread to its commit.",
            buckets=COMMIT_BUCKETS, registry=r,
        )
        self.commit_alerts = Counter(
            "iap_store_committed_alerts", "Alerts in committed batches (new and duplicate).", registry=r
        )
        self.store_backlog = Gauge("iap_store_backlog", "Alerts waiting for a commit to start.", registry=r)
        self.reloads = Counter(
            "iap_config_reloads", "Configuration reloads (SIGHUP), by result.", ["result"], registry=r
        )
        self.certificate_expiry = Gauge(
            "iap_tls_certificate_expiry_timestamp_seconds",
            "When the certificate this daemon presents expires (Unix time).", registry=r,
        )

    def watch_store(self, store: Any) -> None:
        """Follow C{store}'s commits and backlog."""
        store.commit_observers.append(self._committed)
        self.store_backlog.set_function(lambda: store.backlog)

    def _committed(self, count: int, seconds: float) -> None:
        self.commit_seconds.observe(seconds)
        self.commit_alerts.inc(count)

    def watch_connections(self, connections: Any, ready: Callable[[], int]) -> None:
        self.connections_open.set_function(lambda: len(connections))
        self.sensors_ready.set_function(ready)


class SensorMetrics(_Metrics):
    """A sensor daemon's spool and deliveries, read from the running objects at each
    scrape (the spool and forwarder already keep these numbers; copying them into
    separate counters could only let the two drift apart)."""

    def __init__(self, spool: Any, forwarder: Any) -> None:
        super().__init__()
        self.spool = spool
        self.forwarder = forwarder
        self.registry.register(self)
        self.reloads = Counter(
            "iap_config_reloads", "Configuration reloads (SIGHUP), by result.", ["result"], registry=self.registry
        )

    def describe(self) -> list[Any]:
        return []  # names are only known at collect time; nothing to check at register

    def collect(self) -> Any:
        yield GaugeMetricFamily("iap_spool_alerts", "Alerts in the spool, not yet acknowledged.", value=self.spool.depth)
        yield GaugeMetricFamily("iap_spool_bytes", "Octets the spool accounts for (bodies and index).",
                                value=self.spool.pending_bytes)
        yield CounterMetricFamily("iap_alerts_acknowledged", "Alerts the manager acknowledged (200).",
                                  value=self.forwarder.delivered)
        refused = CounterMetricFamily(
            "iap_alerts_refused", "Alerts the manager refused for good and that were set aside, by status.",
            labels=["status"],
        )
        for code, count in sorted(self.forwarder.refused.items()):
            refused.add_metric([str(code)], count)
        yield refused
        yield GaugeMetricFamily("iap_manager_connected", "1 while a connection to the manager is up.",
                                value=1 if self.forwarder.active is not None else 0)
