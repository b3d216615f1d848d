"""
The shipped example configurations stay loadable as the code changes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from iapd import pki
from iapd.config import load_manager, load_proxy, load_sensor

CONF = Path(__file__).resolve().parent.parent / "conf"


def _with_certificates(tmp_path: Path, name: str, role: str, stem: str) -> Path:
    pki.init_ca(tmp_path / "ca")
    crt, key = pki.issue(tmp_path / "ca", role, name)
    shutil.copy(tmp_path / "ca" / "ca.crt", tmp_path / "ca.crt")
    shutil.copy(crt, tmp_path / f"{stem}.crt")
    shutil.copy(key, tmp_path / f"{stem}.key")
    return tmp_path


def test_manager_example(tmp_path: Path) -> None:
    _with_certificates(tmp_path, "manager.example.org", "manager", "manager")
    text = (CONF / "manager.yaml").read_text().replace("sqlite:////var/lib/iapd/alerts.db", "sqlite:///alerts.db")
    (tmp_path / "manager.yaml").write_text(text)
    config = load_manager(tmp_path / "manager.yaml")
    assert config.identity == "manager.example.org"
    assert config.tls.load("manager.yaml").identity == "manager.example.org"
    assert config.store_path == tmp_path / "alerts.db"


def test_sensor_example(tmp_path: Path) -> None:
    _with_certificates(tmp_path, "sensor1.example.org", "sensor", "sensor")
    shutil.copy(CONF / "sensor.yaml", tmp_path / "sensor.yaml")
    config = load_sensor(tmp_path / "sensor.yaml")
    assert (config.manager, config.window) == ("manager.example.org", 256)
    assert config.tls.load("sensor.yaml").identity == "sensor1.example.org"


def test_proxy_examples() -> None:
    for path in [CONF / "proxy.yaml", *sorted((CONF / "two-perimeters").glob("*proxy.yaml"))]:
        config = load_proxy(path)
        assert config.routes, path


def test_two_perimeter_sensor(tmp_path: Path) -> None:
    _with_certificates(tmp_path, "sensor1.branch.example.net", "sensor", "sensor1")
    shutil.copy(CONF / "two-perimeters" / "sensor.yaml", tmp_path / "sensor.yaml")
    config = load_sensor(tmp_path / "sensor.yaml")
    assert config.manager == "manager.soc.example.net"
    assert config.tls.load("sensor.yaml").identity == "sensor1.branch.example.net"
