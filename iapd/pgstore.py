"""
The PostgreSQL store: C{store: postgresql://user@host/dbname} in manager.yaml.

The queueing, batching and fairness are L{iapd.store.GroupCommitStore}'s; this module
only knows how to commit one batch to PostgreSQL (psycopg 3, synchronous API, used only
from the store's own thread) and how iapctl reads the tables back in the same shapes
as the SQLite readers.

Several managers may write the same database.  Exactly-once in the store then rests on
the UNIQUE (sensor, sha256) constraint: C{INSERT ... ON CONFLICT DO NOTHING} makes a
second transaction inserting the same key wait for the first and then insert nothing,
at READ COMMITTED, without an error.  Two transactions taking the same keys in
different orders could still deadlock on each other, so every transaction takes its
locks in one global order: alerts sorted by (sensor, sha256), then sensors rows sorted
by identity.  A deadlock or serialization failure that happens anyway (another program
writing the tables) is retried a few times, and a connection found broken is opened
again once per commit: retrying is always safe, because a transaction that did commit
before the connection broke turns into duplicates, which are answered 200 too.

The URL's password never appears in logs or messages: C{str()} of a backend and every
error message show the URL without it.

IDMEF summaries are written after the commit, as in SQLite (L{GroupCommitStore}):
SQL NULL in C{idmef} means "not summarised yet", JSON C{null} "no summary".  Passes
find pending alerts through the partial index C{alerts_unsummarised}; a store made by
an earlier version gets it when the manager opens it, and where the manager's role may
not create it, summaries stay in each commit (slower acknowledgements, same data) and
the log says what to ask the DBA for.

psycopg is imported only when a PostgreSQL store is used: C{pip install
'iapd[postgresql]'}.
"""

from __future__ import annotations

import datetime
import re
from typing import Any, Sequence

from twisted.logger import Logger

from .store import (
    PENDING_BODY,
    GroupCommitStore,
    Row,
    Seen,
    StoreError,
    alert_dict,
    heartbeat_overdue,
)

SCHEMES = ("postgresql://", "postgres://")

#: libpq connection parameters iapd sets unless the URL sets them itself.
CONNECT_DEFAULTS = {
    "connect_timeout": "10",
    "application_name": "iapd",
    # a server that vanished without a RST must not hold a commit (and the sensor's
    # acknowledgement) for the kernel's two hours
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}

UNSUMMARISED_INDEX = "CREATE INDEX IF NOT EXISTS alerts_unsummarised ON alerts (id) WHERE idmef IS NULL"

SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS alerts (
        id BIGSERIAL PRIMARY KEY,
        sensor TEXT NOT NULL,
        received TIMESTAMPTZ NOT NULL,
        content_type TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        via JSONB NOT NULL DEFAULT '[]',
        peer TEXT,
        body BYTEA NOT NULL,
        idmef JSONB,
        UNIQUE (sensor, sha256)
    )
    """,
    "CREATE INDEX IF NOT EXISTS alerts_received ON alerts (received)",
    # what the summary passes read (GroupCommitStore): small, it holds only the alerts
    # committed and not yet summarised
    UNSUMMARISED_INDEX,
    """
    CREATE TABLE IF NOT EXISTS sensors (
        identity TEXT PRIMARY KEY,
        first_seen TIMESTAMPTZ NOT NULL,
        last_seen TIMESTAMPTZ NOT NULL,
        last_peer TEXT,
        last_via JSONB NOT NULL DEFAULT '[]',
        last_heartbeat TIMESTAMPTZ,
        heartbeat_interval DOUBLE PRECISION
    )
    """,
)

INSERT_ALERT = (
    "INSERT INTO alerts (id, sensor, received, content_type, sha256, via, peer, body, idmef)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (sensor, sha256) DO NOTHING RETURNING id"
)

# Managers commit concurrently, so a connection noted late must not move a sensor's
# times backwards: the newest note wins, whichever transaction commits last.
UPSERT_SEEN = (
    "INSERT INTO sensors AS s (identity, first_seen, last_seen, last_peer, last_via) VALUES (%s, %s, %s, %s, %s)"
    " ON CONFLICT (identity) DO UPDATE SET"
    " first_seen = LEAST(s.first_seen, excluded.first_seen),"
    " last_peer = CASE WHEN excluded.last_seen >= s.last_seen THEN excluded.last_peer ELSE s.last_peer END,"
    " last_via = CASE WHEN excluded.last_seen >= s.last_seen THEN excluded.last_via ELSE s.last_via END,"
    " last_seen = GREATEST(s.last_seen, excluded.last_seen)"
)

UPSERT_HEARTBEAT = (
    "INSERT INTO sensors AS s (identity, first_seen, last_seen, last_peer, last_via, last_heartbeat,"
    " heartbeat_interval) VALUES (%s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (identity) DO UPDATE SET"
    " last_heartbeat = GREATEST(s.last_heartbeat, excluded.last_heartbeat),"
    " heartbeat_interval = COALESCE(excluded.heartbeat_interval, s.heartbeat_interval)"
)

# Serializes schema creation between managers starting together: concurrent CREATE
# TABLE IF NOT EXISTS of one table can fail with a unique violation in the catalog.
_SCHEMA_LOCK = 0x1A9D_5C4E

_RETRIES = 3
"""Attempts after a deadlock or serialization failure before a commit gives up."""


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise StoreError(
            "PostgreSQL stores need the psycopg package: pip install 'iapd[postgresql]'"
        ) from None
    return psycopg


def redact(url: str) -> str:
    """C{url} without its password (in the authority or as a C{password=} parameter)."""
    scheme = next((prefix for prefix in SCHEMES if url.startswith(prefix)), None)
    if scheme is None:
        # key=value connection strings
        return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", url, flags=re.IGNORECASE)
    rest = url[len(scheme):]
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        userinfo, _, hosts = authority.rpartition("@")
        user = userinfo.split(":", 1)[0]
        authority = f"{user}@{hosts}" if user else hosts
    path, question, query = tail.partition("?")
    if question:
        query, hash_, fragment = query.partition("#")
        kept = [item for item in query.split("&") if item and not item.lower().startswith("password=")]
        tail = path + ("?" + "&".join(kept) if kept else "") + hash_ + fragment
    return scheme + authority + tail


def url_problem(url: str) -> str | None:
    """Why C{url} is not a usable PostgreSQL store URL, or None; never connects."""
    if not url.startswith(SCHEMES):
        return f"not a PostgreSQL URL (postgresql://user@host/dbname): {redact(url)!r}"
    try:
        psycopg = _psycopg()
    except StoreError as e:
        return str(e)
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error as e:
        return f"not a PostgreSQL URL (postgresql://user@host/dbname): {redact(url)!r}: {_one_line(e, url)}"
    for port in str(params.get("port", "")).split(","):
        if port and not port.isdigit():
            return f"not a PostgreSQL URL: port {port!r} is not a number in {redact(url)!r}"
    return None


def _one_line(error: BaseException, url: str) -> str:
    """An error message on one line, with any password that libpq echoed removed."""
    text = " ".join(str(error).split()) or type(error).__name__
    password = _password(url)
    if password:
        text = text.replace(password, "***")
    return text


def _password(url: str) -> str | None:
    try:
        import psycopg

        password = psycopg.conninfo.conninfo_to_dict(url).get("password")
    except Exception:  # no psycopg, or not a URL: then libpq echoed nothing either
        return None
    return str(password) if password else None


def _conninfo(url: str) -> str:
    psycopg = _psycopg()
    try:
        given = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error as e:
        raise StoreError(f"not a PostgreSQL URL: {redact(url)}: {_one_line(e, url)}") from None
    extra = {k: v for k, v in CONNECT_DEFAULTS.items() if k not in given}
    return psycopg.conninfo.make_conninfo(url, **extra)


def _connect(url: str) -> Any:
    psycopg = _psycopg()
    conninfo = _conninfo(url)
    try:
        return psycopg.connect(conninfo, autocommit=True)
    except psycopg.Error as e:
        raise StoreError(f"cannot connect to PostgreSQL store {redact(url)}: {_one_line(e, url)}") from None


def parse_timestamp(text: str) -> datetime.datetime:
    """Receive times travel as ISO 8601 text (as in SQLite); a time without a zone is UTC."""
    when = datetime.datetime.fromisoformat(text)
    return when if when.tzinfo is not None else when.replace(tzinfo=datetime.timezone.utc)


def _iso(when: datetime.datetime | None) -> str | None:
    """A timestamp as the SQLite store keeps it: ISO 8601 UTC with microseconds."""
    if when is None:
        return None
    return when.astimezone(datetime.timezone.utc).isoformat(timespec="microseconds")


def _clean(value: Any) -> Any:
    """
    A JSON value PostgreSQL's JSONB accepts: it refuses NUL characters and lone
    surrogates in strings, and one such summary must not fail a whole batch.
    """
    if isinstance(value, str):
        if "\0" in value:
            value = value.replace("\0", "\ufffd")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = value.encode("utf-8", "replace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class PostgresBackend:
    """A PostgreSQL database; every method runs on the store's own thread."""

    log = Logger()

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: Any = None
        self.defers_summaries = False
        """Whether summaries may follow the commit: known once open (L{_summary_index})."""

    def __str__(self) -> str:
        return redact(self.url)

    def __repr__(self) -> str:
        return f"<PostgresBackend {self}>"

    # -- connection --------------------------------------------------------------------

    def open(self) -> None:
        self._conn = self._connect_with_schema()
        try:
            self.defers_summaries = self._summary_index(self._conn)
        except BaseException:
            self._drop_connection()
            raise

    def _summary_index(self, conn: Any) -> bool:
        """
        Make sure the index the summary passes read exists; whether it does.

        Tables made by this version have it.  For a store made by an earlier one it is
        created now: a scan of the table under a lock that holds commits back, once.
        Its rows that have no summary (SQL NULL then) are summarised again, as JSON
        C{null}, by the passes.  A role that may not create it (tables a DBA made and
        owns) keeps summaries in the commit.
        """
        psycopg = _psycopg()
        try:
            if conn.execute("SELECT to_regclass('alerts_unsummarised') IS NOT NULL").fetchone()[0]:
                return True
            self.log.info("creating the index alerts_unsummarised in PostgreSQL store {store} (once)", store=str(self))
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                conn.execute(UNSUMMARISED_INDEX)
        except psycopg.errors.InsufficientPrivilege as e:
            self.log.warn(
                "PostgreSQL store {store}: cannot create the index alerts_unsummarised ({why}); IDMEF summaries"
                " are written in each commit, which slows acknowledgements.  To write them after the commit,"
                " have the tables' owner run (CONCURRENTLY: without holding commits back): {sql}",
                store=str(self), why=_one_line(e, self.url),
                sql=UNSUMMARISED_INDEX.replace("CREATE INDEX", "CREATE INDEX CONCURRENTLY"),
            )
            return False
        except psycopg.Error as e:
            raise StoreError(
                f"cannot open PostgreSQL store {self}: creating the index alerts_unsummarised failed:"
                f" {_one_line(e, self.url)}"
            ) from None
        return True

    def _connect_with_schema(self) -> Any:
        psycopg = _psycopg()
        conn = _connect(self.url)
        try:
            with conn.transaction():
                have = conn.execute("SELECT to_regclass('alerts') IS NOT NULL AND to_regclass('sensors') IS NOT NULL")
                row = have.fetchone()
                if not (row and row[0]):
                    # a manager whose role may only read and write existing tables never
                    # gets here: the tables a DBA made are used as they are
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                    for statement in SCHEMA:
                        conn.execute(statement)
        except psycopg.Error as e:
            conn.close()
            raise StoreError(f"cannot open PostgreSQL store {self}: {_one_line(e, self.url)}") from None
        return conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def close(self) -> None:
        self._drop_connection()

    # -- writing -----------------------------------------------------------------------

    def commit(self, rows: Sequence[Row], seen: Seen) -> list[bool]:
        psycopg = _psycopg()
        reconnected = False
        conflicts = 0
        while True:
            fresh = False
            if self._conn is None or self._conn.closed or self._conn.broken:
                # the server went away since the last commit (or this one): try again
                # once per commit, so an outage costs one connection attempt per batch
                if reconnected:
                    raise StoreError(f"the connection to PostgreSQL store {self} is broken")
                self._drop_connection()
                reconnected = fresh = True
                self._conn = self._connect_with_schema()
            conn = self._conn
            try:
                return self._transaction(conn, rows, seen)
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure) as e:
                conflicts += 1
                if conflicts >= _RETRIES:
                    raise StoreError(
                        f"commit to PostgreSQL store {self} failed {conflicts} times: {_one_line(e, self.url)}"
                    ) from None
            except psycopg.Error as e:
                if conn.broken or conn.closed:
                    # nothing or everything of the transaction committed: either way
                    # running it again is right (a committed alert becomes a duplicate)
                    self._drop_connection()
                    if not fresh and not reconnected:
                        continue
                    raise StoreError(
                        f"lost the connection to PostgreSQL store {self}: {_one_line(e, self.url)}"
                    ) from None
                raise StoreError(f"commit to PostgreSQL store {self} failed: {_one_line(e, self.url)}") from None

    def _transaction(self, conn: Any, rows: Sequence[Row], seen: Seen) -> list[bool]:
        from psycopg.types.json import Jsonb

        # One global lock order for every manager: alerts by key, then sensors by name.
        # The ids still follow the order the alerts arrived in (iapctl lists by id): they
        # are taken from the sequence first, in arrival order, and given out by position.
        order = sorted(range(len(rows)), key=lambda i: (rows[i].record.sensor, rows[i].record.sha256))
        ids: list[int] = []
        if rows:
            ids = sorted(
                r[0] for r in conn.execute(
                    "SELECT nextval(pg_get_serial_sequence('alerts', 'id')) FROM generate_series(1, %s)", (len(rows),)
                )
            )
        params = []
        # what the alerts of a connection, or of a second, share is converted once
        vias: dict[tuple[str, ...], Jsonb] = {}
        times: dict[str, Any] = {}
        for i in order:
            r = rows[i].record
            summary = rows[i].summary
            via = vias.get(r.via)
            if via is None:
                via = vias[r.via] = Jsonb(_clean(list(r.via)))
            received = times.get(r.received)
            if received is None:
                received = times[r.received] = parse_timestamp(r.received)
            params.append((
                ids[i], r.sensor, received, r.content_type, r.sha256, via,
                # SQL NULL: summarised after the commit; JSON null: there is no summary
                r.peer, r.body, None if rows[i].pending else Jsonb(_clean(summary)),
            ))
        sensors = self._sensor_updates(rows, seen)
        results = [False] * len(rows)
        with conn.transaction():
            with conn.cursor() as cursor:
                if params:
                    cursor.executemany(INSERT_ALERT, params, returning=True)
                    inserted = []
                    while True:
                        inserted.append(cursor.fetchone() is not None)
                        if not cursor.nextset():
                            break
                    if len(inserted) != len(order):
                        raise StoreError(f"PostgreSQL returned {len(inserted)} results for {len(order)} alerts")
                    for i, new in zip(order, inserted):
                        results[i] = new
                for _, statement, values in sensors:
                    cursor.execute(statement, values)
        return results

    # -- summaries after the commit (GroupCommitStore) ---------------------------------

    def _on_a_live_connection(self, what: str, work: Any) -> Any:
        """
        C{work(connection)}, run again once on a new connection if the server dropped
        the old one (a restart between a commit and a pass is found only now): both
        reading pending alerts and writing summaries may be repeated.
        """
        psycopg = _psycopg()
        for attempt in range(2):
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._drop_connection()
                self._conn = self._connect_with_schema()
            conn = self._conn
            try:
                return work(conn)
            except psycopg.Error as e:
                if (conn.broken or conn.closed) and attempt == 0:
                    self._drop_connection()
                    continue
                raise StoreError(f"{what} PostgreSQL store {self} failed: {_one_line(e, self.url)}") from None
        raise AssertionError("not reached")

    def pending_summaries(self, limit: int) -> list[tuple[int, bytes]]:
        """Up to C{limit} alerts stored without their summary, oldest first."""
        rows = self._on_a_live_connection("reading alerts to summarise from", lambda conn: conn.execute(
            "SELECT id, body FROM alerts WHERE idmef IS NULL ORDER BY id LIMIT %s", (limit,)
        ).fetchall())
        return [(alert_id, bytes(body)) for alert_id, body in rows]

    def write_summaries(self, summaries: Sequence[tuple[int, dict[str, Any] | None]]) -> None:
        """
        Set C{(id, summary)} summaries, in one transaction, in id order.

        Not waiting for the WAL flush: a summary lost in a crash is computed again.  In
        id order, so that two managers summarising the same alerts wait for each other
        instead of deadlocking; the second finds them done and leaves them.
        """
        from psycopg.types.json import Jsonb

        params = [(Jsonb(_clean(summary)), alert_id) for alert_id, summary in sorted(summaries, key=lambda s: s[0])]

        def write(conn: Any) -> None:
            with conn.transaction():
                conn.execute("SET LOCAL synchronous_commit TO OFF")
                with conn.cursor() as cursor:
                    cursor.executemany("UPDATE alerts SET idmef = %s WHERE id = %s AND idmef IS NULL", params)

        self._on_a_live_connection("writing summaries to", write)

    @staticmethod
    def _sensor_updates(rows: Sequence[Row], seen: Seen) -> list[tuple[str, str, tuple[Any, ...]]]:
        """The sensors rows to write, sorted by identity: at most two statements each."""
        from psycopg.types.json import Jsonb

        updates: list[tuple[str, str, tuple[Any, ...]]] = []
        for identity, (when, peer, via) in seen.items():
            at = parse_timestamp(when)
            updates.append((identity, UPSERT_SEEN, (identity, at, at, peer, Jsonb(list(via)))))
        # several heartbeats of one sensor in a batch: the first one's connection data
        # for a sensor not yet known, the latest time, the last interval announced
        beats: dict[str, list[Any]] = {}
        for row in rows:
            if not row.heartbeat:
                continue
            r = row.record
            at = parse_timestamp(r.received)
            interval = (row.summary or {}).get("heartbeat_interval")
            if r.sensor not in beats:
                beats[r.sensor] = [r.sensor, at, at, r.peer, Jsonb(list(r.via)), at, interval]
            else:
                beat = beats[r.sensor]
                beat[5] = max(beat[5], at)
                if interval is not None:
                    beat[6] = interval
        for identity, beat in beats.items():
            interval = beat[6]
            if isinstance(interval, bool) or not isinstance(interval, (int, float)):
                beat[6] = None
            else:
                beat[6] = float(interval)
            updates.append((identity, UPSERT_HEARTBEAT, tuple(beat)))
        # stable: a sensor's connection note comes before its heartbeat
        updates.sort(key=lambda u: u[0])
        return updates


class PostgresStore(GroupCommitStore):
    """A L{GroupCommitStore} on a PostgreSQL database."""

    def __init__(self, url: str, reactor: Any, **kw: Any) -> None:
        super().__init__(PostgresBackend(url), reactor, **kw)
        self.url = url


# -- reading, for iapctl and tests: synchronous, another process ---------------------


def open_reader(url: str) -> Any:
    """A connection for readers (iapctl, the dashboard), separate from the manager's writing one."""
    psycopg = _psycopg()
    from psycopg.rows import dict_row

    try:
        conn = psycopg.connect(_conninfo(url), autocommit=True, row_factory=dict_row)
    except psycopg.Error as e:
        raise StoreError(f"cannot read PostgreSQL store {redact(url)}: {_one_line(e, url)}") from None
    return conn


def run_query(url: str, sql: str, args: Sequence[Any]) -> list[dict[str, Any]]:
    """One read-only query on a fresh connection: readers are short-lived commands and web requests."""
    psycopg = _psycopg()
    conn = open_reader(url)
    try:
        return list(conn.execute(sql, args).fetchall())
    except psycopg.errors.UndefinedTable:
        raise StoreError(
            f"no store in {redact(url)}: no alerts or sensors table (has the manager run with this configuration?)"
        ) from None
    except psycopg.Error as e:
        raise StoreError(f"cannot read PostgreSQL store {redact(url)}: {_one_line(e, url)}") from None
    finally:
        conn.close()


def glob_regex(pattern: str) -> str | None:
    """
    A PostgreSQL regular expression (for C{~}) matching what SQLite's GLOB matches:
    C{*} any text, C{?} one character, C{[...]} a set (C{[^...]} its complement), the
    rest literally and case-sensitively.  None when nothing can match (a set that is
    never closed, as in SQLite).
    """
    out = ["^"]
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = i + 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            end = pattern.find("]", j)
            if end < 0:
                return None  # SQLite: an unterminated set matches nothing
            body = pattern[i + 1:end]
            negate = body.startswith("^")
            if negate:
                body = body[1:]
            members = "".join("\\" + ch if ch in "\\[" else ch for ch in body)
            out.append("[" + ("^" if negate else "") + members + "]")
            i = end
        elif c.isascii() and not c.isalnum():
            out.append("\\" + c)
        else:
            out.append(c)
        i += 1
    out.append("$")
    return "".join(out)


def alert_from_row(row: dict[str, Any], with_body: bool) -> dict[str, Any]:
    """One PostgreSQL row in the field names of C{iapctl alerts --json}, as the SQLite store gives them."""
    idmef = row["idmef"]
    if row.get("pending_body") is not None:
        # stored, not summarised yet (the manager catches up when it has time)
        from .idmef import summarize

        idmef = summarize(bytes(row["pending_body"]))
    body = bytes(row["body"]) if with_body else None
    return alert_dict(row, body, received=_iso(row["received"]), via=row["via"], idmef=idmef)


def read_alerts_pg(
    url: str,
    since: str | None = None,
    sensor: str | None = None,
    after_id: int | None = None,
    limit: int | None = None,
    with_body: bool = False,
    heartbeats: bool = True,
) -> list[dict[str, Any]]:
    """L{iapd.store.read_alerts} for a PostgreSQL store: the same filters and dicts."""
    clauses: list[str] = []
    args: list[Any] = []
    if not heartbeats:
        clauses.append("(idmef IS NULL OR idmef->>'kind' IS DISTINCT FROM 'Heartbeat')")
    if since is not None:
        try:
            args.append(parse_timestamp(since))
        except ValueError:
            raise StoreError(f"not an ISO 8601 time: {since!r}") from None
        clauses.append("received >= %s")
    if sensor is not None:
        regex = glob_regex(sensor.lower())
        if regex is None:
            clauses.append("FALSE")
        else:
            clauses.append("sensor ~ %s")
            args.append(regex)
    if after_id is not None:
        clauses.append("id > %s")
        args.append(after_id)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    if limit is not None:
        # the newest N, still printed oldest first
        tail = " ORDER BY id DESC LIMIT %s"
        args.append(limit)
    else:
        tail = " ORDER BY id"
    rows = run_query(
        url,
        f"SELECT id, sensor, received, content_type, sha256, via, peer, octet_length(body) AS size, idmef, {PENDING_BODY}"
        + (", body" if with_body else "")
        + f" FROM alerts{where}{tail}",
        args,
    )
    alerts = [alert_from_row(r, with_body) for r in rows]
    if limit is not None:
        alerts.reverse()
    return alerts


def read_sensors_pg(url: str) -> list[dict[str, Any]]:
    """L{iapd.store.read_sensors} for a PostgreSQL store: the same dicts."""
    rows = run_query(
        url,
        "SELECT s.identity, s.first_seen, s.last_seen, s.last_peer, s.last_via,"
        " s.last_heartbeat, s.heartbeat_interval,"
        " (SELECT count(*) FROM alerts a WHERE a.sensor = s.identity) AS alerts,"
        " (SELECT max(received) FROM alerts a WHERE a.sensor = s.identity) AS last_alert"
        " FROM sensors s ORDER BY s.identity COLLATE \"C\"",
        (),
    )
    out = []
    for r in rows:
        last_heartbeat = _iso(r["last_heartbeat"])
        out.append({
            "sensor": r["identity"],
            "first_seen": _iso(r["first_seen"]),
            "last_seen": _iso(r["last_seen"]),
            "last_peer": r["last_peer"],
            "via": r["last_via"],
            "alerts": r["alerts"],
            "last_alert": _iso(r["last_alert"]),
            "last_heartbeat": last_heartbeat,
            "heartbeat_interval": r["heartbeat_interval"],
            "heartbeat_overdue": heartbeat_overdue(last_heartbeat, r["heartbeat_interval"]),
        })
    return out
