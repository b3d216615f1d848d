"""
The floor under the manager's memory per idle sensor: the least a Twisted TLS server
keeps for one, on this stack and on Debian's, beside iapd's manager in the same run.

    python3 bench/floor.py                     # 1,000 and 10,000 connections, about 10 minutes
    python3 bench/floor.py --connections 2000  # other counts
    python3 bench/floor.py --smoke             # for CI: 40 connections, checks the harness

Issue 6 asks for less than 20 KiB per idle sensor connection on the manager.  The
"floor" here is a server that does nothing but hold mutual-auth TLS connections, made
with what the brief makes iapd use (Twisted's TLS over pyOpenSSL): it listens with the
manager's own TLS context (L{iapd.tls.server_options}: the benchmark's PKI, a verified
client certificate required), answers one octet to the one each client sends after its
handshake, gives the connection's memory BIOs back at once as the manager does for a
quiet one (L{iapd.tlsbuffers}), calls C{malloc_trim}, and keeps nothing else: no IAP
setup, no store, no timers, no Python object of its own beyond Twisted's C{Protocol}.
It stands for the least a server on this stack keeps with the same TLS (1.3, mutual
authentication, OpenSSL's default groups and suites): C{bench/tls_memory.py} takes
OpenSSL's share apart, and shows what other choices would weigh.

For each stack and count it measures, the way C{bench/run.py}'s scale section does
(RSS over the RSS after a warm-up, divided by the connections, once they are quiet;
full handshakes, every client on this interpreter's stack, Debian's rows included):

  iapd manager          C{twistd iap-manager}, sensors set up by C{bench/loadgen.py}
                        (CONNECT, upgrade, TLS, version verify), measured after
                        QUIET_S so that it has given their TLS buffers back
  floor                 the server above, clients with the sensor's certificate
  ... Ed25519 sensor    both again with the sensors' certificates made for Ed25519
                        keys instead of P-256 (iapctl's): what the choice of key is worth

and then, in a run of its own under tracemalloc (which adds to the RSS), the octets of
Python objects the floor keeps per connection, to set beside iapd's (bench/py_memory.py).

Nothing about the sizes is asserted.  The run fails if a connection does not complete
its handshake and exchange, or (through run.py's checks) if the manager lost or
duplicated an alert of the few each run sends.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts this checkout's iapd first on the path)
from common import MANAGER, SENSOR, BenchError, Manager, Process, env  # noqa: E402

PER_PROCESS = 2500  # client connections per client process, as run.py's load generators
SETUP_LIMIT = 300  # seconds a client process may take to set up its connections
FD_MARGIN = 1000  # descriptors beyond one a connection, for a manager's store and logs (as run.py)


# -- the floor server and its clients (run as subprocesses) ---------------------------


def serve(pki: Path, trace: bool = False) -> None:
    """
    The floor server: prints its port, then holds what connects until SIGTERM.  Twice
    a second it calls C{malloc_trim} and prints how many connections are open and how
    many of them have given their buffers back; with C{trace}, also the octets
    tracemalloc sees Python holding.
    """
    if trace:
        import tracemalloc

        tracemalloc.start()
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import endpoints, reactor, task
    from twisted.internet.protocol import Factory, Protocol
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from iapd import tls, tlsbuffers

    material = tls.load_material(pki / f"{MANAGER}.crt", pki / f"{MANAGER}.key", pki / "ca.crt")
    counts = {"open": 0, "released": 0}  # connections open, and of those, given back

    class Hold(Protocol):
        released = False

        def connectionMade(self) -> None:
            counts["open"] += 1

        def dataReceived(self, data: bytes) -> None:
            self.transport.write(b"y")
            reactor.callLater(0, self.give_back)  # not inside OpenSSL's own call

        def give_back(self) -> None:
            if self.connected and not self.released and tlsbuffers.release(self.transport.getHandle()):
                self.released = True
                counts["released"] += 1

        def connectionLost(self, reason: Any = None) -> None:
            self.connected = False
            counts["open"] -= 1
            counts["released"] -= self.released

    def tick() -> None:
        """Trim, then say how things stand: what the orchestrator waits for."""
        if tlsbuffers._malloc_trim is not None:
            tlsbuffers._malloc_trim(0)
        said: dict[str, int] = dict(counts)
        if trace:
            said["traced"] = tracemalloc.get_traced_memory()[0]
        print(json.dumps(said), flush=True)

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)  # errors
    task.LoopingCall(tick).start(0.5)
    endpoint = endpoints.SSL4ServerEndpoint(reactor, 0, tls.server_options(material), backlog=4096,
                                            interface="127.0.0.1")

    def listening(port: Any) -> None:
        print(json.dumps({"port": port.getHost().port, "buffers": tlsbuffers.unsupported_reason()}), flush=True)

    endpoint.listen(Factory.forProtocol(Hold)).addCallbacks(listening, lambda f: (f.printTraceback(), os._exit(1)))
    reactor.run()


def connect(port: int, pki: Path, count: int, parallel: int = 64) -> None:
    """
    C{count} sensors' TLS connections to the floor server: each sends one octet after its
    handshake and waits for one back.  Prints a line once all are done (or failed, or
    after C{SETUP_LIMIT} seconds), then keeps them until its standard input ends.
    """
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import endpoints, reactor, stdio
    from twisted.internet.protocol import Factory, Protocol

    from iapd import tls

    common.raise_nofile(count + 256)
    material = tls.load_material(pki / f"{SENSOR}.crt", pki / f"{SENSOR}.key", pki / "ca.crt")
    endpoint = endpoints.wrapClientTLS(tls.client_options(material, MANAGER),
                                       endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=120))
    state: dict[str, Any] = {"started": 0, "ready": 0, "errors": [], "t0": time.perf_counter(), "told": False}

    class Client(Protocol):
        ready = False

        def connectionMade(self) -> None:
            self.transport.write(b"x")  # goes once the handshake is done

        def dataReceived(self, data: bytes) -> None:
            if data == b"y" and not self.ready:
                self.ready = True
                state["ready"] += 1
                finished_one()

        def connectionLost(self, reason: Any = None) -> None:
            if not self.ready and not state["told"]:  # a handshake refused, say
                failed(reason)

    def start_one() -> None:
        if state["started"] >= count:
            return
        state["started"] += 1
        endpoint.connect(Factory.forProtocol(Client)).addErrback(failed)

    def failed(f: Any) -> None:
        state["errors"].append(f.getErrorMessage())
        finished_one()

    def tell() -> None:
        if not state["told"]:
            state["told"] = True
            out = {"ready": state["ready"], "errors": state["errors"][:5], "setup_s": time.perf_counter() - state["t0"]}
            print(json.dumps(out), flush=True)

    def finished_one() -> None:
        if state["ready"] + len(state["errors"]) >= count:
            tell()
        else:
            start_one()

    def too_long() -> None:
        if not state["told"]:
            state["errors"].insert(0, f"{count - state['ready']} of {count} not set up after {SETUP_LIMIT} s")
            tell()

    reactor.callLater(SETUP_LIMIT, too_long)

    class Wait(Protocol):
        def connectionLost(self, reason: Any = None) -> None:
            reactor.stop()

    stdio.StandardIO(Wait())
    for _ in range(min(parallel, count)):
        start_one()
    reactor.run()


# -- the orchestration ----------------------------------------------------------------


class Floor(Process):
    """The floor server, under C{python}; with C{trace}, under tracemalloc."""

    def __init__(self, workdir: Path, pki: Path, nofile: int, name: str, python: str | None,
                 trace: bool = False) -> None:
        super().__init__(name, [python or sys.executable, __file__, "--serve", str(pki), *(["--trace"] * trace)],
                         workdir, nofile=nofile)
        try:
            said = self.report(lambda r: "port" in r, "no port said", 30, since=0)
            if said["buffers"]:
                raise BenchError(f"{name} cannot give TLS buffers back: {said['buffers']}")
        except BaseException:
            self.stop()
            raise
        self.port: int = said["port"]

    def said(self) -> list[dict[str, Any]]:
        """What the server has said so far (its log's JSON lines)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def report(self, want: Callable[[dict[str, Any]], bool], what: str, timeout: float = 60,
               since: int | None = None) -> dict[str, Any]:
        """The first thing the server says, from now on (or from its C{since}th line), that C{want}s."""
        seen = len(self.said()) if since is None else since
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.alive()
            new = self.said()[seen:]
            for said in new:
                if want(said):
                    return said
            seen += len(new)
            time.sleep(0.1)
        raise BenchError(f"{self.name}: {what} after {timeout:.0f} s; it last said {self.said()[-1:]}")


def hold(floor: Floor, pki: Path, count: int, workdir: Path) -> list[subprocess.Popen[str]]:
    """Connect C{count} clients to C{floor}, split over processes; returns them, holding."""
    procs, logs = [], []
    for first in range(0, count, PER_PROCESS):
        n = min(PER_PROCESS, count - first)
        logs.append(workdir / f"{floor.name}-client-{first}.log")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen([sys.executable, __file__, "--connect", str(floor.port), str(pki), str(n)],
                                          env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                          stderr=log, start_new_session=True))
    try:
        deadline = time.monotonic() + SETUP_LIMIT + 60
        for p, log_path in zip(procs, logs):
            assert p.stdout is not None
            ready, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = p.stdout.readline() if ready else ""
            if not line:
                why = f"exited with {p.poll()}" if ready else f"said nothing in {SETUP_LIMIT + 60} s"
                raise BenchError(f"a client of {floor.name} {why}: {log_path.read_text(errors='replace')[-2000:]}")
            got = json.loads(line)
            if got["errors"]:
                more = f" (and {len(got['errors']) - 1} more)" if len(got["errors"]) > 1 else ""
                raise BenchError(f"{floor.name}: {got['ready']} connected, then {got['errors'][0]}{more}")
    except BaseException:
        for p in procs:
            common.stop(p)
        raise
    return procs


def measure_floor(workdir: Path, pki: Path, sensor_pki: Path, count: int, python: str | None, name: str,
                  trace: bool = False) -> float:
    """
    The floor server's RSS per connection, in KiB, over its RSS after a warm-up, read
    once every connection is open and has given its buffers back and the heap has been
    trimmed; with C{trace}, the octets of Python objects per connection instead.
    """
    floor = Floor(workdir, pki, count + FD_MARGIN, name, python, trace)
    procs: list[subprocess.Popen[str]] = []
    try:
        warm = hold(floor, sensor_pki, 4, workdir)  # caches and first allocations
        floor.report(lambda r: r.get("released") == 4, "the 4 warm-up connections not given back")
        for p in warm:
            common.stop(p)
        said = floor.report(lambda r: r.get("open") == 0, "the 4 warm-up connections not closed")
        base = said["traced"] if trace else floor.rss()
        procs = hold(floor, sensor_pki, count, workdir)
        said = floor.report(lambda r: r.get("open") == count and r.get("released") == count,
                            f"not all {count} connections open and given back")
        return (said["traced"] - base) / count if trace else (floor.rss() - base) / count
    finally:
        for p in procs:
            common.stop(p, 30)
        floor.stop()


def measure_manager(bench: Any, workdir: Path, sensor_pki: Path, count: int, python: str | None, name: str) -> float:
    from run import QUIET_S

    common.raise_nofile(count + FD_MARGIN)
    manager = Manager(workdir, bench.pki, nofile=count + FD_MARGIN, name=name, python=python)
    saved, bench.pki = bench.pki, sensor_pki  # the load generators take their sensor's files from here
    try:
        bench.load(manager, manager.port, 4, 1024, 16, 0.3)  # warm up, as run.py's scale section
        time.sleep(0.5)
        base = manager.rss()

        def quiet_rss() -> int:  # once the manager has given the quiet connections' TLS buffers back
            time.sleep(QUIET_S)
            return manager.rss()

        r = bench.load(manager, manager.port, count, 1024, 4, 0.2, before_go=quiet_rss)
        return float(r["extra"] - base) / count
    finally:
        bench.pki = saved
        manager.stop()
        manager.remove_store()


def ed25519_pki(pki: Path, directory: Path) -> Path:
    """The sensor's name, roles and CA, for an Ed25519 key (as bench/tls_memory.py's row)."""
    from tls_memory import ed25519_sensor

    directory.mkdir(exist_ok=True)
    shutil.copy(pki / "ca.crt", directory / "ca.crt")
    key_pem, certificate = ed25519_sensor(pki)
    from cryptography.hazmat.primitives import serialization

    (directory / f"{SENSOR}.key").write_bytes(key_pem)
    (directory / f"{SENSOR}.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return directory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", default="1000,10000", help="counts, comma-separated")
    parser.add_argument("--smoke", action="store_true", help="40 connections: checks the harness, figures mean little")
    parser.add_argument("--no-debian", action="store_true", help="this interpreter's stack only")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--serve", metavar="PKI", help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--connect", nargs=3, metavar=("PORT", "PKI", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve), args.trace)
        return 0
    if args.connect:
        connect(int(args.connect[0]), Path(args.connect[1]), int(args.connect[2]))
        return 0

    from run import Bench

    counts = [40] if args.smoke else [int(n) for n in args.connections.split(",")]
    hard = common.nofile_hard()
    for count in [n for n in counts if n + FD_MARGIN > hard]:
        print(f"skipped: {count} connections need {count + FD_MARGIN} descriptors; the limit is {hard}")
        counts.remove(count)
    if not counts:
        raise BenchError("no count of connections fits the descriptor limit")
    stacks: list[tuple[str, str | None]] = [("pip's stack", None)]
    here = common.stack()
    debian, why_not = (None, "") if args.no_debian else common.debian_stack(here)
    if debian is not None:
        stacks.append(("Debian's stack", common.DEBIAN_PYTHON))
    workdir = Path(tempfile.mkdtemp(prefix="iapd-floor-"))
    try:
        bench = Bench(argparse.Namespace(), workdir)
        ed_pki = ed25519_pki(bench.pki, workdir / "pki-ed25519")
        print("Manager memory per idle sensor connection, KiB (RSS over the RSS after a warm-up, per connection,"
              " the connections quiet)")
        for label, info in (("pip's stack", here), ("Debian's stack", debian)):
            if info is not None:
                print(f"  {label}: Python {info['python']} ({info['interpreter']}), Twisted {info['twisted']},"
                      f" pyOpenSSL {info['pyopenssl']}, {info['openssl']}")
        if why_not:
            print(f"  skipped: {why_not}")
        print(f"{'stack':15} {'conns':>6} {'sensor key':10} {'iapd':>7} {'floor':>7} {'iapd - floor':>12}", flush=True)
        for count in counts:
            for stack, python in stacks:
                for key, sensor_pki in (("P-256", bench.pki), ("Ed25519", ed_pki)):
                    tag = f"{stack[:3]}-{count}-{key[:2]}"
                    iapd = measure_manager(bench, workdir, sensor_pki, count, python, f"manager-{tag}")
                    floor = measure_floor(workdir, bench.pki, sensor_pki, count, python, f"floor-{tag}")
                    print(f"{stack:15} {count:>6} {key:10} {iapd:7.1f} {floor:7.1f} {iapd - floor:12.1f}", flush=True)
        traced = min(counts[-1], 500)
        print(f"Python objects per connection in the floor (tracemalloc, {traced} connections, P-256;"
              " bench/py_memory.py measures iapd's):")
        for stack, python in stacks:
            octets = measure_floor(workdir, bench.pki, bench.pki, traced, python, f"floor-{stack[:3]}-py", trace=True)
            print(f"  {stack:15} {octets:,.0f} B", flush=True)
    finally:
        if args.keep:
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
