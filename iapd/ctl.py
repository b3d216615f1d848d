"""
C{iapctl -c manager.yaml alerts|sensors|tail}: read what a manager stored; C{backup}: copy it.

It opens the store read-only, from another process, while the manager runs (SQLite in
WAL mode lets readers and the writer proceed together).  C{--json} prints one object per
line with the stable field names of DESIGN.md section 7, for scripts and outside tests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from .config import ConfigError, ManagerConfig, load_manager
from .store import StoreError, read_alerts, read_sensors

_RELATIVE = re.compile(r"(\d+)([smhd])\Z")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(text: str, now: datetime.datetime | None = None) -> str:
    """
    An ISO 8601 time (naive means UTC) or a span back from now (C{90s}, C{10m}, C{2h},
    C{7d}), as the sortable UTC text the store keeps.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    m = _RELATIVE.match(text.strip())
    if m:
        when = now - datetime.timedelta(**{_UNITS[m[2]]: int(m[1])})
    else:
        try:
            when = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"--since: {text!r} is neither an ISO 8601 time nor a span like 10m, 2h, 7d") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
    return when.astimezone(datetime.timezone.utc).isoformat(timespec="microseconds")


def _summary_line(alert: dict[str, Any]) -> str:
    idmef = alert["idmef"] or {}
    what = idmef.get("classification") or ("(heartbeat)" if idmef.get("kind") == "Heartbeat" else "-")
    sev = idmef.get("severity") or "-"
    via = ",".join(alert["via"]) or "direct"
    return (
        f"{alert['id']:>6}  {alert['received'][:19]}Z  {alert['sensor']:<24}  {sev:<6}  "
        f"{what[:60]}  [{alert['size']} octets, via {via}, sha256 {alert['sha256'][:12]}]"
    )


def _print_alerts(alerts: list[dict[str, Any]], as_json: bool) -> None:
    for alert in alerts:
        if as_json:
            print(json.dumps(alert, sort_keys=True))
        else:
            print(_summary_line(alert))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="iapctl", description="Read the alerts and sensors an IAP manager stored, or back its store up."
    )
    parser.add_argument("-c", "--config", required=True, help="the manager's YAML configuration (manager.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    alerts = sub.add_parser("alerts", help="list stored alerts, oldest first")
    tail = sub.add_parser("tail", help="print alerts as they are stored (Ctrl-C to stop)")
    for p in (alerts, tail):
        p.add_argument("--json", action="store_true", help="one JSON object per line")
        p.add_argument("--sensor", help="only this sensor identity (glob patterns allowed)")
    for p in (alerts, tail):
        p.add_argument("--heartbeats", action="store_true", help="include IDMEF heartbeats")
    alerts.add_argument("--since", help="only alerts received since: ISO 8601 time, or 10m, 2h, 7d ago")
    alerts.add_argument("--limit", type=int, help="only the newest N")
    tail.add_argument("--interval", type=float, default=1.0, help="seconds between looks at the store")
    tail.add_argument("--count", type=int, help="stop after N new alerts")
    sensors = sub.add_parser("sensors", help="list sensors with their last connection and alert counts")
    sensors.add_argument("--json", action="store_true", help="one JSON object per line")
    backup = sub.add_parser("backup", help="copy an SQLite store and its body log, while the manager runs")
    backup.add_argument("dest", type=Path, help="the copy's database file (or a directory to put it in)")
    backup.add_argument("--verify", action="store_true",
                        help="then check the copy: SQLite's integrity check, and every body against its SHA-256")
    args = parser.parse_args(argv)

    try:
        config = load_manager(Path(args.config))
        if args.command == "alerts":
            since = parse_since(args.since) if args.since else None
            _print_alerts(
                _read_alerts(config, since=since, sensor=args.sensor, limit=args.limit, heartbeats=args.heartbeats),
                args.json,
            )
        elif args.command == "sensors":
            for s in _read_sensors(config):
                if args.json:
                    print(json.dumps(s, sort_keys=True))
                else:
                    print(_sensor_line(s))
        elif args.command == "backup":
            return _backup(config, args.dest, args.verify)
        else:
            return _tail(config, args)
    except (ConfigError, StoreError, ValueError) as e:
        print(f"iapctl: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    return 0


def _read_alerts(config: ManagerConfig, **kw: Any) -> list[dict[str, Any]]:
    """The SQLite or the PostgreSQL reader, as the configuration's store URL says."""
    if config.store_path is None:
        from .pgstore import read_alerts_pg

        return read_alerts_pg(config.store, **kw)
    return read_alerts(config.store_path, **kw)


def _backup(config: ManagerConfig, dest: Path, verify: bool) -> int:
    if config.store_path is None:
        raise StoreError("iapctl backup copies an SQLite store; this manager's store is PostgreSQL: back it up with"
                         " PostgreSQL's own tools (pg_dump, or a base backup)")
    from .backup import backup_store

    try:
        done = backup_store(config.store_path, dest, verify=verify)
    except KeyboardInterrupt:
        print("iapctl: interrupted: no backup written", file=sys.stderr)
        return 130
    print(f"{done.alerts} alert{'' if done.alerts == 1 else 's'} (the last: {done.last_id or '-'}) in {done.database},"
          f" their bodies in {done.bodies} ({done.log_octets} octets)")
    if done.damaged:
        for problem in done.damaged:
            print(f"iapctl: damaged: {problem}", file=sys.stderr)
        print(f"iapctl: the backup is written, but {len(done.damaged)} of its alerts or pages are damaged"
              " (in the store itself, or only in this copy: a second backup tells which)", file=sys.stderr)
        return 1
    if verify:
        print("checked: the database is sound and every body matches its SHA-256")
    return 0


def _read_sensors(config: ManagerConfig) -> list[dict[str, Any]]:
    if config.store_path is None:
        from .pgstore import read_sensors_pg

        return read_sensors_pg(config.store)
    return read_sensors(config.store_path)


def _when(text: str | None) -> str:
    return f"{text[:19]}Z" if text else "-"


def _sensor_line(s: dict[str, Any]) -> str:
    if s["heartbeat_overdue"] is None:
        beat = "no heartbeat interval known"
    else:
        state = "OVERDUE" if s["heartbeat_overdue"] else "ok"
        beat = f"heartbeat {state} (last {_when(s['last_heartbeat'])}, every {s['heartbeat_interval']:g}s)"
    return (
        f"{s['sensor']:<32} alerts {s['alerts']:>8}  last seen {_when(s['last_seen'])}"
        f"  last alert {_when(s['last_alert'])}  {beat}  from {s['last_peer']}"
    )


def _tail(config: ManagerConfig, args: argparse.Namespace) -> int:
    existing = _read_alerts(config, sensor=args.sensor, limit=1)
    last = existing[-1]["id"] if existing else 0
    printed = 0
    try:
        while args.count is None or printed < args.count:
            new = _read_alerts(config, sensor=args.sensor, after_id=last, heartbeats=args.heartbeats)
            if args.count is not None:
                new = new[: args.count - printed]
            _print_alerts(new, args.json)
            sys.stdout.flush()
            if new:
                last = new[-1]["id"]
                printed += len(new)
            else:
                time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
