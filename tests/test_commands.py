"""
The commands as users run them: real processes, real sockets, real files.
"""

from __future__ import annotations

import hashlib
import json
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from iapd.store import read_alerts

from .processes import Daemon, env, free_port, run


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


# -- iapctl backup -------------------------------------------------------------------


def _ctl(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run(["iapd.ctl", "-c", str(config), *args])


def _config_for(state: Path, store: Path, port: int, tmp_path: Path) -> tuple[Path, Path]:
    """A manager configuration on C{store} listening on C{port}, and a sensor's for it."""
    manager = tmp_path / f"manager-{port}.yaml"
    manager.write_text(
        (state / "manager.yaml").read_text()
        .replace("pki/", f"{state}/pki/")
        .replace('store: "sqlite:///alerts.db"', f'store: "sqlite:///{store}"')
        .replace("web: {", "#")
        .replace(re.search(r"tcp:(\d+):", (state / "manager.yaml").read_text())[0], f"tcp:{port}:")
    )
    sensor = tmp_path / f"sensor-{port}.yaml"
    sensor.write_text(
        re.sub(r"port=\d+", f"port={port}", (state / "sensor.yaml").read_text()).replace("pki/", f"{state}/pki/")
    )
    return manager, sensor


def test_backup_while_the_manager_runs_and_a_manager_starts_on_it(dev_manager, tmp_path: Path) -> None:
    state, _ = dev_manager
    sent = [b"first alert before the backup", b"second alert before the backup"]
    for body in sent:
        assert run(["iapd.send", "-c", str(state / "sensor.yaml"), "-"], stdin=body).returncode == 0
    (tmp_path / "backups").mkdir()

    done = _ctl(state / "manager.yaml", "backup", str(tmp_path / "backups"), "--verify")
    assert done.returncode == 0, done.stderr
    copy = tmp_path / "backups" / "alerts.db"
    assert f"3 alerts (the last: 3) in {copy}, their bodies in {copy}-bodies" in done.stdout
    assert "checked: the database is sound and every body matches its SHA-256" in done.stdout
    # the running manager goes on; what it stores after the backup is not in it
    assert run(["iapd.send", "-c", str(state / "sensor.yaml"), "-"], stdin=b"after the backup").returncode == 0

    assert sorted(p.name for p in copy.parent.iterdir()) == ["alerts.db", "alerts.db-bodies"]
    bodies = [(state / "sample-alert.xml").read_bytes(), *sent]
    assert Path(f"{copy}-bodies").read_bytes() == b"".join(bodies)
    assert [a["body"] for a in read_alerts(copy, with_body=True)] == bodies

    # a manager starts on the copy: the digest index is rebuilt, a retransmission is
    # recognised, and a new alert's body goes after the copy's
    port = free_port()
    manager_yaml, sensor_yaml = _config_for(state, copy, port, tmp_path)
    restored = Daemon(["iap-manager", "-c", str(manager_yaml)], tmp_path)
    try:
        restored.wait_for("restored from a backup")
        restored.wait_for(f"ManagerFactory starting on {port}")
        for body in (sent[0], b"new on the restored copy"):
            answer = run(["iapd.send", "-c", str(sensor_yaml), "-"], stdin=body)
            assert answer.returncode == 0, answer.stderr
    finally:
        assert restored.stop() in (0, -signal.SIGTERM), restored.log()
    assert "Traceback" not in restored.log()
    assert [a["body"] for a in read_alerts(copy, with_body=True)] == [*bodies, b"new on the restored copy"]


def test_backup_refusals_leave_nothing_behind(dev_manager, tmp_path: Path) -> None:
    state, _ = dev_manager
    config = state / "manager.yaml"
    out = tmp_path / "out"
    out.mkdir()
    taken = out / "taken.db"
    taken.write_bytes(b"someone's file")
    refused = _ctl(config, "backup", str(taken))
    assert refused.returncode == 2
    assert f"iapctl: error: {taken} already exists: a backup never replaces a file; name another" in refused.stderr
    assert taken.read_bytes() == b"someone's file" and not Path(f"{taken}-bodies").exists()

    Path(f"{out}/lone.db-bodies").write_bytes(b"x")
    refused = _ctl(config, "backup", str(out / "lone.db"))
    assert refused.returncode == 2 and "lone.db-bodies already exists" in refused.stderr
    assert not (out / "lone.db").exists()

    refused = _ctl(config, "backup", str(out / "absent" / "copy.db"))
    assert refused.returncode == 2 and f"cannot write a backup in {out / 'absent'}: no such directory" in refused.stderr

    postgres = out / "pg.yaml"
    postgres.write_text(config.read_text().replace('"sqlite:///alerts.db"', '"postgresql://iapd@127.0.0.1:1/iapd"')
                        .replace("pki/", f"{state}/pki/"))
    refused = _ctl(postgres, "backup", str(out / "pg-copy.db"))
    assert refused.returncode == 2 and "this manager's store is PostgreSQL: back it up with" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert sorted(p.name for p in out.iterdir()) == ["lone.db-bodies", "pg.yaml", "taken.db"]


def test_backup_of_a_damaged_store(dev_manager, tmp_path: Path) -> None:
    """A short body log: no backup; a changed body: the backup, and which alert is damaged."""
    state, _ = dev_manager
    for body in (b"alpha alpha alpha", b"bravo bravo bravo"):
        assert run(["iapd.send", "-c", str(state / "sensor.yaml"), "-"], stdin=body).returncode == 0
    # a copy of the store to damage (the running manager's own is left alone)
    first = tmp_path / "first.db"
    assert _ctl(state / "manager.yaml", "backup", str(first)).returncode == 0
    config, _ = _config_for(state, first, free_port(), tmp_path)
    log = Path(f"{first}-bodies")
    whole = log.read_bytes()

    log.write_bytes(whole[:-3])
    short = _ctl(config, "backup", str(tmp_path / "second.db"))
    assert short.returncode == 2
    assert (f"the body log {log} holds {len(whole) - 3} octets, but the store's rows point at {len(whole)}"
            in short.stderr)
    assert not (tmp_path / "second.db").exists() and not list(tmp_path.glob(".*partial"))

    log.write_bytes(whole.replace(b"bravo bravo", b"bravo BRAVO"))
    damaged = _ctl(config, "backup", str(tmp_path / "second.db"), "--verify")
    assert damaged.returncode == 1, damaged.stderr
    assert f"iapctl: damaged: alert 3: its body in {tmp_path / 'second.db-bodies'} (at" in damaged.stderr
    assert "the backup is written, but 1 of its alerts or pages are damaged" in damaged.stderr
    assert "alert 2" not in damaged.stderr
    assert Path(f"{tmp_path}/second.db-bodies").read_bytes() == log.read_bytes()


def test_backup_while_alerts_keep_arriving(dev_manager, tmp_path: Path) -> None:
    """Each copy is one committed state: every row it holds has its whole body, checked."""
    state, _ = dev_manager
    stop = threading.Event()
    sent: list[bytes] = []
    codes: list[int] = []

    failures: list[BaseException] = []

    def send() -> None:
        try:
            send_rounds()
        except BaseException as e:  # reported by the test, not lost with the thread
            failures.append(e)

    def send_rounds() -> None:
        # one iap-send after the other, each with alerts of its own, until told to stop
        while not stop.is_set() and len(codes) < 100:
            batch = tmp_path / f"round-{len(codes)}"
            batch.mkdir()
            bodies = [f"round {len(codes)} alert {i} ".encode() * (1 + i * 7) for i in range(30)]
            for i, body in enumerate(bodies):
                (batch / f"{i:03d}.txt").write_bytes(body)
            result = run(["iapd.send", "-c", str(state / "sensor.yaml"), *(str(batch / f"{i:03d}.txt") for i in range(30))])
            codes.append(result.returncode)
            sent.extend(bodies)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        copies = []
        finished = 0
        for n in range(3):
            # a copy once the sender has finished two more rounds than at the last copy's
            # end: at most one round in flight then, so each copy holds more than the last
            deadline = time.monotonic() + 60
            while len(codes) < finished + 2 and time.monotonic() < deadline and sender.is_alive():
                time.sleep(0.05)
            assert not failures and len(codes) >= finished + 2, (failures, codes)
            copies.append(tmp_path / f"copy-{n}.db")
            done = _ctl(state / "manager.yaml", "backup", str(copies[-1]), "--verify")
            assert done.returncode == 0, done.stderr
            assert "every body matches its SHA-256" in done.stdout
            finished = len(codes)
    finally:
        stop.set()
        sender.join(120)
    assert codes and set(codes) == {0}
    counts = []
    for copy in copies:
        alerts = read_alerts(copy, with_body=True)
        counts.append(len(alerts))
        # the sample, then the alerts sent, in order, each once and whole
        assert [a["id"] for a in alerts] == list(range(1, len(alerts) + 1))
        assert [a["body"] for a in alerts[1:]] == sent[: len(alerts) - 1]
        assert Path(f"{copy}-bodies").stat().st_size == sum(a["size"] for a in alerts)
    # the store grew while the copies were made
    assert counts[0] < counts[1] < counts[2] <= len(sent) + 1


@pytest.mark.parametrize("limit, expected", [
    # what SQLite says of EFBIG; of a full disk it says "database or disk is full"
    (16 * 1024, "cannot copy the store {store} to {out}/.copy.db.partial: disk I/O error"),
    (256 * 1024, "cannot copy the body log {store}-bodies to {out}/.copy.db-bodies.partial: File too large"),
])
def test_backup_that_cannot_be_written_leaves_nothing(dev_manager, tmp_path: Path, limit: int, expected: str) -> None:
    """A disk that fills during the backup (here a file size limit): the reason, and no file."""
    state, _ = dev_manager
    for n in range(3):
        body = f"large alert {n} ".encode() * 8000  # 110 KiB each
        assert run(["iapd.send", "-c", str(state / "sensor.yaml"), "-"], stdin=body).returncode == 0
    out = tmp_path / "out"
    out.mkdir()

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a core dump
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    failed = subprocess.run(
        [sys.executable, "-m", "iapd.ctl", "-c", str(state / "manager.yaml"), "backup", str(out / "copy.db")],
        env=env(), capture_output=True, text=True, timeout=60, preexec_fn=limited,
    )
    assert failed.returncode == 2, failed.stderr
    store = (state / "alerts.db").resolve()
    assert f"iapctl: error: {expected.format(store=store, out=out)}\n" == failed.stderr
    assert "Traceback" not in failed.stderr
    assert list(out.iterdir()) == []
    # with room, the same backup is whole
    assert _ctl(state / "manager.yaml", "backup", str(out / "copy.db"), "--verify").returncode == 0
