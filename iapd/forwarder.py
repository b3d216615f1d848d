"""
Delivery from the spool to the manager, for as long as the sensor runs.

One connection at a time carries the spooled alerts in order, pipelined up to the
window.  A 200 acknowledges the alert in the spool; the spool moves only over
contiguous acknowledgements, so anything after a gap is sent again on the next
connection and the manager's deduplication keeps the store exactly-once.  Nothing ends
delivery for good: a refused certificate, a 403, a 503, an unreachable hop all lead to
the same place, a reconnection after a capped exponential backoff with jitter, with the
reason logged once each time it changes.  Alerts the manager refuses for ever (400,
413, 415) are moved out of the spool into C{rejected/} with the reason, so that one bad
alert cannot block the others.
"""

from __future__ import annotations

import collections
import random
from pathlib import Path
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from .client import ClientState, Outcome, SensorFactory, SensorProtocol, SensorSettings
from .errors import REASONS
from .spool import Record, Spool

PERMANENT = frozenset({400, 411, 413, 415})
"""Codes that will not change however often the alert is sent."""


class Backoff:
    """Capped exponential backoff with full jitter; reset after a success."""

    def __init__(self, initial: float = 1.0, maximum: float = 60.0, rng: Callable[[], float] = random.random) -> None:
        self.initial, self.maximum, self.rng = initial, maximum, rng
        self.failures = 0

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * (2 ** self.failures))
        self.failures += 1
        # at least half the ceiling, so that a crowd of sensors spreads but still waits
        return ceiling * (0.5 + 0.5 * self.rng())

    def reset(self) -> None:
        self.failures = 0


class Forwarder:
    """Keeps one connection to the manager and drains the spool through it."""

    log = Logger()

    def __init__(
        self, reactor: Any, spool: Spool, settings: SensorSettings, endpoint: Any | None,
        backoff: Backoff | None = None,
    ) -> None:
        self.reactor = reactor
        self.spool = spool
        self.settings = settings
        self.endpoint = endpoint
        self.backoff = backoff or Backoff()
        self.factory = SensorFactory(settings, reactor)
        self.active: SensorProtocol | None = None
        self.delivered = 0
        self.refused: collections.Counter[int] = collections.Counter()
        """Alerts refused for good and set aside, by status code."""
        self._aside: set[int] = set()
        """Refused alerts whose copy in rejected/ is being written."""
        self._done: set[int] = set()
        """Alerts with a final answer, waiting for an earlier one before the spool's
        (cumulative) acknowledgement can pass them."""
        self._cursor = 0
        self._reading = False
        self._running = False
        self._retry: Any = None
        self._connecting: Deferred[Any] | None = None
        self._last_reason: str | None = None
        self.spool.on_append.append(self._fill)

    def reload(self, settings: SensorSettings) -> None:
        """Use C{settings} (new certificate, key, CAs) for the next connection.

        The connection in use keeps its session: cutting it would only make the
        manager see a reconnect storm at every certificate rollover.
        """
        self.settings = settings
        self.factory = SensorFactory(settings, self.reactor)

    # -- connection lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self._running = True
        if self.endpoint is not None:
            self._connect()

    def stop(self) -> Deferred[None] | None:
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        if self.active is not None and self.active.state != ClientState.CLOSED:
            closed = self.active.closed
            self.active.transport.loseConnection()
            return closed
        return None

    def _connect(self) -> None:
        self._retry = None
        if not self._running or self.active is not None or self.endpoint is None:
            return
        d = self.endpoint.connect(self.factory)
        self._connecting = d

        def connected(proto: SensorProtocol) -> None:
            self._connecting = None
            proto.ready.addCallbacks(self.attach, lambda f: self._failed(f.getErrorMessage()))

        def failed(failure: Failure) -> None:
            self._connecting = None
            if not self._running:
                return
            self._failed(f"cannot connect: {failure.getErrorMessage()}")

        d.addCallbacks(connected, failed)

    def attach(self, proto: SensorProtocol) -> Any:
        """Use C{proto}, a connection in the data phase (dialled or accepted)."""
        if self.active is not None or not self._running:
            proto.transport.loseConnection()
            return None
        self.active = proto
        self.backoff.reset()
        self._cursor = self.spool.acked  # resend everything not acknowledged
        self._say(None)
        self.log.info(
            "delivering to {manager}{resumed}; {n} alerts waiting",
            manager=self.settings.manager, n=self.spool.depth,
            resumed=" (TLS session resumed)" if proto.resumed else "",
        )
        proto.closed.addCallback(lambda _: self._lost(proto))
        self._fill()
        return None

    def _lost(self, proto: SensorProtocol) -> None:
        if self.active is proto:
            self.active = None
            reason = str(proto._failure) if proto._failure else "connection closed"
            self._failed(reason)

    def _failed(self, reason: str) -> None:
        if not self._running:
            return
        self._say(reason)
        if self.endpoint is not None and self._retry is None and self.active is None:
            delay = self.backoff.next_delay()
            self._retry = self.reactor.callLater(delay, self._connect)

    def _say(self, reason: str | None) -> None:
        """Log a delivery problem once each time it changes, not on every retry."""
        if reason == self._last_reason:
            return
        if reason is None:
            self.log.info("delivery to {manager} works again", manager=self.settings.manager)
        else:
            self.log.warn(
                "cannot deliver to {manager}: {reason}; alerts stay in the spool and delivery is retried",
                manager=self.settings.manager, reason=reason,
            )
        self._last_reason = reason

    # -- sending ---------------------------------------------------------------------------

    def _fill(self) -> None:
        proto = self.active
        if proto is None or proto.state != ClientState.READY or self._reading:
            return
        room = self.settings.window - proto.outstanding
        if room <= 0:
            return
        entries = self.spool.entries_after(self._cursor, room)
        if not entries:
            return
        self._cursor = entries[-1].seq
        self._reading = True

        def send(records: list[Record]) -> None:
            self._reading = False
            if self.active is not proto or proto.state != ClientState.READY:
                # the connection changed while reading: the new one starts from the top
                self._cursor = self.spool.acked
                self._fill()
                return
            for record in records:
                if record.seq in self._done or record.seq in self._aside:
                    continue  # answered on an earlier connection; only its spool ack waits
                proto.send(record.content_type, record.body).addCallback(self._outcome, record, proto)
            self._fill()

        def unreadable(failure: Failure) -> None:
            self._reading = False
            self._cursor = self.spool.acked
            self.log.error("cannot read the spool: {why}", why=failure.getErrorMessage())
            proto.transport.loseConnection()
            self._fill()

        self.spool.read(entries).addCallbacks(send, unreadable)

    def _first_unresolved(self) -> int | None:
        """The first spooled alert with no final answer yet: the next one due."""
        for seq in self.spool.pending:
            if seq not in self._done and seq not in self._aside:
                return seq
        return None

    def _advance(self) -> None:
        """Acknowledge in the spool the longest run of resolved alerts from its head.

        Spool acknowledgements are cumulative, so an alert answered 200 behind one that
        is still being written to rejected/ must wait for it: acknowledging past it
        would lose it if the sensor died before the write.
        """
        last = None
        for seq in self.spool.pending:
            if seq not in self._done:
                break
            last = seq
        if last is not None:
            self._done.difference_update(range(self.spool.acked + 1, last + 1))
            self.spool.ack(last)

    def _outcome(self, outcome: Outcome, record: Record, proto: SensorProtocol) -> None:
        if outcome.code is None:
            return  # the connection is gone; its loss is handled once, in _lost
        if record.seq != self._first_unresolved() or (outcome.code not in PERMANENT and outcome.code != 200):
            # a gap (an earlier alert not answered) or a 503-like answer: start over from
            # the first unacknowledged alert on a new connection
            if self.active is proto:
                self._cursor = self.spool.acked
                proto.transport.loseConnection()
                if outcome.code != 200:
                    self._say(f"manager answered {outcome.code} {REASONS.get(outcome.code, '')}".rstrip())
            return
        if outcome.code == 200:
            self.delivered += 1
            self._done.add(record.seq)
            self._advance()
            self._fill()
            return
        # refused for ever: keep it aside durably while the alerts behind it flow on
        self._aside.add(record.seq)
        meta = {"seq": record.seq, "content_type": record.content_type, "code": outcome.code,
                "reason": outcome.reason}

        def kept(_: Any) -> None:
            self.log.error(
                "manager refused alert {seq} for good ({code} {phrase}); kept in {dir}",
                seq=record.seq, code=outcome.code, phrase=REASONS.get(outcome.code or 0, ""),
                dir=str(Path(self.spool.files.directory) / "rejected"),
            )
            self.refused[outcome.code or 0] += 1
            self._aside.discard(record.seq)
            self._done.add(record.seq)
            self._advance()
            self._fill()

        def not_kept(failure: Failure) -> None:
            self.log.error("cannot set refused alert {seq} aside: {why}; retrying later",
                           seq=record.seq, why=failure.getErrorMessage())
            self._aside.discard(record.seq)  # sent again, and refused again, on the next connection
            if self.active is proto:
                self._cursor = self.spool.acked
                proto.transport.loseConnection()

        self.spool.set_aside(record, meta).addCallbacks(kept, not_kept)
