"""
Draft 6.2: an endpoint SHOULD terminate a connection upon receipt of TCP urgent data.

No Twisted reactor reports urgent data (the byte is silently dropped), and
SO_OOBINLINE would inject it into the TLS stream.  So, on Linux, a private epoll object
watches the connection sockets for EPOLLPRI; its own descriptor is registered with the
reactor as a reader, and an event aborts the connection it belongs to.  Elsewhere the
watcher is inert and says so once.
"""

from __future__ import annotations

import select
import socket
from typing import Any, Callable

from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

HAVE_EPOLL = hasattr(select, "epoll") and hasattr(select, "EPOLLPRI")


@implementer(IReadDescriptor)
class UrgentDataWatcher:
    """
    Calls a connection's callback when urgent data arrives on its socket.

    One watcher serves every connection of a process; the reactor wakes it only when
    some watched socket has an urgent byte pending, and it is registered with the reactor
    only while it watches something, so no owner has to remember to close it.
    """

    log = Logger()

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._callbacks: dict[int, tuple[socket.socket, Callable[[], None]]] = {}
        self._epoll: Any = None
        if not HAVE_EPOLL:
            self.log.warn("urgent data cannot be detected on this platform (no epoll)")

    def watch(self, transport: Any, on_urgent: Callable[[], None]) -> int | None:
        """
        Watch C{transport}'s socket; returns the descriptor to pass to L{unwatch}.

        The descriptor is kept by the caller because Twisted drops C{transport.socket}
        before it calls C{connectionLost}.
        """
        if not HAVE_EPOLL:
            return None
        sock = getattr(transport, "socket", None)
        if not isinstance(sock, socket.socket):
            return None
        if self._epoll is None:
            self._epoll = select.epoll()
            self._reactor.addReader(self)
        fd = sock.fileno()
        self._callbacks[fd] = (sock, on_urgent)
        try:
            self._epoll.register(fd, select.EPOLLPRI)
        except FileExistsError:
            self._epoll.modify(fd, select.EPOLLPRI)
        return fd

    def unwatch(self, fd: int | None) -> None:
        """Forget C{fd}; once nothing is watched, leave the reactor alone."""
        if fd is None or self._epoll is None:
            return
        if self._callbacks.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass  # already closed: the kernel dropped it from the set
        if not self._callbacks:
            self.close()

    @property
    def watched(self) -> int:
        """How many sockets are watched now."""
        return len(self._callbacks)

    def fileno(self) -> int:
        return self._epoll.fileno() if self._epoll is not None else -1

    def doRead(self) -> None:
        if self._epoll is None:
            return
        for fd, _events in self._epoll.poll(0):
            entry = self._callbacks.pop(fd, None)
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass
            if entry is None:
                continue
            sock, on_urgent = entry
            try:
                sock.recv(1, socket.MSG_OOB)
            except OSError:
                pass
            on_urgent()
        if not self._callbacks:
            self.close()

    def connectionLost(self, reason: Failure) -> None:
        self.close()

    def close(self) -> None:
        if self._epoll is not None:
            self._reactor.removeReader(self)
            self._epoll.close()
            self._epoll = None
            self._callbacks.clear()

    def logPrefix(self) -> str:
        return "UrgentDataWatcher"
