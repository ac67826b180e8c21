"""What each API request came to, counted and logged in one place for every route.

`AccountingMiddleware` gives every request to a route that starts or follows a generation an
`Account` labelled with that route, the moment the request arrives. An account ends once: the
stream it answered completed, failed upstream or lost its client, the whole response was
written, the request was refused before any stream began, by a gate (415, 503 while draining)
or by the route, or it failed before any stream began (a 5xx). A resume counts `resumed` as
well, when it attaches to a stream that nobody was reading; it then ends like any other stream.
A replay (the events route without Last-Event-ID) is not a resume: it counts its own outcome
only. Once the response is over, a request that was counted writes its one `edge.stream` line.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenwire.edge.context import valid_request_id
from tokenwire.edge.errors import ACCOUNT_KEY, EdgeError
from tokenwire.edge.metrics import EdgeMetrics, Outcome, RouteName
from tokenwire.edge.tracing import stream_failed
from tokenwire.edge.upstream import Failover

log = structlog.get_logger("tokenwire.edge")
ACCOUNT = ACCOUNT_KEY


"""Scope key of the request's Account."""
REFUSALS = frozenset({400, 408, 409, 413, 415, 429, 503})
"""Statuses that count as `rejected`: the request was refused, no generation ran for it."""
CUT_SHORT = {"cancelled": Outcome.CANCELLED, "deadline_exceeded": Outcome.DEADLINE_EXCEEDED}
"""The server's finish reasons (and gRPC codes) of a generation it did not finish, as the
server's own `tokenwire_requests_total` names them; any other finish is `completed`."""
FAILED = frozenset({Outcome.UPSTREAM_ERROR, Outcome.DEADLINE_EXCEEDED})
"""Outcomes whose span is marked failed (the server's spans mark a deadline failed too)."""


def finished(finish_reason: str) -> Outcome:
    """The outcome of a stream whose generation ended with this finish reason: cancelled and
    deadline_exceeded as the server counts them, whichever route carried it."""
    return CUT_SHORT.get(finish_reason, Outcome.COMPLETED)


def failed(code: str) -> Outcome:
    """The outcome of a stream ended by an error with this code (CANCELLED, DEADLINE_EXCEEDED,
    INTERNAL, ...): the same cancel or deadline a `done` event can carry, else upstream_error."""
    return CUT_SHORT.get(code.lower(), Outcome.UPSTREAM_ERROR)


class Account:
    """One request's outcome on one route, counted once and logged once; TTFT and the
    active-stream gauge."""

    def __init__(self, metrics: EdgeMetrics, route: RouteName, request_id: str) -> None:
        self.metrics = metrics
        self.route = route
        self.request_id = request_id
        """The id the request goes by: its valid X-Request-ID or a new one, until the route
        settles on the stream's."""
        self.outcome: Outcome | None = None
        self.status: int | None = None
        """The HTTP status the response started with."""
        self.events = 0
        """SSE events written (0 for a response that is not an event stream)."""
        self.details: dict[str, Any] = {}
        """What the route adds to the request's line (`choices`, `resumed_after`): no content."""
        self.arrived = time.perf_counter()
        """When the request arrived (the account is made then): where its TTFT starts."""

    @staticmethod
    def of(request: Request) -> Account:
        account = request.scope.get(ACCOUNT)
        assert isinstance(account, Account), (
            "the route is not one of the accounted routes (app._accounted_routes)"
        )
        return account

    def end(self, outcome: Outcome) -> None:
        """The request's outcome; later calls change nothing."""
        if self.outcome is not None:
            return
        self.outcome = outcome
        self._count(outcome)
        if outcome in FAILED:
            stream_failed(outcome)

    def refused(self, error: EdgeError) -> None:
        """An error answered as the request's HTTP status, unless the request had already ended
        (an upstream failure after the server accepted it): a refusal is `rejected`; a failure
        (5xx: the server failed the stream at its open, its deadline passed before the server
        accepted it, the model's chat template failed) counts as the same error ending a
        stream would (deadline_exceeded, cancelled, else upstream_error)."""
        if error.status in REFUSALS or error.openai_code == "model_not_found":
            self.end(Outcome.REJECTED)
        elif error.status >= 500:
            self.end(failed(error.code))

    def answered(self, status: int) -> None:
        """The response starts with `status`: a refusal status ends a request not yet ended."""
        self.status = status
        if status in REFUSALS:
            self.end(Outcome.REJECTED)

    def resumed(self) -> None:
        """A resume attached to a stream nobody was reading (counted besides its outcome)."""
        self._count(Outcome.RESUMED)

    def first_token(self) -> None:
        """The stream's first token is written: its TTFT, from the request's arrival."""
        self.metrics.ttft.labels(route=self.route).observe(time.perf_counter() - self.arrived)

    def stream_opened(self) -> None:
        self.metrics.active.inc()

    def stream_closed(self) -> None:
        """The HTTP stream ended; without an outcome by now, its client left first."""
        self.metrics.active.dec()
        self.end(Outcome.CLIENT_DISCONNECTED)

    def report(self) -> None:
        """The request's `edge.stream` line, once its response is over; a request that counted
        no outcome (a 204, 401, 404 or 410 resume...) writes none. Ids, counts and labels
        only: never a prompt, a completion or a key."""
        if self.outcome is None:
            return
        log.info(
            "edge.stream",
            request_id=self.request_id,
            route=self.route,
            outcome=self.outcome,
            status=self.status,
            events=self.events,
            duration_ms=round((time.perf_counter() - self.arrived) * 1000, 3),
            **self.details,
        )

    def _count(self, outcome: Outcome) -> None:
        self.metrics.streams.labels(route=self.route, outcome=outcome).inc()


def failovers_counted(metrics: EdgeMetrics) -> Callable[[Failover], None]:
    """What the upstream reports each failover to: tokenwire_edge_failovers_total{route}."""

    def count(failover: Failover) -> None:
        metrics.failovers.labels(route=failover.route).inc()

    return count


class AccountingMiddleware:
    """Before the gates: an Account for each request to an accounted route, made as it
    arrives, and `rejected` for one refused before any stream, by a gate as by the route
    (counted as its response starts, so a client that reads the refusal then the metrics sees
    it counted). Inside the tracing middleware, so the request's line carries its trace ids."""

    def __init__(
        self, app: ASGIApp, metrics: EdgeMetrics, routes: Sequence[tuple[BaseRoute, RouteName]]
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self._route(scope)
        if route is None:
            await self.app(scope, receive, send)
            return
        account = Account(self.metrics, route, _given_id(scope))
        scope[ACCOUNT] = account

        async def answering(message: Message) -> None:
            if message["type"] == "http.response.start":
                account.answered(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, answering)
        finally:
            account.report()

    def _route(self, scope: Scope) -> RouteName | None:
        """The label of the accounted route the request is for (its path and its method)."""
        if scope["type"] != "http":
            return None
        for route, name in self.routes:
            if route.matches(scope)[0] == Match.FULL:
                return name
        return None


def _given_id(scope: Scope) -> str:
    """The caller's X-Request-ID where it is a valid one, else a new id: what a request refused
    before its route reads its id goes by (an invalid header is never logged)."""
    header = Headers(scope=scope).get("x-request-id", "")
    return header if valid_request_id(header) else uuid.uuid4().hex
