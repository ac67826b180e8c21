"""The edge's bounds on its HTTP connections, which the server's protocol (tokenwire.edge.server)
applies to each one, and one log line per interval for what many clients could otherwise log
many times a second."""

from __future__ import annotations

import dataclasses
import time

import structlog

log = structlog.get_logger("tokenwire.edge")

LOG_INTERVAL_S = 10.0


class Tally:
    """A log line for an event that may come thousands of times a second: the first one at
    once, then at most one per LOG_INTERVAL_S, each with how many came since the last line."""

    def __init__(self, event: str) -> None:
        self.event = event
        self.since = 0
        self._next = 0.0

    def count(self, **fields: object) -> None:
        self.since += 1
        now = time.monotonic()
        if now >= self._next:
            log.warning(self.event, count=self.since, interval_s=LOG_INTERVAL_S, **fields)
            self.since = 0
            self._next = now + LOG_INTERVAL_S


@dataclasses.dataclass
class ConnectionLimits:
    """One edge's bounds on its connections, which its protocol reads for each one."""

    send_timeout_s: float
    """A connection whose client takes no data for this long, with data waiting, is cut."""
    stalled: Tally = dataclasses.field(default_factory=lambda: Tally("edge.clients_stalled"))
