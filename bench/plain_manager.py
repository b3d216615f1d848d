"""
The manager without TLS, for the benchmark only: what TLS costs.

    python3 bench/plain_manager.py PORT STORE.db

Runs iapd's own L{ManagerProtocol}, store and data phase, except that the data phase
starts right after CONNECT's 200 (no upgrade, no handshake, no verify; the sensor
identity is fixed).  IAP has no plaintext mode and iapd offers none: this exists only so
that "plain TCP vs TLS" compares the same code with and without TLS.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402,F401  (puts this checkout's iapd first on the path)


def main() -> None:
    from twisted.internet import reactor

    from iapd.manager import ManagerFactory, ManagerProtocol, ManagerSettings, State
    from iapd.parser import ContentReader
    from iapd.store import SQLiteStore

    class PlainProtocol(ManagerProtocol):
        def _on_connect(self, message: object) -> None:
            super()._on_connect(message)
            if self.state != State.UPGRADE:
                return
            self._stop_deadline()
            self.sensor = common.SENSOR
            self.state = State.DATA
            settings = self.factory.settings
            self._reader = ContentReader(settings.max_content_length, settings.content_types)
            self.factory.store.seen(self.sensor, self.peer, self.via)
            self.setRawMode()

    class PlainFactory(ManagerFactory):
        protocol = PlainProtocol

    port, db = int(sys.argv[1]), Path(sys.argv[2])
    store = SQLiteStore(db, reactor)

    def opened(_: Any) -> None:
        factory = PlainFactory(ManagerSettings(identity=common.MANAGER, material=None), store, reactor)
        reactor.listenTCP(port, factory, interface="127.0.0.1", backlog=1024)

    store.open().addCallback(opened)
    reactor.addSystemEventTrigger("before", "shutdown", store.close)
    reactor.run()


if __name__ == "__main__":
    main()
