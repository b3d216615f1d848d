"""
What one alert costs the SQLite store, and how much of it is the exactly-once check.

    python3 bench/store.py            # a few minutes: 300,000 alerts per variant
    python3 bench/store.py --alerts 1500000   # a larger store, where a B-tree index hurts more
    python3 bench/store.py --smoke    # seconds, for CI: checks the harness still works

The manager's saturated store thread, alone: batches of 4,096 alerts (1 KiB, from 16
sensors) committed into a fresh SQLite file, one transaction per batch, as under full
load.  For each variant it prints the time per alert, the bytes written to the disk per
alert (C{/proc/self/io}), the space on disk per alert (file, WAL and digest index) and
the alerts per second the store alone allows, measured over the second half of the run
(the first half grows the file).

  iapd          the store as the manager runs it: L{SQLiteBackend.commit}, with its
                digest index and its body log beside the file (iapd/digests.py,
                iapd/bodylog.py), synchronous=FULL
  unique index  what iapd did before the digest index, and what SQLite alone offers: a
                UNIQUE (sensor, sha256) constraint in the table, INSERT OR IGNORE
  no fsync      iapd with synchronous=OFF: what the fsyncs cost (not something iapd can
                do: a 200 promises the alert is on the disk); its "written" is low
                because the kernel counts a page once while it stays dirty
  no dedup      no exactly-once check at all: a lower bound (not something iapd can do
                either: a retransmission would be stored twice)

The baseline is the first row; the others are compared with it.  Speed is measured,
never asserted; the run fails if an alert committed is not in the file exactly once, or
if a batch sent again is stored again by a variant that promises exactly-once.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import alert_template, make_alert  # noqa: E402

from iapd.store import SCHEMA, AlertRecord, Row, SQLiteBackend  # noqa: E402

UNIQUE_TABLE = SCHEMA.replace("    body_size INTEGER\n);", "    body_size INTEGER,\n    UNIQUE (sensor, sha256)\n);", 1)
assert UNIQUE_TABLE != SCHEMA


def written() -> int:
    """Octets this process has caused to be written to the disk so far."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("write_bytes:"))


def batch(n: int, size: int, start: int) -> list[Row]:
    """C{n} distinct alerts of C{size} octets, as the manager hands them over."""
    head, tail = alert_template(size)  # the benchmark's IDMEF alerts (bench/common.py)
    rows = []
    for i in range(start, start + n):
        body = make_alert(head, tail, "store", i % 16, i)
        rows.append(Row(AlertRecord(sensor=f"sensor{i % 16}.example.org", content_type="application/idmef+xml",
                                    body=body), None, pending=True))
    return rows


def on_disk(path: Path) -> int:
    """The store's octets: its file, WAL and digest index."""
    files = list(path.parent.glob(path.name + "*"))
    files += [f for d in files if d.is_dir() for f in d.iterdir()]
    return sum(f.stat().st_size for f in files if f.is_file())


def run(name: str, alerts: int, size: int, per_batch: int, workdir: Path) -> dict[str, float]:
    path = workdir / name.replace(" ", "-") / "alerts.db"
    path.parent.mkdir()
    if name == "unique index":
        with sqlite3.connect(path) as db:
            db.executescript(UNIQUE_TABLE)
    backend = SQLiteBackend(path)
    backend.open()
    db = backend._db
    assert db is not None
    if name == "no fsync":
        db.execute("PRAGMA synchronous=OFF")
        backend.bodies.sync = lambda: None  # type: ignore[method-assign]  # nor the body log's
    exactly_once = name != "no dedup"

    def commit(rows: list[Row]) -> list[bool]:
        if name in ("iapd", "no fsync"):
            return backend.commit(rows, {})
        # the table alone, without the digest index: the backend's own insert
        db.execute("BEGIN IMMEDIATE")
        ids = backend._insert(db, rows)
        backend.bodies.sync()
        db.execute("COMMIT")
        return [i is not None for i in ids]

    seconds = 0.0
    done = measured = 0
    octets0 = 0
    first: list[Row] = []
    while done < alerts:
        rows = batch(per_batch, size, done)
        first = first or rows
        if done >= alerts // 2 and not measured:
            octets0 = written()
        t0 = time.perf_counter()
        new = commit(rows)
        t1 = time.perf_counter()
        if not all(new):
            raise SystemExit(f"{name}: {new.count(False)} new alerts were taken for retransmissions")
        if done >= alerts // 2:
            seconds += t1 - t0
            measured += len(rows)
        done += len(rows)
    octets = written() - octets0
    if exactly_once:
        again = commit(first)
        if any(again):
            raise SystemExit(f"{name}: {sum(again)} retransmitted alerts were stored again")
    backend.close()
    with sqlite3.connect(path) as check:
        count, distinct = check.execute("SELECT count(*), count(DISTINCT sha256) FROM alerts").fetchone()
    if count != done or distinct != done:
        raise SystemExit(f"{name}: {done} alerts committed, {count} rows and {distinct} distinct digests stored")
    size_on_disk = on_disk(path)
    shutil.rmtree(path.parent)
    return {
        "store_us": seconds / measured * 1e6,
        "written_kib": octets / measured / 1024,
        "file_octets": size_on_disk / done,
        "rate": measured / seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny and quick: checks the harness, not the speed")
    parser.add_argument("--alerts", type=int, default=300_000, help="alerts per variant (default 300,000)")
    parser.add_argument("--size", type=int, default=1024, help="octets per alert (default 1024)")
    parser.add_argument("--batch", type=int, default=4096, help="alerts per commit (default 4096, the store's largest)")
    parser.add_argument("--dir", default=None, help="where the SQLite files go (default: a temporary directory)")
    args = parser.parse_args()
    alerts = 2 * 512 if args.smoke else args.alerts
    per_batch = 256 if args.smoke else args.batch
    with tempfile.TemporaryDirectory(prefix="iapd-store-bench-", dir=args.dir) as tmp:
        print(f"{alerts:,} alerts of {args.size} octets per variant, {per_batch} per commit, in {tmp}", flush=True)
        print(f"{'variant':<12} {'store':>9} {'written':>12} {'on disk':>10} {'alerts/s':>10} {'vs iapd':>8}")
        base = None
        for name in ("iapd", "unique index", "no fsync", "no dedup"):
            r = run(name, alerts, args.size, per_batch, Path(tmp))
            base = base or r
            print(f"{name:<12} {r['store_us']:6.1f} us {r['written_kib']:6.1f} KiB/al"
                  f" {r['file_octets']:6.0f} B/al {r['rate']:10,.0f} {r['rate'] / base['rate']:7.2f}x", flush=True)
    print("every alert stored exactly once; retransmissions not stored again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
