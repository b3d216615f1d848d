"""
What the dashboard and the API are asked for, parsed from a query string.

Sans-IO: these are values, parsed and checked without touching the store, so that the
API, the HTML pages and the event stream share one meaning of each parameter, and a bad
parameter is a 400 naming it.  L{AlertQuery.matches} applies the same filters in Python
to an alert dict, for the live event stream, which must not query the store once per
watching browser.

  parameter        meaning                                        SQL (both stores)
  --------------   --------------------------------------------   --------------------
  sensor           identity glob, as iapctl --sensor               GLOB / ~ regex
  severity         IDMEF Impact severity; repeatable (any of)      = any of
  classification   substring of Classification text, any case      instr(lower) / position
  since, until     ISO 8601 (naive = UTC) or 90s/10m/2h/7d ago     received >= / <
  heartbeats       1 to include IDMEF heartbeats                   kind <> 'Heartbeat'
  after_id         only ids above (live updates)                  id >
  before_id        only ids below (the next page, newest first)    id <
  limit            page size, 1 to MAX_LIMIT                       LIMIT
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import attr

from ..ctl import parse_since

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_TEXT = 256
SEVERITIES = ("high", "medium", "low", "info")
"""IDMEF's Impact severities (RFC 4765 4.2.6.1); anything else counts as other."""


class QueryError(ValueError):
    """A parameter that cannot be used; str() names it and is safe to show."""


def _ascii_lower(text: str) -> str:
    # SQLite's lower() folds ASCII only; the Python matcher must agree with it
    return text.translate(_ASCII_LOWER)


_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def _one(args: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = [v for v in args.get(name, ()) if v.strip()]
    if not values:
        return None
    if len(values) > 1:
        raise QueryError(f"{name}: give it once")
    value = values[0].strip()
    if len(value) > MAX_TEXT:
        raise QueryError(f"{name}: longer than {MAX_TEXT} characters")
    return value


def _digits(text: str) -> bool:
    """ASCII digits only: str.isdigit() is also true of '²', which int() refuses."""
    return text.isascii() and text.isdigit()


def _id(args: Mapping[str, Sequence[str]], name: str) -> int | None:
    value = _one(args, name)
    if value is None:
        return None
    if not _digits(value) or len(value) > 18:
        raise QueryError(f"{name}: must be an alert id (a whole number), got {value!r}")
    return int(value)


def _flag(args: Mapping[str, Sequence[str]], name: str) -> bool:
    value = _one(args, name)
    if value is None:
        return False
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise QueryError(f"{name}: must be 1 or 0, got {value!r}")


def _time(args: Mapping[str, Sequence[str]], name: str) -> str | None:
    value = _one(args, name)
    if value is None:
        return None
    try:
        return parse_since(value)
    except (ValueError, OverflowError):  # 99999999999d, 0001-01-01T00:00+01:00
        raise QueryError(
            f"{name}: {value!r} is neither an ISO 8601 time (2026-11-23T10:00Z) nor a span back from now (10m, 2h, 7d)"
        ) from None


def decode_args(raw: Mapping[bytes, Sequence[bytes]]) -> dict[str, list[str]]:
    """A twisted.web C{request.args} as text; undecodable octets become U+FFFD."""
    return {
        k.decode("utf-8", "replace"): [v.decode("utf-8", "replace") for v in vs]
        for k, vs in raw.items()
    }


@attr.s(frozen=True, auto_attribs=True)
class AlertQuery:
    """Filters and a page of the alert list; see the module's table."""

    sensor: str | None = None
    severity: tuple[str, ...] = ()
    classification: str | None = None
    since: str | None = None
    until: str | None = None
    heartbeats: bool = False
    after_id: int | None = None
    before_id: int | None = None
    limit: int = DEFAULT_LIMIT

    @classmethod
    def from_args(cls, args: Mapping[str, Sequence[str]]) -> "AlertQuery":
        severity = []
        for value in args.get("severity", ()):
            value = value.strip()
            if value:
                if len(value) > MAX_TEXT:
                    raise QueryError(f"severity: longer than {MAX_TEXT} characters")
                severity.append(value)
        limit_text = _one(args, "limit")
        limit = DEFAULT_LIMIT
        if limit_text is not None:
            if not _digits(limit_text) or not 1 <= int(limit_text) <= MAX_LIMIT:
                raise QueryError(f"limit: must be a whole number from 1 to {MAX_LIMIT}, got {limit_text!r}")
            limit = int(limit_text)
        sensor = _one(args, "sensor")
        return cls(
            sensor=sensor.lower() if sensor else None,
            severity=tuple(dict.fromkeys(severity)),
            classification=_one(args, "classification"),
            since=_time(args, "since"),
            until=_time(args, "until"),
            heartbeats=_flag(args, "heartbeats"),
            after_id=_id(args, "after_id"),
            before_id=_id(args, "before_id"),
            limit=limit,
        )

    def filter_args(self) -> list[tuple[str, str]]:
        """The filters (not the page) as query parameters, for links and the stream."""
        out: list[tuple[str, str]] = []
        if self.sensor:
            out.append(("sensor", self.sensor))
        out += [("severity", s) for s in self.severity]
        if self.classification:
            out.append(("classification", self.classification))
        if self.since:
            out.append(("since", self.since))
        if self.until:
            out.append(("until", self.until))
        if self.heartbeats:
            out.append(("heartbeats", "1"))
        return out

    def matches(self, alert: Mapping[str, Any]) -> bool:
        """Whether an alert dict (as iapctl --json prints it) passes the filters."""
        idmef = alert.get("idmef") or {}
        if not self.heartbeats and idmef.get("kind") == "Heartbeat":
            return False
        if self.sensor is not None and not _glob_matches(self.sensor, alert["sensor"]):
            return False
        if self.severity and idmef.get("severity") not in self.severity:
            return False
        if self.classification is not None:
            text = idmef.get("classification")
            if text is None or _ascii_lower(self.classification) not in _ascii_lower(text):
                return False
        if self.since is not None and alert["received"] < self.since:
            return False
        if self.until is not None and alert["received"] >= self.until:
            return False
        if self.after_id is not None and alert["id"] <= self.after_id:
            return False
        if self.before_id is not None and alert["id"] >= self.before_id:
            return False
        return True


_STAR = ("*",)


def _glob_tokens(pattern: str) -> list[tuple[Any, ...]] | None:
    """
    C{pattern} as tokens: C{_STAR}, or a one-character test (C{("?",)}, C{("=", c)},
    C{("[", invert, chars, ranges)}); None for a set that is never closed, which
    matches nothing (as in SQLite).  Sets are read as SQLite's patternCompare reads
    them: a C{]} first is a member, C{-} makes a range only between two members.
    """
    tokens: list[tuple[Any, ...]] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            if not tokens or tokens[-1] is not _STAR:
                tokens.append(_STAR)
        elif c == "?":
            tokens.append(("?",))
        elif c == "[":
            invert = i < n and pattern[i] == "^"
            if invert:
                i += 1
            chars: set[str] = set()
            ranges: list[tuple[str, str]] = []
            if i < n and pattern[i] == "]":
                chars.add("]")
                i += 1
            prior: str | None = None
            while i < n and pattern[i] != "]":
                c2 = pattern[i]
                i += 1
                if c2 == "-" and i < n and pattern[i] != "]" and prior is not None:
                    ranges.append((prior, pattern[i]))
                    i += 1
                    prior = None
                else:
                    chars.add(c2)
                    prior = c2
            if i >= n:
                return None
            i += 1  # the closing ]
            tokens.append(("[", invert, frozenset(chars), tuple(ranges)))
        else:
            tokens.append(("=", c))
    return tokens


def _one_matches(token: tuple[Any, ...], c: str) -> bool:
    kind = token[0]
    if kind == "=":
        return bool(c == token[1])
    if kind == "?":
        return True
    _, invert, chars, ranges = token
    seen = c in chars or any(low <= c <= high for low, high in ranges)
    return bool(seen != invert)


def glob_match(pattern: str, text: str) -> bool:
    """
    SQLite's GLOB (C{*}, C{?}, C{[...]}, case-sensitive), in time proportional to
    len(pattern) * len(text) whatever the pattern: the filter of the live event stream
    runs on the reactor, so a pattern such as C{*?*?*?...!} must not backtrack
    exponentially, as a translation to a Python regular expression does.
    """
    tokens = _glob_tokens(pattern)
    if tokens is None:
        return False
    t = p = 0
    star, mark = -1, 0
    while t < len(text):
        if p < len(tokens) and tokens[p] is _STAR:
            star, mark = p, t
            p += 1
        elif p < len(tokens) and _one_matches(tokens[p], text[t]):
            p += 1
            t += 1
        elif star >= 0:
            p, mark = star + 1, mark + 1
            t = mark
        else:
            return False
    while p < len(tokens) and tokens[p] is _STAR:
        p += 1
    return p == len(tokens)


def _glob_matches(pattern: str, text: str) -> bool:
    """SQLite's GLOB, as the SQL filter applies it (L{glob_match})."""
    return glob_match(pattern, text)


@attr.s(frozen=True, auto_attribs=True)
class SensorQuery:
    """A page of the sensor list, ordered by identity: C{after} is the cursor."""

    after: str | None = None
    limit: int = MAX_LIMIT

    @classmethod
    def from_args(cls, args: Mapping[str, Sequence[str]]) -> "SensorQuery":
        limit_text = _one(args, "limit")
        limit = MAX_LIMIT
        if limit_text is not None:
            if not _digits(limit_text) or not 1 <= int(limit_text) <= MAX_LIMIT:
                raise QueryError(f"limit: must be a whole number from 1 to {MAX_LIMIT}, got {limit_text!r}")
            limit = int(limit_text)
        return cls(after=_one(args, "after"), limit=limit)


@attr.s(frozen=True, auto_attribs=True)
class StatsQuery:
    """Alerts per minute by severity over the last C{minutes}, with the alert filters."""

    alerts: AlertQuery
    minutes: int = 60

    @classmethod
    def from_args(cls, args: Mapping[str, Sequence[str]]) -> "StatsQuery":
        minutes_text = _one(args, "minutes")
        minutes = 60
        if minutes_text is not None:
            if not _digits(minutes_text) or not 1 <= int(minutes_text) <= 1440:
                raise QueryError(f"minutes: must be a whole number from 1 to 1440, got {minutes_text!r}")
            minutes = int(minutes_text)
        return cls(AlertQuery.from_args(args), minutes)
