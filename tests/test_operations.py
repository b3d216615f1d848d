"""
Running a manager and a sensor as an administrator does: SIGHUP reloads, /metrics,
JSON-lines logs.  Real twistd processes, real TLS, real files.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509

from iapd.tls import load_material

from .certs import make_test_pki
from .processes import Daemon, free_port, run
from .syncclient import Refused, SyncSensor

MANAGER_YAML = """\
identity: manager.test
listen: ["tcp:{port}:interface=127.0.0.1"]
tls: {{certificate: {cert}, key: {key}, ca: {ca}}}
store: "sqlite:///alerts.db"
allow: {{sensors: {sensors}, networks: ["127.0.0.0/8"]}}
limits: {{setup_timeout: 5, max_content_length: 4096}}
web: {{listen: "tcp:{web}:interface=127.0.0.1"}}
"""


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port} after {timeout}s")


def scrape(port: int) -> dict[str, float]:
    """The samples of a /metrics page, by name with labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


class Manager:
    """A twistd iap-manager in C{directory}, configured by L{MANAGER_YAML}."""

    def __init__(self, directory: Path, pki_dir: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.directory, self.pki_dir = directory, pki_dir
        self.port, self.web = free_port(), free_port()
        self.configure()
        self.daemon = Daemon([*extra_args, "iap-manager", "-c", "manager.yaml"], directory)
        wait_port(self.port)
        wait_port(self.web)

    def configure(self, cert: str = "manager.test.crt", key: str = "manager.test.key", ca: str = "ca.crt",
                  sensors: str = '["*.test"]') -> None:
        p = self.pki_dir
        (self.directory / "manager.yaml").write_text(MANAGER_YAML.format(
            port=self.port, web=self.web, cert=p / cert, key=p / key, ca=p / ca, sensors=sensors,
        ))

    def reload(self, expect: str) -> str:
        """SIGHUP, then wait for the next log line containing C{expect}."""
        seen = self.daemon.log().count(expect)
        self.daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            log = self.daemon.log()
            if log.count(expect) > seen:
                return log
            assert self.daemon.proc.poll() is None, log
            time.sleep(0.05)
        raise AssertionError(f"{expect!r} not logged after SIGHUP:\n{self.daemon.log()}")

    def sensor(self, name: str = "sensor1.test", ca: str = "ca.crt") -> SyncSensor:
        p = self.pki_dir
        return SyncSensor(self.port, "manager.test", p / f"{name}.crt", p / f"{name}.key", p / ca)

    def stop(self) -> str:
        code = self.daemon.stop()
        log = self.daemon.log()
        assert code in (0, -signal.SIGTERM), log
        assert "Traceback" not in log, log
        return log


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    directory.mkdir()
    pki = make_test_pki(directory)
    # files named after the identity they carry, as SyncSensor and configure() expect
    for stem, pair in (("rogue.test", pki.sensor_other_ca), ("manager.other", pki.manager_other_ca)):
        shutil.copy(pair[0], directory / f"{stem}.crt")
        shutil.copy(pair[1], directory / f"{stem}.key")
    (directory / "both.crt").write_bytes(pki.ca.read_bytes() + pki.other_ca.read_bytes())
    return directory


@pytest.fixture
def manager(tmp_path: Path, pki_dir: Path):
    m = Manager(tmp_path, pki_dir)
    try:
        yield m
    finally:
        if m.daemon.proc.poll() is None:
            m.stop()


def stored(directory: Path) -> list[dict]:
    listed = run(["iapd.ctl", "-c", str(directory / "manager.yaml"), "alerts", "--json"])
    assert listed.returncode == 0, listed.stderr
    return [json.loads(line) for line in listed.stdout.splitlines()]


def fingerprint(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).fingerprint(x509.hashes.SHA256())  # type: ignore[attr-defined]


def test_sighup_rolls_certificates_ca_and_allow_list_over_without_dropping_connections(manager: Manager) -> None:
    pki = manager.pki_dir
    old_cert = x509.load_pem_x509_certificate((pki / "manager.test.crt").read_bytes())
    new_cert = x509.load_pem_x509_certificate((pki / "manager.other.crt").read_bytes())

    established = manager.sensor().connect()
    assert x509.load_der_x509_certificate(established.manager_certificate) == old_cert
    assert established.send(b"before the reload") == 200
    with pytest.raises(Refused) as refused:  # a sensor of the other CA is not trusted yet
        manager.sensor("rogue.test", ca="both.crt").connect()
    # TLS 1.3: the client learns of the refused certificate at its first read, as an alert
    assert refused.value.step in ("handshake", "verify") and refused.value.code is None

    # rollover: a manager certificate from the new CA, both CAs trusted, sensor2 no longer allowed
    manager.configure(cert="manager.other.crt", key="manager.other.key", ca="both.crt",
                      sensors='["sensor1.test", "rogue.test"]')
    log = manager.reload("reloaded ")
    assert "keep their sessions" in log

    assert established.send(b"after the reload, on the old session") == 200
    with manager.sensor(ca="both.crt").connect() as fresh:
        assert x509.load_der_x509_certificate(fresh.manager_certificate) == new_cert
        assert fresh.send(b"on a new connection") == 200
    with manager.sensor("rogue.test", ca="both.crt").connect() as rogue:
        assert rogue.send(b"from the newly trusted CA") == 200
    with pytest.raises(Refused) as refused:
        manager.sensor("sensor2.test", ca="both.crt").connect()
    assert refused.value.code == 403
    assert "sensor 'sensor2.test' is not in allow.sensors" in manager.daemon.log()
    # a sensor that trusts only the old CA can no longer verify the new manager certificate
    with pytest.raises(Refused) as refused:
        manager.sensor().connect()
    assert refused.value.step == "handshake"

    # a broken reload (key of another certificate) changes nothing
    manager.configure(cert="manager.other.crt", key="manager.test.key", ca="both.crt",
                      sensors='["sensor1.test", "rogue.test"]')
    log = manager.reload("refused, the running configuration stays")
    assert "does not belong to certificate" in log
    with manager.sensor(ca="both.crt").connect() as after_bad:
        assert x509.load_der_x509_certificate(after_bad.manager_certificate) == new_cert
        assert after_bad.send(b"after a refused reload") == 200
    assert established.send(b"still on the first session") == 200
    established.close()

    samples = scrape(manager.web)
    assert samples['iap_config_reloads_total{result="ok"}'] == 1
    assert samples['iap_config_reloads_total{result="failed"}'] == 1
    rolled = load_material(pki / "manager.other.crt", pki / "manager.other.key", pki / "both.crt")
    assert samples["iap_tls_certificate_expiry_timestamp_seconds"] == rolled.not_after().timestamp()
    bodies = sorted(a["sensor"] for a in stored(manager.directory))
    assert bodies == ["rogue.test"] + ["sensor1.test"] * 5
    manager.stop()


def test_sighup_reports_keys_that_need_a_restart(manager: Manager) -> None:
    text = (manager.directory / "manager.yaml").read_text()
    (manager.directory / "manager.yaml").write_text(text.replace('"sqlite:///alerts.db"', '"sqlite:///other.db"'))
    log = manager.reload("take effect only after a restart")
    assert "reload: store changed in" in log
    with manager.sensor().connect() as s:
        assert s.send(b"still stored in the first database") == 200
    assert not (manager.directory / "other.db").exists()
    (manager.directory / "manager.yaml").write_text("identity: [not, a, name]\n")
    log = manager.reload("refused, the running configuration stays")
    assert "identity: must be" in log


def test_metrics_move_when_alerts_flow(manager: Manager) -> None:
    before = scrape(manager.web)
    assert before["iap_alerts_received_total"] == 0
    with manager.sensor().connect() as s:
        for i in range(5):
            assert s.send(b"alert %d" % i) == 200
        assert s.send(b"alert 0") == 200  # a retransmission: 200, stored once
        assert s.send(b"not an alert type", content_type=b"text/plain") == 415
        during = scrape(manager.web)
        assert during["iap_connections_open"] == 1 and during["iap_sensors_ready"] == 1
    with pytest.raises(Refused):
        manager.sensor("sensor_no_role").connect()
    after = scrape(manager.web)
    assert after["iap_alerts_received_total"] == 7
    assert after["iap_alerts_stored_total"] == 5
    assert after["iap_alerts_duplicate_total"] == 1
    assert after['iap_alerts_rejected_total{status="415"}'] == 1
    assert after["iap_store_committed_alerts_total"] == 6
    assert after["iap_store_commit_seconds_count"] >= 1
    assert after["iap_store_commit_seconds_sum"] > 0
    assert after["iap_connections_total"] - before["iap_connections_total"] == 2  # wait_port's probe came before
    assert after['iap_setup_failures_total{status="403"}'] == 1
    assert len(stored(manager.directory)) == 5


def test_web_answers_carry_security_headers_and_unknown_paths_are_404(manager: Manager) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{manager.web}/metrics", timeout=10) as answer:
        headers = answer.headers
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://127.0.0.1:{manager.web}/no-such-page", timeout=10)
    assert missing.value.code == 404
    assert "default-src 'none'" in missing.value.headers["Content-Security-Policy"]


def test_json_log_lines_name_the_connection_and_the_sensor(tmp_path: Path, pki_dir: Path) -> None:
    m = Manager(tmp_path, pki_dir, extra_args=("--logger", "iapd.logs.json_observer"))
    try:
        with m.sensor().connect() as s:
            assert s.send(b"logged") == 200
        with m.sensor("sensor2.test").connect() as s2:
            assert s2.send(b"x" * 5000) == 413  # over limits.max_content_length
    finally:
        m.stop()
    events = [json.loads(line) for line in m.daemon.log().splitlines()]
    assert all({"time", "level", "namespace", "message"} <= e.keys() for e in events)
    ready = [e for e in events if e["message"].startswith("sensor sensor1.test ready")]
    assert len(ready) == 1 and ready[0]["sensor"] == "sensor1.test"
    conn = ready[0]["conn"]
    closed = [e for e in events if e.get("conn") == conn and "closed" in e["message"]]
    assert len(closed) == 1 and closed[0]["sensor"] == "sensor1.test" and closed[0]["stored"] == 1
    too_big = [e for e in events if e.get("sensor") == "sensor2.test" and e["level"] == "warn"]
    assert too_big and all(e["conn"] != conn for e in too_big)


def test_a_sighup_as_soon_as_the_port_opens_reloads_and_does_not_kill(tmp_path: Path, pki_dir: Path) -> None:
    """
    twistd binds the listening port before the reactor runs: a SIGHUP sent the moment
    the port opens (a log rotation, an operator who saw it open) used to meet SIGHUP's
    default action and end the manager.  Now it is taken from then on, and the reload
    runs once the manager has started.
    """
    port, web = free_port(), free_port()
    p = pki_dir
    (tmp_path / "manager.yaml").write_text(MANAGER_YAML.format(
        port=port, web=web, cert=p / "manager.test.crt", key=p / "manager.test.key", ca=p / "ca.crt",
        sensors='["*.test"]',
    ))
    daemon = Daemon(["iap-manager", "-c", "manager.yaml"], tmp_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert daemon.proc.poll() is None, daemon.log()
                assert time.monotonic() < deadline, f"nothing listens on {port}:\n{daemon.log()}"
                time.sleep(0.001)
        daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "reloaded " not in daemon.log():
            assert daemon.proc.poll() is None, f"the manager ended on SIGHUP:\n{daemon.log()}"
            assert time.monotonic() < deadline, f"no reload logged:\n{daemon.log()}"
            time.sleep(0.05)
        with SyncSensor(port, "manager.test", p / "sensor1.test.crt", p / "sensor1.test.key", p / "ca.crt").connect() as s:
            assert s.send(b"after the early SIGHUP") == 200
    finally:
        code = daemon.stop()
    assert code in (0, -signal.SIGTERM), daemon.log()
    assert "Traceback" not in daemon.log(), daemon.log()


def test_a_running_manager_freezes_its_start_and_collects_less_often_until_it_stops() -> None:
    import gc

    from iapd.services import GC_THRESHOLD, QuieterCollector

    before = gc.get_threshold()
    collector = QuieterCollector()
    collector.startService()
    try:
        assert gc.get_threshold() == GC_THRESHOLD != before
        assert gc.get_freeze_count() > 1000  # the modules and classes loaded so far
    finally:
        collector.stopService()
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
