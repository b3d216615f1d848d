"""
Readiness for systemd (C{Type=notify}): the datagram itself on real sockets, and real
daemons saying ready only once they listen, and never when they could not start.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from typing import Iterator

import pytest

from iapd.sdnotify import notify

from .certs import make_test_pki
from .processes import Daemon, free_port


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A socket where systemd would listen, and the NOTIFY_SOCKET that names it."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(60)
    try:
        yield sock, str(path)
    finally:
        sock.close()


def test_one_datagram_to_the_named_socket(systemd) -> None:
    sock, address = systemd
    assert notify("READY=1\nSTATUS=testing", {"NOTIFY_SOCKET": address})
    assert sock.recv(4096) == b"READY=1\nSTATUS=testing"


def test_abstract_socket() -> None:
    name = f"iapd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(60)
        assert notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"STOPPING=1"


def test_outside_systemd_nothing_is_sent(tmp_path: Path) -> None:
    assert notify("READY=1", {}) is False
    # a socket that is gone: reported, not raised (the daemon runs on)
    assert notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


def test_manager_says_ready_once_it_listens_and_stopping_when_stopped(systemd, tmp_path: Path) -> None:
    sock, address = systemd
    port, web = free_port(), free_port()
    daemon = Daemon(["iap-manager", "--dev-port", str(port), "--dev-web-port", str(web)], tmp_path,
                    {"IAPD_HOME": str(tmp_path / "state"), "NOTIFY_SOCKET": address})
    try:
        assert sock.recv(4096) == b"READY=1\nSTATUS=manager started"
        # by then the port is bound and the SIGHUP handler is in: a reload right away reloads
        socket.create_connection(("127.0.0.1", port), timeout=30).close()
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_for("reloaded ")
    finally:
        code = daemon.stop()
    assert code in (0, -signal.SIGTERM), daemon.log()
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=manager stopping"


def test_proxy_that_cannot_bind_never_says_ready(systemd, tmp_path: Path) -> None:
    sock, address = systemd
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "proxy.yaml").write_text(
            f'identity: p.test\nlisten: ["tcp:{port}:interface=127.0.0.1"]\n'
            'routes: [{match: "*", upstream: "tcp:host=127.0.0.1:port=9"}]\n'
        )
        daemon = Daemon(["iap-proxy", "-c", str(tmp_path / "proxy.yaml")], tmp_path, {"NOTIFY_SOCKET": address})
        code = daemon.proc.wait(60)
        daemon.stop()
    assert code != 0, daemon.log()
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)  # neither READY nor anything else


def test_sensor_says_ready(systemd, tmp_path: Path) -> None:
    """
    A sensor is ready once started, whether or not its manager is up yet (it keeps
    trying); stopped right after, it stops cleanly: ready means the reactor's SIGTERM
    handler is in (said before it, 3 runs in 7 died of SIGTERM's default action here).
    """
    sock, address = systemd
    pki = make_test_pki(tmp_path / "pki")
    (tmp_path / "sensor.yaml").write_text(
        "identity: sensor1.test\nmanager: manager.test\n"
        f'connect: "tcp:host=127.0.0.1:port={free_port()}"\n'
        f"tls: {{certificate: {pki.sensor[0]}, key: {pki.sensor[1]}, ca: {pki.ca}}}\n"
        f"spool: {tmp_path / 'spool'}\n"
    )
    daemon = Daemon(["iap-sensor", "-c", str(tmp_path / "sensor.yaml")], tmp_path, {"NOTIFY_SOCKET": address})
    try:
        assert sock.recv(4096) == b"READY=1\nSTATUS=sensor started"
    finally:
        daemon.stop()
    try:
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=sensor stopping"
    except TimeoutError:
        raise AssertionError(daemon.log()) from None
    assert "Received SIGTERM, shutting down." in daemon.log() and "Server Shut Down." in daemon.log()
