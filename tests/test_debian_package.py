"""
The Debian package: built from this tree with dpkg-buildpackage, installed with apt in a
clean Debian 12 root, run from the installed files, and purged.

The run is what an admin does: the manager, proxy and sensor daemons started with the
packaged plugins and configurations (only names and ports changed) as the iapd user, on
Debian's own Twisted, pyOpenSSL and cryptography, with a PKI made by the installed
iap-pki; alerts sent with the installed iap-send and through the sensor daemon's drop
directory, read back with the installed iapctl and /metrics; SIGHUP (systemctl reload)
survived.  Then the purge must remove what the package made and leave everything else
as it was.

Needs root, debootstrap, dpkg-dev, debhelper, dh-python and pybuild-plugin-pyproject,
and Debian's archive (.ci/run installs the tools).  Without them the package tests are
skipped, except under CI, where a missing tool is a failure.  The checks of the sources
alone (configurations, units, man pages) run everywhere.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from . import debroot
from .debroot import Root, run
from .processes import ROOT, free_port

pytestmark = pytest.mark.timeout(1200)

DEBIAN = ROOT / "debian"
MAN = ROOT / "docs" / "man"
ROLES = ("manager", "proxy", "sensor")
UNITS = tuple(f"iap-{role}.service" for role in ROLES)
COMMANDS = ("iap-send", "iapctl", "iap-pki")
MAN_PAGES = ("iap-send.1", "iapctl.1", "iap-pki.1", "iap-manager.8", "iap-proxy.8", "iap-sensor.8")
# Not compared before install and after purge: package manager state, caches, logs
# and this test's own scratch space.
UNWATCHED = ("/proc", "/dev", "/tmp", "/var/lib/dpkg", "/var/lib/apt", "/var/cache", "/var/log")
# Changed on purpose by install + purge: the iapd system user stays (Debian keeps
# system users; adduser leaves its lock file in /run, a tmpfs on a real system), and
# Twisted's plugin cache is rebuilt by its trigger.
KEPT_CHANGES = {
    "/etc/passwd", "/etc/passwd-", "/etc/group", "/etc/group-",
    "/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/run/adduser",
    "/usr/lib/python3/dist-packages/twisted/plugins/dropin.cache",
}


def _ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _require_tools() -> None:
    missing = [t for t in ("dpkg-buildpackage", "dpkg-checkbuilddeps", "debootstrap", "unshare", "chroot", "git")
               if shutil.which(t, path=debroot.CLEAN_PATH) is None]
    problem = None
    if os.geteuid() != 0:
        problem = "needs root (debootstrap, chroot)"
    elif missing:
        problem = f"missing tools: {', '.join(missing)} (.ci/run installs them)"
    else:
        deps = run(["dpkg-checkbuilddeps"], cwd=ROOT, timeout=60, check=False)
        if deps.returncode != 0:
            problem = f"build dependencies missing: {deps.stdout.strip()}"
    if problem is not None:
        if _ci():
            pytest.fail(f"Debian package test: {problem}")
        pytest.skip(problem)


def _tree_files() -> list[str]:
    """The working tree's files as git sees them: tracked or new, not ignored, present."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True, timeout=60,
    ).stdout.decode()
    return sorted({f for f in out.split("\0") if f and (ROOT / f).is_file()})


# -- the package, built and installed once for the module ------------------------------


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require_tools()
    build = tmp_path_factory.mktemp("debbuild")
    source = build / "iapd"
    for name in _tree_files():
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=source, timeout=600,
        env=debroot.clean_env(HOME=str(build)))
    debs = list(build.glob("iapd_*_all.deb"))
    assert len(debs) == 1, debs
    return debs[0]


class Installed:
    def __init__(self, root: Root, deb: Path, before: dict[str, tuple[object, ...]]) -> None:
        self.root = root
        self.deb = deb
        self.before = before  # snapshot with the dependencies installed, iapd not yet


@pytest.fixture(scope="module")
def installed(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = debroot.unpack(debroot.base_tarball(), tmp_path_factory.mktemp("debroot") / "root")
    try:
        shutil.copy2(deb, root / f"/tmp/{deb.name}")
        # Dependencies first, from the .deb's own Depends, so that the snapshot the purge
        # is compared with has them; then the package, which must need nothing more.
        depends = run(["dpkg-deb", "-f", str(deb), "Depends"], timeout=60).stdout.strip()
        root.run(["apt-get", "satisfy", "-y", "-q", "--no-install-recommends", depends], timeout=600)
        before = debroot.snapshot(root, UNWATCHED)
        packages = _packages(root)
        root.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", f"/tmp/{deb.name}"], timeout=300)
        assert set(_packages(root)) - set(packages) == {"iapd"}
        yield Installed(root, deb, before)
    finally:
        debroot.remove(root)


def _packages(root: Root) -> list[str]:
    out = root.run(["dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev}\\n"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.split()[1:2] == ["ii"]]


# -- what the package installs ---------------------------------------------------------


def test_installed_files(installed: Installed) -> None:
    root = installed.root
    listed = set(root.run(["dpkg", "-L", "iapd"]).stdout.split())
    for unit in UNITS:
        assert f"/lib/systemd/system/{unit}" in listed
        # installed, not enabled: nothing can run before certificates are in place
        assert not (root / f"/etc/systemd/system/multi-user.target.wants/{unit}").exists()
    for command in COMMANDS:
        assert f"/usr/bin/{command}" in listed
        assert root.run([command, "--help"]).stdout.startswith(f"usage: {command}")
    for page in MAN_PAGES:
        assert f"/usr/share/man/man{page[-1]}/{page}.gz" in listed
    assert "/usr/lib/python3/dist-packages/twisted/plugins/iapd_plugins.py" in listed
    assert "/usr/lib/python3/dist-packages/iapd/manager.py" in listed

    conffiles = root.run(["dpkg-query", "-W", "-f", "${Conffiles}", "iapd"]).stdout
    assert sorted(re.findall(r"^ (\S+) [0-9a-f]{32}$", conffiles, re.M)) == [f"/etc/iapd/{r}.yaml" for r in ROLES]

    # the plugin cache was rebuilt by python3-twisted's trigger and knows the plugins
    assert b"iapd_plugins" in (root / "/usr/lib/python3/dist-packages/twisted/plugins/dropin.cache").read_bytes()
    plugins = root.run(["twistd3", "--help"]).stdout
    for role in ROLES:
        assert f"iap-{role}" in plugins

    user = root.run(["getent", "passwd", "iapd"]).stdout.strip().split(":")
    assert user[5:] == ["/var/lib/iapd", "/usr/sbin/nologin"] and int(user[2]) < 1000
    assert _owner_mode(root, "/var/lib/iapd") == ("iapd", "iapd", "750")
    assert _owner_mode(root, "/etc/iapd/tls") == ("root", "iapd", "750")


def _owner_mode(root: Root, path: str) -> tuple[str, ...]:
    return tuple(root.run(["stat", "-c", "%U %G %a", path]).stdout.split())


# -- running it ------------------------------------------------------------------------

ALERT = """\
<?xml version="1.0" encoding="UTF-8"?>
<idmef:IDMEF-Message xmlns:idmef="http://iana.org/idmef" version="1.0">
  <idmef:Alert messageid="{id}">
    <idmef:Analyzer analyzerid="debian-package-test"/>
    <idmef:CreateTime>2026-11-23T10:00:00Z</idmef:CreateTime>
    <idmef:Classification text="{text}"/>
  </idmef:Alert>
</idmef:IDMEF-Message>
"""


class Daemons:
    """The daemons a test started in the root; all stopped at the end, bounded."""

    def __init__(self, root: Root, logs: Path) -> None:
        self.root = root
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, role: str) -> subprocess.Popen[bytes]:
        """The installed unit's own ExecStart, as its user (no systemd in the root)."""
        unit = (self.root / f"/lib/systemd/system/iap-{role}.service").read_text()
        [command] = [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("ExecStart=")]
        with open(self.logs / f"{role}.log", "wb") as log:
            self.procs[role] = self.root.spawn(shlex.split(command), log, user="iapd", HOME="/var/lib/iapd")
        return self.procs[role]

    def events(self, role: str) -> list[dict[str, Any]]:
        """The daemon's log: one JSON object per line, as the units write it."""
        return [json.loads(line) for line in self.log(role).splitlines() if line.strip()]

    def reload(self, role: str, timeout: float = 30) -> None:
        """SIGHUP (what systemctl reload sends), then wait for the daemon to log the reload."""
        before = sum(e["message"].startswith("reloaded ") for e in self.events(role))
        self.procs[role].send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while sum(e["message"].startswith("reloaded ") for e in self.events(role)) == before:
            self.alive(role)
            assert time.monotonic() < deadline, f"iap-{role} did not reload:\n{self.log(role)}"
            time.sleep(0.1)

    def log(self, role: str) -> str:
        return (self.logs / f"{role}.log").read_text(errors="replace")

    def alive(self, role: str) -> None:
        if self.procs[role].poll() is not None:
            raise AssertionError(f"iap-{role} exited with {self.procs[role].returncode}:\n{self.log(role)}")

    def wait_listening(self, role: str, port: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.alive(role)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"iap-{role} not listening on {port} within {timeout}s:\n{self.log(role)}")

    def stop(self, role: str, timeout: float = 30) -> int:
        proc = self.procs.pop(role)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        return proc.returncode

    def stop_all(self) -> None:
        for role in list(self.procs):
            self.stop(role)


def _configure(root: Root, role: str, **changes: Any) -> None:
    """Rewrite the packaged /etc/iapd/ROLE.yaml with only C{changes} made."""
    path = root / f"/etc/iapd/{role}.yaml"
    config = yaml.safe_load(path.read_text())
    config.update(changes)
    path.write_text(yaml.safe_dump(config))


def _alerts(root: Root) -> list[dict[str, Any]]:
    out = root.run(["iapctl", "-c", "/etc/iapd/manager.yaml", "alerts", "--json"]).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _wait_alerts(root: Root, count: int, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        alerts = _alerts(root)
        if len(alerts) >= count or time.monotonic() > deadline:
            return alerts
        time.sleep(0.5)


def test_run_installed(installed: Installed, tmp_path: Path) -> None:
    root = installed.root
    # A PKI from the installed iap-pki, the CA kept out of the daemons' reach, and the
    # certificates installed where the packaged configurations expect them.
    for args in (["init-ca", "/tmp/ca"], ["issue", "/tmp/ca", "--role", "manager", "localhost"],
                 ["issue", "/tmp/ca", "--role", "sensor", "sensor.localhost"]):
        root.run(["iap-pki", *args])
    for source, target in (("localhost", "manager"), ("sensor.localhost", "sensor")):
        root.run(["install", "-m", "0644", f"/tmp/ca/{source}.crt", f"/etc/iapd/tls/{target}.crt"])
        root.run(["install", "-g", "iapd", "-m", "0640", f"/tmp/ca/{source}.key", f"/etc/iapd/tls/{target}.key"])
    root.run(["install", "-m", "0644", "/tmp/ca/ca.crt", "/etc/iapd/tls/ca.crt"])

    manager_port, proxy_port, web_port = free_port(), free_port(), free_port()
    _configure(root, "manager", identity="localhost", listen=[f"tcp:{manager_port}:interface=127.0.0.1"],
               web={"listen": f"tcp:{web_port}:interface=127.0.0.1"})
    _configure(root, "proxy", identity="proxy.localhost", listen=[f"tcp:{proxy_port}:interface=127.0.0.1"],
               routes=[{"match": "localhost", "upstream": f"tcp:host=127.0.0.1:port={manager_port}"}],
               allow={"networks": ["127.0.0.0/8"]})
    _configure(root, "sensor", identity="sensor.localhost", manager="localhost",
               connect=f"tcp:host=127.0.0.1:port={proxy_port}", heartbeat=0)
    # iap-send talks to the manager directly, with the same certificate.
    direct = yaml.safe_load((root / "/etc/iapd/sensor.yaml").read_text())
    direct.update(connect=f"tcp:host=127.0.0.1:port={manager_port}")
    (root / "/tmp/direct.yaml").write_text(yaml.safe_dump(direct))
    # What systemd's RuntimeDirectory=iapd does for the sensor unit.
    root.run(["install", "-d", "-o", "iapd", "-g", "iapd", "-m", "0750", "/run/iapd"])

    daemons = Daemons(root, tmp_path)
    try:
        daemons.start("manager")
        daemons.wait_listening("manager", manager_port)
        (root / "/tmp/one.xml").write_text(ALERT.format(id="one", text="sent with iap-send"))
        sent = root.run(["iap-send", "-c", "/tmp/direct.yaml", "/tmp/one.xml"], timeout=60)
        assert "acknowledged" in sent.stdout, sent.stdout
        [alert] = _alerts(root)
        assert (alert["sensor"], alert["via"], alert["idmef"]["messageid"]) == ("sensor.localhost", [], "one")
        assert _owner_mode(root, "/var/lib/iapd/alerts.db")[:2] == ("iapd", "iapd")

        # systemctl reload: the manager takes SIGHUP and goes on serving
        daemons.reload("manager")
        (root / "/tmp/two.xml").write_text(ALERT.format(id="two", text="after SIGHUP"))
        root.run(["iap-send", "-c", "/tmp/direct.yaml", "/tmp/two.xml"], timeout=60)

        # the sensor daemon, through the proxy, from its packaged drop directory
        daemons.start("proxy")
        daemons.wait_listening("proxy", proxy_port)
        daemons.start("sensor")
        drop = root / "/var/lib/iapd/outgoing"
        deadline = time.monotonic() + 60
        while not drop.is_dir():
            daemons.alive("sensor")
            assert time.monotonic() < deadline, daemons.log("sensor")
            time.sleep(0.1)
        (root / "/var/lib/iapd/outgoing/three.tmp").write_text(ALERT.format(id="three", text="from the drop directory"))
        os.rename(drop / "three.tmp", drop / "three.xml")
        alerts = _wait_alerts(root, 3)
        assert [(a["idmef"]["messageid"], a["sensor"], a["via"]) for a in alerts] == [
            ("one", "sensor.localhost", []),
            ("two", "sensor.localhost", []),
            ("three", "sensor.localhost", ["proxy.localhost"]),
        ], (alerts, daemons.log("sensor"), daemons.log("proxy"))
        # /metrics on Debian's prometheus-client
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=30) as response:
            metrics = response.read().decode()
        assert re.search(r"^iap_alerts_stored_total 3\.0$", metrics, re.M), metrics

        for role in ("sensor", "proxy"):
            daemons.reload(role)
        for role in ("sensor", "proxy", "manager"):
            daemons.alive(role)
        # structured logs: every connection event names the connection and, once known, the sensor
        ready = [e for e in daemons.events("manager") if e["message"].startswith("sensor sensor.localhost ready")]
        assert len(ready) >= 3 and all(e["sensor"] == "sensor.localhost" and e["conn"] for e in ready), ready
    finally:
        daemons.stop_all()
        root.run(["rm", "-rf", "/run/iapd"])
    for role in ("manager", "proxy", "sensor"):
        log = daemons.log(role)
        assert "Traceback" not in log and "Unhandled" not in log, f"iap-{role}:\n{log}"


def test_purge(installed: Installed) -> None:
    root = installed.root
    root.run(["apt-get", "purge", "-y", "-q", "iapd"], timeout=300)
    for gone in ("/etc/iapd", "/var/lib/iapd", "/usr/lib/python3/dist-packages/iapd", "/usr/bin/iap-send"):
        assert not (root / gone).exists(), gone
    assert b"iapd" not in (root / "/usr/lib/python3/dist-packages/twisted/plugins/dropin.cache").read_bytes()
    after = debroot.snapshot(root, UNWATCHED)
    changed = {p for p in installed.before.keys() | after.keys() if installed.before.get(p) != after.get(p)}
    assert changed <= KEPT_CHANGES, sorted(changed - KEPT_CHANGES)
    # the system user stays, as documented
    assert root.run(["getent", "passwd", "iapd"], check=False).returncode == 0


# -- the sources alone: no root needed --------------------------------------------------


def test_packaged_configurations_load(tmp_path: Path) -> None:
    """debian/adapt-conf's output is valid and points at the packaged layout."""
    from iapd import config

    for role in ROLES:
        out = run(["sh", str(DEBIAN / "adapt-conf"), str(ROOT / "conf" / f"{role}.yaml")], timeout=30).stdout
        path = tmp_path / f"{role}.yaml"
        path.write_text(out)
        loaded = getattr(config, f"load_{role}")(path)
        assert "systemctl reload iap-" + role in out
        if role != "proxy":
            assert str(loaded.tls.certificate).startswith("/etc/iapd/tls/")
            assert str(loaded.tls.key) == f"/etc/iapd/tls/{role}.key"
    sensor = config.load_sensor(tmp_path / "sensor.yaml")
    assert str(sensor.spool) == "/var/lib/iapd/spool"
    assert all(str(i.path).startswith(("/var/lib/iapd/", "/run/iapd/")) for i in sensor.inputs)


def test_units() -> None:
    """The units name the right plugin and configuration, share the hardening, verify."""
    texts = {unit: (DEBIAN / "systemd" / unit).read_text() for unit in UNITS}
    hardening = None
    for unit, text in texts.items():
        role = unit[len("iap-"):-len(".service")]
        assert (
            f"ExecStart=/usr/bin/twistd3 --nodaemon --pidfile= --logger iapd.logs.json_observer"
            f" iap-{role} -c /etc/iapd/{role}.yaml\n"
        ) in text
        assert "User=iapd\n" in text and "StateDirectory=iapd\n" in text
        assert "ExecReload=/bin/kill -HUP $MAINPID\n" in text
        assert "Type=notify\n" in text  # iapd.sdnotify: started once the ports are bound
        ours = [line for line in text.splitlines() if line.startswith(("Protect", "Private", "Restrict", "Capability",
                                                                        "NoNewPrivileges", "SystemCall", "Lock"))]
        assert "CapabilityBoundingSet=" in ours and "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX" in ours
        assert hardening in (None, ours), unit
        hardening = ours
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    for unit, text in texts.items():
        # verify wants ExecStart's program to exist: stand in for twistd3 where the host lacks it
        if not os.access("/usr/bin/twistd3", os.X_OK):
            text = text.replace("/usr/bin/twistd3", shutil.which("true") or "/bin/true")
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"iapd-verify-{os.getpid()}" / unit
        path.parent.mkdir(exist_ok=True)
        try:
            path.write_text(text)
            out = run([analyze, "verify", "--man=no", str(path)], timeout=60, check=False)
        finally:
            shutil.rmtree(path.parent)
        assert out.returncode == 0 and out.stdout.strip() == "", out.stdout


def _long_options(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text)) - {"--help"}


def _man(page: str) -> str:
    # roff as plain text: font changes dropped, escaped hyphens plain
    return re.sub(r"\\f[BIRP]", "", (MAN / page).read_text()).replace("\\-", "-")


@pytest.mark.parametrize("command, module, subcommands", [
    ("iap-send", "iapd.send", [[]]),
    ("iapctl", "iapd.ctl", [["alerts"], ["sensors"], ["tail"], ["backup"]]),
    ("iap-pki", "iapd.pki_cli", [["init-ca"], ["issue"]]),
])
def test_man_pages_cover_commands(command: str, module: str, subcommands: list[list[str]]) -> None:
    """Every option a command's --help shows is in its man page."""
    from .processes import run as run_module

    page = _man(f"{command}.1")
    for sub in subcommands:
        helped = run_module([module, *sub, "--help"])
        assert helped.returncode == 0, helped.stderr
        missing = _long_options(helped.stdout) - _long_options(page)
        assert not missing, (command, sub, missing)
        for word in sub:
            assert word in page


@pytest.mark.parametrize("role", ROLES)
def test_man_pages_cover_plugins(role: str) -> None:
    import importlib

    options = importlib.import_module(f"iapd.{role}_tap").Options
    page = _man(f"iap-{role}.8")
    names = [p[0] for p in getattr(options, "optParameters", [])] + [f[0] for f in getattr(options, "optFlags", [])]
    for name in names:
        assert f"--{name}" in page, (role, name)
    assert f"/etc/iapd/{role}.yaml" in page and "SIGHUP" in page
