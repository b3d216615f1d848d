"""
SIGHUP and /metrics on the sensor and the proxy daemons: real twistd processes, real
TLS, the manager's real SQLite store.
"""

from __future__ import annotations

import base64
import select
import shutil
import signal
import socket
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from iapd.store import StoreError, read_alerts
from iapd.web.password import hash_password
from iapd.web.site import MAX_CONNECTIONS_PER_ADDRESS

from . import test_proxy_processes as proxy_processes
from .certs import TestPKI
from .processes import Daemon, free_port
from .test_operations import scrape
from .test_proxy_processes import Processes, manager_yaml, proxy_yaml, wait_until
from .test_sensor_daemon import daemon_sensor_yaml, drop_alerts, run_dir, start_manager, start_sensor
from .test_web_process import https_get

pki = proxy_processes.pki
procs = proxy_processes.procs


def hangup(daemon: Daemon, expect: str) -> str:
    """SIGHUP C{daemon}, then wait until it logs C{expect} once more than before."""
    seen = daemon.log().count(expect)
    daemon.proc.send_signal(signal.SIGHUP)
    return wait_until(lambda: daemon.log().count(expect) > seen and daemon.log(), 30, f"{expect!r} after SIGHUP")


def sensors_of(db: Path) -> list[str]:
    """Who sent each stored alert; nothing while the manager is still creating its store."""
    try:
        return [a["sensor"] for a in read_alerts(db, heartbeats=False)] if db.exists() else []
    except StoreError:
        return []


def test_sensor_metrics_follow_the_spool_and_sighup_swaps_its_certificate(
    pki: TestPKI, procs: Processes, tmp_path: Path
) -> None:
    port, web = free_port(), free_port()
    manager_config = manager_yaml(tmp_path / "manager", pki, port)
    db = manager_config.parent / "alerts.db"
    drops = tmp_path / "drops"
    config = daemon_sensor_yaml(tmp_path / "sensor", pki, port, [{"type": "directory", "path": drops}])
    config.write_text(config.read_text() + f'web: {{listen: "tcp:{web}:interface=127.0.0.1"}}\n')
    sensor = start_sensor(procs, config)

    # the manager is down: alerts wait in the spool, and /metrics says so
    drop_alerts(drops, "early", 20)
    samples = wait_until(lambda: (s := scrape(web))["iap_spool_alerts"] == 20 and s, 30, "20 alerts spooled")
    assert samples["iap_manager_connected"] == 0 and samples["iap_alerts_acknowledged_total"] == 0
    assert samples["iap_spool_bytes"] > 0

    manager = start_manager(procs, manager_config, port)
    wait_until(lambda: len(sensors_of(db)) == 20, 60, "20 alerts stored")
    samples = wait_until(lambda: (s := scrape(web))["iap_spool_alerts"] == 0 and s, 30, "the spool drained")
    assert samples["iap_alerts_acknowledged_total"] == 20 and samples["iap_manager_connected"] == 1

    # rollover to another certificate: the open connection keeps its session...
    tls_line = next(line for line in config.read_text().splitlines() if line.startswith("tls:"))
    new_tls = tls_line.replace(str(pki.sensor[0].resolve()), str(pki.sensor2[0].resolve())).replace(
        str(pki.sensor[1].resolve()), str(pki.sensor2[1].resolve())
    )
    assert new_tls != tls_line
    config.write_text(config.read_text().replace(tls_line, new_tls))
    log = hangup(sensor, "reloaded ")
    assert "the next connection uses it" in log
    drop_alerts(drops, "same-session", 5)
    wait_until(lambda: len(sensors_of(db)) == 25, 60, "25 alerts stored")
    assert set(sensors_of(db)) == {"sensor1.test"}

    # ...and the next connection presents the new certificate
    manager.stop()
    start_manager(procs, manager_config, port)
    drop_alerts(drops, "new-session", 5)
    wait_until(lambda: len(sensors_of(db)) == 30, 60, "30 alerts stored")
    assert sensors_of(db)[25:] == ["sensor2.test"] * 5
    assert scrape(web)['iap_config_reloads_total{result="ok"}'] == 1

    # a key that does not match: refused, and delivery goes on as before
    config.write_text(config.read_text().replace(str(pki.sensor2[1].resolve()), str(pki.sensor[1].resolve())))
    log = hangup(sensor, "refused, the running configuration stays")
    assert "does not belong to certificate" in log
    drop_alerts(drops, "after-refused", 3)
    wait_until(lambda: len(sensors_of(db)) == 33, 60, "33 alerts stored")
    assert scrape(web)['iap_config_reloads_total{result="failed"}'] == 1


def test_sensor_sighup_rotates_the_certificate_of_its_metrics_listener(
    pki: TestPKI, procs: Processes, tmp_path: Path
) -> None:
    web = free_port()
    crt, key = tmp_path / "web.crt", tmp_path / "web.key"
    shutil.copy(pki.manager[0], crt)
    shutil.copy(pki.manager[1], key)
    config = daemon_sensor_yaml(tmp_path / "sensor", pki, free_port(), [{"type": "directory", "path": tmp_path / "in"}])
    config.write_text(config.read_text() + f'web: {{listen: "tcp:{web}:interface=127.0.0.1", hosts: [manager.test],'
                      f' tls: {{certificate: "{crt}", key: "{key}"}}}}\n')
    sensor = start_sensor(procs, config)
    assert https_get(web, pki.ca, "/metrics")[0] == 200
    shutil.copy(pki.manager_other_ca[0], crt)
    shutil.copy(pki.manager_other_ca[1], key)
    hangup(sensor, "reloaded web.tls")
    assert https_get(web, pki.other_ca, "/metrics")[0] == 200
    with pytest.raises(ssl.SSLCertVerificationError):
        https_get(web, pki.ca, "/metrics")
    shutil.copy(pki.manager[1], key)  # the key of another certificate: refused, nothing changes
    log = hangup(sensor, "refused, the running configuration stays")
    assert "web.tls: key" in log
    assert https_get(web, pki.other_ca, "/metrics")[0] == 200


def http_status(port: int, path: str = "/metrics", headers: dict[str, str] | None = None) -> int:
    """The status of a GET on 127.0.0.1:C{port} (errors included), and nothing else."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as e:
        return e.code


def test_sensor_metrics_listener_is_guarded_like_the_dashboard(pki: TestPKI, procs: Processes, tmp_path: Path) -> None:
    """
    The sensor's /metrics listener sits on a perimeter host: it gets the dashboard's
    password check, its Host check against DNS rebinding, and its connection limit.
    """
    locked, open_ = free_port(), free_port()
    password = hash_password("s3cret", log_n=4)
    configs = []
    for name, web in (
        ("locked", f'web: {{listen: "tcp:{locked}:interface=127.0.0.1", auth: {{user: prom, password_hash: "{password}"}}}}'),
        ("open", f'web: {{listen: "tcp:{open_}:interface=127.0.0.1"}}'),
    ):
        config = daemon_sensor_yaml(tmp_path / name, pki, free_port(), [])
        config.write_text(config.read_text() + web + "\n")
        configs.append(config)
        start_sensor(procs, config)

    basic = "Basic " + base64.b64encode(b"prom:s3cret").decode()
    wrong = "Basic " + base64.b64encode(b"prom:guess").decode()
    assert http_status(locked) == 401
    assert http_status(locked, headers={"Authorization": wrong}) == 401
    assert http_status(locked, headers={"Authorization": basic}) == 200

    assert scrape(open_)["iap_spool_alerts"] == 0
    assert http_status(open_, headers={"Host": "rebound.attacker.example"}) == 421
    assert http_status(open_, "/alerts") == 404  # a sensor serves /metrics and nothing else

    # more connections than one address may hold: the listener closes the rest at once
    held = [socket.create_connection(("127.0.0.1", open_), timeout=10) for _ in range(MAX_CONNECTIONS_PER_ADDRESS + 8)]
    try:
        closed: set[socket.socket] = set()
        deadline = time.monotonic() + 10
        while len(closed) < 8 and time.monotonic() < deadline:
            readable, _, _ = select.select([c for c in held if c not in closed], [], [], 1)
            for c in readable:
                try:
                    if c.recv(1) == b"":
                        closed.add(c)
                except ConnectionError:
                    closed.add(c)
        assert len(closed) == 8, f"{len(closed)} of {len(held)} connections closed by the sensor"
    finally:
        for c in held:
            c.close()

    def answered() -> bool:
        # the sensor may accept the next connection before it has read the closes
        # above, and refuse it while it still counts them; it must not for long
        try:
            return http_status(open_) == 200
        except (ConnectionError, urllib.error.URLError):
            return False

    wait_until(answered, 10, "the listener answers again once the held connections are closed", interval=0.2)


def connect_through(port: int) -> bytes:
    """A CONNECT for manager.test sent to C{port}; the first answer that comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"IAP/0.2 CONNECT manager.test\r\n\r\n")
        answer = b""
        deadline = time.monotonic() + 10
        while b"\r\n\r\n" not in answer and time.monotonic() < deadline:
            chunk = s.recv(1024)
            if not chunk:
                break
            answer += chunk
        return answer


def test_proxy_sighup_reloads_its_allow_list_and_routes(pki: TestPKI, procs: Processes, tmp_path: Path) -> None:
    manager_port, proxy_port = free_port(), free_port()
    procs.manager(manager_yaml(tmp_path / "manager", pki, manager_port), manager_port)
    config = proxy_yaml(tmp_path / "proxy", "proxy.test", proxy_port, manager_port)
    config.write_text(config.read_text() + 'allow: {networks: ["10.0.0.0/8"]}\n')
    proxy = procs.daemon(["iap-proxy", "-c", str(config)], run_dir(config.parent), f"ProxyFactory starting on {proxy_port}")
    assert connect_through(proxy_port) == b"IAP/0.2 403\r\n\r\n"

    config.write_text(config.read_text().replace("10.0.0.0/8", "127.0.0.0/8"))
    hangup(proxy, "reloaded ")
    assert connect_through(proxy_port) == b"IAP/0.2 200\r\n\r\n"  # the manager's answer, relayed

    config.write_text(config.read_text().replace('match: "manager.test"', 'match: "elsewhere.test"'))
    hangup(proxy, "reloaded ")
    assert connect_through(proxy_port) == b"IAP/0.2 403\r\n\r\n"  # no route any more

    config.write_text(config.read_text().replace("routes:", "rutes:"))
    log = hangup(proxy, "refused, the running configuration stays")
    assert "rutes: unknown key" in log
