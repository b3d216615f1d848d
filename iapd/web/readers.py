"""
Blocking reads of the manager's store for the dashboard: call them from a thread.

The same queries run on SQLite and PostgreSQL; a small L{_Dialect} says how each spells
placeholders, JSON fields, globs and times.  Rows come out as the dicts of
L{iapd.store.alert_dict} and L{iapd.store.read_sensors}, the field names of
C{iapctl --json} (DESIGN.md section 7).

Every read opens its own short connection (read-only for SQLite, which in WAL mode
never waits for the manager's writer), as iapctl does.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import attr

from .. import pgstore
from ..bodylog import BodyReader, log_path
from ..store import BODY_COLUMNS as SQLITE_BODY_COLUMNS
from ..store import PENDING_BODY
from ..store import alert_from_row as sqlite_alert_from_row
from ..store import open_reader as sqlite_open_reader
from ..store import read_sensors
from .query import SEVERITIES, AlertQuery, SensorQuery, StatsQuery

ALERT_COLUMNS = "id, sensor, received, content_type, sha256, via, peer, idmef"


@attr.s(frozen=True, auto_attribs=True)
class _Dialect:
    mark: str
    body_columns: str  # the alert's size, and what its reader needs to summarise or read its body
    field: Callable[[str], str]  # the text of an idmef summary field
    glob: str
    contains: str  # {field} contains the placeholder, ignoring ASCII case
    minute: str  # received truncated to the minute, as 'YYYY-MM-DDTHH:MM'
    time: Callable[[str], Any]  # a sortable UTC text as a query parameter


SQLITE = _Dialect(
    mark="?",
    body_columns=SQLITE_BODY_COLUMNS,
    field=lambda name: f"json_extract(idmef, '$.{name}')",
    glob="sensor GLOB ?",
    contains="instr(lower({field}), lower(?)) > 0",
    minute="substr(received, 1, 16)",
    time=lambda text: text,
)

POSTGRES = _Dialect(
    mark="%s",
    body_columns=f"octet_length(body) AS size, {PENDING_BODY}",
    field=lambda name: f"(idmef->>'{name}')",
    glob="sensor ~ %s",
    contains="position(lower(%s) in lower({field})) > 0",
    minute="to_char(date_trunc('minute', received AT TIME ZONE 'UTC'), 'YYYY-MM-DD\"T\"HH24:MI')",
    time=pgstore.parse_timestamp,
)


def _where(q: AlertQuery, d: _Dialect) -> tuple[list[str], list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    kind = d.field("kind")
    if not q.heartbeats:
        clauses.append(f"(idmef IS NULL OR {kind} IS NULL OR {kind} <> 'Heartbeat')")
    if q.sensor is not None:
        if d is POSTGRES:
            regex = pgstore.glob_regex(q.sensor)
            if regex is None:
                clauses.append("FALSE")
            else:
                clauses.append(d.glob)
                args.append(regex)
        else:
            clauses.append(d.glob)
            args.append(q.sensor)
    if q.severity:
        clauses.append(f"{d.field('severity')} IN ({', '.join([d.mark] * len(q.severity))})")
        args.extend(q.severity)
    if q.classification is not None:
        clauses.append(d.contains.format(field=d.field("classification")))
        args.append(q.classification)
    if q.since is not None:
        clauses.append(f"received >= {d.mark}")
        args.append(d.time(q.since))
    if q.until is not None:
        clauses.append(f"received < {d.mark}")
        args.append(d.time(q.until))
    if q.after_id is not None:
        clauses.append(f"id > {d.mark}")
        args.append(q.after_id)
    if q.before_id is not None:
        clauses.append(f"id < {d.mark}")
        args.append(q.before_id)
    return clauses, args


def _sql_where(clauses: list[str]) -> str:
    return f" WHERE {' AND '.join(clauses)}" if clauses else ""


@attr.s(frozen=True, auto_attribs=True)
class AlertPage:
    alerts: list[dict[str, Any]]
    next_before_id: int | None  # the cursor of the next (older) page, None at the end


class StoreReader:
    """The dashboard's reads, for an SQLite file or a PostgreSQL URL."""

    def __init__(self, store_path: Path | None, url: str | None = None) -> None:
        if (store_path is None) == (url is None):
            raise ValueError("give exactly one of store_path and url")
        self.store_path = store_path
        self.url = url
        self.dialect = SQLITE if store_path is not None else POSTGRES

    @classmethod
    def for_config(cls, config: Any) -> "StoreReader":
        return cls(config.store_path, None if config.store_path is not None else config.store)

    def _rows(self, sql: str, args: Sequence[Any]) -> list[Any]:
        if self.store_path is not None:
            db = sqlite_open_reader(self.store_path)
            try:
                return db.execute(sql, args).fetchall()
            finally:
                db.close()
        assert self.url is not None
        return pgstore.run_query(self.url, sql, args)

    def _alert(self, row: Any, with_body: bool) -> dict[str, Any]:
        if self.store_path is not None:
            with BodyReader(log_path(self.store_path)) as bodies:  # opened only if a body is read
                return sqlite_alert_from_row(row, with_body, bodies)
        return pgstore.alert_from_row(row, with_body)

    def _select(self, with_body: bool = False) -> str:
        # the store summarises after the commit: a row read before that is summarised
        # here, from its body (as iapctl does)
        return f"SELECT {ALERT_COLUMNS}, {self.dialect.body_columns}" + (", body" if with_body else "")

    def alerts(self, q: AlertQuery) -> AlertPage:
        """A page of alerts, newest first."""
        d = self.dialect
        clauses, args = _where(q, d)
        rows = self._rows(
            f"{self._select()} FROM alerts{_sql_where(clauses)} ORDER BY id DESC LIMIT {d.mark}",
            [*args, q.limit + 1],
        )
        alerts = [self._alert(r, False) for r in rows[: q.limit]]
        more = len(rows) > q.limit
        return AlertPage(alerts, alerts[-1]["id"] if more and alerts else None)

    def alert(self, alert_id: int) -> dict[str, Any] | None:
        """One alert with its body, or None."""
        rows = self._rows(f"{self._select(True)} FROM alerts WHERE id = {self.dialect.mark}", [alert_id])
        return self._alert(rows[0], True) if rows else None

    def after(self, after_id: int, limit: int) -> list[dict[str, Any]]:
        """Alerts above C{after_id}, oldest first, heartbeats included: the event stream."""
        d = self.dialect
        rows = self._rows(
            f"{self._select()} FROM alerts WHERE id > {d.mark} ORDER BY id LIMIT {d.mark}", [after_id, limit]
        )
        return [self._alert(r, False) for r in rows]

    def latest_id(self) -> int:
        """The highest alert id, 0 for an empty store."""
        rows = self._rows("SELECT max(id) AS latest FROM alerts", [])
        value = rows[0]["latest"] if rows else None
        return int(value or 0)

    def sensors(self, q: SensorQuery) -> tuple[list[dict[str, Any]], str | None]:
        """A page of sensors by identity, and the cursor of the next page."""
        if self.store_path is not None:
            everyone = read_sensors(self.store_path)
        else:
            assert self.url is not None
            everyone = pgstore.read_sensors_pg(self.url)
        everyone.sort(key=lambda s: s["sensor"])
        if q.after is not None:
            everyone = [s for s in everyone if s["sensor"] > q.after]
        page = everyone[: q.limit]
        return page, page[-1]["sensor"] if len(everyone) > q.limit else None

    def per_minute(self, q: StatsQuery, now: datetime.datetime | None = None) -> dict[str, Any]:
        """
        Alerts per minute by severity over the last C{q.minutes} minutes (the current
        one included), zeros filled in; severities outside IDMEF's four count as other.
        """
        d = self.dialect
        now = now or datetime.datetime.now(datetime.timezone.utc)
        end = now.astimezone(datetime.timezone.utc).replace(second=0, microsecond=0)
        start = end - datetime.timedelta(minutes=q.minutes - 1)
        start_text = start.isoformat(timespec="microseconds")
        alerts = q.alerts
        if alerts.since is None or alerts.since < start_text:
            alerts = attr.evolve(alerts, since=start_text)
        clauses, args = _where(attr.evolve(alerts, after_id=None, before_id=None), d)
        severity = d.field("severity")
        cases = " ".join(f"WHEN '{s}' THEN '{s}'" for s in SEVERITIES)
        rows = self._rows(
            f"SELECT {d.minute} AS minute, CASE {severity} {cases} ELSE 'other' END AS severity, count(*) AS n"
            f" FROM alerts{_sql_where(clauses)} GROUP BY 1, 2",
            args,
        )
        names = (*SEVERITIES, "other")
        buckets: dict[str, dict[str, int]] = {}
        for i in range(q.minutes):
            minute = (start + datetime.timedelta(minutes=i)).strftime("%Y-%m-%dT%H:%M")
            buckets[minute] = dict.fromkeys(names, 0)
        for row in rows:
            bucket = buckets.get(row["minute"])
            if bucket is not None:
                bucket[row["severity"]] += int(row["n"])
        return {
            "start": start.isoformat(),
            "minutes": q.minutes,
            "severities": list(names),
            "series": [{"minute": f"{m}:00+00:00", "counts": c} for m, c in buckets.items()],
        }


def body_text(body: bytes) -> str | None:
    """A body as text when it is UTF-8, else None."""
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None


def json_bytes(value: Any) -> bytes:
    """Compact, sorted JSON; never HTML-significant characters unescaped (see below)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    # served as application/json with nosniff it is never HTML; escaping <, > and & as
    # well costs nothing and keeps the text inert wherever it is pasted
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text.encode("utf-8")
