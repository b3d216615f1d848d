"""
The peers iapd is compared with, on the same machine in the same run: rsyslog RELP and
Prelude SIEM's manager, both from Debian's packages (C{bench/install-peers}).

Each peer runs as private processes started here with their own configuration, pid
files and work directories in the benchmark's temporary directory, on 127.0.0.1 and
free ports; system services are never started, stopped or reconfigured.  Prelude keeps
analyzer profiles only under /etc/prelude/profile: the benchmark makes two of its own
there (C{iapd-bench-manager}, C{iapd-bench-sensor}) and deletes them when done.

Delivered messages are counted at the peer's output (rsyslog's omfile, prelude's xmlmod
log), and a run where any message is missing or doubled fails like an iapd run.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from common import BenchError, Process, free_port, stop, wait_port

DEBIAN_PYTHON = "/usr/bin/python3"  # python3-prelude is built for Debian's interpreter


def rsyslog_available() -> str | None:
    """Why rsyslog RELP cannot run here, or None."""
    if not shutil.which("rsyslogd"):
        return "rsyslogd is not installed (bench/install-peers)"
    mods = Path("/usr/lib/x86_64-linux-gnu/rsyslog")
    for mod in ("imrelp.so", "omrelp.so", "lmnsd_gtls.so"):
        if not any(Path(p).joinpath(mod).exists() for p in (mods, "/usr/lib/rsyslog")):
            return f"rsyslog module {mod} is missing (rsyslog-relp, rsyslog-gnutls)"
    return None


def prelude_available() -> str | None:
    """Why Prelude cannot run here, or None."""
    if not shutil.which("prelude-manager") or not shutil.which("prelude-admin"):
        return "prelude-manager is not installed (bench/install-peers)"
    probe = subprocess.run([DEBIAN_PYTHON, "-c", "import prelude"], capture_output=True, timeout=60) \
        if Path(DEBIAN_PYTHON).exists() else None
    if probe is None or probe.returncode != 0:
        return "python3-prelude is not installed for /usr/bin/python3 (bench/install-peers)"
    if os.geteuid() != 0:
        return "Prelude profiles live in /etc/prelude/profile: run as root"
    return None


def flat_message(tag: str, seq: int, size: int) -> bytes:
    """One syslog line of C{size} octets (newline included) carrying a unique id."""
    head = b"<13>bench: " + f"{tag}-{seq:010d} ".encode()
    body = b"GET /index.php?id=1 HTTP/1.1 Host: www.example.com User-Agent: curl/8.0 " * (size // 70 + 1)
    return head + body[: size - len(head) - 1] + b"\n"


def tls_files(directory: Path) -> Path:
    """A CA, a server and a client certificate (ECDSA P-256) for RELP over TLS."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(n: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, n)])

    def builder(subject: str, issuer: x509.Name, key: Any) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=7)))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = builder("relp bench CA", name("relp bench CA"), ca_key).add_extension(
        x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256())
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = builder(f"{who}.bench", ca.subject, key).add_extension(
            x509.SubjectAlternativeName([x509.DNSName(f"{who}.bench")]), critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        ).sign(ca_key, hashes.SHA256())
        (directory / f"{who}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{who}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    return directory


class OutputCounter:
    """Counts a marker in a file that grows, reading only what is new."""

    def __init__(self, path: Path, marker: bytes) -> None:
        self.path = path
        self.marker = marker
        self.count = 0
        self._offset = 0
        self._tail = b""

    def poll(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self.count
        if data:
            self._offset += len(data)
            chunk = self._tail + data
            self.count += chunk.count(self.marker)
            keep = len(self.marker) - 1
            self._tail = chunk[-keep:] if keep else b""
            # a marker cut at the end is counted next time, with the bytes that follow;
            # one wholly inside the kept tail was counted already: drop its start
            if self.marker in self._tail:
                self._tail = b""
        return self.count


def wait_delivered(counter: OutputCounter, expected: int, started: float, timeout: float,
                   procs: list[Process]) -> tuple[float, float]:
    """Poll until C{expected} messages arrived; (first seen, last seen) times."""
    first = None
    deadline = started + timeout
    last_change, last_count = time.perf_counter(), -1
    while True:
        n = counter.poll()
        now = time.perf_counter()
        if n and first is None:
            first = now
        if n != last_count:
            last_change, last_count = now, n
        if n >= expected:
            return first or now, now
        for p in procs:
            p.alive()
        if now > deadline or now - last_change > 20:
            raise BenchError(f"{counter.path.name}: {n} of {expected} messages arrived (lost messages or a stalled peer)")
        time.sleep(0.01)


# -- rsyslog RELP ----------------------------------------------------------------------

def run_relp(workdir: Path, size: int, count: int, window: int | None, tls: bool, tag: str) -> dict[str, Any]:
    """
    rsyslog A (imtcp in, omrelp out) -> rsyslog B (imrelp in, omfile out), on loopback.

    A plain-TCP feeder hands A C{count} messages; the rate is measured at B's output
    file from the first line to the last, and every id must be there once.
    """
    d = workdir / f"relp-{tag}"
    (d / "wa").mkdir(parents=True)
    (d / "wb").mkdir()
    certs = tls_files(workdir / "relp-pki")
    relp_port, tcp_port = free_port(), free_port()
    out = d / "out.log"
    tls_in = (f' tls="on" tls.caCert="{certs}/ca.pem" tls.myCert="{certs}/server.pem" tls.myPrivKey="{certs}/server.key"'
              ' tls.authMode="name" tls.permittedPeer=["client.bench"]') if tls else ""
    tls_out = (f' tls="on" tls.caCert="{certs}/ca.pem" tls.myCert="{certs}/client.pem" tls.myPrivKey="{certs}/client.key"'
               ' tls.authMode="name" tls.permittedPeer=["server.bench"]') if tls else ""
    win = f' windowSize="{window}"' if window else ""
    (d / "b.conf").write_text(
        f'global(workDirectory="{d}/wb" maxMessageSize="16k")\n'
        'module(load="imrelp")\n'
        f'input(type="imrelp" port="{relp_port}" address="127.0.0.1" maxDataSize="16k"{tls_in})\n'
        'template(name="raw" type="string" string="%msg%\\n")\n'
        f'action(type="omfile" file="{out}" template="raw")\n'
    )
    (d / "a.conf").write_text(
        f'global(workDirectory="{d}/wa" maxMessageSize="16k")\n'
        'module(load="imtcp")\n'
        f'input(type="imtcp" port="{tcp_port}" address="127.0.0.1")\n'
        'module(load="omrelp")\n'
        f'action(type="omrelp" target="127.0.0.1" port="{relp_port}"{win}{tls_out})\n'
    )
    receiver = Process("rsyslog-b", ["rsyslogd", "-n", "-f", str(d / "b.conf"), "-i", str(d / "b.pid")], d)
    sender = None
    try:
        wait_port(relp_port, 20, receiver.proc)
        sender = Process("rsyslog-a", ["rsyslogd", "-n", "-f", str(d / "a.conf"), "-i", str(d / "a.pid")], d)
        wait_port(tcp_port, 20, sender.proc)
        cpu_b, cpu_a = receiver.cpu(), sender.cpu()
        feed = b"".join(flat_message(tag, i, size) for i in range(count))
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", tcp_port)) as s:
            s.sendall(feed)
        counter = OutputCounter(out, b"\n")
        first, last = wait_delivered(counter, count, started, 600, [receiver, sender])
        used_b, used_a = receiver.cpu() - cpu_b, sender.cpu() - cpu_a
        time.sleep(0.3)
        lines = out.read_bytes().split(b"\n")[:-1]
        ids = {line.split(None, 1)[0] for line in lines if line.strip()}
        if len(lines) != count or len(ids) != count:
            raise BenchError(f"rsyslog RELP {tag}: {count} messages sent, {len(lines)} lines, {len(ids)} distinct ids")
        return {"rate": count / (last - started), "rate_from_first": count / max(last - first, 1e-9),
                "receiver_cpu_us": used_b / count * 1e6, "sender_cpu_us": used_a / count * 1e6, "count": count}
    finally:
        if sender is not None:
            sender.stop()
        receiver.stop()


# -- Prelude ---------------------------------------------------------------------------

PRELUDE_SENDER = r'''
import prelude, sys, time
count, size, tag, conf = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
client = prelude.ClientEasy("iapd-bench-sensor", prelude.ClientEasy.IDMEF_WRITE, "bench", "NIDS", "iapd-bench", "1")
client.setConfigFilename(conf)
client.start()
pad = ("GET /index.php?id=1 HTTP/1.1 Host: www.example.com User-Agent: curl/8.0 " * (size // 70 + 1))[: max(0, size - 640)]
print("ready", flush=True)
sys.stdin.readline()
for i in range(count):
    idmef = prelude.IDMEF()
    idmef.set("alert.messageid", "%s-%010d" % (tag, i))
    idmef.set("alert.analyzer(0).name", "suricata")
    idmef.set("alert.classification.text", "ET POLICY Suspicious TLS SNI")
    idmef.set("alert.source(0).node.address(0).address", "192.0.2.17")
    idmef.set("alert.target(0).node.address(0).address", "198.51.100.5")
    idmef.set("alert.assessment.impact.severity", "medium")
    idmef.set("alert.additional_data(0).type", "string")
    idmef.set("alert.additional_data(0).meaning", "payload")
    idmef.set("alert.additional_data(0).data", pad)
    client.sendIDMEF(idmef)
print("sent", flush=True)
sys.stdin.readline()
'''

PROFILES = ("iapd-bench-manager", "iapd-bench-sensor")


class PreludeSetup:
    """The benchmark's own Prelude profiles: a manager and a registered sensor."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir / "prelude"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.made = False

    def __enter__(self) -> "PreludeSetup":
        self.remove()
        self.made = True
        port = free_port()
        password = os.urandom(12).hex()
        log = open(self.workdir / "registration.log", "wb")
        server = subprocess.Popen(
            ["prelude-admin", "registration-server", PROFILES[0], f"--passwd={password}", "--keepalive",
             "--no-confirm", "--listen", f"127.0.0.1:{port}", "--uid=0", "--gid=0"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            wait_port(port, 60, server)
            done = subprocess.run(
                ["prelude-admin", "register", PROFILES[1], "idmef:w admin:r", f"127.0.0.1:{port}",
                 f"--passwd={password}", "--uid=0", "--gid=0"],
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
            )
            if "Successful registration" not in done.stdout + done.stderr:
                raise BenchError(f"prelude sensor registration failed: {done.stdout[-500:]} {done.stderr[-500:]}")
        except BaseException:
            self.remove()
            raise
        finally:
            stop(server, 5)
            log.close()
        return self

    def remove(self) -> None:
        for profile in PROFILES:
            if Path("/etc/prelude/profile", profile).exists():
                subprocess.run(["prelude-admin", "del", profile], capture_output=True, timeout=60)

    def __exit__(self, *exc: Any) -> None:
        if self.made:
            self.remove()


def run_prelude(setup: PreludeSetup, size: int, count: int, tag: str) -> dict[str, Any]:
    """
    prelude-manager (xmlmod output only) fed by one python3-prelude client.

    The client sends without per-alert acknowledgement; the rate is measured at the
    manager's output from the client's start signal to the last alert written.
    """
    d = setup.workdir / tag
    d.mkdir()
    port = free_port()
    out = d / "alerts.xml"
    (d / "manager.conf").write_text(
        f"listen = 127.0.0.1:{port}\n[xmlmod]\nlogfile = {out}\ndisable-buffering\n"
    )
    (d / "client.conf").write_text(f"[prelude]\nserver-addr = 127.0.0.1:{port}\n")
    (d / "send.py").write_text(PRELUDE_SENDER)
    manager = Process("prelude-manager", ["prelude-manager", "--config", str(d / "manager.conf"), "--prelude",
                                          f"--profile={PROFILES[0]}", "-P", str(d / "manager.pid")], d)
    sender = None
    try:
        wait_port(port, 30, manager.proc)
        sender = subprocess.Popen([DEBIAN_PYTHON, str(d / "send.py"), str(count), str(size), tag, str(d / "client.conf")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(d / "sender.log", "wb"),
                                  cwd=d, start_new_session=True)
        assert sender.stdin is not None and sender.stdout is not None
        for _ in range(50):  # libprelude logs its connection on standard output first
            line = sender.stdout.readline()
            if not line or line.strip() == b"ready":
                break
        if line.strip() != b"ready":
            raise BenchError(f"the prelude client did not start: {(d / 'sender.log').read_text()[-1000:]}")
        counter = OutputCounter(out, b"<Alert ")
        time.sleep(0.5)
        counter.poll()  # the manager's own start heartbeat is no alert
        base = counter.count
        cpu0 = manager.cpu()
        started = time.perf_counter()
        sender.stdin.write(b"go\n")
        sender.stdin.flush()
        counter.count -= base
        first, last = wait_delivered(counter, count, started, 600, [manager])
        used = manager.cpu() - cpu0
        time.sleep(0.3)
        data = out.read_bytes()
        ids = set()
        marker = f'messageid="{tag}-'.encode()
        pos = data.find(marker)
        while pos >= 0:
            ids.add(data[pos:pos + len(marker) + 10])
            pos = data.find(marker, pos + 1)
        alerts = data.count(b"<Alert ")
        if alerts != count or len(ids) != count:
            raise BenchError(f"prelude {tag}: {count} alerts sent, {alerts} written, {len(ids)} distinct ids")
        sender.stdin.write(b"done\n")
        sender.stdin.flush()
        return {"rate": count / (last - started), "rate_from_first": count / max(last - first, 1e-9),
                "manager_cpu_us": used / count * 1e6, "count": count}
    finally:
        if sender is not None:
            stop(sender, 10)
        manager.stop()
