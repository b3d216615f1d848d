"""
What a relay costs: iap-proxy against a direct connection and against socat.

    python3 bench/relay.py            # full run, prints a table
    python3 bench/relay.py --smoke    # seconds, for CI: checks the harness still works

Three measurements, each through no relay, iap-proxy, and socat, all on loopback with
the relay in its own process:

  ping-pong   one 1 KiB message at a time, echoed back: messages/s, and relay CPU per
              message (stop-and-wait senders pay the relay's per-chunk cost in latency)
  bulk        64 KiB writes echoed back while more are written: MB/s one way, and relay
              CPU per MB
  iap         a real manager (SQLite, durable acks) and a real sensor connection with a
              window of 64, 1 KiB alerts: alerts/s and relay CPU per alert

Each figure is printed next to the direct baseline of the same run.  Speed is measured,
never asserted; the run fails only if an echo comes back wrong or an alert is not
acknowledged.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {timeout}s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of C{pid} and of its children that have been reaped."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / TICKS


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


class Relay:
    """A relay process in front of C{target_port}, or none at all."""

    def __init__(self, kind: str, target_port: int, workdir: Path) -> None:
        self.kind = kind
        self.proc: subprocess.Popen[bytes] | None = None
        if kind == "direct":
            self.port = target_port
            return
        self.port = free_port()
        if kind == "iap-proxy":
            conf = workdir / f"proxy-{self.port}.yaml"
            conf.write_text(
                "identity: bench-proxy.test\n"
                f'listen: ["tcp:{self.port}:interface=127.0.0.1"]\n'
                f'routes: [{{match: "*", upstream: "tcp:host=127.0.0.1:port={target_port}"}}]\n'
            )
            cmd = [*TWISTD, "--nodaemon", "--pidfile=", "--logfile=/dev/null", "iap-proxy", "-c", str(conf)]
        elif kind == "socat":
            cmd = ["socat", f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork,nodelay",
                   f"TCP:127.0.0.1:{target_port},nodelay"]
        else:
            raise ValueError(kind)
        self.proc = subprocess.Popen(cmd, env=env(), cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def cpu(self) -> float:
        """
        CPU seconds used by the relay.  socat forks a child per connection; once the
        connection is over the child is reaped and its time is in the parent's.
        """
        if self.proc is None:
            return 0.0
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        deadline = time.monotonic() + 10
        while children.exists() and children.read_text().split() and time.monotonic() < deadline:
            time.sleep(0.05)
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def connect_through(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(b"IAP/0.2 CONNECT bench.test\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = s.recv(100)
        if not chunk:
            raise SystemExit("relay closed during setup")
        answer += chunk
    if not answer.startswith(b"IAP/0.2 200"):
        raise SystemExit(f"relay refused: {answer!r}")
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        chunk = s.recv(min(262144, n - got))
        if not chunk:
            raise SystemExit("connection closed early")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def ping_pong(port: int, count: int) -> float:
    s = connect_through(port)
    message = os.urandom(1024)
    start = time.perf_counter()
    for _ in range(count):
        s.sendall(message)
        if recv_exactly(s, len(message)) != message:
            raise SystemExit("echo mismatch")
    elapsed = time.perf_counter() - start
    s.close()
    return count / elapsed


def bulk(port: int, megabytes: int) -> float:
    s = connect_through(port)
    block = os.urandom(65536)
    total = megabytes * 1024 * 1024
    received = [0]

    def reader() -> None:
        while received[0] < total:
            chunk = s.recv(262144)
            if not chunk:
                return
            received[0] += len(chunk)

    t = threading.Thread(target=reader)
    start = time.perf_counter()
    t.start()
    sent = 0
    while sent < total:
        s.sendall(block)
        sent += len(block)
    t.join(120)
    elapsed = time.perf_counter() - start
    s.close()
    if received[0] != total:
        raise SystemExit(f"bulk: sent {total}, echoed {received[0]}")
    return total / elapsed / 1e6


def iap_run(port: int, workdir: Path, count: int) -> float:
    """Alerts/s from a real sensor connection to the real manager through C{port}."""
    script = workdir / "send_n.py"
    script.write_text(
        "import sys, time\n"
        "from twisted.internet import endpoints, task\n"
        "from iapd.client import SensorSettings, deliver\n"
        "from iapd.tls import load_material\n"
        "def main(reactor, port, count, pki):\n"
        "    m = load_material(f'{pki}/sensor.bench.crt', f'{pki}/sensor.bench.key', f'{pki}/ca.crt')\n"
        "    s = SensorSettings(manager='manager.bench', material=m, window=64)\n"
        "    ep = endpoints.TCP4ClientEndpoint(reactor, '127.0.0.1', int(port))\n"
        "    alerts = [('application/x-idef-alert', b'%08d' % i + b'x' * 1016) for i in range(int(count))]\n"
        "    t = time.perf_counter()\n"
        "    def done(outcomes):\n"
        "        bad = [o for o in outcomes if not o.acknowledged]\n"
        "        if bad: raise SystemExit(f'{len(bad)} not acknowledged: {bad[0]}')\n"
        "        print(len(outcomes) / (time.perf_counter() - t))\n"
        "    return deliver(reactor, ep, s, alerts).addCallback(done)\n"
        "task.react(main, sys.argv[1:])\n"
    )
    out = subprocess.run(
        [sys.executable, str(script), str(port), str(count), str(workdir / "pki")],
        env=env(), capture_output=True, text=True, timeout=600,
    )
    if out.returncode != 0:
        raise SystemExit(f"iap run failed: {out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def start_manager(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    from iapd import pki

    pki.init_ca(workdir / "pki")
    pki.issue(workdir / "pki", "manager", "manager.bench")
    pki.issue(workdir / "pki", "sensor", "sensor.bench")
    port = free_port()
    (workdir / "manager.yaml").write_text(
        "identity: manager.bench\n"
        f'listen: ["tcp:{port}:interface=127.0.0.1"]\n'
        "tls: {certificate: pki/manager.bench.crt, key: pki/manager.bench.key, ca: pki/ca.crt}\n"
        'store: "sqlite:///bench.db"\n'
    )
    proc = subprocess.Popen(
        [*TWISTD, "--nodaemon", "--pidfile=", "--logfile=manager.log", "iap-manager", "-c", "manager.yaml"],
        env=env(), cwd=workdir,
    )
    wait_port(port)
    return proc, port


def measure(kinds: list[str], target: int, workdir: Path, run: Callable[[int], float], units: float) -> dict[str, tuple[float, float]]:
    """{relay: (rate, relay CPU microseconds per unit)}"""
    results = {}
    for kind in kinds:
        relay = Relay(kind, target, workdir)
        try:
            before = relay.cpu()
            rate = run(relay.port)
            used = relay.cpu() - before
        finally:
            relay.stop()
        results[kind] = (rate, used / units * 1e6)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny counts: checks the harness, not the speed")
    args = parser.parse_args()
    pings, megabytes, alerts = (300, 16, 500) if args.smoke else (20000, 1024, 20000)
    kinds = ["direct", "iap-proxy"] + (["socat"] if shutil.which("socat") else [])
    if "socat" not in kinds:
        print("socat is not installed (apt-get install socat): comparing with direct only")

    workdir = Path(tempfile.mkdtemp(prefix="iapd-bench-"))
    echo_port = free_port()
    echo = subprocess.Popen([sys.executable, str(ROOT / "bench" / "echo_server.py"), str(echo_port)], stdout=subprocess.PIPE)
    manager, manager_port = start_manager(workdir)
    try:
        assert echo.stdout is not None and echo.stdout.readline().strip() == b"ready"
        rows = [
            ("ping-pong 1 KiB", "msg/s", "us/msg", measure(kinds, echo_port, workdir, lambda p: ping_pong(p, pings), pings)),
            ("bulk 64 KiB writes", "MB/s", "us/MB", measure(kinds, echo_port, workdir, lambda p: bulk(p, megabytes), megabytes)),
            ("IAP 1 KiB, window 64", "alerts/s", "us/alert",
             measure(kinds, manager_port, workdir, lambda p: iap_run(p, workdir, alerts), alerts)),
        ]
    finally:
        for proc in (echo, manager):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nrelay benchmark ({'smoke' if args.smoke else 'full'} run; loopback, {os.cpu_count()} cores)")
    print(f"{'test':<22} {'relay':<10} {'rate':>12} {'vs direct':>10} {'relay CPU':>12}")
    for name, unit, cpu_unit, result in rows:
        base = result["direct"][0]
        for kind in kinds:
            rate, cpu = result[kind]
            cpu_text = "-" if kind == "direct" else f"{cpu:,.1f} {cpu_unit}"
            print(f"{name:<22} {kind:<10} {rate:>9,.0f} {unit:<2} {rate / base:>9.2f}x {cpu_text:>12}")
        if "socat" in result:
            print(f"{'':<22} iap-proxy / socat rate: {result['iap-proxy'][0] / result['socat'][0]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
