"""
Service wiring the three twistd plugins share.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
from typing import Any, NoReturn, Sequence

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.internet.error import ReactorNotRunning

from .config import ConfigError


def add_listeners(parent: service.MultiService, reactor: Any, texts: Sequence[str], factory: Any) -> None:
    """One listening service per endpoint string, under C{parent}."""
    for text in texts:
        listener = StreamServerEndpointService(endpoints.serverFromString(reactor, text), factory)
        # a port that cannot be bound must stop the daemon, not leave it running deaf
        listener._raiseSynchronously = True
        listener.setServiceParent(parent)


# The taps stop twistd with SystemExit, not usage.UsageError: Twisted 22.4 (Debian 12's)
# prints the usage text and exits 0 on a subcommand's UsageError, which a unit or a
# script would take for success.


def configuration_error(role: str, error: ConfigError) -> NoReturn:
    """Stop twistd with one line naming the key, without its page of usage text."""
    raise SystemExit(f"twistd {role}: configuration error: {error}") from None


def stop_failed(reactor: Any) -> None:
    """
    Stop the daemon after a failure it cannot run without (a store or a spool that will
    not open), with exit status 1.

    Such a failure arrives through a Deferred, after twistd has started the services,
    so there is no exception for twistd to turn into an exit status, and
    C{reactor.stop()} alone ends the process with 0, which systemd's
    C{Restart=on-failure} and any script take for a clean stop.  The status is set at
    the very end (L{_exit_if_failed}), once twistd has shut down, written its last log
    lines and removed its pid file.
    """
    _failed.append(True)
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass  # already stopping (a signal came during the start): the status still says it failed


_failed: list[bool] = []


def _exit_if_failed() -> None:
    if _failed:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(1)


# registered when the plugins are imported, before twistd's own and most other exit
# handlers, so that it runs after them (last registered, first run)
atexit.register(_exit_if_failed)


GC_THRESHOLD = (5000, 10, 10)
"""Python's default is (700, 10, 10)."""


class QuieterCollector(service.Service):
    """
    Fewer and smaller runs of Python's cycle collector in a busy daemon.

    Each run holds the GIL, so the reactor and the store's thread both wait for it.  A
    manager taking 50,000 alerts/s ran it 150 times a second for 60-70 ms: the alerts
    in flight (some 10 objects each) outlive a young collection every 7 ms, so they
    are traversed again in the middle generation and then reach the oldest, whose
    collections (twice a second) walked all 70,000 objects, the start's modules and
    classes included, 20-30 ms each.  Once the daemon has started its objects are
    frozen (left out of every collection: they live as long as the process), and a
    young collection waits for 5,000 more objects than were freed, by which time most
    alerts have been answered and freed by reference counting.  16 sensors, 1 KiB,
    5 interleaved rounds: 24.2 -> 22.75 us of manager CPU per alert, 49,043 -> 51,392
    alerts/s, lower in every round.  Garbage in cycles waits a little longer for its
    collection: at most 5,000 objects.
    """

    _before: tuple[int, int, int] = (700, 10, 10)

    def startService(self) -> None:
        super().startService()
        self._before = gc.get_threshold()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLD)

    def stopService(self) -> Any:
        gc.set_threshold(*self._before)
        gc.unfreeze()
        return super().stopService()
