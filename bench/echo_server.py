"""
A plain-socket IAP stand-in for relay benchmarks: answers a CONNECT with 200, then
echoes every byte back.  Deliberately not Twisted, so that the relay under test is the
only Twisted code on the path.
"""

from __future__ import annotations

import socket
import sys
import threading


def serve(conn: socket.socket) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk:
                return
            head += chunk
        conn.sendall(b"IAP/0.2 200\r\n\r\n")
        rest = head.split(b"\r\n\r\n", 1)[1]
        if rest:
            conn.sendall(rest)
        while True:
            data = conn.recv(262144)
            if not data:
                return
            conn.sendall(data)


def main() -> None:
    port = int(sys.argv[1])
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(128)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
