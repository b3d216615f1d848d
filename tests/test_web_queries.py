"""
The dashboard's store reads on both stores (SQLite, and a real PostgreSQL server when
Debian's postgresql is installed), and the event stream's Python filter agreeing with
the SQL one for every filter.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Iterator

import pytest

from iapd.store import AlertRecord, Row, SQLiteBackend
from iapd.web.query import AlertQuery, QueryError, SensorQuery, StatsQuery
from iapd.web.readers import StoreReader

from .pg import pg_database, pg_server  # noqa: F401  (pytest fixtures)

NOW = datetime.datetime(2026, 11, 23, 10, 30, 20, tzinfo=datetime.timezone.utc)


def at(minutes: float) -> str:
    return (NOW + datetime.timedelta(minutes=minutes)).isoformat(timespec="microseconds")


def summary(classification: str | None, severity: str | None, kind: str = "Alert") -> dict[str, Any]:
    return {
        "kind": kind, "messageid": None, "create_time": None, "classification": classification,
        "severity": severity, "analyzer": [], "source": [], "target": [], "messages": 1,
        "heartbeat_interval": 60 if kind == "Heartbeat" else None,
    }


# sensor, minutes from NOW, summary (None: not IDMEF)
DATA = [
    ("s1.test", -50, summary("SSH Brute force", "high")),
    ("s1.test", -40, summary("ssh login", "low")),
    ("s2.test", -30, summary("Port SCAN", "info")),
    ("s2.test", -20, None),
    ("dmz-1.test", -12, summary("Port scan\u00e9 <b>", "weird")),
    ("s1.test", -11, summary(None, None, kind="Heartbeat")),
    ("dmz-1.test", -2.5, summary("web attack", "high")),
    ("s1.test", -2.2, summary("SSH again", "medium")),
    ("s2.test", -0.1, summary(None, None)),
]


def rows() -> list[Row]:
    return [
        Row(AlertRecord(sensor, "application/x-idef-alert", f"body {i}".encode(), via=("p.test",) if i % 2 else (),
                        peer="127.0.0.1:1", received=at(minutes)), s)
        for i, (sensor, minutes, s) in enumerate(DATA)
    ]


@pytest.fixture(params=["sqlite", "postgresql"])
def reader(request: Any, tmp_path: Path) -> Iterator[StoreReader]:
    if request.param == "sqlite":
        backend: Any = SQLiteBackend(tmp_path / "alerts.db")
        result = StoreReader(tmp_path / "alerts.db")
    else:
        url = request.getfixturevalue("pg_database")
        from iapd.pgstore import PostgresBackend

        backend = PostgresBackend(url)
        result = StoreReader(None, url)
    backend.open()
    try:
        backend.commit(rows(), {})
        backend.commit([], {"s1.test": (at(-1), "127.0.0.1:9", ()), "s2.test": (at(-1), None, ("p.test",))})
    finally:
        backend.close()
    yield result


QUERIES = [
    AlertQuery(),
    AlertQuery(heartbeats=True),
    AlertQuery(sensor="s?.test"),
    AlertQuery(sensor="s[12].test", heartbeats=True),
    AlertQuery(sensor="dmz-*"),
    AlertQuery(sensor="["),
    AlertQuery(sensor="s1.test"),
    AlertQuery(severity=("high",)),
    AlertQuery(severity=("low", "info")),
    AlertQuery(severity=("weird",)),
    AlertQuery(classification="ssh"),
    AlertQuery(classification="SCAN"),
    AlertQuery(classification="<b>"),
    AlertQuery(classification="port scan\u00e9"),
    AlertQuery(since=at(-30)),
    AlertQuery(until=at(-12)),
    AlertQuery(since=at(-45), until=at(-2.2)),
    AlertQuery(limit=2),
    AlertQuery(before_id=5),
    AlertQuery(after_id=3, before_id=8, heartbeats=True),
    AlertQuery(sensor="s*", severity=("high", "medium"), classification="SSH", since=at(-60)),
]


@pytest.mark.parametrize("query", QUERIES, ids=[repr(q)[10:80] for q in QUERIES])
def test_sql_and_python_filters_agree(reader: StoreReader, query: AlertQuery) -> None:
    everything = list(reversed(reader.after(0, 1000)))
    assert len(everything) == len(DATA)
    expected = [a for a in everything if query.matches(a)]
    page = reader.alerts(query)
    assert [a["id"] for a in page.alerts] == [a["id"] for a in expected][: query.limit]
    assert page.alerts == expected[: query.limit]
    assert page.next_before_id == (page.alerts[-1]["id"] if len(expected) > query.limit else None)


def test_one_alert_latest_and_after(reader: StoreReader) -> None:
    assert reader.latest_id() == len(DATA)
    alert = reader.alert(2)
    assert alert is not None and alert["body"] == b"body 1" and alert["via"] == ["p.test"]
    assert alert["received"] == at(-40)
    assert reader.alert(999) is None
    assert [a["id"] for a in reader.after(7, 10)] == [8, 9]
    assert [a["id"] for a in reader.after(0, 2)] == [1, 2]


def test_per_minute(reader: StoreReader) -> None:
    stats = reader.per_minute(StatsQuery(AlertQuery(), minutes=15), now=NOW)
    assert stats["start"] == "2026-11-23T10:16:00+00:00"
    assert len(stats["series"]) == 15
    assert stats["series"][-1]["minute"] == "2026-11-23T10:30:00+00:00"
    counts = {m["minute"][11:16]: {k: v for k, v in m["counts"].items() if v} for m in stats["series"]}
    assert counts["10:18"] == {"other": 1}  # the "weird" severity, at -12 min; the heartbeat at -11 is left out
    assert counts["10:27"] == {"high": 1}
    assert counts["10:28"] == {"medium": 1}
    assert counts["10:30"] == {"other": 1}  # not IDMEF
    assert sum(sum(m["counts"].values()) for m in stats["series"]) == 4
    only = reader.per_minute(StatsQuery(AlertQuery(sensor="dmz-*"), minutes=15), now=NOW)
    assert sum(sum(m["counts"].values()) for m in only["series"]) == 2


def test_sensors_pages(reader: StoreReader) -> None:
    everyone, after = reader.sensors(SensorQuery())
    assert [s["sensor"] for s in everyone] == ["s1.test", "s2.test"] and after is None
    first, after = reader.sensors(SensorQuery(limit=1))
    assert [s["sensor"] for s in first] == ["s1.test"] and after == "s1.test"
    rest, after = reader.sensors(SensorQuery(after="s1.test", limit=1))
    assert [s["sensor"] for s in rest] == ["s2.test"] and after is None
    assert first[0]["alerts"] == 4 and first[0]["last_peer"] == "127.0.0.1:9"


@pytest.mark.parametrize("args,message", [
    ({"limit": ["0"]}, "limit: must be a whole number from 1 to 500"),
    ({"since": ["soon"]}, "since: 'soon' is neither"),
    ({"severity": ["x" * 300]}, "severity: longer than 256"),
    ({"after_id": ["-1"]}, "after_id: must be an alert id"),
    ({"sensor": ["a", "b"]}, "sensor: give it once"),
    ({"after_id": ["\u00b2"]}, "after_id: must be an alert id"),  # isdigit(), but not for int()
    ({"before_id": ["\u0661"]}, "before_id: must be an alert id"),
    ({"limit": ["\u00b2"]}, "limit: must be a whole number"),
    ({"since": ["99999999999d"]}, "since: '99999999999d' is neither"),  # too far back for a datetime
    ({"until": ["0001-01-01T00:00+01:00"]}, "until: .* is neither"),  # before year 1 in UTC
])
def test_query_errors_name_the_parameter(args: dict[str, list[str]], message: str) -> None:
    with pytest.raises(QueryError, match=message):
        AlertQuery.from_args(args)


def test_query_round_trip() -> None:
    q = AlertQuery.from_args({
        "sensor": ["S1.*"], "severity": ["high", "low", "high", ""], "classification": [" ssh "],
        "since": ["2026-11-23T10:00"], "heartbeats": ["1"], "limit": ["20"], "before_id": ["9"],
    })
    assert q.sensor == "s1.*" and q.severity == ("high", "low") and q.classification == "ssh"
    assert q.since == "2026-11-23T10:00:00.000000+00:00" and q.heartbeats and q.limit == 20 and q.before_id == 9
    args: dict[str, list[str]] = {}
    for name, value in q.filter_args():
        args.setdefault(name, []).append(value)
    assert AlertQuery.from_args(args) == AlertQuery(
        sensor="s1.*", severity=("high", "low"), classification="ssh", since=q.since, heartbeats=True
    )


GLOB_CASES = [
    ("s1.test", "s1.test"), ("s?.test", "s1.test"), ("s*", "s1.test"), ("*", ""), ("?", ""), ("", ""),
    ("s[12].test", "s2.test"), ("s[^12].test", "s3.test"), ("s[^12].test", "s1.test"), ("[]]", "]"),
    ("[]a]", "a"), ("[^]]", "]"), ("[a-c]", "b"), ("[a-c]", "d"), ("[-a]", "-"), ("[a-]", "-"),
    ("[c-a]", "b"), ("[a-c-e]", "-"), ("[a-c-e]", "d"), ("[", "["), ("[a", "a"), ("a[]", "a]"),
    ("*a*b", "xaxb"), ("*a*b", "xbxa"), ("**?*", "x"), ("a*?", "a"), ("*.test", "dmz-1.test"),
    ("\\*", "\\x"), ("S1.*", "s1.test"), ("*\u00e9*", "caf\u00e9!"), ("[\u00e0-\u00ff]", "\u00e9"),
]


def _sqlite_glob(pattern: str, text: str) -> bool:
    import sqlite3

    db = sqlite3.connect(":memory:")
    try:
        return bool(db.execute("SELECT ? GLOB ?", (text, pattern)).fetchone()[0])
    finally:
        db.close()


@pytest.mark.parametrize("pattern,text", GLOB_CASES)
def test_python_glob_is_sqlite_glob(pattern: str, text: str) -> None:
    from iapd.web.query import glob_match

    assert glob_match(pattern, text) == _sqlite_glob(pattern, text)


def test_python_glob_agrees_with_sqlite_on_random_patterns() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from iapd.web.query import glob_match

    alphabet = st.sampled_from(list("ab-]^[*?."))

    @settings(max_examples=3000, deadline=None)
    @given(st.text(alphabet, max_size=9), st.text(st.sampled_from(list("ab-]^[.")), max_size=7))
    def agree(pattern: str, text: str) -> None:
        assert glob_match(pattern, text) == _sqlite_glob(pattern, text), (pattern, text)

    agree()


@pytest.mark.timeout(60)
def test_glob_filter_has_no_catastrophic_backtracking() -> None:
    """
    The event stream applies the sensor filter on the reactor: a pattern that makes a
    backtracking matcher run for ages (it did, through a Python regular expression)
    must be answered at once, or one viewer freezes the manager.  Fails by the timeout.
    """
    for pattern in ("*?" * 127 + "!", "*a" * 127 + "!", "*[a-z]" * 42 + "!"):
        query = AlertQuery.from_args({"sensor": [pattern]})
        alert = {"id": 1, "sensor": "a" * 200, "received": at(0), "idmef": None}
        assert not query.matches(alert)
