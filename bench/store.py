"""
What one alert costs the SQLite store, and how much of it is the exactly-once check.

    python3 bench/store.py            # about a minute: 300,000 alerts per variant
    python3 bench/store.py --smoke    # seconds, for CI: checks the harness still works

The manager's saturated store thread, alone: batches of 4,096 alerts (1 KiB, from 16
sensors) committed through iapd's own L{SQLiteBackend} into a fresh SQLite file, one
transaction per batch, as under full load.  For each variant it prints the time per
alert in the INSERT and in the COMMIT (fsync and checkpoints), the bytes written to the
disk per alert (C{/proc/self/io}), and the alerts per second the store alone allows,
measured over the second half of the run (the first half grows the file).

  iapd        the store as the manager runs it (synchronous=FULL, UNIQUE (sensor, sha256))
  no fsync    synchronous=OFF: what the fsyncs cost (not something iapd can do: a 200
              promises the alert is on the disk); its "written" is low because the
              kernel counts a page once while it stays dirty, and nothing cleans it
  no dedup    a table without the UNIQUE (sensor, sha256) index: what exactly-once costs
              (not something iapd can do either: a retransmission would be stored twice)

The baseline is the first row; the others are compared with it.  Speed is measured,
never asserted; the run fails if an alert committed is not in the file exactly once, or
if a batch sent again is stored again by the iapd variant.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iapd.store import SCHEMA, AlertRecord, Row, SQLiteBackend  # noqa: E402

NO_DEDUP_TABLE = SCHEMA.replace(",\n    UNIQUE (sensor, sha256)\n", "\n")


def written() -> int:
    """Octets this process has caused to be written to the disk so far."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("write_bytes:"))


def batch(n: int, size: int, start: int) -> list[Row]:
    """C{n} distinct alerts of C{size} octets, as the manager hands them over."""
    filler = b"x" * size
    rows = []
    for i in range(start, start + n):
        body = (b"<alert n=%d/>" % i + filler)[:size]
        rows.append(Row(AlertRecord(sensor=f"sensor{i % 16}.example.org", content_type="application/idmef+xml",
                                    body=body), None, pending=True))
    return rows


def run(name: str, alerts: int, size: int, per_batch: int, workdir: Path) -> dict[str, float]:
    path = workdir / f"{name.replace(' ', '-')}.db"
    if name == "no dedup":
        with sqlite3.connect(path) as db:
            db.executescript(NO_DEDUP_TABLE)
    backend = SQLiteBackend(path)
    backend.open()
    db = backend._db  # the backend's own connection and insert, timed in two halves
    assert db is not None
    if name == "no fsync":
        db.execute("PRAGMA synchronous=OFF")
    insert = commit = 0.0
    done = measured = 0
    octets0 = 0
    first: list[Row] = []
    while done < alerts:
        rows = batch(per_batch, size, done)
        first = first or rows
        if done >= alerts // 2 and not measured:
            octets0 = written()
        t0 = time.perf_counter()
        db.execute("BEGIN IMMEDIATE")
        new = backend._insert(db, rows)
        t1 = time.perf_counter()
        db.execute("COMMIT")
        t2 = time.perf_counter()
        if not all(new):
            raise SystemExit(f"{name}: {new.count(False)} new alerts were taken for retransmissions")
        if done >= alerts // 2:
            insert += t1 - t0
            commit += t2 - t1
            measured += len(rows)
        done += len(rows)
    octets = written() - octets0
    if name == "iapd":
        again = backend.commit(first, {})
        if any(again):
            raise SystemExit(f"iapd: {sum(again)} retransmitted alerts were stored again")
    backend.close()
    with sqlite3.connect(path) as db:
        count, distinct = db.execute("SELECT count(*), count(DISTINCT sha256) FROM alerts").fetchone()
    if count != done or distinct != done:
        raise SystemExit(f"{name}: {done} alerts committed, {count} rows and {distinct} distinct digests stored")
    size_on_disk = path.stat().st_size
    for leftover in workdir.glob(path.name + "*"):
        leftover.unlink()
    return {
        "insert_us": insert / measured * 1e6,
        "commit_us": commit / measured * 1e6,
        "written_kib": octets / measured / 1024,
        "file_octets": size_on_disk / done,
        "rate": measured / (insert + commit),
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
        print(f"{'variant':<10} {'insert':>9} {'commit':>9} {'written':>12} {'file':>10} {'alerts/s':>10} {'vs iapd':>8}")
        base = None
        for name in ("iapd", "no fsync", "no dedup"):
            r = run(name, alerts, args.size, per_batch, Path(tmp))
            base = base or r
            print(f"{name:<10} {r['insert_us']:6.1f} us {r['commit_us']:6.1f} us {r['written_kib']:6.1f} KiB/al"
                  f" {r['file_octets']:6.0f} B/al {r['rate']:10,.0f} {r['rate'] / base['rate']:7.2f}x", flush=True)
    print("every alert stored exactly once; retransmissions not stored again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
