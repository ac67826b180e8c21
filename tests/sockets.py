"""Raw sockets against the servers' connection limits."""

from __future__ import annotations

import socket
import time


def closed_within(sock: socket.socket, limit_s: float, trickle: bool) -> float | None:
    """Seconds until the server closed `sock` (None if still open after limit_s), sending a
    byte of a request every 0.2 s meanwhile when `trickle`."""
    started = time.monotonic()
    sock.settimeout(0.2)
    while (elapsed := time.monotonic() - started) < limit_s:
        try:
            if trickle:
                sock.sendall(b"G")
            if sock.recv(1024) == b"":
                return elapsed
        except TimeoutError:
            continue
        except OSError:
            return elapsed
    return None
