"""
Where the manager's memory per idle TLS sensor goes: Python's share, measured alone.

    python3 bench/py_memory.py            # about half a minute: 300 idle sensors
    python3 bench/py_memory.py --smoke    # for CI: checks the harness still works

C{bench/tls_memory.py} measures OpenSSL's share of an idle connection; this measures the
rest, the Python objects a real manager keeps for one.  It starts C{twistd iap-manager}
under C{tracemalloc}, sets up a few sensors to warm it up (first-use caches, the
store's first batch), takes a snapshot, sets up N more through iapd's real sensor setup
(L{bench/loadgen.py} C{--hold}: CONNECT, upgrade, mutual TLS, version verify) and leaves
them idle, and takes another.  It prints the Python memory the N connections hold each,
split between iapd's own code, Twisted and the rest, and the lines that allocated most
of it.

Nothing is asserted about the sizes; the run fails if a sensor could not be set up.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import BENCH, ROOT, BenchError, Manager, env  # noqa: E402

# twistd with tracemalloc on from the start; SIGUSR1 writes a snapshot to the next file
# name given on the command line (argv[1:] before twistd's own arguments).
TRACED_TWISTD = """
import gc, signal, sys, tracemalloc
tracemalloc.start(1)
names = sys.argv[1].split(",")
del sys.argv[1]
def snapshot(signum, frame):
    gc.collect()
    tracemalloc.take_snapshot().dump(names.pop(0))
signal.signal(signal.SIGUSR1, snapshot)
from twisted.scripts.twistd import run
sys.argv[0] = "twistd"
run()
"""


def hold(port: int, pki: Path, connections: int, first: int, tag: str) -> subprocess.Popen[str]:
    """C{connections} sensors set up and idle until their standard input closes."""
    proc = subprocess.Popen(
        [sys.executable, str(BENCH / "loadgen.py"), "--port", str(port), "--pki", str(pki),
         "--connections", str(connections), "--first-index", str(first), "--window", "16", "--size", "1024",
         "--duration", "1", "--tag", tag, "--hold"],
        env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    ready = json.loads(line) if line else {"ready": 0, "errors": ["the load generator exited"]}
    if ready["ready"] != connections or ready["errors"]:
        common.stop(proc)
        raise BenchError(f"{ready['ready']} of {connections} sensors set up: {ready['errors'][:3]}")
    return proc


def take(manager: Manager, path: Path) -> tracemalloc.Snapshot:
    manager.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 60
    while not path.exists():
        manager.alive()
        if time.monotonic() > deadline:
            raise BenchError("the manager wrote no snapshot in 60 s")
        time.sleep(0.2)
    time.sleep(0.5)  # the dump is written in one go, but let it close
    return tracemalloc.Snapshot.load(str(path))


def owner(filename: str) -> str:
    for part, name in (("/iapd/", "iapd"), ("/twisted/", "Twisted"), ("/OpenSSL/", "pyOpenSSL")):
        if part in filename:
            return name
    return "the rest"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--smoke", action="store_true", help="20 connections: checks the harness, figures mean little")
    args = parser.parse_args()
    count = 20 if args.smoke else args.connections

    work = Path(tempfile.mkdtemp(prefix="iapd-pymem-"))
    pki = common.make_pki(work / "pki")
    before, after = work / "before.snapshot", work / "after.snapshot"
    manager = Manager(work, pki, command=[sys.executable, "-c", TRACED_TWISTD, f"{before},{after}"])
    loads: list[subprocess.Popen[str]] = []
    try:
        loads.append(hold(manager.port, pki, 5, 0, "warm"))
        time.sleep(1)
        first = take(manager, before)
        loads.append(hold(manager.port, pki, count, 10, "idle"))
        time.sleep(2)  # the last sensors' setup lines logged, their deadlines gone
        second = take(manager, after)
    finally:
        for proc in loads:
            common.stop(proc, 30)
        manager.stop()

    by_line = second.compare_to(first, "lineno")
    total = sum(s.size_diff for s in by_line)
    shares: dict[str, int] = {}
    for stat in by_line:
        name = owner(stat.traceback[0].filename)
        shares[name] = shares.get(name, 0) + stat.size_diff
    print(f"Python objects per idle TLS sensor connection on the manager, {count} connections"
          f" (Python {sys.version.split()[0]}; tracemalloc)")
    print(f"  all        {total / count:8.0f} B")
    for name, size in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {name:10} {size / count:8.0f} B")
    print("Lines that allocated most of it (B per connection, allocations per connection):")
    for stat in by_line[:12]:
        frame = stat.traceback[0]
        where = frame.filename.split("/site-packages/")[-1].removeprefix(f"{ROOT}/")
        print(f"  {stat.size_diff / count:7.0f} {stat.count_diff / count:5.1f}  {where}:{frame.lineno}")


if __name__ == "__main__":
    main()
