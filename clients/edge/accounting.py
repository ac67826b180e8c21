"""What each API request came to, counted in one place for every route.

Every route that starts or follows a generation is registered with `accounted(route, ...)`,
which gives its requests an `Account` labelled with that route. An account ends once: the
stream it answered completed, failed upstream or lost its client, or the request was refused
before any stream began. A resume counts `resumed` as well, when it attaches to a stream that
nobody was reading; it then ends like any other stream.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from tokenwire.edge.context import EdgeContext
from tokenwire.edge.errors import EdgeError
from tokenwire.edge.metrics import EdgeMetrics, Outcome, RouteName
from tokenwire.edge.tracing import stream_failed

Endpoint = Callable[[Request], Awaitable[Response]]
ACCOUNT = "tokenwire.account"
"""Scope key of the request's Account."""
REFUSALS = frozenset({400, 409, 413, 415, 429, 503})
"""Statuses that count as `rejected`: the request was refused, no generation ran for it."""


class Account:
    """One request's outcome on one route, counted once; TTFT and the active-stream gauge."""

    def __init__(self, metrics: EdgeMetrics, route: RouteName) -> None:
        self.metrics = metrics
        self.route = route
        self.outcome: Outcome | None = None

    @staticmethod
    def of(request: Request) -> Account:
        account = request.scope.get(ACCOUNT)
        assert isinstance(account, Account), "the route is not registered with accounted()"
        return account

    def end(self, outcome: Outcome) -> None:
        """The request's outcome; later calls change nothing."""
        if self.outcome is not None:
            return
        self.outcome = outcome
        self._count(outcome)
        if outcome == Outcome.UPSTREAM_ERROR:
            stream_failed(outcome)

    def refused(self, error: EdgeError) -> None:
        """An error answered as the request's HTTP status: a refusal unless the request had
        already ended (an upstream failure after the server accepted it)."""
        if error.status in REFUSALS or error.openai_code == "model_not_found":
            self.end(Outcome.REJECTED)

    def resumed(self) -> None:
        """A resume attached to a stream nobody was reading (counted besides its outcome)."""
        self._count(Outcome.RESUMED)

    def first_token(self, seconds: float) -> None:
        self.metrics.ttft.labels(route=self.route).observe(seconds)

    def stream_opened(self) -> None:
        self.metrics.active.inc()

    def stream_closed(self) -> None:
        """The HTTP stream ended; without an outcome by now, its client left first."""
        self.metrics.active.dec()
        self.end(Outcome.CLIENT_DISCONNECTED)

    def _count(self, outcome: Outcome) -> None:
        self.metrics.streams.labels(route=self.route, outcome=outcome).inc()


def accounted(route: RouteName, endpoint: Endpoint) -> Endpoint:
    """The endpoint, with an Account for each request; an EdgeError it raises is counted by
    the account before the app answers it."""

    @functools.wraps(endpoint)
    async def counted(request: Request) -> Response:
        account = Account(EdgeContext.of(request).metrics, route)
        request.scope[ACCOUNT] = account
        try:
            return await endpoint(request)
        except EdgeError as error:
            account.refused(error)
            raise

    return counted
