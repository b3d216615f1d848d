"""
Telling systemd that a daemon has started, and that it is stopping (C{Type=notify}).

With C{Type=simple}, C{systemctl start} returned as soon as the process existed: a
daemon that stopped a second later on a bad certificate or a port it could not bind was
reported as started, and a C{systemctl reload} in that second met SIGHUP's default
action, which ends the process, before L{iapd.reload.ReloadOnHangup} was in.  The
units now say C{Type=notify}: systemd waits for C{READY=1}, which is sent once every
service has started (the configuration and certificates loaded, the ports bound, the
SIGHUP handler in), so a start that fails is reported as failed, and a reload asked for
meanwhile waits until then.

The protocol is one datagram to the socket systemd names in C{NOTIFY_SOCKET}
(sd_notify(3)); outside systemd there is no such socket and nothing is sent.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Mapping

from twisted.application import service
from twisted.logger import Logger

log = Logger(namespace="iapd.sdnotify")


def notify(message: str, environ: Mapping[str, str] = os.environ) -> bool:
    """
    Send C{message} (C{"READY=1"}, C{"STOPPING=1"}, ...) to systemd; whether it was sent.

    A socket that cannot take it is logged, never raised: the daemon works without
    systemd's bookkeeping, and systemd reports a start that never said ready.
    """
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # Linux's abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as e:
        log.warn("cannot tell systemd {message!r} through {socket}: {why}", message=message,
                 socket=environ["NOTIFY_SOCKET"], why=e.strerror or str(e))
        return False
    return True


class ReadyNotifier(service.Service):
    """
    Added last to a daemon's services: by its L{startService} every other service has
    started (twistd starts them in order, after binding the listeners).

    twistd starts the services before it runs the reactor, and the reactor puts in its
    SIGTERM and SIGINT handlers only as it starts running: ready said in
    L{startService} let a C{systemctl stop} right after the start meet SIGTERM's default
    action, which ends the process without stopping its services.  So ready is said
    once the reactor runs.
    """

    def __init__(self, reactor: Any, what: str) -> None:
        self.reactor = reactor
        self.what = what

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(notify, f"READY=1\nSTATUS={self.what} started")

    def stopService(self) -> Any:
        notify(f"STOPPING=1\nSTATUS={self.what} stopping")
        return super().stopService()
