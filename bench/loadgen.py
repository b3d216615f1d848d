"""
A load generator: many sensor connections in one process, driven by iapd's own client.

    python3 bench/loadgen.py --port P --pki DIR --connections 16 --window 256 --size 1024 --duration 5 --tag r1
    python3 bench/loadgen.py ... --rate 1000 --duration 5      # fixed offered load, ack latency
    python3 bench/loadgen.py ... --hold                        # connect, say so, wait for "go" on stdin
    python3 bench/loadgen.py ... --linger                      # when done, keep the connections until SIGTERM

Each connection goes through iapd's real sensor setup (L{iapd.client.SensorFactory}:
CONNECT, upgrade, mutual TLS with role checks, version verify).  In the data phase a
lean driver takes over the connection: it writes pre-framed alerts up to the window and
counts the manager's C{IAP/0.2 200} answers by their bytes, so that the generator's own
Python work per alert stays small and the manager, not the generator, is measured.
Any answer other than 200, and any connection lost with alerts in flight, is reported
as an error; the caller fails the run on it.

Every alert body is unique: its message id (at a fixed offset) names the run's tag, the
connection and the sequence number, so the caller can count them in the store.

Prints one JSON object on stdout when done (with C{--hold}, a first one once every
connection is ready; then it waits for a line: C{go} sends, end of input just closes).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import IDEF, MANAGER, SENSOR, alert_template, message_id, raise_nofile  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402  (no reactor installed by these)
from twisted.internet.protocol import Factory, Protocol  # noqa: E402

OK = b"IAP/0.2 200\r\n\r\n"


class Run:
    """State shared by the connections of one process."""

    def __init__(self, args: argparse.Namespace, reactor: Any) -> None:
        self.args = args
        self.reactor = reactor
        head, tail = alert_template(args.size)
        framing = f"Content-Type: {IDEF}\r\nContent-Length: {args.size}\r\n\r\n".encode()
        self.frame_head = framing + head
        self.frame_tail = tail + b"\r\n\r\n"
        self.drivers: list[Driver] = []
        self.errors: list[str] = []
        self.sending = False
        self.stopping = False
        self.started = 0.0
        self.cpu_at_start = 0.0
        self.latencies: list[float] = []
        self.finished: Any = None
        self.ready_count = 0
        self.failed_setups = 0

    def error(self, text: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(text)
        else:
            self.errors[-1] = f"... and more ({text})"

    def check_done(self) -> None:
        if self.stopping and all(d.inflight == 0 or d.lost for d in self.drivers) and not self.finished.called:
            self.finished.callback(None)


class Driver:
    """The data phase of one connection."""

    def __init__(self, run: Run, index: int, proto: Any) -> None:
        self.run = run
        self.index = index
        self.proto = proto
        self.transport = proto.transport
        self.seq = 0
        self.inflight = 0
        self.acked = 0
        self.credit = 0  # alerts the pacer allows (fixed-rate mode)
        self.lost = False
        self._buf = b""
        self._sent_at: collections.deque[float] = collections.deque()
        proto.dataReceived = self.data_received
        proto.connectionLost = self.connection_lost

    def fill(self) -> None:
        run = self.run
        if run.stopping or not run.sending or self.lost:
            return
        n = run.args.window - self.inflight
        if run.args.rate:
            n = min(n, self.credit)
            self.credit -= max(n, 0)
        if n <= 0:
            return
        head, tail, tag, index, seq = run.frame_head, run.frame_tail, run.args.tag, self.index, self.seq
        out = [head + message_id(tag, index, s) + tail for s in range(seq, seq + n)]
        self.seq = seq + n
        self.inflight += n
        if run.args.rate:
            now = time.perf_counter()
            self._sent_at.extend([now] * n)
        self.transport.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data
        k = len(buf) // len(OK)
        if buf[: k * len(OK)] != OK * k:
            self.run.error(f"connection {self.index}: unexpected answer {buf[:200]!r}")
            self.lost = True
            self.transport.abortConnection()
            return
        self._buf = buf[k * len(OK):]
        if k > self.inflight:
            self.run.error(f"connection {self.index}: {k} answers for {self.inflight} alerts in flight")
            self.transport.abortConnection()
            return
        self.inflight -= k
        self.acked += k
        if self.run.args.rate:
            now = time.perf_counter()
            lat = self.run.latencies
            for _ in range(k):
                lat.append(now - self._sent_at.popleft())
        if self.run.stopping:
            self.run.check_done()
        else:
            self.fill()

    def connection_lost(self, reason: Any = None) -> None:
        self.lost = True
        if self.inflight or not self.run.stopping:
            self.run.error(f"connection {self.index} lost with {self.inflight} alerts in flight:"
                           f" {reason.getErrorMessage() if reason else ''}")
        self.run.check_done()


def connect_all(run: Run, reactor: Any) -> Any:
    """Set up every connection, at most C{--parallel} at a time; fires when all are ready."""
    from twisted.internet import endpoints
    from iapd.client import SensorFactory, SensorSettings
    from iapd.tls import client_options, load_material

    args = run.args
    all_ready: Deferred[None] = Deferred()
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", args.port, timeout=120)
    if args.plain:
        factory: Any = Factory.forProtocol(PlainProtocol)
    else:
        pki = Path(args.pki)
        material = load_material(pki / f"{SENSOR}.crt", pki / f"{SENSOR}.key", pki / "ca.crt")
        settings = SensorSettings(manager=MANAGER, material=material, window=args.window, setup_timeout=300)
        factory = SensorFactory(settings, reactor)
        if not args.resume:
            factory._tls = client_options(material, MANAGER)  # every handshake a full one
    next_index = iter(range(args.first_index, args.first_index + args.connections))
    pending = [0]

    def one() -> None:
        index = next(next_index, None)
        if index is None:
            return
        pending[0] += 1

        def ready(proto: Any) -> None:
            run.drivers.append(Driver(run, index, proto))
            run.ready_count += 1
            settled()

        def failed(failure: Any) -> None:
            run.failed_setups += 1
            run.error(f"connection {index}: setup failed: {failure.getErrorMessage()}")
            settled()

        def settled() -> None:
            pending[0] -= 1
            one()
            if pending[0] == 0 and not all_ready.called:
                all_ready.callback(None)

        def connected(proto: Any) -> Any:
            return proto.ready

        endpoint.connect(factory).addCallback(connected).addCallbacks(ready, failed)

    for _ in range(min(args.parallel, args.connections)):
        one()
    if args.connections == 0:
        all_ready.callback(None)
    return all_ready


class PlainProtocol(Protocol):
    """A connection to the benchmark's plaintext manager: CONNECT, 200, then data."""

    def __init__(self) -> None:
        self.ready: Deferred[Any] = Deferred()
        self._answer = b""

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.transport.write(f"IAP/0.2 CONNECT {MANAGER}\r\n\r\n".encode())

    def dataReceived(self, data: bytes) -> None:
        self._answer += data
        if len(self._answer) >= len(OK) and not self.ready.called:
            if self._answer != OK:
                self.transport.abortConnection()
                self.ready.errback(Exception(f"refused: {self._answer!r}"))
            else:
                self.ready.callback(self)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pki", default="")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--first-index", type=int, default=0)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=0.0, help="offered alerts/s over all connections (0: flood)")
    parser.add_argument("--tag", default="bench")
    parser.add_argument("--hold", action="store_true",
                        help="once all are ready print a line, then send on 'go' or close on end of input")
    parser.add_argument("--linger", action="store_true",
                        help="when done, say so and keep the connections, idle, until stopped (SIGTERM)")
    parser.add_argument("--plain", action="store_true", help="the benchmark's plaintext manager: no TLS")
    parser.add_argument("--resume", action="store_true", help="offer TLS sessions back (default: full handshakes)")
    parser.add_argument("--parallel", type=int, default=64, help="connection setups at once")
    args = parser.parse_args()
    raise_nofile(args.connections + 256)

    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor, task
    run = Run(args, reactor)
    run.finished = Deferred()
    out: dict[str, Any] = {"connections": args.connections, "pid": os.getpid()}

    def emit(data: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(data) + "\n")
        sys.stdout.flush()

    def all_ready(_: Any) -> Any:
        out["ready"] = run.ready_count
        out["setup_s"] = time.perf_counter() - setup_start
        if not args.hold:
            return start_sending()
        # tell the caller, then wait for "go" (send) or the end of standard input (close)
        emit(dict(out, phase="ready", errors=run.errors))
        from twisted.internet import stdio
        from twisted.protocols.basic import LineReceiver

        told: Deferred[bool] = Deferred()

        class Wait(LineReceiver):
            delimiter = b"\n"

            def lineReceived(self, line: bytes) -> None:
                if not told.called:
                    told.callback(line.strip() == b"go")

            def connectionLost(self, reason: Any = None) -> None:
                if not told.called:
                    told.callback(False)

        stdio.StandardIO(Wait())
        return told.addCallback(lambda go: start_sending() if go else None)

    def start_sending() -> Any:
        run.sending = True
        run.started = time.perf_counter()
        run.cpu_at_start = sum(os.times()[:2])
        pacer = None
        if args.rate:
            issued = [0]

            def pace() -> None:
                due = int(args.rate * (time.perf_counter() - run.started)) - issued[0]
                if due <= 0 or not run.drivers:
                    return
                issued[0] += due
                n = len(run.drivers)
                base, extra = divmod(due, n)
                start = issued[0] % n
                for i, d in enumerate(run.drivers):
                    d.credit += base + (1 if (i - start) % n < extra else 0)
                    d.fill()

            pacer = task.LoopingCall(pace)
            pacer.start(0.002)
        else:
            for d in run.drivers:
                d.fill()

        def stop_sending() -> None:
            if pacer is not None and pacer.running:
                pacer.stop()
            run.stopping = True
            run.check_done()

        reactor.callLater(args.duration, stop_sending)
        drained = run.finished
        drained.addTimeout(120, reactor)
        return drained

    def finish(result: Any) -> None:
        elapsed = time.perf_counter() - run.started if run.started else 0.0
        if hasattr(result, "getErrorMessage"):
            run.error(f"not all alerts acknowledged: {result.getErrorMessage()}")
        sent = sum(d.seq for d in run.drivers)
        acked = sum(d.acked for d in run.drivers)
        out.update(sent=sent, acked=acked, elapsed=elapsed, rate=acked / elapsed if elapsed else 0.0,
                   errors=run.errors, failed_setups=run.failed_setups, phase="done",
                   cpu_s=sum(os.times()[:2]) - run.cpu_at_start)
        if run.latencies:
            lat = sorted(run.latencies)
            out["lat_p50_ms"] = lat[len(lat) // 2] * 1000
            out["lat_p99_ms"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
            out["lat_max_ms"] = lat[-1] * 1000
        if args.linger:
            emit(out)
            return
        for d in run.drivers:
            if not d.lost:
                d.transport.loseConnection()
        emit(out)
        reactor.callLater(0.2, reactor.stop)

    setup_start = time.perf_counter()
    reactor.callWhenRunning(lambda: connect_all(run, reactor).addCallback(all_ready).addBoth(finish))
    reactor.run()


if __name__ == "__main__":
    main()
