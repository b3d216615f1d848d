"""
The embedded default: a manager that runs with no configuration file at all.

Meant for a first look and for development, never for production: it creates a
development CA, a manager certificate for C{localhost} and one sensor certificate in a
local state directory, writes the matching manager.yaml and sensor.yaml there, listens on
loopback only, and says all of this loudly in its log.  Once running it sends one sample
alert to itself through the real sensor code path, so the first run shows the whole
chain working: TLS with role certificates, the verify phase, the store.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import pki

STATE_ENV = "IAPD_HOME"
DEFAULT_STATE = "iapd-data"
MANAGER_NAME = "localhost"
SENSOR_NAME = "sensor.localhost"

SAMPLE_ALERT = b"""<?xml version="1.0" encoding="UTF-8"?>
<idmef:IDMEF-Message xmlns:idmef="http://iana.org/idmef" version="1.0">
  <idmef:Alert messageid="iapd-quickstart-1">
    <idmef:Analyzer analyzerid="iapd-quickstart" name="iap-send" model="iapd"/>
    <idmef:CreateTime ntpstamp="0xe8b5a3c0.0x0">2026-11-23T00:00:00Z</idmef:CreateTime>
    <idmef:Source><idmef:Node><idmef:Address category="ipv4-addr">
      <idmef:address>192.0.2.10</idmef:address></idmef:Address></idmef:Node></idmef:Source>
    <idmef:Target><idmef:Node><idmef:Address category="ipv4-addr">
      <idmef:address>198.51.100.20</idmef:address></idmef:Address></idmef:Node></idmef:Target>
    <idmef:Classification text="iapd quick start: sample alert"/>
    <idmef:Assessment><idmef:Impact severity="low"/></idmef:Assessment>
  </idmef:Alert>
</idmef:IDMEF-Message>
"""


def state_dir() -> Path:
    return Path(os.environ.get(STATE_ENV) or DEFAULT_STATE).resolve()


def prepare(state: Path, listen_port: int, web_port: int = 8080) -> tuple[Path, list[str]]:
    """
    Make sure C{state} holds a development PKI and configuration; return the manager
    configuration's path and what was created (for the log).
    """
    created: list[str] = []
    state.mkdir(parents=True, exist_ok=True, mode=0o750)
    pki_dir = state / "pki"
    if not (pki_dir / "ca.crt").exists():
        pki.init_ca(pki_dir, name="iapd DEVELOPMENT CA (not for production)")
        pki.issue(pki_dir, "manager", MANAGER_NAME)
        pki.issue(pki_dir, "sensor", SENSOR_NAME)
        created.append(f"a development CA with certificates for {MANAGER_NAME} and {SENSOR_NAME} in {pki_dir}")
    manager_yaml = state / "manager.yaml"
    if not manager_yaml.exists():
        manager_yaml.write_text(
            "# Written by iapd on its first run without -c: a development manager.\n"
            f"identity: {MANAGER_NAME}\n"
            f'listen: ["tcp:{listen_port}:interface=127.0.0.1"]\n'
            f"tls: {{certificate: pki/{MANAGER_NAME}.crt, key: pki/{MANAGER_NAME}.key, ca: pki/ca.crt}}\n"
            'store: "sqlite:///alerts.db"\n'
            'allow: {sensors: ["*"], networks: ["127.0.0.0/8", "::1/128"]}\n'
            "# the dashboard, JSON API and /metrics; loopback only, so no TLS or password needed\n"
            f'web: {{listen: "tcp:{web_port}:interface=127.0.0.1"}}\n'
        )
        created.append(str(manager_yaml))
    sensor_yaml = state / "sensor.yaml"
    if not sensor_yaml.exists():
        sensor_yaml.write_text(
            "# Written by iapd on its first run without -c: a sensor for the development manager.\n"
            f"identity: {SENSOR_NAME}\n"
            f"manager: {MANAGER_NAME}\n"
            f'connect: "tcp:host=127.0.0.1:port={listen_port}"\n'
            f"tls: {{certificate: pki/{SENSOR_NAME}.crt, key: pki/{SENSOR_NAME}.key, ca: pki/ca.crt}}\n"
            "window: 256\n"
        )
        created.append(str(sensor_yaml))
    sample = state / "sample-alert.xml"
    if not sample.exists():
        sample.write_bytes(SAMPLE_ALERT)
        created.append(str(sample))
    return manager_yaml, created
