"""
The PostgreSQL store beside the SQLite store: the same load against a manager on each.

    python3 bench/pg.py            # about two minutes: 3 rounds, 1 and 16 sensors, 1 KiB
    python3 bench/pg.py --smoke    # for CI: checks the harness still works

It starts a private PostgreSQL server from Debian's binaries (C{apt-get install
postgresql}), as the tests do (tests/pg.py), but with fsync on, as a production server
runs: on loopback, its data in a temporary directory, never a system cluster.  Each
case runs against a manager of its own on a fresh store: SQLite (the default, and the
baseline) and PostgreSQL (a fresh database), interleaved round by round as in
bench/run.py.  It prints the median alerts/s, the manager's CPU per alert, how long
the manager took after the run to write the IDMEF summaries it left for later, and
PostgreSQL's rate over SQLite's.

Nothing is asserted about speed; the run fails if an alert acknowledged is not stored
exactly once.  Without the server binaries or psycopg it says so and skips.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts this checkout first on the path)
from common import MID_LENGTH, MID_OFFSET, BenchError, Manager  # noqa: E402
from run import Bench  # noqa: E402


class PgManager(Manager):
    """A manager on a fresh database of C{server}; the checks of L{Manager}, in PostgreSQL."""

    def __init__(self, workdir: Path, pki_dir: Path, server: Any, name: str) -> None:
        self.server = server
        self.dbname = server.create_database()
        self.url = server.url(self.dbname)
        super().__init__(workdir, pki_dir, name=name, store=self.url)

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute(sql, args).fetchone()

    def last_id(self) -> int:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                return int(self._one("SELECT coalesce(max(id), 0) FROM alerts")[0])
            except psycopg.errors.UndefinedTable:
                # the manager creates the tables in its store's thread, as it starts listening
                self.alive()
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name}: no alerts table 30 s after it started listening") from None
                time.sleep(0.1)

    def unsummarised(self) -> int:
        return int(self._one("SELECT count(*) FROM alerts WHERE idmef IS NULL")[0])

    def check_stored(self, after_id: int, acked: int, tag: str) -> None:
        mid = f"substring(body from {MID_OFFSET + 1} for {MID_LENGTH})"
        rows, digests, ids, tagged = self._one(
            f"SELECT count(*), count(DISTINCT sha256), count(DISTINCT {mid}),"
            f" count(*) FILTER (WHERE substring(body from {MID_OFFSET + 1} for %s) = %s) FROM alerts WHERE id > %s",
            (len(tag), tag.encode(), after_id),
        )
        if not (rows == digests == ids == tagged == acked):
            raise BenchError(
                f"run {tag}: {acked} alerts acknowledged, but PostgreSQL holds {rows} new rows, {digests} distinct"
                f" digests, {ids} distinct message ids, {tagged} of this run (lost or duplicated alerts)"
            )

    def remove_store(self) -> None:
        self.server.drop_database(self.dbname)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load per case")
    parser.add_argument("--smoke", action="store_true", help="one short round: checks the harness, figures mean little")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.duration = 1, 1.0
    args.keep = False

    try:
        import psycopg  # noqa: F401
    except ImportError:
        print("skipped: psycopg is not installed (pip install '.[test]' or 'iapd[postgresql]')")
        return 0
    sys.path.insert(0, str(common.ROOT))
    from tests.pg import PostgresServer, find_bindir

    bindir = find_bindir()
    if bindir is None:
        print("skipped: no PostgreSQL server binaries (apt-get install postgresql)")
        return 0
    try:
        server = PostgresServer(bindir, fsync=True)  # initdb
    except RuntimeError as e:
        raise BenchError(f"cannot make a PostgreSQL cluster with {bindir}: {e}") from None
    workdir = Path(tempfile.mkdtemp(prefix="iapd-bench-pg-"))
    bench = Bench(args, workdir)
    print(f"PostgreSQL from {bindir}, fsync on, port {server.port}; 1 KiB alerts, window 256,"
          f" {args.rounds} round(s) of {args.duration:g} s", flush=True)
    cases = [(store, sensors) for sensors in (1, 16) for store in ("sqlite", "postgresql")]
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {case: [] for case in cases}
    try:
        server.start()
        for rnd, (store, sensors) in bench.rounds(cases):
            name = f"manager-{bench._tags + 1:04d}"
            manager = PgManager(workdir, bench.pki, server, name) if store == "postgresql" \
                else Manager(workdir, bench.pki, name=name)
            try:
                r = bench.load(manager, manager.port, sensors, 1024, 256, args.duration, catch_up=not args.smoke)
                manager.alive()
            finally:
                manager.stop()
                manager.remove_store()
            runs[(store, sensors)].append(r)
            catch_up = r["summary_catch_up_s"]
            print(f"  round {rnd + 1}: {store:10} {sensors:2} sensor(s) {r['rate']:9,.0f} alerts/s,"
                  f" manager {r['manager_cpu_us']:5.1f} us/alert"
                  + (f", summaries caught up {catch_up:.1f} s later" if catch_up is not None else ""), flush=True)
    finally:
        server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n{'store':12} {'sensors':>7} {'alerts/s':>10} {'lowest':>9} {'highest':>9} {'us/alert':>9}"
          f" {'summaries':>10} {'vs SQLite':>10}")
    for sensors in (1, 16):
        base = statistics.median(r["rate"] for r in runs[("sqlite", sensors)])
        for store in ("sqlite", "postgresql"):
            rs = runs[(store, sensors)]
            rate = statistics.median(r["rate"] for r in rs)
            catch = [r["summary_catch_up_s"] for r in rs if r["summary_catch_up_s"] is not None]
            print(f"{store:12} {sensors:7} {rate:10,.0f} {min(r['rate'] for r in rs):9,.0f}"
                  f" {max(r['rate'] for r in rs):9,.0f} {statistics.median(r['manager_cpu_us'] for r in rs):9.1f}"
                  f" {f'{statistics.median(catch):.1f} s' if catch else '-':>10} {rate / base:9.2f}x")
    print("summaries: how long after the run the manager took to write the IDMEF summaries it left for later")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench/pg.py: FAILED: {e}", file=sys.stderr)
        sys.exit(1)
