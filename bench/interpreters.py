"""
The same manager code under two Python interpreters, interleaved in one run.

    python3 bench/interpreters.py --other ~/iapd/bin/python   # about 2 minutes
    python3 bench/interpreters.py --smoke                     # for CI: this interpreter twice

How a CPython was built moves the manager's CPU per alert: Debian's python3.11 is built
with profile-guided optimisation and link-time optimisation, while a CPython built
from source without C{--enable-optimizations} (pyenv's default) is not, and a venv
made from Debian's python3 (as the README's quick start makes one) runs on Debian's
build with pip's libraries.  A benchmark taken under one interpreter says little about
another, so this measures the difference on its own: 16 sensors (load generators
under this interpreter), 1 KiB alerts, window 256, one manager per run on a fresh
store, the two interpreters in turn for C{--rounds} rounds, each round's order rotated
(as in C{bench/run.py}).  It prints each run, the medians, and the other interpreter's
rate over this one's paired by round.

C{--other} must import this checkout's iapd and what the manager needs (for a venv:
C{pip install .} in it).  Nothing is asserted about speed; a run fails if any alert
was lost or duplicated.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from run import Bench  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other", help="the interpreter to compare with this one (smoke: this one again)")
    parser.add_argument("--smoke", action="store_true", help="one short round: checks the harness, not the speed")
    parser.add_argument("--rounds", type=int, help="runs of each interpreter, interleaved (5; smoke: 1)")
    parser.add_argument("--sensors", type=int, default=16)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--duration", type=float, help="seconds of load per run (5; smoke: 1)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, PKI)")
    args = parser.parse_args()
    if not args.other and not args.smoke:
        parser.error("--other is required (the interpreter to compare with this one)")
    if (args.rounds is not None and args.rounds < 1) or (args.duration is not None and args.duration <= 0) \
            or args.sensors < 1 or args.size < 1:
        parser.error("--rounds, --sensors and --size must be at least 1, --duration more than 0")
    other = args.other or sys.executable
    args.rounds = args.rounds or (1 if args.smoke else 5)
    args.duration = args.duration or (1.0 if args.smoke else 5.0)
    pythons = {"this": sys.executable, "other": other}
    try:
        stacks = {name: common.stack(python) for name, python in pythons.items()}
    except common.StackMissing as e:
        parser.error(f"{e} (in a venv: pip install . there)")
    for name, st in stacks.items():
        print(f"{name}: Python {st['python']} ({st['interpreter']}), Twisted {st['twisted']},"
              f" pyOpenSSL {st['pyopenssl']}, {st['openssl']}")
    workdir = Path(tempfile.mkdtemp(prefix="iapd-bench-interp-"))
    try:
        bench = Bench(args, workdir)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in pythons}
        for rnd, name in bench.rounds(list(pythons)):
            manager = common.Manager(workdir, bench.pki, name=f"manager-{bench._tags + 1:04d}", python=pythons[name])
            try:
                r = bench.load(manager, manager.port, args.sensors, args.size, 256, args.duration)
                manager.alive()
            finally:
                manager.stop()
                manager.remove_store()
            runs[name].append(r)
            print(f"round {rnd + 1} {name:<6} {r['rate']:>9,.0f} alerts/s  manager {r['manager_cpu_us']:5.1f} us/alert",
                  flush=True)
    except BaseException:
        print(f"the logs are in {workdir}", file=sys.stderr)  # the errors name files there
        raise
    else:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    for name, rs in runs.items():
        rates = [r["rate"] for r in rs]
        print(f"{name:<6} median {statistics.median(rates):,.0f} alerts/s ({min(rates):,.0f}-{max(rates):,.0f}),"
              f" manager {statistics.median(r['manager_cpu_us'] for r in rs):.1f} us/alert")
    ratios = [o["rate"] / t["rate"] for o, t in zip(runs["other"], runs["this"])]
    cpu = [o["manager_cpu_us"] / t["manager_cpu_us"] for o, t in zip(runs["other"], runs["this"])]
    print(f"other / this, paired by round: alerts/s {statistics.median(ratios):.2f}x"
          f" ({', '.join(f'{x:.2f}' for x in ratios)}), manager CPU per alert {statistics.median(cpu):.2f}x"
          f" ({', '.join(f'{x:.2f}' for x in cpu)})")
    print("No alert was lost or duplicated in any run (checked in the store after each run).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
