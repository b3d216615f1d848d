"""
The proxy as users run it: real twistd processes (iap-manager, iap-proxy), real
sensors (iap-send, or a small script on iapd.client), raw sockets for what a well
behaved sensor never does, and a fake next hop for the relay's byte-level behaviour.

Everything listens on 127.0.0.1 on ports from free_port(); every wait has a deadline;
nothing asserts how long anything took.
"""

from __future__ import annotations

import json
import os
import queue
import re
import select
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from iapd.store import read_alerts

from .certs import TestPKI, make_test_pki
from .processes import Daemon, env, free_port, run

LOCAL = "127.0.0.1"
OK = b"IAP/0.2 200\r\n\r\n"
FORBIDDEN = b"IAP/0.2 403\r\n\r\n"
BAD_GATEWAY = b"IAP/0.2 502\r\n\r\n"
MiB = 1024 * 1024


# -- fixtures and configuration files ------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


class Processes:
    """The daemons and child processes of one test; all of them end with the test."""

    def __init__(self) -> None:
        self.daemons: list[Daemon] = []
        self.children: list[subprocess.Popen[Any]] = []

    def daemon(self, args: list[str], cwd: Path, ready: str) -> Daemon:
        d = Daemon(args, cwd)
        self.daemons.append(d)
        d.wait_for(ready)
        return d

    def manager(self, config: Path, port: int) -> Daemon:
        return self.daemon(["iap-manager", "-c", str(config)], config.parent, f"ManagerFactory starting on {port}")

    def proxy(self, config: Path, port: int) -> Daemon:
        return self.daemon(["iap-proxy", "-c", str(config)], config.parent, f"ProxyFactory starting on {port}")

    def popen(self, args: list[str], cwd: Path) -> subprocess.Popen[str]:
        child = subprocess.Popen(
            args, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.children.append(child)
        return child

    def end(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.kill()
            child.communicate(timeout=30)
        for d in self.daemons:
            d.stop()


@pytest.fixture
def procs() -> Iterator[Processes]:
    p = Processes()
    try:
        yield p
    finally:
        p.end()
    for d in p.daemons:
        assert "Traceback" not in d.log(), d.log()


def _tls(pki: TestPKI, pair: tuple[Path, Path]) -> str:
    crt, key = pair
    return f'tls: {{certificate: "{crt.resolve()}", key: "{key.resolve()}", ca: "{pki.ca.resolve()}"}}\n'


def manager_yaml(
    directory: Path, pki: TestPKI, port: int, dial: tuple[int, ...] = (), setup_timeout: float | None = None
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "manager.yaml"
    text = (
        "identity: manager.test\n"
        f'listen: ["tcp:{port}:interface={LOCAL}"]\n'
        + _tls(pki, pki.manager)
        + 'store: "sqlite:///alerts.db"\n'
    )
    if dial:
        text += "dial: [" + ", ".join(f'"tcp:host={LOCAL}:port={p}"' for p in dial) + "]\n"
    if setup_timeout is not None:
        text += f"limits: {{setup_timeout: {setup_timeout}}}\n"
    path.write_text(text)
    return path


def proxy_yaml(directory: Path, identity: str, port: int, upstream_port: int, match: str = "manager.test") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "proxy.yaml"
    path.write_text(
        f"identity: {identity}\n"
        f'listen: ["tcp:{port}:interface={LOCAL}"]\n'
        f'routes: [{{match: "{match}", upstream: "tcp:host={LOCAL}:port={upstream_port}"}}]\n'
    )
    return path


def sensor_yaml(
    path: Path, pki: TestPKI, connect: int | None = None, listen: int | None = None, window: int | None = None
) -> Path:
    text = "identity: sensor1.test\nmanager: manager.test\n" + _tls(pki, pki.sensor)
    if connect is not None:
        text += f'connect: "tcp:host={LOCAL}:port={connect}"\n'
    if listen is not None:
        text += f'listen: "tcp:{listen}:interface={LOCAL}"\n'
    if window is not None:
        text += f"window: {window}\n"
    path.write_text(text)
    return path


def alert_files(directory: Path, count: int, prefix: str = "alert") -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        f = directory / f"{prefix}-{i:05d}.txt"
        f.write_bytes(f"{prefix} number {i}".encode())
        names.append(str(f))
    return names


def listed(manager_config: Path) -> list[dict[str, Any]]:
    result = run(["iapd.ctl", "-c", str(manager_config), "alerts", "--json"])
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def stored_count(db: Path) -> int:
    """How many alerts the manager committed so far (0 while the store is not there)."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            return int(c.execute("SELECT count(*) FROM alerts").fetchone()[0])
    except sqlite3.Error:
        return 0


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(interval)


def finish(child: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate(timeout=30)
        raise AssertionError(f"{child.args!r} still running after {timeout}s\nstdout:\n{out}\nstderr:\n{err}")
    return child.returncode, out, err


def dead_port() -> int:
    """A loopback port where nothing listens (free_port() just closed its socket)."""
    return free_port()


# -- raw sockets ---------------------------------------------------------------------


def raw(port: int, timeout: float = 10) -> socket.socket:
    s = socket.create_connection((LOCAL, port), timeout=timeout)
    s.settimeout(timeout)
    return s


def read_until_eof(s: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything until the peer's FIN; a timeout (the socket's) is a failure."""
    data = b""
    while len(data) <= limit:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            raise AssertionError(f"no EOF within the timeout; received {data!r}") from None
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"more than {limit} octets without EOF")


def read_block(s: socket.socket) -> bytes:
    """One setup message: up to and including the empty line."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(1)
        if not chunk:
            raise AssertionError(f"EOF inside a setup message; received {data!r}")
        data += chunk
    return data


def reset(s: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP RST, not a FIN."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def sees_eof_or_reset(s: socket.socket) -> bytes:
    """Read until FIN or RST (both count as 'the other side is gone')."""
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, ConnectionAbortedError):
            return data
        except socket.timeout:
            raise AssertionError(f"neither EOF nor reset within the timeout; received {data!r}") from None
        if not chunk:
            return data
        data += chunk


class FakeUpstream:
    """
    A next hop played by a thread: it accepts, reads the CONNECT block, answers
    C{answer}, then hands the socket to the test (which may read it, or never again).
    """

    def __init__(self, answer: bytes = OK) -> None:
        self.answer = answer
        self.listener = socket.socket()
        self.listener.bind((LOCAL, 0))
        self.listener.listen(16)
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.accepted: queue.Queue[tuple[socket.socket, bytes, bytes]] = queue.Queue()
        self.sockets: list[socket.socket] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.sockets.append(conn)
            conn.settimeout(10)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                head, _, rest = data.partition(b"\r\n\r\n")
                conn.sendall(self.answer)
            except OSError:
                continue
            self.accepted.put((conn, head + b"\r\n\r\n", rest))

    def next(self, timeout: float = 10) -> tuple[socket.socket, bytes, bytes]:
        try:
            return self.accepted.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the proxy did not reach the fake upstream within {timeout}s") from None

    def close(self) -> None:
        self._stop.set()
        self.thread.join(10)
        self.listener.close()
        for s in self.sockets:
            s.close()


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    u = FakeUpstream()
    try:
        yield u
    finally:
        u.close()


def relay(port: int) -> socket.socket:
    """A raw client through the proxy at C{port}, past a 200 from the next hop."""
    s = raw(port)
    s.sendall(b"IAP/0.2 CONNECT manager.test\r\n\r\n")
    assert read_block(s) == OK
    return s


# -- /proc ---------------------------------------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


# -- a sensor process for what iap-send cannot do -------------------------------------

SENDER = r'''
"""
python sender.py sensor.yaml paced N   one connection, N alerts queued 10 per 10 ms
python sender.py sensor.yaml each N    N connections one after the other, one alert each
Exit 0 only when every alert was acknowledged; each one that was not is named on stderr.
"""
import sys
from pathlib import Path

from twisted.internet import endpoints, task
from twisted.internet.defer import DeferredList, inlineCallbacks

from iapd.client import Outcome, SensorFactory, SensorSettings, deliver
from iapd.config import load_sensor
from iapd.send import describe_outcome

CT = "application/x-idef-alert"


@inlineCallbacks
def main(reactor, config, mode, count):
    cfg = load_sensor(Path(config))
    settings = SensorSettings(
        manager=cfg.manager, material=cfg.tls.load(config), window=cfg.window, setup_timeout=cfg.setup_timeout
    )
    endpoint = endpoints.clientFromString(reactor, cfg.connect)
    outcomes = []
    if mode == "each":
        for i in range(count):
            [o] = yield deliver(reactor, endpoint, settings, [(CT, b"delivery %d" % i)])
            outcomes.append(o)
    else:
        proto = yield endpoint.connect(SensorFactory(settings, reactor))
        yield proto.ready
        sent = []
        for i in range(count):
            sent.append(proto.send(CT, b"paced alert %d" % i))
            if i % 10 == 9:
                yield task.deferLater(reactor, 0.01, lambda: None)
        results = yield DeferredList(sent, consumeErrors=True)
        outcomes = [r if ok else Outcome(None, r.getErrorMessage()) for ok, r in results]
        proto.transport.loseConnection()
    missing = [(i, o) for i, o in enumerate(outcomes) if not o.acknowledged]
    for i, o in missing:
        print(f"sender: alert {i}: NOT acknowledged: {describe_outcome(o)}", file=sys.stderr)
    if missing:
        print(f"sender: {len(missing)} of {count} alerts not acknowledged", file=sys.stderr)
        raise SystemExit(1)
    print(f"sender: {count} acknowledged")


task.react(main, [sys.argv[1], sys.argv[2], int(sys.argv[3])])
'''


def sender_script(directory: Path) -> Path:
    path = directory / "sender.py"
    path.write_text(SENDER)
    return path


# -- 1. a chain of proxies -------------------------------------------------------------


def test_chain_of_two_proxies_records_via_in_traversal_order(pki: TestPKI, procs: Processes, tmp_path: Path) -> None:
    m_port, p2_port, p1_port = free_port(), free_port(), free_port()
    manager = manager_yaml(tmp_path / "manager", pki, m_port)
    procs.manager(manager, m_port)
    procs.proxy(proxy_yaml(tmp_path / "p2", "p2.test", p2_port, m_port), p2_port)
    procs.proxy(proxy_yaml(tmp_path / "p1", "p1.test", p1_port, p2_port), p1_port)
    sensor = sensor_yaml(tmp_path / "sensor.yaml", pki, connect=p1_port)
    files = alert_files(tmp_path / "out", 3)

    sent = run(["iapd.send", "-c", str(sensor), *files])
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.count(": acknowledged") == 3

    alerts = listed(manager)
    assert len(alerts) == 3
    for alert in alerts:
        assert alert["sensor"] == "sensor1.test"
        assert alert["via"] == ["p1.test", "p2.test"]


# -- 2. refusals -------------------------------------------------------------------------


def test_routing_refusals_through_a_real_proxy(pki: TestPKI, procs: Processes, tmp_path: Path) -> None:
    port, nowhere = free_port(), dead_port()
    procs.proxy(proxy_yaml(tmp_path / "p1", "p1.test", port, nowhere), port)

    # not an open relay: a host no route allows
    with raw(port) as s:
        s.sendall(b"IAP/0.2 CONNECT elsewhere.test\r\n\r\n")
        assert read_until_eof(s) == FORBIDDEN

    # a loop: the request already went through this proxy
    with raw(port) as s:
        s.sendall(b"IAP/0.2 CONNECT manager.test\r\nIAP/0.2 VIA p1.test\r\n\r\n")
        assert read_until_eof(s) == BAD_GATEWAY

    # the route's next hop does not answer the phone
    with raw(port) as s:
        s.sendall(b"IAP/0.2 CONNECT manager.test\r\n\r\n")
        assert read_until_eof(s) == BAD_GATEWAY



def test_send_through_a_proxy_whose_next_hop_is_down(pki: TestPKI, procs: Processes, tmp_path: Path) -> None:
    port = free_port()
    procs.proxy(proxy_yaml(tmp_path / "p1", "p1.test", port, dead_port()), port)
    sensor = sensor_yaml(tmp_path / "sensor.yaml", pki, connect=port)
    [file] = alert_files(tmp_path / "out", 1)
    sent = run(["iapd.send", "-c", str(sensor), file])
    assert sent.returncode == 1, sent.stderr
    assert "alert-00000.txt: NOT acknowledged: 502" in sent.stderr
    assert "Bad Gateway" in sent.stderr or "refused" in sent.stderr
    assert "1 of 1 alerts not acknowledged" in sent.stderr
    assert "Traceback" not in sent.stderr
    # the code once, then its phrase: "502 Bad Gateway: ...", as for any other status
    assert "502 502" not in sent.stderr, sent.stderr


# -- 3. the manager dials out (draft 6.1) -------------------------------------------------


def test_manager_dials_a_listening_sensor(pki: TestPKI, procs: Processes, tmp_path: Path) -> None:
    s_port, m_port = free_port(), free_port()
    sensor = sensor_yaml(tmp_path / "sensor.yaml", pki, listen=s_port)
    [file] = alert_files(tmp_path / "out", 1)
    sender = procs.popen([sys.executable, "-m", "iapd.send", "-c", str(sensor), "--wait", "60", file], tmp_path)

    manager = manager_yaml(tmp_path / "manager", pki, m_port, dial=(s_port,))
    daemon = procs.manager(manager, m_port)

    code, out, err = finish(sender, 90)
    assert code == 0, err
    assert "acknowledged" in out
    [alert] = listed(manager)
    assert alert["sensor"] == "sensor1.test" and alert["via"] == []
    assert daemon.proc.poll() is None


def test_manager_keeps_dialing_until_the_sensor_listens(pki: TestPKI, procs: Processes, tmp_path: Path) -> None:
    s_port, m_port = dead_port(), free_port()
    manager = manager_yaml(tmp_path / "manager", pki, m_port, dial=(s_port,))
    daemon = procs.manager(manager, m_port)

    # nobody listens yet: the manager schedules retries and stays up
    daemon.wait_for("Scheduling retry 2 to connect", timeout=30)
    assert daemon.proc.poll() is None
    assert "connection 1 from" not in daemon.log()

    sensor = sensor_yaml(tmp_path / "sensor.yaml", pki, listen=s_port)
    [file] = alert_files(tmp_path / "out", 1)
    sender = procs.popen([sys.executable, "-m", "iapd.send", "-c", str(sensor), "--wait", "60", file], tmp_path)
    code, out, err = finish(sender, 90)
    assert code == 0, err
    [alert] = listed(manager)
    assert alert["sensor"] == "sensor1.test"
    assert daemon.proc.poll() is None


def test_sensor_with_connect_and_listen_falls_back_to_listening(
    pki: TestPKI, procs: Processes, tmp_path: Path
) -> None:
    """connect and listen both set: the first hop is down, so the manager's dial serves."""
    s_port, m_port = free_port(), free_port()
    sensor = sensor_yaml(tmp_path / "sensor.yaml", pki, connect=dead_port(), listen=s_port)
    [file] = alert_files(tmp_path / "out", 1)
    sender = procs.popen([sys.executable, "-m", "iapd.send", "-c", str(sensor), "--wait", "60", file], tmp_path)
    manager = manager_yaml(tmp_path / "manager", pki, m_port, dial=(s_port,))
    procs.manager(manager, m_port)
    code, out, err = finish(sender, 90)
    assert code == 0, err
    [alert] = listed(manager)
    assert alert["sensor"] == "sensor1.test"


# -- 4. a proxy dies in the middle of a stream ----------------------------------------------


def test_proxy_killed_mid_stream(pki: TestPKI, procs: Processes, tmp_path: Path) -> None:
    total = 3000
    m_port, p_port = free_port(), free_port()
    manager = manager_yaml(tmp_path / "manager", pki, m_port)
    db = manager.parent / "alerts.db"
    m_daemon = procs.manager(manager, m_port)
    proxy = procs.proxy(proxy_yaml(tmp_path / "p1", "p1.test", p_port, m_port), p_port)
    via_proxy = sensor_yaml(tmp_path / "via-proxy.yaml", pki, connect=p_port, window=64)

    sender = procs.popen([sys.executable, str(sender_script(tmp_path)), str(via_proxy), "paced", str(total)], tmp_path)
    wait_until(lambda: stored_count(db) >= 200 or sender.poll() is not None, 60, "200 alerts stored", interval=0.01)
    assert sender.poll() is None, "the sender finished before the proxy could be killed"
    proxy.proc.kill()
    proxy.proc.wait(30)

    code, out, err = finish(sender, 60)
    assert code != 0, out
    match = re.search(r"sender: (\d+) of 3000 alerts not acknowledged", err)
    assert match, err
    assert "NOT acknowledged" in err
    missing = int(match[1])
    assert 0 < missing < total

    closed = re.compile(r"connection \d+ from 127\.0\.0\.1:\d+ closed \(.*\): (\d+) stored")
    log = wait_until(lambda: closed.search(m_daemon.log()) and m_daemon.log(), 30, "manager logs the closed connection")
    found = closed.search(log)
    assert found and int(found[1]) > 0, log
    assert m_daemon.proc.poll() is None

    stored = read_alerts(db)
    hashes = [(a["sensor"], a["sha256"]) for a in stored]
    assert len(hashes) == len(set(hashes))
    assert total - missing <= len(stored) < total

    # the manager still serves: resend everything directly (plus a fresh alert)
    bodies = tmp_path / "again"
    bodies.mkdir()
    files = []
    for i in range(total):
        f = bodies / f"{i:05d}"
        f.write_bytes(b"paced alert %d" % i)
        files.append(str(f))
    [fresh] = alert_files(tmp_path / "fresh", 1, "fresh")
    direct = sensor_yaml(tmp_path / "direct.yaml", pki, connect=m_port, window=64)
    sent = run(["iapd.send", "-q", "-c", str(direct), *files, fresh])
    assert sent.returncode == 0, sent.stderr[-2000:]
    stored = read_alerts(db)
    hashes = [(a["sensor"], a["sha256"]) for a in stored]
    assert len(hashes) == len(set(hashes)) == total + 1
    assert m_daemon.proc.poll() is None


# -- 5. descriptors --------------------------------------------------------------------------


def test_no_descriptor_leak(pki: TestPKI, procs: Processes, tmp_path: Path) -> None:
    m_port, p_port = free_port(), free_port()
    # the manager's own setup deadline must not be what frees the proxy's descriptors
    manager = manager_yaml(tmp_path / "manager", pki, m_port, setup_timeout=120)
    procs.manager(manager, m_port)
    proxy = procs.proxy(proxy_yaml(tmp_path / "p1", "p1.test", p_port, m_port), p_port)
    pid = proxy.proc.pid
    baseline = fd_count(pid)

    sensor = sensor_yaml(tmp_path / "sensor.yaml", pki, connect=p_port)
    sent = run([sys.executable, str(sender_script(tmp_path)), str(sensor), "each", "30"])
    assert sent.returncode == 0, sent.stderr
    assert len(listed(manager)) == 30

    for _ in range(10):
        with raw(p_port) as s:
            s.sendall(b"IAP/0.2 CONNECT nowhere.test\r\n\r\n")
            assert read_until_eof(s) == FORBIDDEN
    for _ in range(10):
        with raw(p_port) as s:
            s.sendall(b"IAP/0.2 CONN")
    vanished = []
    for _ in range(5):
        s = raw(p_port)
        s.sendall(b"IAP/0.2 CONNECT manager.test\r\n\r\n")
        vanished.append(s)
    for s in vanished:
        reset(s)

    deadline = time.monotonic() + 20
    counts = [fd_count(pid)]
    while counts[-1] > baseline and time.monotonic() < deadline:
        time.sleep(0.2)
        counts.append(fd_count(pid))
    assert counts[-1] <= baseline, (
        f"proxy holds {counts[-1]} descriptors, {baseline} at start: {sorted(os.listdir(f'/proc/{pid}/fd'))}"
    )


# -- 6. a slow consumer ---------------------------------------------------------------------


def test_slow_consumer_bounded_memory(procs: Processes, upstream: FakeUpstream, tmp_path: Path) -> None:
    p_port = free_port()
    proxy = procs.proxy(proxy_yaml(tmp_path / "p1", "p1.test", p_port, upstream.port), p_port)
    pid = proxy.proc.pid
    before = rss_bytes(pid)

    client = relay(p_port)
    conn, head, _ = upstream.next()
    assert head == b"IAP/0.2 CONNECT manager.test\r\nIAP/0.2 VIA p1.test\r\n\r\n"
    # from here on the upstream never reads again
    client.setblocking(False)
    chunk = b"\x00" * (1 << 20)
    cap = 400 * MiB
    written = 0
    try:
        while written < cap:
            _, writable, _ = select.select([], [client], [], 3)
            if not writable:
                break  # unwritable for 3 s: the proxy stopped reading
            try:
                written += client.send(chunk)
            except BlockingIOError:
                continue
        after = rss_bytes(pid)
    finally:
        client.close()
        conn.close()

    assert written < cap, "the proxy read everything: no back-pressure"
    assert written < 128 * MiB, f"{written / MiB:.0f} MiB accepted before the proxy pushed back"
    assert after - before < 64 * MiB, f"proxy RSS grew by {(after - before) / MiB:.0f} MiB"


# -- 7. endings ----------------------------------------------------------------------------


@pytest.fixture
def relay_proxy(procs: Processes, upstream: FakeUpstream, tmp_path: Path) -> int:
    p_port = free_port()
    procs.proxy(proxy_yaml(tmp_path / "p1", "p1.test", p_port, upstream.port), p_port)
    return p_port


def test_client_close_reaches_upstream_after_its_data(relay_proxy: int, upstream: FakeUpstream) -> None:
    client = relay(relay_proxy)
    conn, _, _ = upstream.next()
    client.sendall(b"both ways: ")
    conn.sendall(b"pong")
    assert client.recv(4) == b"pong"
    client.sendall(b"last words")
    client.close()
    assert read_until_eof(conn) == b"both ways: last words"


def test_upstream_close_reaches_client_after_its_data(relay_proxy: int, upstream: FakeUpstream) -> None:
    client = relay(relay_proxy)
    conn, _, _ = upstream.next()
    try:
        conn.sendall(b"goodbye")
        conn.close()
        assert read_until_eof(client) == b"goodbye"
    finally:
        client.close()


def test_client_reset_reaches_upstream(relay_proxy: int, upstream: FakeUpstream) -> None:
    client = relay(relay_proxy)
    conn, _, _ = upstream.next()
    client.sendall(b"x")
    reset(client)
    assert sees_eof_or_reset(conn) in (b"", b"x")
