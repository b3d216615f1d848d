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
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH, Chain, Manager, env, free_port, make_pki, stop  # noqa: E402


def relay_in_front(kind: str, target_port: int, workdir: Path) -> Chain:
    """No relay (C{direct}), or one relay process of C{kind} in front of C{target_port}."""
    return Chain("iap-proxy" if kind == "direct" else kind, 0 if kind == "direct" else 1, target_port, workdir)


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


def iap_run(port: int, workdir: Path, count: int) -> tuple[float, int]:
    """Alerts/s from one real sensor connection (window 64) to the real manager through C{port}."""
    out = subprocess.run(
        [sys.executable, str(BENCH / "loadgen.py"), "--port", str(port), "--pki", str(workdir / "pki"),
         "--window", "64", "--duration", str(max(1.0, count / 5000)), "--tag", f"relay{port % 10000}"],
        env=env(), capture_output=True, text=True, timeout=600,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else None
    if out.returncode != 0 or result is None or result["errors"] or result["sent"] != result["acked"]:
        raise SystemExit(f"iap run failed: {result and result['errors']} {out.stderr[-2000:]}")
    return result["rate"], result["acked"]


def measure(kinds: list[str], target: int, workdir: Path, run: Callable[[int], float | tuple[float, int]],
            units: float) -> dict[str, tuple[float, float]]:
    """{relay: (rate, relay CPU microseconds per unit)}"""
    results = {}
    for kind in kinds:
        relay = relay_in_front(kind, target, workdir)
        try:
            before = relay.cpu()
            outcome = run(relay.port)
            used = relay.cpu() - before
        finally:
            relay.stop()
        rate, done = outcome if isinstance(outcome, tuple) else (outcome, units)
        results[kind] = (rate, used / done * 1e6)
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
    echo = subprocess.Popen([sys.executable, str(BENCH / "echo_server.py"), str(echo_port)], stdout=subprocess.PIPE)
    make_pki(workdir / "pki")
    manager = Manager(workdir, workdir / "pki")
    manager_port = manager.port
    try:
        assert echo.stdout is not None and echo.stdout.readline().strip() == b"ready"
        rows = [
            ("ping-pong 1 KiB", "msg/s", "us/msg", measure(kinds, echo_port, workdir, lambda p: ping_pong(p, pings), pings)),
            ("bulk 64 KiB writes", "MB/s", "us/MB", measure(kinds, echo_port, workdir, lambda p: bulk(p, megabytes), megabytes)),
            ("IAP 1 KiB, window 64", "alerts/s", "us/alert",
             measure(kinds, manager_port, workdir, lambda p: iap_run(p, workdir, alerts), alerts)),
        ]
    finally:
        stop(echo)
        manager.stop()
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
