"""
iapd against itself and its peers, on one machine, in one run.

    python3 bench/run.py              # full run (about 30 minutes), needs root for the peers
    python3 bench/run.py --smoke      # about a minute, no peers: checks that the harness works
    bench/install-peers               # rsyslog RELP and Prelude from Debian's packages

Prints a table of figures and ratios and writes C{results.json}, C{results.txt} and
C{scale.png} to C{--out} (default C{bench/results/}; with C{--smoke}, a temporary
directory).  Every process runs on 127.0.0.1 with its own files in a temporary
directory, and is stopped at the end.

What is measured (sensors, managers and relays are separate processes; the machine's
cores are shared by all of them, the load generator included).  Every throughput,
latency and peer case runs C{--rounds} times (3), interleaved with the cases it is
compared with and in a rotated order, each run against a fresh manager; the median is
reported, with the lowest and highest, and each ratio both of medians and paired by
round (the goals are judged on the paired one):

  throughput   sustained alerts/s from N sensors (1, 16, 256), each keeping a window of
               alerts in flight, every alert committed before its 200; direct, through
               one and two iap-proxy hops, through socat instead of iap-proxy, and
               without TLS (the benchmark's plain manager), and direct on Debian's stack
               (below); manager and relay CPU per alert; and 16 sensors direct into a
               store that already holds --grown alerts
  peers        rsyslog RELP (omrelp -> imrelp) over TLS with window 1024 and the stock
               window, over plain TCP; prelude-manager fed by a python3-prelude client;
               and iapd's best direct cases again, beside them (16 sensors on both
               stacks, 1 sensor with window 1024 on pip's)
  latency      acknowledgement latency p50/p99 at a fixed offered load, and CPU seconds
               per 10,000 alerts for the manager and each proxy
  scale        N sensors, 1 -> 10,000: time to set them all up, manager memory per idle
               TLS connection (1 s after the last handshake, and once quiet long enough
               for the manager to give their TLS buffers back), then alerts/s and
               memory under load, and per connection once quiet again; on both stacks

Two stacks: the manager runs under this interpreter with its libraries (pip's, with the
OpenSSL bundled in cryptography's wheel), and, where Debian's /usr/bin/python3 has the
libraries the .deb depends on (bench/install-peers installs them), also under Debian's
Python, Twisted, pyOpenSSL and OpenSSL, which is what the .deb runs on.

Speed is never asserted.  The run fails, loudly and with a non-zero exit, when any alert
is lost or duplicated: every acknowledged alert must be in the manager's store exactly
once (rows, digests and message ids counted), every alert sent must be acknowledged,
and every message a peer was given must come out of it once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import BENCH, BenchError, Chain, Manager, Process, env, free_port, nofile_hard, wait_port  # noqa: E402
from iapd.tlsbuffers import INTERVAL as RELEASE_INTERVAL  # noqa: E402

QUIET_S = 2 * RELEASE_INTERVAL + 1.0
"""How long connections stay quiet before the scale section measures them again: a
manager gives a connection's TLS buffers back after a whole sweep interval without a
read, at the sweep after that (iapd/tlsbuffers.py)."""

LOADGEN = [sys.executable, str(BENCH / "loadgen.py")]
PER_PROCESS = 2500  # connections per load-generator process
T = TypeVar("T")


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, debian: bool = False) -> None:
        self.args = args
        self.workdir = workdir
        self.debian = debian  # whether Debian's stack runs managers too (L{common.stack})
        self.pki = common.make_pki(workdir / "pki")
        self.results: dict[str, Any] = {"throughput": [], "peers": [], "latency": [], "scale": [], "skipped": []}
        self._tags = 0

    def tag(self) -> str:
        self._tags += 1
        return f"r{self._tags:04d}"

    def note(self, text: str) -> None:
        print(text, flush=True)

    # -- one load ------------------------------------------------------------------

    def load(self, manager: Manager | Process, port: int, sensors: int, size: int, window: int, duration: float,
             rate: float = 0.0, plain: bool = False, before_go: Any = None, catch_up: bool = False,
             after_done: Any = None) -> dict[str, Any]:
        """
        Run C{sensors} connections against C{port} (split over load-generator processes),
        check that every alert sent was acknowledged and stored exactly once; with
        C{catch_up}, then wait for the manager to write the summaries it left for later.
        C{before_go} is called once every connection is set up, C{after_done} once every
        alert is answered, with the connections still open; their results are the
        result's C{extra} and C{after}.
        """
        tag = self.tag()
        procs: list[subprocess.Popen[str]] = []
        last_id = manager.last_id() if isinstance(manager, Manager) else None
        try:
            for first in range(0, sensors, PER_PROCESS):
                n = min(PER_PROCESS, sensors - first)
                cmd = [*LOADGEN, "--port", str(port), "--pki", str(self.pki), "--connections", str(n),
                       "--first-index", str(first), "--window", str(window), "--size", str(size),
                       "--duration", str(duration), "--tag", tag, "--hold"]
                if rate:
                    cmd += ["--rate", str(rate * n / sensors)]
                if plain:
                    cmd.append("--plain")
                if after_done:
                    cmd.append("--linger")
                procs.append(subprocess.Popen(cmd, env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              stderr=open(self.workdir / f"loadgen-{tag}-{first}.log", "w"),
                                              text=True, start_new_session=True))
            ready = [self._line(p, tag) for p in procs]
            errors = [e for r in ready for e in r["errors"]]
            if errors or sum(r["ready"] for r in ready) != sensors:
                raise BenchError(f"run {tag}: {sensors} sensors wanted, {sum(r['ready'] for r in ready)} set up: {errors[:3]}")
            extra = before_go() if before_go else None
            cpu0 = manager.cpu()
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
            done = [self._line(p, tag) for p in procs]
            cpu = manager.cpu() - cpu0
            after = after_done() if after_done else None
        finally:
            for p in procs:
                common.stop(p, 30)
        errors = [e for r in done for e in r["errors"]]
        sent, acked = sum(r["sent"] for r in done), sum(r["acked"] for r in done)
        if errors or sent != acked:
            raise BenchError(f"run {tag}: {sent} alerts sent, {acked} acknowledged: {errors[:5]}")
        elapsed = max(r["elapsed"] for r in done)
        out = {"tag": tag, "sensors": sensors, "size": size, "window": window, "acked": acked, "elapsed": elapsed,
               "rate": acked / elapsed, "setup_s": max(r["setup_s"] for r in ready),
               "manager_cpu_us": cpu / max(acked, 1) * 1e6, "loadgen_cpu_us": sum(r["cpu_s"] for r in done) / max(acked, 1) * 1e6,
               "extra": extra, "after": after, "summary_catch_up_s": None}
        if isinstance(manager, Manager):
            manager.check_stored(last_id or 0, acked, tag)
            if catch_up:
                out["summary_catch_up_s"] = catch = manager.wait_summarised()
                out["rate_with_summaries"] = acked / (elapsed + catch)
        lat = [r for r in done if "lat_p50_ms" in r]
        if lat:
            out["lat_p50_ms"] = max(r["lat_p50_ms"] for r in lat)
            out["lat_p99_ms"] = max(r["lat_p99_ms"] for r in lat)
        return out

    def _line(self, proc: subprocess.Popen[str], tag: str) -> dict[str, Any]:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            proc.wait(30)
            raise BenchError(f"run {tag}: a load generator exited with {proc.returncode} without a result"
                             f" (see {self.workdir}/loadgen-{tag}-*.log)")
        return json.loads(line)

    def run_path(self, size: int, sensors: int, window: int, relay: str | None = None, hops: int = 0,
                 rate: float = 0.0, catch_up: bool = False) -> dict[str, Any]:
        """
        One run against a manager of its own, started for it and deleted after it:
        every run starts from the same empty, idle store, whatever ran before it
        (C{relay} "plain": the benchmark's manager without TLS; "debian": the manager on
        Debian's stack).
        """
        name = f"manager-{self._tags + 1:04d}"
        manager: Manager | PlainManager = PlainManager(self.workdir, name) if relay == "plain" \
            else Manager(self.workdir, self.pki, name=name, python=common.DEBIAN_PYTHON if relay == "debian" else None)
        chain = None
        try:
            if relay in ("iap-proxy", "socat"):
                chain = Chain(relay, hops, manager.port, self.workdir)
            relays0 = [x.cpu() for x in chain.relays] if chain else []
            r = self.load(manager, chain.port if chain else manager.port, sensors, size, window, self.args.duration,
                          rate=rate, plain=relay == "plain", catch_up=catch_up and not self.args.smoke)
            if chain:
                used = [x.cpu() - c0 for x, c0 in zip(chain.relays, relays0)]
                r["relay_cpu_us"] = sum(used) / r["acked"] * 1e6
                r["proxy_cpu_s_per_10k"] = [u / r["acked"] * 10000 for u in used]
            else:
                r["relay_cpu_us"] = 0.0
            if isinstance(manager, PlainManager):
                manager.check(r, self)
            manager.alive()
        finally:
            if chain:
                chain.stop()
            manager.stop()
            if not self.args.keep:
                manager.remove_store()
        return r

    def rounds(self, cases: Sequence[T]) -> Iterator[tuple[int, T]]:
        """
        Every case once per round (C{--rounds}), each round starting one case later.

        The machine's speed drifts by a third over minutes: run once, and one after
        the other, cases were compared across that drift, and the first case of a
        group always ran on the quietest machine.  Interleaved and rotated, each case
        meets the same drift, and the median of its rounds, or of the ratios within
        its rounds (L{paired}), is what is compared.
        """
        for rnd in range(self.args.rounds):
            for i in range(len(cases)):
                yield rnd, cases[(i + rnd) % len(cases)]

    # -- sections ------------------------------------------------------------------

    def throughput(self) -> None:
        a = self.args
        socat = shutil.which("socat")
        if not socat:
            self.skip("socat is not installed (apt-get install socat): no relay comparison")
        paths: list[tuple[str, str | None, int]] = [
            ("direct", None, 0), ("iap-proxy", "iap-proxy", 1), ("iap-proxy x2", "iap-proxy", 2)]
        if socat:
            paths += [("socat", "socat", 1), ("socat x2", "socat", 2)]
        paths.append(("direct, no TLS", "plain", 0))
        if self.debian:
            paths.append((DEBIAN_DIRECT, "debian", 0))
        for size in a.sizes:
            for sensors in a.sensors:
                runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in paths}
                for rnd, (name, relay, hops) in self.rounds(paths):
                    r = self.run_path(size, sensors, a.window, relay, hops, catch_up=name == "direct" and rnd == 0)
                    runs[name].append(r)
                    self.note(f"  {size:>5} B {sensors:>4} sensors {name:<15} round {rnd + 1}"
                              f" {r['rate']:>9,.0f} alerts/s  manager {r['manager_cpu_us']:5.1f} us/alert"
                              + (f"  relay {r['relay_cpu_us']:5.1f} us/alert" if relay in ("iap-proxy", "socat") else ""))
                for name, _, _ in paths:
                    self.results["throughput"].append(dict(aggregate(runs[name]), path=name))
            # one sensor with RELP's window, for the comparison with rsyslog
            w1024 = []
            for rnd, _ in self.rounds([None]):
                w1024.append(self.run_path(size, 1, 1024))
                self.note(f"  {size:>5} B    1 sensor  window 1024     round {rnd + 1} {w1024[-1]['rate']:>9,.0f} alerts/s")
            self.results["throughput"].append(dict(aggregate(w1024), path="direct, window 1024"))
            if size != 1024 or not a.grown or 16 not in a.sensors:
                continue
            # a store that has been in service for a while: does ingest slow down as it grows?
            self.note(f"  filling a store with {a.grown:,} alerts first")
            manager = Manager(self.workdir, self.pki, name=f"manager-{size}-grown", prefill=a.grown)
            try:
                r = self.load(manager, manager.port, 16, size, a.window, a.duration)
                r["path"] = f"direct, store of {a.grown:,}"
                self.results["throughput"].append(dict(aggregate([r]), path=r["path"]))
                self.note(f"  {size:>5} B   16 sensors store of {a.grown:,} {r['rate']:>9,.0f} alerts/s"
                          f"  manager {r['manager_cpu_us']:5.1f} us/alert")
            finally:
                manager.stop()
                if not a.keep:
                    manager.remove_store()

    def latency(self) -> None:
        a = self.args
        cases = [("direct", 0), ("iap-proxy", 1), ("iap-proxy x2", 2)]
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in cases}
        for rnd, (name, hops) in self.rounds(cases):
            r = self.run_path(1024, a.latency_sensors, 256, "iap-proxy" if hops else None, hops, rate=a.rate)
            runs[name].append(r)
            self.note(f"  {name:<13} round {rnd + 1} {a.rate:,.0f}/s offered, {r['rate']:,.0f}/s acked:"
                      f" p50 {r['lat_p50_ms']:.2f} ms p99 {r['lat_p99_ms']:.2f} ms,"
                      f" manager {r['manager_cpu_us'] / 100:.2f} CPU s/10k"
                      + (f", proxies {', '.join(f'{x:.2f}' for x in r['proxy_cpu_s_per_10k'])} CPU s/10k" if hops else ""))
        for name, _ in cases:
            row = aggregate(runs[name])
            row.update(path=name, offered=a.rate, manager_cpu_s_per_10k=row["manager_cpu_us"] * 10000 / 1e6)
            self.results["latency"].append(row)

    def scale(self) -> None:
        a = self.args
        hard = nofile_hard()
        stacks = [(PIP, None)] + ([(DEBIAN, common.DEBIAN_PYTHON)] if self.debian else [])
        for sensors, (stack, python) in ((n, s) for n in a.scale for s in stacks):
            if sensors + 1000 > hard:
                self.skip(f"scale {sensors} ({stack}): the descriptor limit is {hard}; {sensors} sensors need more")
                continue
            common.raise_nofile(sensors + 1000)
            manager = Manager(self.workdir, self.pki, nofile=sensors + 1000, name=f"manager-scale-{sensors}-{stack[:3]}",
                              python=python)
            try:
                # warm up (store, TLS context, first allocations), then the baseline
                self.load(manager, manager.port, 4, 1024, 16, 0.3)
                time.sleep(0.5)
                base = manager.rss()
                window = max(4, min(a.window, 65536 // sensors))

                def measure_idle() -> dict[str, Any]:
                    # just set up, then quiet long enough for the manager to give their
                    # TLS buffers back (iapd/tlsbuffers.py)
                    time.sleep(1.0)
                    just = manager.rss()
                    time.sleep(QUIET_S - 1.0)
                    return {"rss_kib": just, "quiet_rss_kib": manager.rss()}

                def measure_after() -> dict[str, Any]:
                    loaded = manager.rss()
                    time.sleep(QUIET_S)
                    return {"loaded_rss_kib": loaded, "quiet_rss_kib": manager.rss()}

                r = self.load(manager, manager.port, sensors, 1024, window, a.duration, before_go=measure_idle,
                              after_done=measure_after)
                idle, after = r.pop("extra"), r.pop("after")
                r["rss_loaded_kib"] = after["loaded_rss_kib"]
                r["rss_base_kib"] = base
                r["rss_idle_kib"] = idle["rss_kib"]
                r["per_connection_kib"] = (idle["rss_kib"] - base) / sensors
                r["quiet_kib"] = (idle["quiet_rss_kib"] - base) / sensors
                r["after_load_kib"] = (after["quiet_rss_kib"] - base) / sensors
                r["stack"] = stack
                self.results["scale"].append(r)
                self.note(f"  {sensors:>6} sensors, {stack} (window {window}): set up in {r['setup_s']:.1f} s,"
                          f" {r['per_connection_kib']:.1f} KiB per idle TLS connection just set up,"
                          f" {r['quiet_kib']:.1f} once quiet {QUIET_S:.0f} s, {r['after_load_kib']:.1f} quiet after"
                          f" the load; {r['rate']:,.0f} alerts/s, manager RSS {r['rss_loaded_kib'] / 1024:.0f} MiB"
                          " under load")
            finally:
                manager.stop()
                if not a.keep:
                    manager.remove_store()

    def peers(self) -> None:
        """
        The peers and iapd's best direct configurations, interleaved round by round:
        the ratios compare runs that met the same moments of the machine.
        """
        import peers

        a = self.args
        cases: list[tuple[str, Any]] = []
        why = peers.rsyslog_available()
        if why:
            self.skip(f"rsyslog RELP: {why}")
        else:
            cases += [("RELP TLS, window 1024", (1024, True, 1)), ("RELP TLS, stock window", (None, True, 8)),
                      ("RELP plain TCP, window 1024", (1024, False, 1))]
        why = peers.prelude_available()
        if why:
            self.skip(f"Prelude: {why}")
        else:
            cases.append(("prelude-manager", None))
        if not cases:
            return
        cases += [(IAPD_16, (16, a.window, None)), (IAPD_W1024, (1, 1024, None))]
        if self.debian:
            cases.append((IAPD_16_DEBIAN, (16, a.window, "debian")))
        with contextlib.ExitStack() as stack:
            setup = stack.enter_context(peers.PreludeSetup(self.workdir)) \
                if any(name == "prelude-manager" for name, _ in cases) else None
            for size in a.sizes:
                runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in cases}
                for rnd, (name, how) in self.rounds(cases):
                    if name.startswith("RELP"):
                        window, tls, fraction = how
                        tag = self.tag()
                        r = peers.run_relp(self.workdir, size, a.relp_count // fraction, window, tls, tag)
                        self.forget(self.workdir / f"relp-{tag}")
                        cpu = f"receiver {r['receiver_cpu_us']:.1f} us/msg, sender {r['sender_cpu_us']:.1f} us/msg"
                    elif name == "prelude-manager":
                        assert setup is not None
                        tag = self.tag()
                        r = peers.run_prelude(setup, size, a.prelude_count, tag)
                        self.forget(setup.workdir / tag)
                        cpu = f"manager {r['manager_cpu_us']:.1f} us/alert"
                    else:
                        sensors, window, stack_ = how
                        r = self.run_path(size, sensors, window, stack_)
                        cpu = f"manager {r['manager_cpu_us']:.1f} us/alert"
                    runs[name].append(r)
                    self.note(f"  {size:>5} B {name:<28} round {rnd + 1} {r['rate']:>9,.0f} /s  {cpu}")
                for name, _ in cases:
                    self.results["peers"].append(dict(aggregate(runs[name]), peer=name, size=size))

    def forget(self, directory: Path) -> None:
        """A peer's output of one run (up to 400 MB at 4 KiB), unless --keep."""
        if not self.args.keep:
            shutil.rmtree(directory, ignore_errors=True)

    def skip(self, text: str) -> None:
        self.results["skipped"].append(text)
        self.note(f"  skipped: {text}")


IAPD_16 = "iapd, 16 sensors"
IAPD_W1024 = "iapd, 1 sensor, window 1024"
IAPD_16_DEBIAN = "iapd, 16 sensors, Debian's"
PIP = "pip's stack"
DEBIAN = "Debian's stack"
DEBIAN_DIRECT = "direct, Debian's"


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """
    One row from the rounds of a case: the median of every figure, the rates of
    every round, and their lowest and highest.
    """
    row = dict(runs[0])
    row.update(rounds=len(runs), rates=[r["rate"] for r in runs],
               rate_min=min(r["rate"] for r in runs), rate_max=max(r["rate"] for r in runs))
    for key, value in runs[0].items():
        if key in ("size", "sensors", "window", "count", "summary_catch_up_s", "rate_with_summaries"):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            row[key] = statistics.median(r[key] for r in runs)
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            row[key] = [statistics.median(col) for col in zip(*(r[key] for r in runs))]
    measured = [r for r in runs if r.get("summary_catch_up_s") is not None]
    if measured:  # measured in one round only: after a run, its own backlog
        row["summary_catch_up_s"] = measured[0]["summary_catch_up_s"]
        row["rate_with_summaries"] = measured[0]["rate_with_summaries"]
    return row


class PlainManager(Process):
    """bench/plain_manager.py: iapd's manager code without TLS."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.port = free_port()
        self.db = workdir / f"{name}.db"
        super().__init__(name, [sys.executable, str(BENCH / "plain_manager.py"), str(self.port), str(self.db)], workdir)
        wait_port(self.port, 30, self.proc)

    def last_id(self) -> int:
        return Manager.last_id(self)  # type: ignore[arg-type]

    def check(self, r: dict[str, Any], bench: Bench) -> None:
        Manager.check_stored(self, 0, r["acked"], r["tag"])  # type: ignore[arg-type]

    def remove_store(self) -> None:
        Manager.remove_store(self)  # type: ignore[arg-type]


# -- report ------------------------------------------------------------------------

def spread(row: dict[str, Any]) -> str:
    """The lowest and highest rate of a row's rounds."""
    if row.get("rounds", 1) < 2:
        return "-"
    return f"{row['rate_min'] / 1000:,.1f}-{row['rate_max'] / 1000:,.1f}k"


def paired(a: dict[str, Any], b: dict[str, Any]) -> list[float]:
    """
    C{a}'s rate over C{b}'s, round by round.

    The rounds interleave the cases so that each meets the same drift of the machine;
    a ratio of medians pairs one case's middle round with another's and throws that
    away, a ratio within each round keeps it.  Empty when the two were not run in
    the same rounds.
    """
    ra, rb = a.get("rates", [a["rate"]]), b.get("rates", [b["rate"]])
    if len(ra) != len(rb):
        return []
    return [x / y for x, y in zip(ra, rb)]


def paired_text(ratios: list[float], cost: bool = False) -> str:
    """The median of per-round ratios and every round's, as a cost (1 - ratio) in % or as a ratio."""
    if len(ratios) < 2:
        return ""
    if cost:
        each = ", ".join(f"{(1 - r) * 100:.1f}" for r in ratios)
        return f"; paired by round {(1 - statistics.median(ratios)) * 100:.1f}% ({each})"
    each = ", ".join(f"{r:.2f}" for r in ratios)
    return f"; paired by round {statistics.median(ratios):.2f}x ({each})"


def verdict_ratio(of_medians: float, ratios: list[float]) -> float:
    """What a goal is judged on: the median of the per-round ratios when there are rounds."""
    return statistics.median(ratios) if len(ratios) >= 2 else of_medians


def find(rows: list[dict[str, Any]], **kw: Any) -> dict[str, Any] | None:
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def report(results: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The table as text, and the goals with their verdicts."""
    lines: list[str] = []
    add = lines.append
    m = results["machine"]
    add(f"iapd benchmark, {results['mode']} run, {m['when']}")
    add(f"machine: {m['cpus']} cores ({m['cpu_model']}), {m['memory_gib']:.0f} GiB, {m['os']},"
        f" load average at start {m['loadavg']}")
    for name, st in ((PIP, m), (DEBIAN, m.get("debian_stack"))):
        if st:
            where = f" ({st['interpreter']})" if st.get("interpreter") else ""  # older results.json have none
            add(f"{name}: Python {st['python']}{where}, Twisted {st['twisted']}, pyOpenSSL {st['pyopenssl']},"
                f" {st.get('openssl', '?')}")
    add("all processes share these cores (the load generator too); figures move by 10-30% between runs")
    add("")
    rounds = results["args"]["rounds"]
    tp = results["throughput"]
    if tp:
        add("Sustained alerts/s, every alert committed (SQLite, synchronous=FULL) before its 200;"
            f" window {results['args']['window']} per sensor; median of {rounds} rounds (lowest-highest),"
            " each run against a fresh manager")
        add("(summaries are written after the 200: 'summaries s' is how long the manager then took to catch up"
            " (first round, direct), 'with summ.' the alerts/s counting that time too)")
        add(f"{'size':>6} {'sensors':>7} {'path':<20} {'alerts/s':>9} {'lowest-highest':>15} {'vs direct':>9}"
            f" {'mgr us/alert':>12} {'relay us/alert':>14} {'summaries s':>11} {'with summ.':>10}")
        for r in tp:
            base = find(tp, size=r["size"], sensors=r["sensors"], path="direct")
            ratio = r["rate"] / base["rate"] if base and r["sensors"] == base["sensors"] else float("nan")
            catch = r.get("summary_catch_up_s")
            add(f"{r['size']:>6} {r['sensors']:>7} {r['path']:<20} {r['rate']:>9,.0f} {spread(r):>15} {ratio:>8.2f}x"
                f" {r['manager_cpu_us']:>12.1f} {r.get('relay_cpu_us', 0) or 0:>14.1f}"
                f" {'-' if catch is None else f'{catch:.1f}':>11}"
                f" {'-' if catch is None else format(r['rate_with_summaries'], ',.0f'):>10}")
        add("")
    goals: list[dict[str, Any]] = []
    peers = results["peers"]
    if peers:
        add("Peers and iapd on the same machine, interleaved round by round; median of"
            f" {rounds} rounds (rate at the receiver; RELP acknowledges on enqueue, Prelude does not"
            " acknowledge each alert; iapd answers each alert once it is durable)")
        add(f"{'size':>6} {'peer':<30} {'msgs/s':>9} {'lowest-highest':>15} {'receiver us/msg':>15}")
        for r in peers:
            cpu = r.get("receiver_cpu_us", r.get("manager_cpu_us", 0))
            add(f"{r['size']:>6} {r['peer']:<30} {r['rate']:>9,.0f} {spread(r):>15} {cpu:>15.1f}")
        add("")
    # ratios and goals
    if tp or peers:
        add("Ratios of medians, and the median of the ratios within each round (the goals are judged on the"
            " latter: each round meets the machine's drift alike)")
        for size in results["args"]["sizes"]:
            for stack, beside, direct_paths in ((PIP, (IAPD_16, IAPD_W1024), ("direct", "direct, window 1024")),
                                                (DEBIAN, (IAPD_16_DEBIAN,), (DEBIAN_DIRECT,))):
                ours = [r for r in peers if r["size"] == size and r["peer"] in beside]
                if ours:  # run beside the peers: compare with these
                    best = max(ours, key=lambda r: r["rate"])
                    label = f"iapd best ({best['peer']}, beside the peers)"
                else:
                    direct = [r for r in tp if r["size"] == size and r["path"] in direct_paths]
                    best = max(direct, key=lambda r: r["rate"], default=None)
                    label = f"iapd best direct ({best['sensors']} sensors, window {best['window']}, {stack})" \
                        if best else ""
                for peer, goal in (("RELP TLS, window 1024", 1.0), ("RELP TLS, stock window", None),
                                   ("RELP plain TCP, window 1024", None), ("prelude-manager", 1.5)):
                    p = find(peers, size=size, peer=peer)
                    if not p or not best:
                        continue
                    ratio = best["rate"] / p["rate"]
                    rounds_ = paired(best, p) if ours else []
                    add(f"{size:>6} B {label} / {peer}: {ratio:.2f}x{paired_text(rounds_)}")
                    if goal:
                        value = verdict_ratio(ratio, rounds_)
                        goals.append({"goal": f"{size} B manager ingest >= {goal}x {peer}, {stack}", "value": value,
                                      "met": value >= goal})
            for sensors in results["args"]["sensors"]:
                base = find(tp, size=size, sensors=sensors, path="direct")
                two = find(tp, size=size, sensors=sensors, path="iap-proxy x2")
                one_p = find(tp, size=size, sensors=sensors, path="iap-proxy")
                socat = find(tp, size=size, sensors=sensors, path="socat")
                socat2 = find(tp, size=size, sensors=sensors, path="socat x2")
                plain = find(tp, size=size, sensors=sensors, path="direct, no TLS")
                if base and two:
                    cost = 1 - two["rate"] / base["rate"]
                    rounds_ = paired(two, base)
                    value = 1 - verdict_ratio(1 - cost, rounds_)
                    goals.append({"goal": f"{size} B {sensors} sensors: two proxies cost < 10%", "value": value,
                                  "met": value < 0.10})
                    add(f"{size:>6} B {sensors:>4} sensors: two proxies cost {cost * 100:5.1f}% of direct"
                        + (f", one proxy {(1 - one_p['rate'] / base['rate']) * 100:5.1f}%" if one_p else "")
                        + paired_text(rounds_, cost=True))
                if one_p and socat:
                    ratio = one_p["rate"] / socat["rate"]
                    rounds_ = paired(one_p, socat)
                    value = verdict_ratio(ratio, rounds_)
                    goals.append({"goal": f"{size} B {sensors} sensors: proxy relays >= socat", "value": value,
                                  "met": value >= 0.97})
                    add(f"{size:>6} B {sensors:>4} sensors: iap-proxy / socat {ratio:.2f}x"
                        + (f" (two hops {two['rate'] / socat2['rate']:.2f}x)" if two and socat2 else "")
                        + f"; relay CPU {one_p['relay_cpu_us']:.1f} vs {socat['relay_cpu_us']:.1f} us/alert"
                        + paired_text(rounds_))
                if plain and base:
                    add(f"{size:>6} B {sensors:>4} sensors: TLS / plain TCP {base['rate'] / plain['rate']:.2f}x"
                        f" (manager {base['manager_cpu_us']:.1f} vs {plain['manager_cpu_us']:.1f} us/alert)")
        add("")
    lat = results["latency"]
    if lat:
        add(f"Acknowledgement latency at a fixed offered load ({lat[0]['sensors']} sensors, 1 KiB);"
            f" median of {rounds} rounds")
        add(f"{'path':<14} {'offered/s':>9} {'acked/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'manager CPU s/10k':>18} {'proxy CPU s/10k':>16}")
        for r in lat:
            proxies = ", ".join(f"{x:.2f}" for x in r.get("proxy_cpu_s_per_10k", [])) or "-"
            add(f"{r['path']:<14} {r['offered']:>9,.0f} {r['rate']:>9,.0f} {r['lat_p50_ms']:>8.2f} {r['lat_p99_ms']:>8.2f}"
                f" {r['manager_cpu_s_per_10k']:>18.2f} {proxies:>16}")
        add("")
    sc = results["scale"]
    if sc:
        add("Scale: N sensors over TLS, 1 KiB alerts (window shrinks with N: 64 Ki alerts in flight at most)")
        add(f"KiB per idle connection (manager RSS over its RSS before, per connection): 'set up' 1 s after the"
            f" last handshake, 'quiet' {QUIET_S:.0f} s after it, 'after load' {QUIET_S:.0f} s after the load")
        add(f"{'sensors':>7} {'stack':<15} {'window':>6} {'setup s':>8} {'set up':>7} {'quiet':>7} {'after load':>10}"
            f" {'alerts/s':>9} {'RSS idle MiB':>12} {'RSS load MiB':>12}")
        for r in sc:
            stack = r.get("stack", PIP)
            quiet = r.get("quiet_kib")  # results.json of runs before the quiet figures have none
            after = r.get("after_load_kib")
            add(f"{r['sensors']:>7} {stack:<15} {r['window']:>6} {r['setup_s']:>8.1f} {r['per_connection_kib']:>7.1f}"
                f" {'-' if quiet is None else f'{quiet:.1f}':>7} {'-' if after is None else f'{after:.1f}':>10}"
                f" {r['rate']:>9,.0f} {r['rss_idle_kib'] / 1024:>12.1f} {r['rss_loaded_kib'] / 1024:>12.1f}")
            if r["sensors"] >= 1000:
                figures = (("quiet", quiet), ("quiet after load", after)) if quiet is not None else (
                    ("set up", r["per_connection_kib"]),)  # a run from before the quiet figures
                for what, value in figures:
                    if value is not None:
                        goals.append({"goal": f"< 20 KiB per idle sensor connection ({what}) at {r['sensors']},"
                                              f" {stack}", "value": value, "met": value < 20})
        add("")
    if goals:
        add("Goals")
        for g in goals:
            add(f"  [{'met' if g['met'] else 'NOT met'}] {g['goal']} ({g['value']:.2f})")
        add("")
    for s in results["skipped"]:
        add(f"skipped: {s}")
    add("No alert was lost or duplicated in any run (checked in the store after each run).")
    return "\n".join(lines), goals


def plot(results: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot"
    sc = results["scale"]
    if not sc:
        return "no scale results: no plot"
    fig, ax = plt.subplots(figsize=(7, 5.2), dpi=100)
    ax.set_xscale("log")
    ax.set_xlabel("concurrent TLS sensors")
    ax.set_ylabel("alerts/s", color="tab:blue")
    ax2 = ax.twinx()
    for stack, fill in ((PIP, None), (DEBIAN, "none")):
        rows = [r for r in sc if r.get("stack", PIP) == stack]
        if not rows:
            continue
        n = [r["sensors"] for r in rows]
        ax.plot(n, [r["rate"] for r in rows], "o-", mfc=fill, color="tab:blue", label=f"alerts/s (durable acks), {stack}")
        ax2.plot(n, [r["rss_loaded_kib"] / 1024 for r in rows], "s--", mfc=fill, color="tab:red",
                 label=f"manager RSS under load, {stack}")
        ax2.plot(n, [r["rss_idle_kib"] / 1024 for r in rows], "^:", mfc=fill, color="tab:orange",
                 label=f"manager RSS idle, {stack}")
    ax.set_ylim(bottom=0)
    ax2.set_ylabel("MiB", color="tab:red")
    ax2.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [str(x.get_label()) for x in lines], loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2,
              fontsize=7)
    ax.set_title(f"iapd manager, 1 KiB alerts, {results['machine']['cpus']} cores shared with the load", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def machine(here: dict[str, str], debian: dict[str, str] | None) -> dict[str, Any]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    osname = "Linux"
    try:
        osname = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)[
            "PRETTY_NAME"].strip('"')
    except (OSError, KeyError):
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gib": mem, "os": osname,
            "python": here["python"], "interpreter": here.get("interpreter"), "twisted": here["twisted"],
            "pyopenssl": here["pyopenssl"],
            "openssl": here["openssl"], "debian_stack": debian,
            "loadavg": Path("/proc/loadavg").read_text().split()[0], "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny and quick: checks the harness, not the speed")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results, smoke: a temporary one)")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], help="alert sizes (1024,4096)")
    parser.add_argument("--sensors", type=lambda s: [int(x) for x in s.split(",")], help="concurrent sensors (1,16,256)")
    parser.add_argument("--scale", type=lambda s: [int(x) for x in s.split(",")],
                        help="scale steps, sensors (1,10,100,1000,10000)")
    parser.add_argument("--duration", type=float, help="seconds of load per run (5)")
    parser.add_argument("--rounds", type=int, help="runs of every throughput, latency and peer case, interleaved;"
                        " the median is reported (3; smoke: 1)")
    parser.add_argument("--grown", type=int, help="alerts already in the store of the grown-store run"
                        " (1 KiB, 16 sensors; 2,000,000; 0: no such run)")
    parser.add_argument("--window", type=int, default=256, help="alerts in flight per sensor (iapd's default: 256)")
    parser.add_argument("--rate", type=float, default=1000.0, help="offered load of the latency runs, alerts/s")
    parser.add_argument("--latency-sensors", type=int, default=16)
    parser.add_argument("--relp-count", type=int, help="messages per RELP run (100000)")
    parser.add_argument("--prelude-count", type=int, help="alerts per Prelude run (60000)")
    parser.add_argument("--only", help="comma-separated sections: throughput,peers,latency,scale")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, stores)")
    args = parser.parse_args()
    smoke = args.smoke
    args.sizes = args.sizes or ([1024] if smoke else [1024, 4096])
    args.sensors = args.sensors or ([1, 16] if smoke else [1, 16, 256])
    args.scale = args.scale or ([1, 50] if smoke else [1, 10, 100, 1000, 10000])
    args.duration = args.duration or (1.0 if smoke else 5.0)
    args.rounds = args.rounds or (1 if smoke else 3)
    args.grown = (20_000 if smoke else 2_000_000) if args.grown is None else args.grown
    args.relp_count = args.relp_count or 100000
    args.prelude_count = args.prelude_count or 60000
    if smoke:
        args.rate = min(args.rate, 300.0)
    sections = (args.only or "throughput,peers,latency,scale").split(",")
    if smoke or args.no_peers:
        sections = [s for s in sections if s != "peers"]

    try:
        here = common.stack()
    except common.StackMissing as e:
        raise BenchError(str(e)) from None
    debian, why_not = common.debian_stack(here)
    workdir = Path(tempfile.mkdtemp(prefix="iapd-bench-"))
    out = args.out or (workdir / "results" if smoke else common.BENCH / "results")
    bench = Bench(args, workdir, debian=debian is not None)
    bench.results.update(mode="smoke" if smoke else "full", machine=machine(here, debian),
                         args={k: v for k, v in vars(args).items() if k != "out"})
    started = time.monotonic()
    try:
        if why_not:
            bench.skip(why_not)
        if smoke or args.no_peers:
            bench.skip("peers (rsyslog RELP, Prelude): not run in " + ("smoke mode" if smoke else "this run (--no-peers)"))
        for section in ("throughput", "peers", "latency", "scale"):
            if section in sections:
                bench.note(f"\n== {section}")
                getattr(bench, section)()
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}")
    bench.results["duration_s"] = time.monotonic() - started
    text, goals = report(bench.results)
    bench.results["goals"] = goals
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(bench.results, indent=1, default=str) + "\n")
    (out / "results.txt").write_text(text + "\n")
    why = plot(bench.results, out / "scale.png")
    print("\n" + text)
    print(f"\nresults in {out}/ (results.txt, results.json" + (", scale.png)" if not why else f"); {why}"))
    print(f"took {bench.results['duration_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
