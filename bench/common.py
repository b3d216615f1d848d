"""
What the benchmarks share: ports, processes, CPU and memory from /proc, a test PKI, the
manager and relays as real processes, and alerts whose loss or duplication can be
counted in the manager's store.

Every process here is started by the benchmark, on 127.0.0.1, with files in a temporary
directory; every process started is stopped (SIGTERM, then SIGKILL after a bounded wait).
Subprocesses import iapd from this checkout (PYTHONPATH), never from site-packages:
L{stack} makes sure of it.
"""

from __future__ import annotations

import base64
import json
import os
import random
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TWISTD_MAIN = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
DEBIAN_PYTHON = "/usr/bin/python3"
"""Debian's interpreter: with Debian's python3-twisted, python3-openssl and the rest of the
.deb's Depends, what a manager installed from the .deb runs on (OpenSSL 3.0 on Debian 12,
not the OpenSSL bundled in cryptography's wheel)."""
TICKS = os.sysconf("SC_CLK_TCK")
MANAGER = "manager.bench"
SENSOR = "sensor.bench"
IDEF = "application/x-idef-alert"


class BenchError(SystemExit):
    """A run that cannot be trusted (lost or duplicated alert, a process that died): exit loudly."""

    def __init__(self, message: str) -> None:
        super().__init__(f"\nBENCHMARK FAILED: {message}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"process {proc.args!r} exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"nothing listens on {port} after {timeout}s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of C{pid} and of its children that have been reaped."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / TICKS


def rss_kib(pid: int) -> int:
    """Resident set size of C{pid} (VmRSS), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for {pid}")


def env() -> dict[str, str]:
    """The environment of every subprocess: this checkout's iapd first on the path."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def twistd(python: str | None = None) -> list[str]:
    """The twistd command, under C{python} (default: this interpreter, with its libraries)."""
    return [python or sys.executable, "-c", TWISTD_MAIN]


_STACK_PROBE = """
import json, os, sys
import attr, cryptography, defusedxml, numpy, plyvel, prometheus_client, service_identity, twisted, yaml
import OpenSSL
from OpenSSL import SSL
import iapd, twisted.plugins.iapd_plugins, iapd.manager_tap
print(json.dumps({"iapd": iapd.__file__, "python": sys.version.split()[0],
                  "interpreter": os.path.realpath(sys.executable)
                  + (", in a venv" if sys.prefix != sys.base_prefix else ""),
                  "twisted": twisted.__version__,
                  "pyopenssl": OpenSSL.__version__, "cryptography": cryptography.__version__,
                  "openssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}))
"""


class StackMissing(Exception):
    """An interpreter that cannot run this checkout's iapd: what it lacks."""


def stack(python: str | None = None) -> dict[str, str]:
    """
    The libraries C{python} runs iapd with (versions of Python, Twisted, pyOpenSSL and
    the OpenSSL it is linked with), checking that it imports this checkout's iapd and
    every library the .deb depends on; L{StackMissing} saying what is missing if not.
    """
    python = python or sys.executable
    try:
        out = subprocess.run([python, "-c", _STACK_PROBE], env=env(), cwd="/", capture_output=True, text=True,
                             timeout=60)
    except OSError as e:
        raise StackMissing(f"{python}: {e}") from None
    if out.returncode != 0:
        raise StackMissing(f"{python} cannot run iapd: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    found: dict[str, str] = json.loads(out.stdout.strip().splitlines()[-1])
    if not found["iapd"].startswith(str(ROOT / "iapd")):
        raise StackMissing(f"{python} imports iapd from {found['iapd']}, not from {ROOT}")
    return found


def debian_stack(here: dict[str, str]) -> tuple[dict[str, str] | None, str]:
    """
    Debian's stack (L{DEBIAN_PYTHON}) when it can run iapd and differs from C{here},
    this interpreter's (L{stack}); otherwise None, and why it is left out.
    """
    try:
        theirs = stack(DEBIAN_PYTHON)
    except StackMissing as e:
        return None, (f"Debian's stack: {e} (bench/install-peers installs python3-twisted, python3-openssl"
                      " and the rest of the .deb's Depends)")
    if theirs == here:
        return None, "Debian's stack: this interpreter runs on it already"
    return theirs, ""


def raise_nofile(wanted: int) -> int:
    """Raise this process's descriptor limit towards C{wanted}; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = min(max(soft, wanted), hard) if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if new != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            if hard == resource.RLIM_INFINITY or wanted > hard:
                pass
            return soft
    return new


def nofile_hard() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def stop(proc: subprocess.Popen[Any] | None, timeout: float = 15) -> None:
    """SIGTERM, a bounded wait, then SIGKILL: for processes this benchmark started."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def make_pki(directory: Path) -> Path:
    """A CA with one manager and one sensor certificate (iapd's own role conventions)."""
    from iapd import pki

    if not (directory / "ca.crt").exists():
        pki.init_ca(directory)
        pki.issue(directory, "manager", MANAGER)
        pki.issue(directory, "sensor", SENSOR)
    return directory


class Process:
    """A daemon this benchmark started; its log goes to a file."""

    def __init__(self, name: str, args: Sequence[str], cwd: Path, nofile: int = 0, extra_env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = cwd / f"{name}.log"
        self._log = open(self.log_path, "ab")
        e = env()
        e.update(extra_env or {})

        def limits() -> None:
            if nofile:
                raise_nofile(nofile)

        self.proc = subprocess.Popen(list(args), cwd=cwd, env=e, stdout=self._log, stderr=subprocess.STDOUT,
                                     preexec_fn=limits, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def rss(self) -> int:
        return rss_kib(self.proc.pid)

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited with {self.proc.returncode}; its log:\n{self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        stop(self.proc)
        self._log.close()


def prefill_store(db: Path, count: int) -> None:
    """
    Make C{db} a store that already holds C{count} 1 KiB alerts, as a manager's does
    after months of service, through iapd's own SQLite code (and so with its digest
    index).  They are written as summarised, so that the manager has nothing to catch
    up on when it starts.
    """
    from iapd.store import AlertRecord, Row, SQLiteBackend

    backend = SQLiteBackend(db)
    backend.open()
    try:
        pad = b"x" * 1024
        for start in range(0, count, 4096):
            rows = [
                Row(AlertRecord(sensor=f"earlier{i % 64}.example.org", content_type="application/idmef+xml",
                                body=(b"<earlier n=%d/>" % i + pad)[:1024]), None)
                for i in range(start, min(count, start + 4096))
            ]
            if not all(backend.commit(rows, {})):
                raise BenchError(f"prefilling {db}: an alert was taken for a retransmission")
    finally:
        backend.close()


class Manager(Process):
    """
    C{twistd iap-manager} on a fresh SQLite store in C{workdir} (or one holding C{prefill}
    alerts), under C{python} (L{twistd}) or started by C{command} (bench/py_memory.py's
    twistd under tracemalloc); or on the C{store} URL, for a subclass that knows how to
    read it (bench/pg.py).
    """

    def __init__(self, workdir: Path, pki_dir: Path, nofile: int = 0, name: str = "manager", prefill: int = 0,
                 python: str | None = None, store: str | None = None, command: Sequence[str] | None = None) -> None:
        self.port = free_port()
        self.db = workdir / f"{name}.db"
        if prefill:
            prefill_store(self.db, prefill)
        conf = workdir / f"{name}.yaml"
        conf.write_text(
            f"identity: {MANAGER}\n"
            f'listen: ["tcp:{self.port}:interface=127.0.0.1:backlog=4096"]\n'
            f"tls: {{certificate: {pki_dir}/{MANAGER}.crt, key: {pki_dir}/{MANAGER}.key, ca: {pki_dir}/ca.crt}}\n"
            f'store: "{store or f"sqlite:///{self.db}"}"\n'
            "limits: {setup_timeout: 120}\n"
        )
        super().__init__(name, [*(command or twistd(python)), "--nodaemon", "--pidfile=", "--logfile=-",
                                "iap-manager", "-c", str(conf)],
                         workdir, nofile=nofile)
        try:
            wait_port(self.port, 30, self.proc)
            if prefill:
                # a manager that has been running for a while answers new alerts from the
                # digest filter; after a start it fills it from the index first (seconds)
                self.wait_log("the digest filter holds", 120)
        except BaseException:
            self.stop()  # the caller has no manager to stop: one that never listened must not stay
            raise

    def wait_log(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log_tail(1 << 20):
            self.alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: no {text!r} in its log after {timeout} s")
            time.sleep(0.1)

    def last_id(self) -> int:
        if not self.db.exists():
            return 0
        deadline = time.monotonic() + 30
        while True:
            try:
                with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30) as db:
                    return db.execute("SELECT coalesce(max(id), 0) FROM alerts").fetchone()[0]
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)  # the manager creates the table just after it listens

    def remove_store(self) -> None:
        """
        Delete the store's files (database, WAL, digest index): with a manager of its
        own for every run, a full run would otherwise leave gigabytes behind.
        """
        for path in self.db.parent.glob(self.db.name + "*"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def unsummarised(self) -> int:
        """Alerts stored whose IDMEF summary the manager has not written yet."""
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30) as db:
            return db.execute("SELECT count(*) FROM alerts WHERE idmef IS NULL").fetchone()[0]

    def wait_summarised(self, timeout: float = 300) -> float:
        """
        Wait until the manager has caught up with the summaries it writes after the
        acknowledgement (so that one run does not pay for the last); how long it took.
        """
        started = time.monotonic()
        while self.unsummarised():
            self.alive()
            if time.monotonic() - started > timeout:
                raise BenchError(f"{self.name}: {self.unsummarised()} alerts still unsummarised after {timeout}s")
            time.sleep(0.1)
        return time.monotonic() - started

    def check_stored(self, after_id: int, acked: int, tag: str) -> None:
        """
        Every alert acknowledged since C{after_id} is in the store exactly once: as many
        rows as acknowledgements, each message id (at a fixed offset, carrying C{tag})
        and each digest once.
        """
        from iapd.bodylog import BodyLogError, BodyReader, log_path

        rows = tagged = 0
        digest_set: set[str] = set()
        id_set: set[bytes] = set()
        with closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)) as db, \
                BodyReader(log_path(self.db)) as bodies:
            # every body as a reader gets it: from the body log, checked against its digest
            for i, sha256, in_row, at, size in db.execute(
                "SELECT id, sha256, body, body_at, body_size FROM alerts WHERE id > ?", (after_id,)
            ):
                try:
                    mid = bodies.body(i, in_row, at, size, sha256)[MID_OFFSET:MID_OFFSET + MID_LENGTH]
                except BodyLogError as e:
                    raise BenchError(f"run {tag}: {e}") from None
                rows += 1
                digest_set.add(sha256)
                id_set.add(mid)
                tagged += mid.startswith(tag.encode())
        digests, ids = len(digest_set), len(id_set)
        if not (rows == digests == ids == tagged == acked):
            raise BenchError(
                f"run {tag}: {acked} alerts acknowledged, but the store holds {rows} new rows, {digests} distinct"
                f" digests, {ids} distinct message ids, {tagged} of this run (lost or duplicated alerts)"
            )


class Relay(Process):
    """A relay process in front of C{target_port}: iap-proxy or socat."""

    def __init__(self, kind: str, target_port: int, workdir: Path, nofile: int = 0) -> None:
        self.kind = kind
        self.port = free_port()
        name = f"{kind}-{self.port}"
        if kind == "iap-proxy":
            conf = workdir / f"{name}.yaml"
            conf.write_text(
                f"identity: proxy-{self.port}.bench\n"
                f'listen: ["tcp:{self.port}:interface=127.0.0.1:backlog=4096"]\n'
                f'routes: [{{match: "*", upstream: "tcp:host=127.0.0.1:port={target_port}"}}]\n'
                "limits: {setup_timeout: 120, max_connections: 100000, max_per_source: 100000}\n"
            )
            cmd = [*twistd(), "--nodaemon", "--pidfile=", "--logfile=/dev/null", "iap-proxy", "-c", str(conf)]
        elif kind == "socat":
            cmd = ["socat", f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork,nodelay,backlog=1024",
                   f"TCP:127.0.0.1:{target_port},nodelay"]
        else:
            raise ValueError(kind)
        super().__init__(name, cmd, workdir, nofile=nofile)
        wait_port(self.port, 30, self.proc)

    def cpu(self) -> float:
        """
        CPU seconds used by the relay and the children it has reaped.  socat forks a
        child per connection: its time reaches the parent once the connection is over.
        """
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        deadline = time.monotonic() + 10
        while self.kind == "socat" and children.exists() and children.read_text().split() \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        return cpu_seconds(self.proc.pid)


class Chain:
    """C{hops} relays of one kind in front of a manager; C{port} is where sensors connect."""

    def __init__(self, kind: str, hops: int, target_port: int, workdir: Path, nofile: int = 0) -> None:
        self.relays: list[Relay] = []
        port = target_port
        try:
            for _ in range(hops):
                relay = Relay(kind, port, workdir, nofile)
                self.relays.append(relay)
                port = relay.port
        except BaseException:
            self.stop()
            raise
        self.port = port

    def cpu(self) -> float:
        return sum(r.cpu() for r in self.relays)

    def stop(self) -> None:
        for relay in self.relays:
            relay.stop()


# -- alerts -------------------------------------------------------------------------

MID_OFFSET = 134  # where the message id starts in every body (checked by make_alert)
MID_LENGTH = 32


def alert_template(size: int) -> tuple[bytes, bytes]:
    """
    A realistic IDMEF Alert of exactly C{size} octets, split around its 32-octet message
    id: C{head + mid + tail}.
    """
    head = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n'
        b'<idmef:IDMEF-Message xmlns:idmef="http://iana.org/idmef" version="1.0">'
        b'<idmef:Alert messageid="'
    )
    assert len(head) == MID_OFFSET, len(head)
    tail_start = (
        b'"><idmef:Analyzer analyzerid="bench-01" name="suricata" class="NIDS"><idmef:Node>'
        b'<idmef:name>sensor.bench</idmef:name></idmef:Node></idmef:Analyzer>'
        b'<idmef:CreateTime ntpstamp="0xe9b1c2d3.0x0">2026-11-23T10:00:00Z</idmef:CreateTime>'
        b'<idmef:Source><idmef:Node><idmef:Address category="ipv4-addr"><idmef:address>192.0.2.17'
        b'</idmef:address></idmef:Address></idmef:Node></idmef:Source><idmef:Target><idmef:Node>'
        b'<idmef:Address category="ipv4-addr"><idmef:address>198.51.100.5</idmef:address></idmef:Address>'
        b'</idmef:Node></idmef:Target><idmef:Classification text="ET POLICY Suspicious TLS SNI"/>'
        b'<idmef:Assessment><idmef:Impact severity="medium"/></idmef:Assessment>'
        b'<idmef:AdditionalData type="string" meaning="payload"><idmef:string>'
    )
    tail_end = b"</idmef:string></idmef:AdditionalData></idmef:Alert></idmef:IDMEF-Message>\n"
    pad = size - len(head) - MID_LENGTH - len(tail_start) - len(tail_end)
    if pad < 0:
        raise ValueError(f"alerts are at least {size - pad} octets")
    return head, tail_start + eve_payload(pad) + tail_end


def eve_payload(size: int) -> bytes:
    """
    C{size} octets of what a Suricata alert logged with its payload carries (iapd's
    sensor puts the EVE line in AdditionalData, iapd/eve.py): the JSON fields, then
    the HTTP request as base64, as printable text and as the base64 of its packet,
    with the cookies, tokens and addresses real traffic varies.  LZ4 keeps 63% of a
    1 KiB alert made with it and 68% of a 4 KiB one; the filler it replaced, one line
    repeated, kept 17%, which flattered a store that compresses (README, "What
    remains").  Nothing in it needs escaping in XML.
    """
    rng = random.Random(size)
    words = ["login", "cart", "static", "img", "api", "v2", "search", "account", "news", "assets"]
    headers = b"".join(
        b"X-%s-%d: %s\r\n" % (rng.choice(words).encode().title(), n, rng.randbytes(24).hex().encode())
        for n in range(8)
    )
    request = (
        b"GET /%s/%s?q=%s;session=%s HTTP/1.1\r\nHost: www.%s.example\r\nUser-Agent: curl/8.%d\r\n"
        b"Cookie: sid=%s; csrftoken=%s\r\nAccept: */*\r\n%s\r\n"
        % (rng.choice(words).encode(), rng.choice(words).encode(), rng.randbytes(12).hex().encode(),
           rng.randbytes(16).hex().encode(), rng.choice(words).encode(), rng.randrange(10),
           rng.randbytes(20).hex().encode(), rng.randbytes(32).hex().encode(), headers)
    )
    printable = request.replace(b"\r\n", b"..")
    packet = rng.randbytes(54) + request
    line = (
        b'{"timestamp":"2026-11-23T10:00:00.%06d+0000","flow_id":%d,"in_iface":"eth0","event_type":"alert",'
        b'"src_ip":"192.0.2.17","src_port":%d,"dest_ip":"198.51.100.5","dest_port":80,"proto":"TCP",'
        b'"alert":{"action":"allowed","gid":1,"signature_id":2013028,"rev":7,'
        b'"signature":"ET POLICY Suspicious TLS SNI","category":"Potential Corporate Privacy Violation",'
        b'"severity":2},"app_proto":"http","payload":"%s","payload_printable":"%s","packet":"%s",'
        b'"packet_info":{"linktype":1}}'
        % (rng.randrange(10**6), rng.randrange(10**15), rng.randrange(1024, 65536),
           base64.b64encode(request), printable, base64.b64encode(packet))
    )
    while len(line) < size:  # a larger alert: more of the same kind of payload, not the same octets
        line += b" " + base64.b64encode(rng.randbytes(48)) + b" " + printable
    return line[:size]


def message_id(tag: str, conn: int, seq: int) -> bytes:
    """32 octets: the run's tag, the connection and the sequence number."""
    mid = f"{tag}-{conn:06d}-{seq:010d}".encode()
    if len(mid) > MID_LENGTH:
        raise ValueError(f"tag {tag!r} is too long")
    return mid.ljust(MID_LENGTH, b"x")


def make_alert(head: bytes, tail: bytes, tag: str, conn: int, seq: int) -> bytes:
    return head + message_id(tag, conn, seq) + tail
