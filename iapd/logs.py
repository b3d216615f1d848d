"""
Logs an operator can search: every event of a connection carries the same fields.

Two things live here.  L{ContextLogger} is a Twisted L{Logger} that adds a fixed set of
fields (connection id, peer, sensor identity) to every event it emits, so that a search
for one sensor or one connection finds all of its lines without parsing prose.
L{json_observer} writes one JSON object per line, for journald or a log shipper:

    twistd --nodaemon --logger iapd.logs.json_observer iap-manager -c manager.yaml

The text log twistd writes by default stays as it was; the fields are in the events
either way.
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import IO, Any, Callable

from twisted.logger import FileLogObserver, Logger, formatEvent

__all__ = ["ContextLogger", "json_observer", "event_as_line"]


class ContextLogger(Logger):
    """A L{Logger} whose events all carry the fields C{context()} returns.

    Fields given at the call win over the context's, and the context is read at each
    event, so that a sensor identity learned after the handshake appears from then on.
    """

    def __init__(self, namespace: str, context: Callable[[], dict[str, Any]]) -> None:
        super().__init__(namespace=namespace)
        self._context = context

    def emit(self, level: Any, format: str | None = None, **kwargs: Any) -> None:
        fields = self._context()
        fields.update(kwargs)
        super().emit(level, format, **fields)


_SCALARS = (str, int, float, bool, type(None))


def _plain(value: Any) -> Any:
    """C{value} if JSON can carry it as is, else its text."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, _SCALARS) for v in value):
        return list(value)
    return str(value)


def event_as_line(event: dict[str, Any]) -> str:
    """One event as one line of JSON: time, level, namespace, the message, its fields."""
    level = event.get("log_level")
    when = event.get("log_time")
    record: dict[str, Any] = {
        "time": (
            datetime.datetime.fromtimestamp(when, datetime.timezone.utc).isoformat(timespec="milliseconds")
            if when is not None else None
        ),
        "level": level.name if level is not None else None,
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in record or key.startswith("_"):
            continue
        record[key] = _plain(value)
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = failure.getErrorMessage()
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n"


def json_observer(out: IO[str] | None = None) -> FileLogObserver:
    """A log observer writing JSON lines to C{out} (standard output by default).

    Named on twistd's command line as C{--logger iapd.logs.json_observer}; twistd calls
    it with no argument.
    """
    return FileLogObserver(out if out is not None else sys.stdout, event_as_line)
