"""
iapd against itself and its peers, on one machine, in one run.

    python3 bench/run.py              # full run (about 20 minutes), needs root for the peers
    python3 bench/run.py --smoke      # under a minute, no peers: checks that the harness works
    bench/install-peers               # rsyslog RELP and Prelude from Debian's packages

Prints a table of figures and ratios and writes C{results.json}, C{results.txt} and
C{scale.png} to C{--out} (default C{bench/results/}; with C{--smoke}, a temporary
directory).  Every process runs on 127.0.0.1 with its own files in a temporary
directory, and is stopped at the end.

What is measured (sensors, managers and relays are separate processes; the machine's
cores are shared by all of them, the load generator included):

  throughput   sustained alerts/s from N sensors (1, 16, 256), each keeping a window of
               alerts in flight, every alert committed before its 200; direct, through
               one and two iap-proxy hops, through socat instead of iap-proxy, and
               without TLS (the benchmark's plain manager); manager and relay CPU per alert;
               and 16 sensors direct into a store that already holds --grown alerts
  peers        rsyslog RELP (omrelp -> imrelp) over TLS with window 1024 and the stock
               window, over plain TCP; prelude-manager fed by a python3-prelude client
  latency      acknowledgement latency p50/p99 at a fixed offered load, and CPU seconds
               per 10,000 alerts for the manager and each proxy
  scale        N sensors, 1 -> 10,000: time to set them all up, manager memory per idle
               TLS connection, then alerts/s and memory under load

Speed is never asserted.  The run fails, loudly and with a non-zero exit, when any alert
is lost or duplicated: every acknowledged alert must be in the manager's store exactly
once (rows, digests and message ids counted), every alert sent must be acknowledged,
and every message a peer was given must come out of it once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import BENCH, BenchError, Chain, Manager, Process, env, free_port, nofile_hard, wait_port  # noqa: E402

LOADGEN = [sys.executable, str(BENCH / "loadgen.py")]
PER_PROCESS = 2500  # connections per load-generator process


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
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
             rate: float = 0.0, plain: bool = False, before_go: Any = None) -> dict[str, Any]:
        """
        Run C{sensors} connections against C{port} (split over load-generator processes),
        check that every alert sent was acknowledged and stored exactly once.
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
        finally:
            for p in procs:
                common.stop(p, 30)
        errors = [e for r in done for e in r["errors"]]
        sent, acked = sum(r["sent"] for r in done), sum(r["acked"] for r in done)
        if errors or sent != acked:
            raise BenchError(f"run {tag}: {sent} alerts sent, {acked} acknowledged: {errors[:5]}")
        catch_up = 0.0
        if isinstance(manager, Manager):
            manager.check_stored(last_id or 0, acked, tag)
            if not self.args.smoke:  # in smoke mode the figures do not matter: save the time
                catch_up = manager.wait_summarised()
        elapsed = max(r["elapsed"] for r in done)
        out = {"tag": tag, "sensors": sensors, "size": size, "window": window, "acked": acked, "elapsed": elapsed,
               "rate": acked / elapsed, "setup_s": max(r["setup_s"] for r in ready),
               "manager_cpu_us": cpu / max(acked, 1) * 1e6, "loadgen_cpu_us": sum(r["cpu_s"] for r in done) / max(acked, 1) * 1e6,
               "extra": extra, "summary_catch_up_s": catch_up}
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

    # -- sections ------------------------------------------------------------------

    def throughput(self) -> None:
        a = self.args
        socat = shutil.which("socat")
        if not socat:
            self.skip("socat is not installed (apt-get install socat): no relay comparison")
        for size in a.sizes:
            for sensors in a.sensors:
                manager = Manager(self.workdir, self.pki, name=f"manager-{size}-{sensors}")
                try:
                    paths = [("direct", None, 0), ("iap-proxy", "iap-proxy", 1), ("iap-proxy x2", "iap-proxy", 2)]
                    if socat:
                        paths += [("socat", "socat", 1), ("socat x2", "socat", 2)]
                    for name, kind, hops in paths:
                        chain = Chain(kind, hops, manager.port, self.workdir) if kind else None
                        try:
                            relay_cpu0 = chain.cpu() if chain else 0.0
                            r = self.load(manager, chain.port if chain else manager.port, sensors, size, a.window,
                                          a.duration)
                            r["relay_cpu_us"] = (chain.cpu() - relay_cpu0) / r["acked"] * 1e6 if chain else 0.0
                        finally:
                            if chain:
                                chain.stop()
                        r["path"] = name
                        self.results["throughput"].append(r)
                        self.note(f"  {size:>5} B {sensors:>4} sensors {name:<13} {r['rate']:>9,.0f} alerts/s"
                                  f"  manager {r['manager_cpu_us']:5.1f} us/alert"
                                  + (f"  relay {r['relay_cpu_us']:5.1f} us/alert" if kind else ""))
                    manager.alive()
                finally:
                    manager.stop()
                # the same code without TLS: the benchmark's plain manager
                plain = self.plain_manager(size, sensors)
                try:
                    r = self.load(plain, plain.port, sensors, size, a.window, a.duration, plain=True)
                    r["path"] = "direct, no TLS"
                    plain.check(r, self)
                finally:
                    plain.stop()
                self.results["throughput"].append(r)
                self.note(f"  {size:>5} B {sensors:>4} sensors {'no TLS':<13} {r['rate']:>9,.0f} alerts/s"
                          f"  manager {r['manager_cpu_us']:5.1f} us/alert")
            # one sensor with RELP's window, for the comparison with rsyslog
            manager = Manager(self.workdir, self.pki, name=f"manager-{size}-w1024")
            try:
                r = self.load(manager, manager.port, 1, size, 1024, a.duration)
                r["path"] = "direct, window 1024"
                self.results["throughput"].append(r)
                self.note(f"  {size:>5} B    1 sensor  window 1024   {r['rate']:>9,.0f} alerts/s")
            finally:
                manager.stop()
            if size != 1024 or not a.grown or 16 not in a.sensors:
                continue
            # a store that has been in service for a while: does ingest slow down as it grows?
            self.note(f"  filling a store with {a.grown:,} alerts first")
            manager = Manager(self.workdir, self.pki, name=f"manager-{size}-grown", prefill=a.grown)
            try:
                r = self.load(manager, manager.port, 16, size, a.window, a.duration)
                r["path"] = f"direct, store of {a.grown:,}"
                self.results["throughput"].append(r)
                self.note(f"  {size:>5} B   16 sensors store of {a.grown:,} {r['rate']:>9,.0f} alerts/s"
                          f"  manager {r['manager_cpu_us']:5.1f} us/alert")
            finally:
                manager.stop()

    def plain_manager(self, size: int, sensors: int) -> "PlainManager":
        return PlainManager(self.workdir, f"plain-{size}-{sensors}")

    def latency(self) -> None:
        a = self.args
        manager = Manager(self.workdir, self.pki, name="manager-latency")
        try:
            for name, hops in (("direct", 0), ("iap-proxy", 1), ("iap-proxy x2", 2)):
                chain = Chain("iap-proxy", hops, manager.port, self.workdir) if hops else None
                try:
                    relay0 = [r.cpu() for r in chain.relays] if chain else []
                    r = self.load(manager, chain.port if chain else manager.port, a.latency_sensors, 1024, 256,
                                  a.duration, rate=a.rate)
                    if chain:
                        r["proxy_cpu_s_per_10k"] = [(x.cpu() - c0) / r["acked"] * 10000 for x, c0 in zip(chain.relays, relay0)]
                finally:
                    if chain:
                        chain.stop()
                r["path"] = name
                r["offered"] = a.rate
                r["manager_cpu_s_per_10k"] = r["manager_cpu_us"] * 10000 / 1e6
                self.results["latency"].append(r)
                self.note(f"  {name:<13} {a.rate:,.0f}/s offered, {r['rate']:,.0f}/s acked: p50 {r['lat_p50_ms']:.2f} ms"
                          f" p99 {r['lat_p99_ms']:.2f} ms, manager {r['manager_cpu_s_per_10k']:.2f} CPU s/10k"
                          + (f", proxies {', '.join(f'{x:.2f}' for x in r['proxy_cpu_s_per_10k'])} CPU s/10k" if hops else ""))
        finally:
            manager.stop()

    def scale(self) -> None:
        a = self.args
        hard = nofile_hard()
        for sensors in a.scale:
            if sensors + 1000 > hard:
                self.skip(f"scale {sensors}: the descriptor limit is {hard}; {sensors} sensors need more")
                continue
            common.raise_nofile(sensors + 1000)
            manager = Manager(self.workdir, self.pki, nofile=sensors + 1000, name=f"manager-scale-{sensors}")
            try:
                # warm up (store, TLS context, first allocations), then the baseline
                self.load(manager, manager.port, 4, 1024, 16, 0.3)
                time.sleep(0.5)
                base = manager.rss()
                window = max(4, min(a.window, 65536 // sensors))
                idle: dict[str, Any] = {}

                def measure_idle() -> dict[str, Any]:
                    time.sleep(1.0)
                    idle["rss_kib"] = manager.rss()
                    return idle

                r = self.load(manager, manager.port, sensors, 1024, window, a.duration, before_go=measure_idle)
                r["rss_loaded_kib"] = manager.rss()
                r["rss_base_kib"] = base
                r["rss_idle_kib"] = idle["rss_kib"]
                r["per_connection_kib"] = (idle["rss_kib"] - base) / sensors
                self.results["scale"].append(r)
                self.note(f"  {sensors:>6} sensors (window {window}): set up in {r['setup_s']:.1f} s,"
                          f" {r['per_connection_kib']:.1f} KiB per idle TLS connection,"
                          f" {r['rate']:,.0f} alerts/s, manager RSS {r['rss_loaded_kib'] / 1024:.0f} MiB under load")
            finally:
                manager.stop()

    def peers(self) -> None:
        import peers

        a = self.args
        why = peers.rsyslog_available()
        if why:
            self.skip(f"rsyslog RELP: {why}")
        else:
            for size in a.sizes:
                for name, window, tls, count in (("RELP TLS, window 1024", 1024, True, a.relp_count),
                                                 ("RELP TLS, stock window", None, True, a.relp_count // 8),
                                                 ("RELP plain TCP, window 1024", 1024, False, a.relp_count)):
                    r = peers.run_relp(self.workdir, size, count, window, tls, self.tag())
                    r.update(peer=name, size=size)
                    self.results["peers"].append(r)
                    self.note(f"  {size:>5} B {name:<28} {r['rate']:>9,.0f} msgs/s"
                              f"  receiver {r['receiver_cpu_us']:.1f} us/msg, sender {r['sender_cpu_us']:.1f} us/msg")
        why = peers.prelude_available()
        if why:
            self.skip(f"Prelude: {why}")
            return
        with peers.PreludeSetup(self.workdir) as setup:
            for size in a.sizes:
                r = peers.run_prelude(setup, size, a.prelude_count, self.tag())
                r.update(peer="prelude-manager", size=size)
                self.results["peers"].append(r)
                self.note(f"  {size:>5} B {'prelude-manager':<28} {r['rate']:>9,.0f} alerts/s"
                          f"  manager {r['manager_cpu_us']:.1f} us/alert")

    def skip(self, text: str) -> None:
        self.results["skipped"].append(text)
        self.note(f"  skipped: {text}")


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


# -- report ------------------------------------------------------------------------

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
    add(f"machine: {m['cpus']} cores ({m['cpu_model']}), {m['memory_gib']:.0f} GiB, {m['os']}, Python {m['python']},"
        f" Twisted {m['twisted']}, pyOpenSSL {m['pyopenssl']}, load average at start {m['loadavg']}")
    add("all processes share these cores (the load generator too); figures move by 10-30% between runs")
    add("")
    tp = results["throughput"]
    if tp:
        add("Sustained alerts/s, every alert committed (SQLite, synchronous=FULL) before its 200;"
            f" window {results['args']['window']} per sensor")
        add("(summaries are written after the 200: 'summaries s' is how long the manager took after the run to"
            " catch up; the next run starts after that)")
        add(f"{'size':>6} {'sensors':>7} {'path':<20} {'alerts/s':>10} {'vs direct':>9} {'mgr us/alert':>12}"
            f" {'relay us/alert':>14} {'summaries s':>11}")
        for r in tp:
            base = find(tp, size=r["size"], sensors=r["sensors"], path="direct")
            ratio = r["rate"] / base["rate"] if base and r["sensors"] == base["sensors"] else float("nan")
            add(f"{r['size']:>6} {r['sensors']:>7} {r['path']:<20} {r['rate']:>10,.0f} {ratio:>8.2f}x"
                f" {r['manager_cpu_us']:>12.1f} {r.get('relay_cpu_us', 0) or 0:>14.1f} {r['summary_catch_up_s']:>11.1f}")
        add("")
    goals: list[dict[str, Any]] = []
    peers = results["peers"]
    if peers:
        add("Peers on the same machine, same run (rate at the receiver; RELP acknowledges on enqueue,"
            " Prelude does not acknowledge each alert)")
        add(f"{'size':>6} {'peer':<30} {'msgs/s':>10} {'receiver us/msg':>15}")
        for r in peers:
            add(f"{r['size']:>6} {r['peer']:<30} {r['rate']:>10,.0f} {r.get('receiver_cpu_us', r.get('manager_cpu_us', 0)):>15.1f}")
        add("")
    # ratios and goals
    if tp:
        add("Ratios")
        for size in results["args"]["sizes"]:
            best = max((r for r in tp if r["size"] == size and r["path"] in ("direct", "direct, window 1024")),
                       key=lambda r: r["rate"], default=None)
            one = find(tp, size=size, path="direct, window 1024")
            for peer, goal in (("RELP TLS, window 1024", 1.0), ("RELP TLS, stock window", None),
                               ("RELP plain TCP, window 1024", None), ("prelude-manager", 1.5)):
                p = find(peers, size=size, peer=peer)
                if not p or not best:
                    continue
                ratio = best["rate"] / p["rate"]
                text = (f"{size:>6} B iapd best direct ({best['sensors']} sensors, window {best['window']})"
                        f" / {peer}: {ratio:.2f}x")
                if one and one is not best:
                    text += f"  (1 sensor, window 1024: {one['rate'] / p['rate']:.2f}x)"
                add(text)
                if goal:
                    goals.append({"goal": f"{size} B manager ingest >= {goal}x {peer}", "value": ratio, "met": ratio >= goal})
            for sensors in results["args"]["sensors"]:
                base = find(tp, size=size, sensors=sensors, path="direct")
                two = find(tp, size=size, sensors=sensors, path="iap-proxy x2")
                one_p = find(tp, size=size, sensors=sensors, path="iap-proxy")
                socat = find(tp, size=size, sensors=sensors, path="socat")
                socat2 = find(tp, size=size, sensors=sensors, path="socat x2")
                plain = find(tp, size=size, sensors=sensors, path="direct, no TLS")
                if base and two:
                    cost = 1 - two["rate"] / base["rate"]
                    goals.append({"goal": f"{size} B {sensors} sensors: two proxies cost < 10%", "value": cost, "met": cost < 0.10})
                    add(f"{size:>6} B {sensors:>4} sensors: two proxies cost {cost * 100:5.1f}% of direct"
                        + (f", one proxy {(1 - one_p['rate'] / base['rate']) * 100:5.1f}%" if one_p else ""))
                if one_p and socat:
                    ratio = one_p["rate"] / socat["rate"]
                    goals.append({"goal": f"{size} B {sensors} sensors: proxy relays >= socat", "value": ratio, "met": ratio >= 0.97})
                    add(f"{size:>6} B {sensors:>4} sensors: iap-proxy / socat {ratio:.2f}x"
                        + (f" (two hops {two['rate'] / socat2['rate']:.2f}x)" if two and socat2 else "")
                        + f"; relay CPU {one_p['relay_cpu_us']:.1f} vs {socat['relay_cpu_us']:.1f} us/alert")
                if plain and base:
                    add(f"{size:>6} B {sensors:>4} sensors: TLS / plain TCP {base['rate'] / plain['rate']:.2f}x"
                        f" (manager {base['manager_cpu_us']:.1f} vs {plain['manager_cpu_us']:.1f} us/alert)")
        add("")
    lat = results["latency"]
    if lat:
        add(f"Acknowledgement latency at a fixed offered load ({lat[0]['sensors']} sensors, 1 KiB)")
        add(f"{'path':<14} {'offered/s':>9} {'acked/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'manager CPU s/10k':>18} {'proxy CPU s/10k':>16}")
        for r in lat:
            proxies = ", ".join(f"{x:.2f}" for x in r.get("proxy_cpu_s_per_10k", [])) or "-"
            add(f"{r['path']:<14} {r['offered']:>9,.0f} {r['rate']:>9,.0f} {r['lat_p50_ms']:>8.2f} {r['lat_p99_ms']:>8.2f}"
                f" {r['manager_cpu_s_per_10k']:>18.2f} {proxies:>16}")
        add("")
    sc = results["scale"]
    if sc:
        add("Scale: N sensors over TLS, 1 KiB alerts (window shrinks with N: 64 Ki alerts in flight at most)")
        add(f"{'sensors':>7} {'window':>6} {'setup s':>8} {'KiB/idle conn':>13} {'alerts/s':>9} {'RSS idle MiB':>12} {'RSS load MiB':>12}")
        for r in sc:
            add(f"{r['sensors']:>7} {r['window']:>6} {r['setup_s']:>8.1f} {r['per_connection_kib']:>13.1f} {r['rate']:>9,.0f}"
                f" {r['rss_idle_kib'] / 1024:>12.1f} {r['rss_loaded_kib'] / 1024:>12.1f}")
            if r["sensors"] >= 1000:
                goals.append({"goal": f"< 20 KiB per idle sensor connection at {r['sensors']}",
                              "value": r["per_connection_kib"], "met": r["per_connection_kib"] < 20})
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
    n = [r["sensors"] for r in sc]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    ax.plot(n, [r["rate"] for r in sc], "o-", color="tab:blue", label="alerts/s (durable acks)")
    ax.set_xscale("log")
    ax.set_xlabel("concurrent TLS sensors")
    ax.set_ylabel("alerts/s", color="tab:blue")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(n, [r["rss_loaded_kib"] / 1024 for r in sc], "s--", color="tab:red", label="manager RSS under load")
    ax2.plot(n, [r["rss_idle_kib"] / 1024 for r in sc], "^:", color="tab:orange", label="manager RSS idle")
    ax2.set_ylabel("MiB", color="tab:red")
    ax2.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [str(x.get_label()) for x in lines], loc="upper center", fontsize=8)
    ax.set_title(f"iapd manager, 1 KiB alerts, {results['machine']['cpus']} cores shared with the load", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def machine() -> dict[str, Any]:
    import OpenSSL
    import twisted

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
            "python": platform.python_version(), "twisted": twisted.__version__, "pyopenssl": OpenSSL.__version__,
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
    args.grown = (20_000 if smoke else 2_000_000) if args.grown is None else args.grown
    args.relp_count = args.relp_count or 100000
    args.prelude_count = args.prelude_count or 60000
    if smoke:
        args.rate = min(args.rate, 300.0)
    sections = (args.only or "throughput,peers,latency,scale").split(",")
    if smoke or args.no_peers:
        sections = [s for s in sections if s != "peers"]

    common.check_imports_here()
    workdir = Path(tempfile.mkdtemp(prefix="iapd-bench-"))
    out = args.out or (workdir / "results" if smoke else common.BENCH / "results")
    bench = Bench(args, workdir)
    bench.results.update(mode="smoke" if smoke else "full", machine=machine(),
                         args={k: v for k, v in vars(args).items() if k != "out"})
    started = time.monotonic()
    try:
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
