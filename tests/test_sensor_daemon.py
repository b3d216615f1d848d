"""
The sensor daemon (C{twistd iap-sensor}) under process-level faults.

The promise users buy iapd for: an alert the sensor accepted is never lost and never
stored twice, whatever dies (the manager, a proxy, the sensor itself, the manager's
store), and an alert the sensor cannot take stays with its producer.  Every test runs
real twistd processes on 127.0.0.1 ports from free_port(), kills them with a real
SIGKILL, and waits on the manager's SQLite store (or iapctl) with a deadline; nothing
asserts how long anything took.

Each daemon run gets a directory of its own as working directory, so that a restarted
daemon's log (twistd.log in its working directory) does not overwrite the log of the
run before it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import struct
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from iapd.store import read_alerts

from . import test_proxy_processes as proxy_processes
from .certs import TestPKI
from .processes import Daemon, free_port, run
from .test_proxy_processes import (
    Processes,
    manager_yaml,
    proxy_yaml,
    sensor_yaml,
    stored_count,
    wait_until,
)

# the fixtures of the proxy process tests: the test PKI, and daemons that end with the test
pki = proxy_processes.pki
procs = proxy_processes.procs

OK = b"IAP/0.2 200\r\n\r\n"
BAD_REQUEST = b"IAP/0.2 400\r\n\r\n"
UNAVAILABLE = b"IAP/0.2 503\r\n\r\n"
IDEF = "application/x-idef-alert"
MiB = 1024 * 1024
TOTAL = 3000
SENSOR_READY = "sensor sensor1.test: delivering to manager.test"


# -- configuration and daemons ----------------------------------------------------------


def daemon_sensor_yaml(
    directory: Path,
    pki: TestPKI,
    connect: int,
    inputs: Iterable[dict[str, Any]],
    spool: Path | None = None,
    spool_max_bytes: int | None = None,
    heartbeat: float | None = None,
    window: int | None = None,
) -> Path:
    """A sensor.yaml for the daemon: sensor_yaml's basics plus spool, inputs, heartbeat."""
    directory.mkdir(parents=True, exist_ok=True)
    path = sensor_yaml(directory / "sensor.yaml", pki, connect=connect, window=window)
    text = path.read_text()
    text += f"spool: {json.dumps(str(spool or directory / 'spool'))}\n"
    if spool_max_bytes is not None:
        text += f"spool_max_bytes: {spool_max_bytes}\n"
    if heartbeat is not None:
        text += f"heartbeat: {heartbeat}\n"
    text += "limits: {setup_timeout: 10, ack_timeout: 30}\n"
    text += "inputs:\n" + "".join(f"  - {json.dumps({k: str(v) for k, v in spec.items()})}\n" for spec in inputs)
    path.write_text(text)
    return path


def run_dir(base: Path) -> Path:
    """A fresh working directory (and so a fresh twistd.log) for the next run of a daemon."""
    n = 1
    while (base / f"run-{n}").exists():
        n += 1
    d = base / f"run-{n}"
    d.mkdir(parents=True)
    return d


def start_manager(procs: Processes, config: Path, port: int) -> Daemon:
    return procs.daemon(["iap-manager", "-c", str(config)], run_dir(config.parent), f"ManagerFactory starting on {port}")


def start_proxy(procs: Processes, config: Path, port: int) -> Daemon:
    return procs.daemon(["iap-proxy", "-c", str(config)], run_dir(config.parent), f"ProxyFactory starting on {port}")


def start_sensor(procs: Processes, config: Path) -> Daemon:
    return procs.daemon(["iap-sensor", "-c", str(config)], run_dir(config.parent), SENSOR_READY)


def sigkill(daemon: Daemon) -> None:
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(30)


def tails(*daemons: Daemon, n: int = 3000) -> str:
    return "".join(f"\n--- {d.log_path} (pid {d.proc.pid}) ---\n{d.log()[-n:]}" for d in daemons)


# -- alerts in, alerts out ----------------------------------------------------------------


def drop_alerts(directory: Path, prefix: str, count: int, size: int = 0) -> set[bytes]:
    """C{count} alert files with unique bodies, each written as *.tmp and renamed in."""
    directory.mkdir(parents=True, exist_ok=True)
    bodies = set()
    for i in range(count):
        body = f"{prefix} alert {i:05d} ".encode().ljust(size, b".") + b"\n"
        tmp = directory / f"{prefix}-{i:05d}.tmp"
        tmp.write_bytes(body)
        os.rename(tmp, directory / f"{prefix}-{i:05d}.alert")
        bodies.add(body)
    return bodies


def files_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file())


def stable_listing(directory: Path, timeout: float = 30) -> set[str]:
    """The names in C{directory} once they stay the same for longer than a scan interval."""
    last: list[set[str]] = [set()]

    def settled() -> bool:
        now = {p.name for p in files_in(directory)}
        same, last[0] = now == last[0], now
        return same

    last[0] = {p.name for p in files_in(directory)}
    wait_until(settled, timeout, f"the listing of {directory} settles", interval=0.7)
    return last[0]


def stored_bodies(db: Path) -> list[bytes]:
    """Every alert body the manager stored (heartbeats left out), duplicates kept."""
    if not db.exists():
        return []
    return [a["body"] for a in read_alerts(db, with_body=True, heartbeats=False)]


def wait_stored(db: Path, count: int, timeout: float, *daemons: Daemon) -> None:
    try:
        wait_until(lambda: stored_count(db) >= count, timeout, f"{count} alerts stored", interval=0.1)
    except AssertionError as e:
        raise AssertionError(f"{e}; {stored_count(db)} stored{tails(*daemons)}") from None


def assert_exactly_once(db: Path, expected: set[bytes]) -> None:
    bodies = stored_bodies(db)
    seen = set(bodies)
    assert len(seen) == len(bodies), f"{len(bodies) - len(seen)} alerts stored more than once"
    missing, extra = expected - seen, seen - expected
    assert not missing, f"{len(missing)} alerts lost, e.g. {sorted(missing)[:3]}"
    assert not extra, f"{len(extra)} unexpected alerts stored, e.g. {sorted(extra)[:3]}"
    assert len(bodies) == len(expected)


# -- reading the spool from outside (its record format, iapd/spool.py) ----------------------

_HEAD = struct.Struct("<4sQIII")  # "IAPS" | seq u64 | type length u32 | body length u32 | crc32 u32


def spool_acked(spool: Path) -> int:
    try:
        text = (spool / "acked").read_text().strip()
    except FileNotFoundError:
        return 0
    return int(text) if text.isdigit() else 0


def spool_records(spool: Path) -> list[tuple[int, str, bytes]]:
    """(seq, content type, body) of every whole record in the segments, in order."""
    out = []
    for segment in sorted(spool.glob("seg-*.log")):
        try:
            data = segment.read_bytes()
        except FileNotFoundError:  # deleted meanwhile: all of it was acknowledged
            continue
        pos = 0
        while pos + _HEAD.size <= len(data):
            magic, seq, type_len, body_len, _ = _HEAD.unpack_from(data, pos)
            end = pos + _HEAD.size + type_len + body_len
            if magic != b"IAPS" or end > len(data):
                break
            ct = data[pos + _HEAD.size : pos + _HEAD.size + type_len].decode("ascii", "replace")
            out.append((seq, ct, data[pos + _HEAD.size + type_len : end]))
            pos = end
    return out


def spool_pending(spool: Path) -> list[bytes]:
    """Bodies the spool still holds for delivery (read C{acked} first: see the callers)."""
    acked = spool_acked(spool)
    return [body for seq, _, body in spool_records(spool) if seq > acked]


def wait_spool_drained(spool: Path, timeout: float, *daemons: Daemon) -> None:
    try:
        wait_until(lambda: not spool_pending(spool), timeout, "the spool acknowledges everything", interval=0.1)
    except AssertionError as e:
        raise AssertionError(f"{e}; {len(spool_pending(spool))} still pending{tails(*daemons)}") from None


# -- one stream, one kill --------------------------------------------------------------------


def kill_mid_stream(db: Path, victim: Daemon, total: int) -> int:
    """SIGKILL C{victim} once the store holds 300 alerts; returns how many it held then."""
    wait_until(lambda: stored_count(db) >= 300, 60, "300 alerts stored", interval=0.02)
    sigkill(victim)
    held = stored_count(db)
    assert held < total, "everything was stored before the kill: the test did not test a stream"
    return held


def test_manager_killed_mid_stream(pki: TestPKI, procs: Processes, tmp_path: Path) -> None:
    m_port = free_port()
    manager = manager_yaml(tmp_path / "manager", pki, m_port)
    db = manager.parent / "alerts.db"
    m_daemon = start_manager(procs, manager, m_port)
    outgoing = tmp_path / "outgoing"
    config = daemon_sensor_yaml(tmp_path / "sensor", pki, m_port, [{"type": "directory", "path": outgoing}])
    sensor = start_sensor(procs, config)

    expected = drop_alerts(outgoing, "kill-manager", TOTAL)
    kill_mid_stream(db, m_daemon, TOTAL)
    time.sleep(1)  # the sensor notices, keeps spooling, retries into a closed port
    assert sensor.proc.poll() is None, tails(sensor)

    m_daemon = start_manager(procs, manager, m_port)
    wait_stored(db, TOTAL, 90, sensor, m_daemon)
    assert_exactly_once(db, expected)
    assert files_in(outgoing) == []
    wait_spool_drained(config.parent / "spool", 30, sensor)
    assert sensor.proc.poll() is None


def test_proxy_killed_mid_stream(pki: TestPKI, procs: Processes, tmp_path: Path) -> None:
    m_port, p_port = free_port(), free_port()
    manager = manager_yaml(tmp_path / "manager", pki, m_port)
    db = manager.parent / "alerts.db"
    m_daemon = start_manager(procs, manager, m_port)
    proxy_config = proxy_yaml(tmp_path / "p1", "p1.test", p_port, m_port)
    proxy = start_proxy(procs, proxy_config, p_port)
    outgoing = tmp_path / "outgoing"
    config = daemon_sensor_yaml(tmp_path / "sensor", pki, p_port, [{"type": "directory", "path": outgoing}])
    sensor = start_sensor(procs, config)

    expected = drop_alerts(outgoing, "kill-proxy", TOTAL)
    kill_mid_stream(db, proxy, TOTAL)
    time.sleep(1)
    assert sensor.proc.poll() is None, tails(sensor)

    proxy = start_proxy(procs, proxy_config, p_port)
    wait_stored(db, TOTAL, 90, sensor, proxy, m_daemon)
    assert_exactly_once(db, expected)
    assert {tuple(a["via"]) for a in read_alerts(db)} == {("p1.test",)}
    assert files_in(outgoing) == []
    wait_spool_drained(config.parent / "spool", 30, sensor)
    assert m_daemon.proc.poll() is None and sensor.proc.poll() is None


def test_sensor_killed_mid_stream(pki: TestPKI, procs: Processes, tmp_path: Path) -> None:
    m_port = free_port()
    manager = manager_yaml(tmp_path / "manager", pki, m_port)
    db = manager.parent / "alerts.db"
    outgoing = tmp_path / "outgoing"
    config = daemon_sensor_yaml(tmp_path / "sensor", pki, m_port, [{"type": "directory", "path": outgoing}])
    spool = config.parent / "spool"
    sensor = start_sensor(procs, config)

    # a backlog in the spool first (the manager starts a little later), so that the kill
    # finds alerts spooled and not yet acknowledged, and files not yet spooled
    expected = drop_alerts(outgoing, "kill-sensor", TOTAL)
    wait_until(lambda: len(files_in(outgoing)) <= TOTAL - 1000, 60, "1000 alerts spooled", interval=0.02)
    m_daemon = start_manager(procs, manager, m_port)
    kill_mid_stream(db, sensor, TOTAL)
    assert spool_pending(spool), "nothing waited in the spool when the sensor was killed"
    time.sleep(0.5)

    sensor = start_sensor(procs, config)  # same configuration: same spool, same input directory
    wait_stored(db, TOTAL, 90, sensor, m_daemon)
    assert_exactly_once(db, expected)
    assert files_in(outgoing) == []
    wait_spool_drained(spool, 30, sensor)
    assert m_daemon.proc.poll() is None and sensor.proc.poll() is None


# -- the manager's store fails, then recovers -------------------------------------------------


def test_store_down_then_back(pki: TestPKI, procs: Processes, tmp_path: Path) -> None:
    m_port = free_port()
    manager = manager_yaml(tmp_path / "manager", pki, m_port)
    db = manager.parent / "alerts.db"
    m_daemon = start_manager(procs, manager, m_port)
    outgoing = tmp_path / "outgoing"
    config = daemon_sensor_yaml(tmp_path / "sensor", pki, m_port, [{"type": "directory", "path": outgoing}])
    spool = config.parent / "spool"
    sensor = start_sensor(procs, config)

    expected = drop_alerts(outgoing, "store-down", TOTAL)
    wait_until(lambda: stored_count(db) >= 300, 60, "300 alerts stored", interval=0.02)
    with sqlite3.connect(str(db), timeout=30) as c:
        c.execute("CREATE TRIGGER down BEFORE INSERT ON alerts BEGIN SELECT RAISE(ABORT, 'disk on fire'); END")
    c.close()
    held = stored_count(db)
    assert held < TOTAL, "everything was stored before the store failed: the test did not test a stream"

    m_daemon.wait_for("disk on fire")
    m_log = m_daemon.wait_for("answering 503")
    assert "store unavailable, answering 503" in m_log, m_log[-3000:]
    sensor.wait_for("manager answered 503")
    # the sensor takes every file into its spool even though nothing can be stored
    wait_until(lambda: not files_in(outgoing), 60, "the sensor spools every file", interval=0.1)
    time.sleep(1)  # some more rounds of 503
    assert stored_count(db) == held, "the manager stored alerts although its store fails"
    # nothing lost: what the spool still holds plus what was stored is everything
    pending = spool_pending(spool)
    stored = stored_bodies(db)
    assert pending, "the spool is empty although the manager could not store"
    assert set(pending) | set(stored) == expected
    assert len(stored) == len(set(stored)) == held
    assert sensor.proc.poll() is None and m_daemon.proc.poll() is None

    with sqlite3.connect(str(db), timeout=30) as c:
        c.execute("DROP TRIGGER down")
    c.close()
    wait_stored(db, TOTAL, 90, sensor, m_daemon)
    assert_exactly_once(db, expected)
    wait_spool_drained(spool, 30, sensor)
    assert sensor.proc.poll() is None and m_daemon.proc.poll() is None


# -- a full spool leaves alerts with their producers -------------------------------------------


def test_spool_full_leaves_files_in_place(pki: TestPKI, procs: Processes, tmp_path: Path) -> None:
    m_port = free_port()
    manager = manager_yaml(tmp_path / "manager", pki, m_port)  # not started yet
    db = manager.parent / "alerts.db"
    outgoing = tmp_path / "outgoing"
    config = daemon_sensor_yaml(
        tmp_path / "sensor", pki, m_port, [{"type": "directory", "path": outgoing}], spool_max_bytes=MiB
    )
    spool = config.parent / "spool"
    sensor = start_sensor(procs, config)

    expected = drop_alerts(outgoing, "spool-full", 3000, size=1023)  # 3000 x 1 KiB: ~3 MiB
    sensor.wait_for("spool full")
    # the directory input has stopped taking files: they stay where they are, undeleted
    wait_until(lambda: len(files_in(outgoing)) < 3000, 30, "some files spooled")
    left = stable_listing(outgoing)
    time.sleep(1.5)  # three more scans of the directory
    assert {p.name for p in files_in(outgoing)} == left, "files left the directory while the spool was full"
    assert left, "every file left the directory although the spool holds 1 MiB"
    in_dir = {p.read_bytes() for p in files_in(outgoing)}
    records = spool_records(spool)
    assert spool_acked(spool) == 0
    assert sum(_HEAD.size + len(ct) + len(body) for _, ct, body in records) <= MiB
    assert in_dir | {body for _, _, body in records} == expected, "alerts lost while the spool was full"
    assert sensor.proc.poll() is None

    m_daemon = start_manager(procs, manager, m_port)
    wait_stored(db, 3000, 120, sensor, m_daemon)
    assert_exactly_once(db, expected)
    wait_until(lambda: not files_in(outgoing), 30, "the directory empties")
    wait_spool_drained(spool, 30, sensor)
    assert sensor.proc.poll() is None


# -- a corrupted spool record is quarantined, the others delivered ------------------------------


def test_corrupted_spool_record_is_quarantined(pki: TestPKI, procs: Processes, tmp_path: Path) -> None:
    m_port = free_port()
    manager = manager_yaml(tmp_path / "manager", pki, m_port)  # down while the sensor spools
    db = manager.parent / "alerts.db"
    outgoing = tmp_path / "outgoing"
    config = daemon_sensor_yaml(tmp_path / "sensor", pki, m_port, [{"type": "directory", "path": outgoing}])
    spool = config.parent / "spool"
    sensor = start_sensor(procs, config)

    expected = drop_alerts(outgoing, "corrupt", 50, size=200)
    wait_until(lambda: not files_in(outgoing), 30, "the sensor spools the 50 alerts")
    # SIGTERM: a clean stop (twistd re-raises the signal, so the exit status is -SIGTERM)
    assert sensor.stop() in (0, -signal.SIGTERM) and "Server Shut Down." in sensor.log(), tails(sensor)
    assert {body for _, _, body in spool_records(spool)} == expected

    victim = next(b for b in expected if b.startswith(b"corrupt alert 00025 "))
    [segment] = [s for s in spool.glob("seg-*.log") if victim in s.read_bytes()]
    data = bytearray(segment.read_bytes())
    at = data.index(victim)
    for i in range(60, 64):  # well inside the body, away from its unique name
        data[at + i] ^= 0xFF
    segment.write_bytes(bytes(data))
    assert victim not in segment.read_bytes()

    sensor = start_sensor(procs, config)
    m_daemon = start_manager(procs, manager, m_port)
    wait_stored(db, 49, 60, sensor, m_daemon)
    wait_spool_drained(spool, 30, sensor)
    assert_exactly_once(db, expected - {victim})
    quarantined = list((spool / "quarantine").iterdir())
    assert quarantined, "nothing in spool/quarantine/"
    assert any(victim[:20] in q.read_bytes() for q in quarantined), [q.name for q in quarantined]
    log = sensor.log()
    assert "corrupt" in log and "checksum mismatch" in log and "quarantine" in log, log[-3000:]
    assert sensor.proc.poll() is None


# -- heartbeats ----------------------------------------------------------------------------------


def ctl_json(manager: Path, *args: str) -> list[dict[str, Any]]:
    result = run(["iapd.ctl", "-c", str(manager), *args, "--json"])
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def sensor_row(manager: Path) -> dict[str, Any] | None:
    rows = [r for r in ctl_json(manager, "sensors") if r["sensor"] == "sensor1.test"]
    return rows[0] if rows else None


def test_heartbeats_and_overdue(pki: TestPKI, procs: Processes, tmp_path: Path) -> None:
    m_port = free_port()
    manager = manager_yaml(tmp_path / "manager", pki, m_port)
    db = manager.parent / "alerts.db"
    start_manager(procs, manager, m_port)
    outgoing = tmp_path / "outgoing"
    config = daemon_sensor_yaml(
        tmp_path / "sensor", pki, m_port, [{"type": "directory", "path": outgoing}], heartbeat=1
    )
    sensor = start_sensor(procs, config)
    [alert] = drop_alerts(outgoing, "beside-heartbeats", 1)

    def beating() -> dict[str, Any] | None:
        row = sensor_row(manager) if db.exists() else None
        return row if row and row["last_heartbeat"] and row["heartbeat_interval"] is not None else None

    row = wait_until(beating, 30, "iapctl sensors shows a heartbeat", interval=0.2)
    assert row["heartbeat_interval"] == 1
    assert row["heartbeat_overdue"] is False
    # heartbeats keep coming: never overdue while the sensor runs, and last_heartbeat moves on
    beats = {row["last_heartbeat"]}
    deadline = time.monotonic() + 30
    while len(beats) < 4:
        assert time.monotonic() < deadline, f"heartbeats stopped: {sorted(beats)}{tails(sensor)}"
        row = sensor_row(manager)
        assert row is not None and row["heartbeat_overdue"] is False, row
        beats.add(row["last_heartbeat"])
        time.sleep(0.3)

    wait_stored(db, 1, 30, sensor)
    shown = ctl_json(manager, "alerts")
    assert [a["sha256"] for a in shown] == [a["sha256"] for a in read_alerts(db, heartbeats=False)]
    assert len(shown) == 1 and shown[0]["idmef"] is None, shown
    everything = ctl_json(manager, "alerts", "--heartbeats")
    heartbeats = [a for a in everything if (a["idmef"] or {}).get("kind") == "Heartbeat"]
    assert len(heartbeats) >= 3 and len(everything) == len(heartbeats) + 1, everything
    assert all(a["sensor"] == "sensor1.test" for a in everything)
    assert {a["id"] for a in shown} <= {a["id"] for a in everything}
    assert {a for a in stored_bodies(db)} == {alert}

    sigkill(sensor)
    row = wait_until(lambda: (r := sensor_row(manager)) and r["heartbeat_overdue"] is True and r, 30,
                     "heartbeat_overdue becomes true after the sensor died", interval=0.5)
    assert row["heartbeat_interval"] == 1


# -- the socket input -----------------------------------------------------------------------------


def frame(body: bytes, content_type: str = IDEF) -> bytes:
    return f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body + b"\r\n\r\n"


def read_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        try:
            chunk = s.recv(n - len(data))
        except TimeoutError:
            raise AssertionError(f"no answer within the timeout; received {data!r}") from None
        if not chunk:
            raise AssertionError(f"EOF after {data!r}, expected {n} octets")
        data += chunk
    return data


def read_to_eof(s: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = s.recv(4096)
        except TimeoutError:
            raise AssertionError(f"the connection was not closed; received {data!r}") from None
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def unix(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(15)
    s.connect(str(path))
    return s


def test_socket_input(pki: TestPKI, procs: Processes, tmp_path: Path) -> None:
    m_port = free_port()
    manager = manager_yaml(tmp_path / "manager", pki, m_port)  # down: the spool fills up
    db = manager.parent / "alerts.db"
    sock = tmp_path / "in.sock"
    assert len(str(sock)) < 100, "AF_UNIX paths are short; run with a shorter --basetemp"
    config = daemon_sensor_yaml(
        tmp_path / "sensor", pki, m_port, [{"type": "socket", "path": sock, "mode": "0600"}], spool_max_bytes=MiB
    )
    spool = config.parent / "spool"
    sensor = start_sensor(procs, config)
    assert sock.is_socket() and sock.stat().st_mode & 0o777 == 0o600, oct(sock.stat().st_mode)

    good = [b"<socket alert one/>", b"<socket alert two/>"]
    with unix(sock) as s:
        s.sendall(frame(good[0]) + frame(good[1]))
        assert read_exactly(s, 2 * len(OK)) == OK + OK
        # answered once spooled: both are on disk now
        assert {body for _, _, body in spool_records(spool)} == set(good)

    with unix(sock) as s:
        s.sendall(b"Content-Type: application/x-idef-alert\r\nContent-Length: 3\r\n\r\nhello\r\n\r\n")
        assert read_to_eof(s) == BAD_REQUEST

    accepted, refused = [], []
    with unix(sock) as s:
        for i in range(40):  # 1 MiB holds fewer than 20 of these
            body = f"filler {i:03d} ".encode().ljust(64 * 1024, b"f")
            s.sendall(frame(body))
            answer = read_exactly(s, len(OK))
            if answer == UNAVAILABLE:
                refused.append(body)
                if len(refused) == 2:
                    break
            else:
                assert answer == OK and not refused, (i, answer)
                accepted.append(body)
    assert len(refused) == 2, "the socket never answered 503 although the spool holds at most 1 MiB"
    sensor.wait_for("spool full")
    assert {body for _, _, body in spool_records(spool)} == set(good) | set(accepted)

    m_daemon = start_manager(procs, manager, m_port)
    wait_stored(db, len(good) + len(accepted), 60, sensor, m_daemon)
    wait_spool_drained(spool, 30, sensor)
    assert_exactly_once(db, set(good) | set(accepted))  # and nothing answered 503 was stored
    assert sensor.proc.poll() is None


# -- a refused alert never blocks the others ------------------------------------------------------


def test_refused_alerts_set_aside(pki: TestPKI, procs: Processes, tmp_path: Path) -> None:
    m_port = free_port()
    manager = manager_yaml(tmp_path / "manager", pki, m_port)  # accepts application/x-idef-alert only
    db = manager.parent / "alerts.db"
    m_daemon = start_manager(procs, manager, m_port)
    normal, plain = tmp_path / "normal", tmp_path / "plain"
    config = daemon_sensor_yaml(
        tmp_path / "sensor", pki, m_port,
        [{"type": "directory", "path": normal}, {"type": "directory", "path": plain, "content_type": "text/plain"}],
    )
    spool = config.parent / "spool"
    sensor = start_sensor(procs, config)

    expected, refused = set(), set()
    for i in range(20):
        expected |= drop_alerts(normal, f"normal{i:02d}", 10)
        refused |= drop_alerts(plain, f"plain{i:02d}", 1)

    wait_stored(db, len(expected), 60, sensor, m_daemon)
    rejected = spool / "rejected"
    wait_until(lambda: rejected.is_dir() and len(list(rejected.glob("*.json"))) >= len(refused), 30,
               "every text/plain alert set aside in spool/rejected/")
    wait_spool_drained(spool, 30, sensor)
    assert_exactly_once(db, expected)

    reasons = [json.loads(p.read_text()) for p in sorted(rejected.glob("*.json"))]
    assert len(reasons) == len(refused)
    assert all(r["code"] == 415 and r["content_type"] == "text/plain" for r in reasons), reasons
    assert {p.read_bytes() for p in rejected.glob("*.alert")} == refused
    assert files_in(normal) == [] and files_in(plain) == []
    assert "refused alert" in sensor.log() and "415" in sensor.log()
    assert sensor.proc.poll() is None and m_daemon.proc.poll() is None
    # refusals do not cost a reconnection: the alerts behind one keep flowing on the same session
    assert m_daemon.log().count("sensor sensor1.test ready on connection") == 1, tails(sensor, m_daemon)


def test_alert_larger_than_the_spool_does_not_block_the_others(
    pki: TestPKI, procs: Processes, tmp_path: Path
) -> None:
    """
    A file that could never fit in the spool, even empty, stays where it is (it was not
    accepted, so it is not lost) and the files after it are delivered.
    """
    m_port = free_port()
    manager = manager_yaml(tmp_path / "manager", pki, m_port)
    db = manager.parent / "alerts.db"
    m_daemon = start_manager(procs, manager, m_port)
    outgoing = tmp_path / "outgoing"
    outgoing.mkdir()
    big = outgoing / "big.alert"
    (outgoing / "big.tmp").write_bytes(b"B" * (2 * MiB))
    os.rename(outgoing / "big.tmp", big)
    os.utime(big, (time.time() - 60, time.time() - 60))  # the oldest: the first the input looks at
    config = daemon_sensor_yaml(
        tmp_path / "sensor", pki, m_port, [{"type": "directory", "path": outgoing}], spool_max_bytes=MiB
    )
    sensor = start_sensor(procs, config)

    expected = drop_alerts(outgoing, "after-big", 20)
    wait_stored(db, len(expected), 30, sensor, m_daemon)
    assert_exactly_once(db, expected)
    assert files_in(outgoing) == [big], "the oversized file must stay with its producer, the others leave"
    assert big.stat().st_size == 2 * MiB
    assert "big.alert" in sensor.log(), "the sensor log does not say why big.alert stays"
    assert sensor.proc.poll() is None


def test_a_spool_that_cannot_open_stops_the_sensor_with_status_1(pki: TestPKI, tmp_path: Path) -> None:
    """A failure found after twistd started the services still ends in a non-zero exit,
    which systemd's Restart=on-failure and scripts rely on."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the spool's parent should be\n")
    config = daemon_sensor_yaml(tmp_path / "sensor", pki, free_port(), [], spool=blocker / "spool")
    daemon = Daemon(["iap-sensor", "-c", str(config)], run_dir(config.parent))
    code = daemon.proc.wait(60)
    daemon.stop()
    log = daemon.log()
    assert code == 1, log
    assert f"cannot open the spool {blocker / 'spool'}" in log and "; stopping" in log
    assert "Server Shut Down." in log and "Traceback" not in log
    assert blocker.read_text() == "a file where the spool's parent should be\n"
