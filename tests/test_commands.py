"""
The commands as users run them: real processes, real sockets, real files.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import urllib.request
from pathlib import Path

import pytest

from .processes import Daemon, free_port, run


@pytest.fixture
def dev_manager(tmp_path: Path):
    """The README's first command: a manager with no -c, on a free loopback port."""
    port = free_port()
    web = free_port()
    daemon = Daemon(
        ["iap-manager", "--dev-port", str(port), "--dev-web-port", str(web)], tmp_path,
        {"IAPD_HOME": str(tmp_path / "state")},
    )
    daemon.web_port = web  # type: ignore[attr-defined]
    try:
        daemon.wait_for("sample alert acknowledged and stored")
        yield tmp_path / "state", daemon
    finally:
        # twistd re-raises the signal that stopped it, so SIGTERM is a clean exit
        assert daemon.stop() in (0, -signal.SIGTERM), daemon.log()
        assert "Traceback" not in daemon.log()


def test_embedded_default_sends_and_shows_an_alert(dev_manager) -> None:
    state, daemon = dev_manager
    log = daemon.log()
    assert "DEVELOPMENT MODE" in log and "DEVELOPMENT CA" in log
    assert "classification 'iapd quick start: sample alert', severity low" in log
    for name in ("manager.yaml", "sensor.yaml", "pki/ca.crt", "pki/localhost.key", "sample-alert.xml", "alerts.db"):
        assert (state / name).exists(), name
    assert (state / "pki/localhost.key").stat().st_mode & 0o077 == 0
    assert "interface=127.0.0.1" in (state / "manager.yaml").read_text()
    # the dashboard is on, on loopback, and shows the sample alert
    assert f"or in a browser: http://localhost:{daemon.web_port}/" in log
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.web_port}/api/alerts", timeout=30) as answer:
        [alert] = json.load(answer)["alerts"]
    assert alert["idmef"]["classification"] == "iapd quick start: sample alert"


def test_send_then_list(dev_manager, tmp_path: Path) -> None:
    state, _ = dev_manager
    (tmp_path / "one.txt").write_bytes(b"first alert")
    (tmp_path / "two.xml").write_bytes((state / "sample-alert.xml").read_bytes().replace(b"quickstart-1", b"q-2"))
    sent = run(["iapd.send", "-c", str(state / "sensor.yaml"), str(tmp_path / "one.txt"), str(tmp_path / "two.xml")])
    assert sent.returncode == 0, sent.stderr
    assert "one.txt: acknowledged" in sent.stdout and "two.xml: acknowledged" in sent.stdout

    listed = run(["iapd.ctl", "-c", str(state / "manager.yaml"), "alerts", "--json"])
    assert listed.returncode == 0, listed.stderr
    alerts = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(alerts) == 3  # the sample from start-up, then ours in order
    for alert in alerts:
        assert {"id", "sensor", "received", "content_type", "sha256", "via", "idmef"} <= alert.keys()
        assert alert["sensor"] == "sensor.localhost" and alert["via"] == []
    assert alerts[1]["idmef"] is None
    assert alerts[2]["idmef"]["messageid"] == "iapd-q-2"
    assert set(alerts[2]["idmef"]) >= {"messageid", "create_time", "classification", "severity", "analyzer", "source", "target"}

    human = run(["iapd.ctl", "-c", str(state / "manager.yaml"), "alerts", "--since", "1h", "--sensor", "sensor.*"])
    assert human.stdout.count("sensor.localhost") == 3
    assert run(["iapd.ctl", "-c", str(state / "manager.yaml"), "alerts", "--sensor", "nobody*"]).stdout == ""
    sensors = run(["iapd.ctl", "-c", str(state / "manager.yaml"), "sensors", "--json"])
    [sensor] = [json.loads(line) for line in sensors.stdout.splitlines()]
    assert sensor["sensor"] == "sensor.localhost" and sensor["alerts"] == 3


def test_send_from_stdin_and_retransmission(dev_manager) -> None:
    state, _ = dev_manager
    for _ in range(2):
        sent = run(["iapd.send", "-c", str(state / "sensor.yaml"), "-"], stdin=b"same body twice")
        assert sent.returncode == 0, sent.stderr
    listed = run(["iapd.ctl", "-c", str(state / "manager.yaml"), "alerts", "--json"])
    bodies = [json.loads(line)["sha256"] for line in listed.stdout.splitlines()]
    assert len(bodies) == len(set(bodies)) == 2  # the sample and one copy of ours


def test_send_names_each_unacknowledged_alert(dev_manager, tmp_path: Path) -> None:
    state, _ = dev_manager
    (tmp_path / "a.txt").write_bytes(b"x")
    refused = run(["iapd.send", "-c", str(state / "sensor.yaml"), "--content-type", "text/plain", str(tmp_path / "a.txt")])
    assert refused.returncode == 1
    assert "a.txt: NOT acknowledged: 415 Unsupported Media Type" in refused.stderr
    assert "1 of 1 alerts not acknowledged" in refused.stderr
    missing = run(["iapd.send", "-c", str(state / "sensor.yaml"), str(tmp_path / "absent.txt")])
    assert missing.returncode == 2 and "absent.txt: cannot read" in missing.stderr


def test_send_to_a_manager_that_is_down(tmp_path: Path, dev_manager) -> None:
    state, _ = dev_manager
    config = (state / "sensor.yaml").read_text()
    port = free_port()
    down = tmp_path / "down.yaml"
    down.write_text(
        "\n".join(
            line if not line.startswith("connect:") else f'connect: "tcp:host=127.0.0.1:port={port}"'
            for line in config.splitlines()
        ).replace("pki/", f"{state}/pki/")
    )
    (tmp_path / "a.txt").write_bytes(b"x")
    result = run(["iapd.send", "-c", str(down), str(tmp_path / "a.txt")])
    assert result.returncode == 1
    assert "a.txt: NOT acknowledged: cannot connect" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_configuration_stops_twistd_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text("identity: m.test\nlimits: {setup_timeout: soon}\n")
    daemon = Daemon(["iap-manager", "-c", str(tmp_path / "m.yaml")], tmp_path)
    code = daemon.proc.wait(60)
    daemon.stop()
    log = daemon.log()
    assert code == 1
    assert "configuration error" in log and "tls: is required" in log
    assert "Traceback" not in log


def test_unbindable_port_stops_the_daemon(dev_manager, tmp_path: Path) -> None:
    state, _ = dev_manager
    # a second manager on the same port must not run deaf
    other = tmp_path / "other"
    other.mkdir()
    daemon = Daemon(["iap-manager", "-c", str(state / "manager.yaml")], other)
    code = daemon.proc.wait(60)
    daemon.stop()
    assert code != 0
    assert "Address already in use" in daemon.log() or "CannotListenError" in daemon.log()


def test_second_manager_on_the_same_store_stops_with_a_reason(dev_manager, tmp_path: Path) -> None:
    """Two managers writing one SQLite file would each keep their own digest index and
    could each store a retransmission once: the second stops at start and says why."""
    state, first = dev_manager
    config = (state / "manager.yaml").read_text()
    port, web = free_port(), free_port()
    config = re.sub(r'listen: \["tcp:\d+:', f'listen: ["tcp:{port}:', config)
    config = re.sub(r'web: \{listen: "tcp:\d+:', f'web: {{listen: "tcp:{web}:', config)
    (state / "second.yaml").write_text(config)
    other = tmp_path / "other"
    other.mkdir()
    daemon = Daemon(["iap-manager", "-c", str(state / "second.yaml")], other)
    code = daemon.proc.wait(60)
    daemon.stop()
    log = daemon.log()
    assert code == 1, log
    assert "cannot open the store: cannot open SQLite store" in log
    assert "alerts.db-digests is in use by another process (is another manager running with this store?); stopping" in log
    assert "Traceback" not in log
    # the first manager goes on storing
    body = b"sent after the second manager stopped"
    sent = run(["iapd.send", "-c", str(state / "sensor.yaml"), "-"], stdin=body)
    assert sent.returncode == 0, sent.stderr
    listed = run(["iapd.ctl", "-c", str(state / "manager.yaml"), "alerts", "--json"])
    digests = [json.loads(line)["sha256"] for line in listed.stdout.splitlines()]
    assert digests[-1] == hashlib.sha256(body).hexdigest() and len(digests) == 2
    assert first.proc.poll() is None


def test_ctl_errors(tmp_path: Path) -> None:
    result = run(["iapd.ctl", "-c", str(tmp_path / "none.yaml"), "alerts"])
    assert result.returncode == 2 and "iapctl: error:" in result.stderr and "Traceback" not in result.stderr


def test_proxy_needs_its_configuration(tmp_path: Path) -> None:
    daemon = Daemon(["iap-proxy"], tmp_path)
    code = daemon.proc.wait(60)
    daemon.stop(signal.SIGKILL)
    assert code != 0 and "-c proxy.yaml is required" in daemon.log()
    (tmp_path / "p.yaml").write_text("identity: p.test\nroutes: []\n")
    daemon = Daemon(["iap-proxy", "-c", str(tmp_path / "p.yaml")], tmp_path)
    code = daemon.proc.wait(60)
    daemon.stop(signal.SIGKILL)
    log = daemon.log()
    assert code == 1 and "configuration error" in log and "routes: must be a non-empty list" in log
    assert "Traceback" not in log
