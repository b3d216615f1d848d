"""
Every bad configuration stops with one message naming the key and the problem.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest

from iapd.config import ConfigError, load_manager, load_proxy, load_sensor
from iapd.web.password import hash_password

from .certs import make_test_pki


@pytest.fixture(scope="module")
def pki_dir() -> Path:
    with tempfile.TemporaryDirectory() as d:
        make_test_pki(Path(d))
        yield Path(d)


GOOD_MANAGER = """\
identity: manager.test
listen: ["tcp:0:interface=127.0.0.1"]
tls: {certificate: PKI/manager.test.crt, key: PKI/manager.test.key, ca: PKI/ca.crt}
store: "sqlite:///alerts.db"
allow: {sensors: ["*.test"], networks: ["127.0.0.0/8"]}
limits: {setup_timeout: 5, max_content_length: 4096}
"""

GOOD_SENSOR = """\
identity: sensor1.test
manager: manager.test
connect: "tcp:host=127.0.0.1:port=5603"
tls: {certificate: PKI/sensor1.test.crt, key: PKI/sensor1.test.key, ca: PKI/ca.crt}
window: 64
"""


def write(tmp_path: Path, pki_dir: Path, text: str, name: str = "role.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text.replace("PKI/", f"{pki_dir}/"))
    return path


def test_good_manager(tmp_path: Path, pki_dir: Path) -> None:
    config = load_manager(write(tmp_path, pki_dir, GOOD_MANAGER))
    assert config.identity == "manager.test"
    assert config.store_path == tmp_path / "alerts.db"  # relative to the file
    assert config.setup_timeout == 5.0 and config.max_content_length == 4096
    assert config.allow_sensors == ("*.test",)
    assert config.tls.load("x").identity == "manager.test"


def test_manager_defaults(tmp_path: Path, pki_dir: Path) -> None:
    text = "identity: m.test\ntls: {certificate: PKI/manager.test.crt, key: PKI/manager.test.key, ca: PKI/ca.crt}\n"
    config = load_manager(write(tmp_path, pki_dir, text))
    assert config.listen == ("tcp:5603",)
    assert config.setup_timeout == 10.0 and config.max_content_length == 1048576
    assert config.content_types == frozenset(["application/x-idef-alert"])
    assert config.store_path == tmp_path / "alerts.db"


def test_absolute_sqlite_url(tmp_path: Path, pki_dir: Path) -> None:
    text = GOOD_MANAGER.replace('"sqlite:///alerts.db"', f'"sqlite:///{tmp_path}/abs.db"')
    assert load_manager(write(tmp_path, pki_dir, text)).store_path == tmp_path / "abs.db"


# (what is changed, replacement, words the message must contain)
BAD_MANAGER = [
    ("identity: manager.test\n", "", "identity: is required"),
    ("identity: manager.test", "identity: not a host!", "identity: must be a DNS host name"),
    ('listen: ["tcp:0:interface=127.0.0.1"]', 'listen: ["bogus:1"]', "listen: 'bogus:1': not a Twisted server endpoint"),
    ('listen: ["tcp:0:interface=127.0.0.1"]', "listen: []", "listen: must name at least one endpoint"),
    ('listen: ["tcp:0:interface=127.0.0.1"]', "listen: {a: 1}", "listen: must be a list of strings"),
    ("PKI/manager.test.crt", "PKI/missing.crt", "tls: cannot read certificate"),
    ("PKI/manager.test.key", "PKI/sensor1.test.key", "does not belong to certificate"),
    ("PKI/manager.test.key", "PKI/ca.crt", "is not an unencrypted PEM private key"),
    ("PKI/manager.test.crt", "PKI/manager.test.key", "is not a PEM certificate"),
    ("ca: PKI/ca.crt", "ca: PKI/manager.test.key", "holds no PEM certificate"),
    ("tls: {certificate", "tls: {certficate", "tls.certficate: unknown key"),
    ('store: "sqlite:///alerts.db"', 'store: "mysql://x/y"', "store: not an SQLite URL"),
    ('store: "sqlite:///alerts.db"', 'store: "postgresql://u@h:notaport/db"', "store: not a PostgreSQL URL"),
    ('networks: ["127.0.0.0/8"]', 'networks: ["127.0.0.0/33"]', "allow.networks: '127.0.0.0/33': not a network"),
    ("allow: {sensors", "allow: {sensor", "allow.sensor: unknown key"),
    ("setup_timeout: 5", "setup_timeout: 0", "limits.setup_timeout: must be a number of seconds above 0"),
    ("setup_timeout: 5", "setup_timeout: abc", "limits.setup_timeout: must be a number"),
    ("setup_timeout: 5", "setup_timeout: true", "limits.setup_timeout: must be a number"),
    ("max_content_length: 4096", "max_content_length: -1", "limits.max_content_length: must be a whole number"),
    ("max_content_length: 4096", "max_content_length: 1.5", "limits.max_content_length: must be a whole number"),
    ("identity: manager.test\n", "identity: manager.test\nidentiy: x\n", "identiy: unknown key"),
    ("identity: manager.test\n", "identity: manager.test\ndial: ['tcp:nohost']\n", "dial: 'tcp:nohost': not a Twisted client endpoint"),
    ("identity: manager.test\n", "identity: manager.test\ncontent_types: [nope]\n", "content_types: 'nope': not a media type"),
    ("identity: manager.test\n", "identity: manager.test\nweb: {listen: 'zz:9'}\n", "web.listen: 'zz:9': not a Twisted server endpoint"),
]


@pytest.mark.parametrize("old,new,message", BAD_MANAGER, ids=[m for _, _, m in BAD_MANAGER])
def test_bad_manager(tmp_path: Path, pki_dir: Path, old: str, new: str, message: str) -> None:
    assert old in GOOD_MANAGER
    path = write(tmp_path, pki_dir, GOOD_MANAGER.replace(old, new))
    with pytest.raises(ConfigError) as info:
        config = load_manager(path)
        config.tls.load(str(path))
    assert message in str(info.value)
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize(
    "text,message",
    [
        ("identity: [unclosed\n", "not valid YAML at line 2"),
        ("- a\n- b\n", "the file must be a mapping"),
        ("", "the file must be a mapping"),
        ("tls: 5\nidentity: m.test\n", "tls must be a mapping"),
    ],
)
def test_unusable_files(tmp_path: Path, pki_dir: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_manager(write(tmp_path, pki_dir, text))


def test_missing_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_manager(tmp_path / "absent.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_manager(tmp_path / "bin.yaml")


def test_good_sensor(tmp_path: Path, pki_dir: Path) -> None:
    config = load_sensor(write(tmp_path, pki_dir, GOOD_SENSOR))
    assert (config.manager, config.window) == ("manager.test", 64)
    assert config.tls.load("x").identity == "sensor1.test"


BAD_SENSOR = [
    ("manager: manager.test\n", "", "manager: is required"),
    ('connect: "tcp:host=127.0.0.1:port=5603"\n', "", "connect: is required unless listen is set"),
    ('connect: "tcp:host=127.0.0.1:port=5603"', 'connect: "tcp:nohost"', "connect: 'tcp:nohost': not a Twisted client endpoint"),
    ("window: 64", "window: 0", "window: must be a whole number of alerts from 1 to 65536"),
    ("window: 64", "window: many", "window: must be a whole number"),
    ("window: 64", "window: 64\nlisten: 'zz:5603'", "listen: 'zz:5603': not a Twisted server endpoint"),
    ("window: 64", "window: 64\nlimits: {setup_timeout: -3}", "limits.setup_timeout: must be a number"),
    ("window: 64", "window: 64\ninputs: {type: directory}", "inputs: must be a list"),
    ("window: 64", "window: 64\nlisten: ['tcp:0']", "listen: must be one server endpoint string"),
    ("window: 64", "window: 64\nlimits: {ack_timeout: 0}", "limits.ack_timeout: must be a number of seconds"),
    ("window: 64", "window: 64\nweb: {listen: 'nope:1'}", "web.listen: 'nope:1': not a Twisted server endpoint"),
    ("window: 64", "window: 64\nweb: {port: 8080}", "web.port: unknown key"),
    ("window: 64", "window: 64\nweb: 8080", "web must be a mapping"),
    # the sensor's /metrics listener follows the dashboard's rules (iapd.web.config)
    ("window: 64", "window: 64\nweb: {listen: 'tcp:9603'}",
     "web.listen: 'tcp:9603' is reachable beyond loopback, and its /metrics tell the sensor's spool and deliveries:"
     " set web.tls and web.auth"),
    ("window: 64", "window: 64\nweb: {listen: 'tcp:9603:interface=127.0.0.1', tls: manager}",
     "web.tls: must be {certificate: ..., key: ...}, got 'manager'"),
    ("window: 64", "window: 64\nweb: {listen: 'tcp:9603:interface=127.0.0.1', auth: {client_certificates: [ops.test]}}",
     "web.auth.client_certificates: needs web.tls"),
    ("window: 64", "window: 64\nweb: {listen: 'tcp:9603', tls: {certificate: PKI/sensor1.test.crt, key: PKI/sensor1.test.key}}",
     "web.listen: 'tcp:9603' is reachable beyond loopback"),
]


@pytest.mark.parametrize("old,new,message", BAD_SENSOR, ids=[m for _, _, m in BAD_SENSOR])
def test_bad_sensor(tmp_path: Path, pki_dir: Path, old: str, new: str, message: str) -> None:
    assert old in GOOD_SENSOR
    with pytest.raises(ConfigError) as info:
        load_sensor(write(tmp_path, pki_dir, GOOD_SENSOR.replace(old, new)))
    assert message in str(info.value)


def test_sensor_may_listen_instead_of_connect(tmp_path: Path, pki_dir: Path) -> None:
    text = GOOD_SENSOR.replace('connect: "tcp:host=127.0.0.1:port=5603"', 'listen: "tcp:5604:interface=127.0.0.1"')
    config = load_sensor(write(tmp_path, pki_dir, text))
    assert (config.connect, config.listen) == (None, "tcp:5604:interface=127.0.0.1")


def test_manager_dial(tmp_path: Path, pki_dir: Path) -> None:
    text = GOOD_MANAGER + 'dial: ["tcp:host=127.0.0.1:port=5604"]\n'
    assert load_manager(write(tmp_path, pki_dir, text)).dial == ("tcp:host=127.0.0.1:port=5604",)


GOOD_PROXY = """\
identity: proxy.test
listen: ["tcp:0:interface=127.0.0.1"]
routes:
  - {match: "*.test", upstream: "tcp:host=127.0.0.1:port=5603"}
allow: {networks: ["127.0.0.0/8"]}
limits: {setup_timeout: 3}
"""


def test_good_proxy(tmp_path: Path, pki_dir: Path) -> None:
    config = load_proxy(write(tmp_path, pki_dir, GOOD_PROXY))
    assert config.routes == (("*.test", "tcp:host=127.0.0.1:port=5603"),)
    assert config.setup_timeout == 3.0


BAD_PROXY = [
    ("identity: proxy.test\n", "", "identity: is required"),
    ('  - {match: "*.test", upstream: "tcp:host=127.0.0.1:port=5603"}\n', "", "routes: is required"),
    ('routes:\n  - {match: "*.test", upstream: "tcp:host=127.0.0.1:port=5603"}\n', "routes: []\n", "routes: must be a non-empty list"),
    ('{match: "*.test", ', "{", "routes[0].match: is required"),
    ('upstream: "tcp:host=127.0.0.1:port=5603"', 'upstream: "tcp:5603"', "routes[0].upstream: 'tcp:5603': not a Twisted client endpoint"),
    ('match: "*.test"', 'match: "*.test", via: x', "routes[0].via: unknown key"),
    ('networks: ["127.0.0.0/8"]', 'networks: ["nowhere"]', "allow.networks: 'nowhere': not a network"),
    ("setup_timeout: 3", "setup_timeout: 0", "limits.setup_timeout: must be a number"),
    ("setup_timeout: 3", "setup_timeout: 3, max_per_source: 0", "limits.max_per_source: must be a whole number"),
    ("setup_timeout: 3", "setup_timeout: 3, max_connectons: 5", "limits.max_connectons: unknown key"),
    ("allow: {networks", "allow: {sensors: ['*'], networks", "allow.sensors: unknown key"),
]


@pytest.mark.parametrize("old,new,message", BAD_PROXY, ids=[m for _, _, m in BAD_PROXY])
def test_bad_proxy(tmp_path: Path, pki_dir: Path, old: str, new: str, message: str) -> None:
    assert old in GOOD_PROXY
    with pytest.raises(ConfigError) as info:
        load_proxy(write(tmp_path, pki_dir, GOOD_PROXY.replace(old, new)))
    assert message in str(info.value)


# -- the same tables, as the daemons report them at start --------------------------------
# twistd calls Options.parseOptions before anything runs: a bad file must stop it there with
# one line, "twistd ROLE: configuration error: FILE: KEY: PROBLEM", and no traceback.


def _start_error(options: Any, path: Path) -> str:
    with pytest.raises(SystemExit) as info:
        options.parseOptions(["-c", str(path)])
    return str(info.value.code)


@pytest.mark.parametrize("old,new,message", BAD_MANAGER, ids=[m for _, _, m in BAD_MANAGER])
def test_bad_manager_stops_twistd_with_one_line(tmp_path: Path, pki_dir: Path, old: str, new: str, message: str) -> None:
    from iapd import manager_tap

    path = write(tmp_path, pki_dir, GOOD_MANAGER.replace(old, new))
    error = _start_error(manager_tap.Options(), path)
    assert error.startswith(f"twistd iap-manager: configuration error: {path}: ")
    assert message in error and "\n" not in error and "Traceback" not in error


@pytest.mark.parametrize("old,new,message", BAD_SENSOR, ids=[m for _, _, m in BAD_SENSOR])
def test_bad_sensor_stops_twistd_with_one_line(tmp_path: Path, pki_dir: Path, old: str, new: str, message: str) -> None:
    from iapd import sensor_tap

    path = write(tmp_path, pki_dir, GOOD_SENSOR.replace(old, new) + "spool: spool\n")
    error = _start_error(sensor_tap.Options(), path)
    assert error.startswith(f"twistd iap-sensor: configuration error: {path}: ")
    assert message in error and "\n" not in error


@pytest.mark.parametrize("old,new,message", BAD_PROXY, ids=[m for _, _, m in BAD_PROXY])
def test_bad_proxy_stops_twistd_with_one_line(tmp_path: Path, pki_dir: Path, old: str, new: str, message: str) -> None:
    from iapd import proxy_tap

    path = write(tmp_path, pki_dir, GOOD_PROXY.replace(old, new))
    error = _start_error(proxy_tap.Options(), path)
    assert error.startswith(f"twistd iap-proxy: configuration error: {path}: ")
    assert message in error and "\n" not in error


def test_sensor_web_tls_files_that_cannot_be_used_stop_twistd_with_one_line(tmp_path: Path, pki_dir: Path) -> None:
    from iapd import sensor_tap

    web = (
        "web: {listen: 'tcp:9603:interface=127.0.0.1',"
        " tls: {certificate: PKI/sensor1.test.crt, key: PKI/no-such.key}, auth: {password_hash: '%s'}}\n"
        % hash_password("pw", log_n=4)
    )
    path = write(tmp_path, pki_dir, GOOD_SENSOR + "spool: spool\n" + web)
    options = sensor_tap.Options()
    options.parseOptions(["-c", str(path)])
    with pytest.raises(SystemExit) as info:
        sensor_tap.makeService(options)
    error = str(info.value.code)
    assert error.startswith(f"twistd iap-sensor: configuration error: {path}: web.tls: ")
    assert "no-such.key" in error and "\n" not in error


def test_sensor_reload_names_a_changed_web_listener_once(tmp_path: Path, pki_dir: Path) -> None:
    """A SIGHUP cannot move the metrics listener; the warning names C{web}, once."""
    from iapd.reload import changed_keys
    from iapd.sensor import RESTART_KEYS

    before = load_sensor(write(tmp_path, pki_dir, GOOD_SENSOR + "web: {listen: 'tcp:9603:interface=127.0.0.1'}\n"))
    after = load_sensor(write(tmp_path, pki_dir, GOOD_SENSOR + "web: {listen: 'tcp:9604:interface=127.0.0.1'}\n"))
    assert changed_keys(before, after, RESTART_KEYS) == ["web"]
