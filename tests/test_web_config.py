"""
The C{web:} section of manager.yaml: every bad value names its key, and the dashboard
is never reachable beyond loopback without TLS and authentication.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from iapd.config import ConfigError, load_manager
from iapd.web.config import listens_on_loopback
from iapd.web.password import PasswordHash, hash_password, hash_problem
from iapd.web.password import main as password_main

from .certs import make_test_pki

# cheap parameters: these tests check formats, not strength
HASH = hash_password("correct horse battery", log_n=4)

BASE = """\
identity: manager.test
listen: ["tcp:0:interface=127.0.0.1"]
tls: {certificate: PKI/manager.test.crt, key: PKI/manager.test.key, ca: PKI/ca.crt}
store: "sqlite:///alerts.db"
"""


@pytest.fixture(scope="module")
def pki_dir() -> Path:
    with tempfile.TemporaryDirectory() as d:
        make_test_pki(Path(d))
        yield Path(d)


def load(tmp_path: Path, pki_dir: Path, web: str):
    path = tmp_path / "manager.yaml"
    path.write_text((BASE + web).replace("PKI/", f"{pki_dir}/"))
    return load_manager(path)


def test_no_web_key_means_no_web_listener(tmp_path: Path, pki_dir: Path) -> None:
    config = load(tmp_path, pki_dir, "")
    assert config.web is None and config.web_listen is None
    assert load(tmp_path, pki_dir, "web: {}\n").web is None


def test_loopback_needs_nothing_more(tmp_path: Path, pki_dir: Path) -> None:
    config = load(tmp_path, pki_dir, 'web: {listen: "tcp:8080:interface=127.0.0.1"}\n')
    assert config.web_listen == "tcp:8080:interface=127.0.0.1"
    assert config.web.loopback and config.web.tls is None and not config.web.authenticated


def test_extra_host_names(tmp_path: Path, pki_dir: Path) -> None:
    config = load(tmp_path, pki_dir, 'web: {listen: "tcp:8080:interface=127.0.0.1", hosts: [Dash.Example.org, "[::1]"]}\n')
    assert config.web.hosts == ("dash.example.org", "[::1]")


def test_tls_and_both_authentications(tmp_path: Path, pki_dir: Path) -> None:
    config = load(tmp_path, pki_dir, f"""\
web:
  listen: "tcp:8443"
  tls: {{certificate: PKI/manager.test.crt, key: PKI/manager.test.key}}
  auth: {{client_certificates: ["Alice.SOC.test", "*.ops.test"], user: soc, password_hash: "{HASH}"}}
""")
    web = config.web
    assert not web.loopback
    assert web.tls.certificate == pki_dir / "manager.test.crt"
    assert web.tls.ca == pki_dir / "ca.crt"  # the manager's CA by default
    assert web.client_certificates == ("alice.soc.test", "*.ops.test")
    assert web.user == "soc" and web.password_hash == HASH


def test_tls_manager_reuses_the_manager_pair(tmp_path: Path, pki_dir: Path) -> None:
    config = load(tmp_path, pki_dir, f'web: {{listen: "tcp:8443", tls: manager, auth: {{password_hash: "{HASH}"}}}}\n')
    assert config.web.tls.key == pki_dir / "manager.test.key"


@pytest.mark.parametrize("text,loopback", [
    ("tcp:80:interface=127.0.0.1", True),
    ("tcp:80:interface=127.9.9.9", True),
    ("tcp6:80:interface=\\:\\:1", True),
    ("tcp:80:interface=localhost", True),
    ("unix:/run/iapd/web.sock", True),
    ("tcp:80", False),
    ("tcp:80:interface=0.0.0.0", False),
    ("tcp:80:interface=192.0.2.1", False),
    ("tcp6:80", False),
])
def test_loopback_detection(text: str, loopback: bool) -> None:
    assert listens_on_loopback(text) is loopback


BAD = [
    ('web: {listen: "zz:9"}', "web.listen: 'zz:9': not a Twisted server endpoint"),
    ('web: {listen: 8080}', "web.listen: must be one server endpoint string"),
    ('web: {listen: ["tcp:1:interface=127.0.0.1", "tcp:2"]}', "web.listen: must be one server endpoint string"),
    ('web: {listen: "ssl:8443"}', "web.listen: 'ssl:8443': use a tcp: endpoint and set web.tls"),
    ('web: {listen: "tcp:8080"}', "web.listen: 'tcp:8080' is reachable beyond loopback"),
    ('web: {listen: "tcp:8080", tls: manager}', "web.listen: 'tcp:8080' is reachable beyond loopback"),
    ('web: {lisen: "tcp:8080"}', "web.lisen: unknown key"),
    ('web: {tls: manager}', "web.tls: is set but web.listen is not"),
    ('web: {auth: {user: x}}', "web.auth: is set but web.listen is not"),
    ('web: {listen: "tcp:1:interface=127.0.0.1", tls: yes}', "web.tls: must be {certificate: ..., key: ...} or the word manager"),
    ('web: {listen: "tcp:1:interface=127.0.0.1", tls: {certificate: a.crt}}', "web.tls.key: is required"),
    ('web: {listen: "tcp:1:interface=127.0.0.1", tls: {cert: a.crt}}', "web.tls.cert: unknown key"),
    ('web: {listen: "tcp:1:interface=127.0.0.1", auth: {password: x}}', "web.auth.password: unknown key"),
    ('web: {listen: "tcp:1:interface=127.0.0.1", auth: {password_hash: "hunter2"}}', "web.auth.password_hash: not an scrypt hash"),
    ('web: {listen: "tcp:1:interface=127.0.0.1", auth: {password_hash: 5}}', "web.auth.password_hash: must be a string"),
    ('web: {listen: "tcp:1:interface=127.0.0.1", auth: {user: "a:b"}}', "web.auth.user: must be a user name without ':'"),
    ('web: {listen: "tcp:1:interface=127.0.0.1", auth: {user: ""}}', "web.auth.user: must be a user name"),
    ('web: {listen: "tcp:1:interface=127.0.0.1", auth: {client_certificates: ["a.test"]}}',
     "web.auth.client_certificates: needs web.tls"),
    ('web: {listen: "tcp:1:interface=127.0.0.1", tls: manager, auth: {client_certificates: [""]}}',
     "web.auth.client_certificates: '': must be an identity or a glob"),
    ('web: {listen: "tcp:1:interface=127.0.0.1", tls: manager, auth: {client_certificates: 7}}',
     "web.auth.client_certificates: must be a list of strings"),
    ('web: {listen: "tcp:1:interface=127.0.0.1", hosts: ["evil.example/x"]}', "web.hosts: 'evil.example/x': must be a host"),
    ('web: {listen: "tcp:1:interface=127.0.0.1", hosts: 5}', "web.hosts: must be a list of strings"),
    (f'web: {{listen: "tcp:8080", auth: {{password_hash: "{HASH}"}}}}',
     "web.auth.password_hash: HTTP Basic would send the password in clear"),
    ('web: {listen: "tcp:1:interface=127.0.0.1", auth: {password_hash: "$scrypt$ln=25,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$'
     'AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}}', "web.auth.password_hash: scrypt parameters out of bounds"),
]


@pytest.mark.parametrize("web,message", BAD, ids=[m for _, m in BAD])
def test_bad_web_section(tmp_path: Path, pki_dir: Path, web: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, pki_dir, web + "\n")
    assert message in str(info.value)
    assert str(info.value).startswith(str(tmp_path / "manager.yaml"))


def test_password_hash_round_trip_and_constant_format() -> None:
    parsed = PasswordHash.parse(HASH)
    assert str(parsed) == HASH
    assert parsed.verify("correct horse battery")
    assert not parsed.verify("correct horse batterx")
    assert hash_password("x", log_n=4) != hash_password("x", log_n=4)  # salted
    assert hash_problem(HASH) is None


def test_password_command_prints_a_usable_hash(capsys, monkeypatch) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("a long enough password\n"))
    assert password_main(["--stdin"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("$scrypt$ln=15,r=8,p=1$")
    assert PasswordHash.parse(line).verify("a long enough password")
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert password_main(["--stdin"]) == 1
