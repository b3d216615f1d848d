"""
The web listener as users run it: C{twistd iap-manager} with C{web.tls} and
C{web.auth}, spoken to over a verified TLS connection; and the one-line refusals of a
dashboard configured unsafely or with unusable TLS files.
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import socket
import ssl
import time
from pathlib import Path

import pytest

from iapd.web.password import hash_password

from .browser import idmef_alert
from .certs import make_test_pki
from .processes import Daemon, free_port, run

LOCAL = "127.0.0.1"


def https_get(port: int, ca: Path, path: str, authorization: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTPS request, verifying the server as manager.test against the test CA."""
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((LOCAL, port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="manager.test") as tls:
            request = f"GET {path} HTTP/1.0\r\nHost: manager.test\r\n"
            if authorization:
                request += f"Authorization: {authorization}\r\n"
            tls.sendall((request + "\r\n").encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status.split()[1]), headers, body


def manager_yaml(directory: Path, pki: object, port: int, web: str) -> Path:
    crt, key = pki.manager  # type: ignore[attr-defined]
    path = directory / "manager.yaml"
    path.write_text(
        "identity: manager.test\n"
        f'listen: ["tcp:{port}:interface={LOCAL}"]\n'
        f'tls: {{certificate: "{crt}", key: "{key}", ca: "{pki.ca}"}}\n'  # type: ignore[attr-defined]
        'store: "sqlite:///alerts.db"\n' + web
    )
    return path


def test_https_and_password_through_twistd(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki")
    port, web_port = free_port(), free_port()
    secret = hash_password("correct horse battery", log_n=10)
    config = manager_yaml(tmp_path, pki, port, (
        f'web: {{listen: "tcp:{web_port}:interface={LOCAL}", tls: manager,'
        f' auth: {{user: soc, password_hash: "{secret}"}}}}\n'
    ))
    sensor = tmp_path / "sensor.yaml"
    crt, key = pki.sensor
    sensor.write_text(
        f'identity: sensor1.test\nmanager: manager.test\nconnect: "tcp:host={LOCAL}:port={port}"\n'
        f'tls: {{certificate: "{crt}", key: "{key}", ca: "{pki.ca}"}}\n'
    )
    daemon = Daemon(["iap-manager", "-c", str(config)], tmp_path)
    try:
        daemon.wait_for(f"starting on {web_port}")
        (tmp_path / "a.xml").write_bytes(idmef_alert("over-https", classification="Seen over HTTPS"))
        sent = run(["iapd.send", "-c", str(sensor), str(tmp_path / "a.xml")])
        assert sent.returncode == 0, sent.stderr
        code, headers, _ = https_get(web_port, pki.ca, "/api/alerts")
        assert code == 401 and headers["www-authenticate"].startswith("Basic realm=")
        good = "Basic " + base64.b64encode(b"soc:correct horse battery").decode()
        code, headers, body = https_get(web_port, pki.ca, "/api/alerts", good)
        assert code == 200, body
        assert headers["strict-transport-security"] == "max-age=31536000"
        assert json.loads(body)["alerts"][0]["idmef"]["classification"] == "Seen over HTTPS"
        code, _, body = https_get(web_port, pki.ca, "/alerts", good)
        assert code == 200 and b"Seen over HTTPS" in body
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.log()


def test_unsafe_or_unusable_web_configuration_stops_twistd_with_one_line(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki")
    cases = [
        ('web: {listen: "tcp:0"}\n', "web.listen: 'tcp:0' is reachable beyond loopback"),
        (f'web: {{listen: "tcp:0:interface={LOCAL}", tls: {{certificate: "{pki.manager[0]}", key: "{pki.sensor[1]}"}}}}\n',
         "web.tls: key"),
    ]
    for i, (web, message) in enumerate(cases):
        directory = tmp_path / f"case{i}"
        directory.mkdir()
        config = manager_yaml(directory, pki, free_port(), web)
        daemon = Daemon(["iap-manager", "-c", str(config)], directory)
        code = daemon.proc.wait(60)
        daemon.stop()
        log = daemon.log()
        assert code == 1, log
        assert "configuration error" in log and message in log, log
        assert "Traceback" not in log


def hangup(daemon: Daemon, expect: str) -> str:
    """SIGHUP C{daemon}, then wait until it logs C{expect} once more than before."""
    seen = daemon.log().count(expect)
    daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while daemon.log().count(expect) <= seen:
        assert daemon.proc.poll() is None and time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)
    return daemon.log()


def test_sighup_rotates_the_dashboard_certificate_or_refuses_the_whole_reload(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki")
    port, web_port = free_port(), free_port()
    crt, key = tmp_path / "web.crt", tmp_path / "web.key"
    shutil.copy(pki.manager[0], crt)
    shutil.copy(pki.manager[1], key)
    web = (f'web: {{listen: "tcp:{web_port}:interface={LOCAL}", hosts: [manager.test],'
           f' tls: {{certificate: "{crt}", key: "{key}"}}}}\n')
    config = manager_yaml(tmp_path, pki, port, web)
    sensor = tmp_path / "sensor.yaml"
    sensor.write_text(
        f'identity: sensor1.test\nmanager: manager.test\nconnect: "tcp:host={LOCAL}:port={port}"\n'
        f'tls: {{certificate: "{pki.sensor[0]}", key: "{pki.sensor[1]}", ca: "{pki.ca}"}}\n'
    )
    (tmp_path / "a.xml").write_bytes(idmef_alert("rotation"))
    daemon = Daemon(["iap-manager", "-c", str(config)], tmp_path)
    try:
        daemon.wait_for(f"starting on {web_port}")
        assert https_get(web_port, pki.ca, "/metrics")[0] == 200
        with pytest.raises(ssl.SSLCertVerificationError):
            https_get(web_port, pki.other_ca, "/metrics")

        # the files are replaced where they are: the next connection gets the new pair
        shutil.copy(pki.manager_other_ca[0], crt)
        shutil.copy(pki.manager_other_ca[1], key)
        log = hangup(daemon, "reloaded web.tls")
        assert f"for new connections to tcp:{web_port}" in log
        code, _, body = https_get(web_port, pki.other_ca, "/metrics")
        assert code == 200 and b'iap_config_reloads_total{result="ok"} 1.0' in body
        with pytest.raises(ssl.SSLCertVerificationError):
            https_get(web_port, pki.ca, "/metrics")

        # a key of another certificate: the whole reload is refused, the allow-list
        # change in the same file included, and the dashboard keeps what it served
        shutil.copy(pki.manager[1], key)
        config.write_text(config.read_text() + 'allow: {sensors: ["nobody.test"]}\n')
        log = hangup(daemon, "refused, the running configuration stays")
        assert "web.tls: key" in log and "does not belong to certificate" in log
        code, _, body = https_get(web_port, pki.other_ca, "/metrics")
        assert code == 200 and b'iap_config_reloads_total{result="failed"} 1.0' in body
        sent = run(["iapd.send", "-c", str(sensor), str(tmp_path / "a.xml")])
        assert sent.returncode == 0, sent.stderr
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.log()
