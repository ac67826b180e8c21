"""The edge application: routes, auth, request ids, error mapping, lifecycle."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.staticfiles import StaticFiles

from tokenwire.common.settings import is_loopback
from tokenwire.edge import native, openai_api, token_routes
from tokenwire.edge.accounting import (
    ACCOUNT,
    Account,
    AccountingMiddleware,
    failovers_counted,
)
from tokenwire.edge.context import EdgeContext
from tokenwire.edge.errors import EdgeError, request_id_header
from tokenwire.edge.guards import (
    ApiKeyMiddleware,
    CrossSiteMiddleware,
    DrainMiddleware,
    JsonOnlyMiddleware,
    LoopbackHostMiddleware,
    SecurityHeadersMiddleware,
)
from tokenwire.edge.metrics import EdgeMetrics, Outcome, RouteName
from tokenwire.edge.native_format import native_event
from tokenwire.edge.pipeline import ClientLeft
from tokenwire.edge.settings import EdgeSettings
from tokenwire.edge.store import resume_store
from tokenwire.edge.tracing import Tracing, TracingMiddleware
from tokenwire.edge.upstream import Upstream

STATIC = Path(__file__).parent / "static"
NATIVE, COMPLETIONS, CHAT = RouteName.NATIVE, RouteName.COMPLETIONS, RouteName.CHAT


async def _edge_error(request: Request, exc: Exception) -> Response:
    """An EdgeError as the route's JSON error, counted by an accounted route's Account."""
    assert isinstance(exc, EdgeError)
    account = request.scope.get(ACCOUNT)
    if isinstance(account, Account):
        account.refused(exc)
    body = exc.body_for(request.url.path)
    headers = {**exc.headers(), **request_id_header(request.scope)}
    return JSONResponse(body, status_code=exc.status, headers=headers)


async def _client_left(request: Request, exc: Exception) -> Response:
    """A client that left before its response began: 499 (nginx's "client closed request",
    which no one reads), counted as a disconnect by an accounted route's Account."""
    assert isinstance(exc, ClientLeft)
    account = request.scope.get(ACCOUNT)
    if isinstance(account, Account):
        account.end(Outcome.CLIENT_DISCONNECTED)
    return Response(status_code=499)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown routes (404) and wrong methods (405, with Allow) in the route's JSON error shape."""
    assert isinstance(exc, HTTPException)
    path = request.url.path
    if exc.status_code == 405:
        message = f"{request.method} is not allowed on {path}"
        error = EdgeError(405, "METHOD_NOT_ALLOWED", message, openai_code="method_not_allowed")
    elif exc.status_code == 404:
        message = f"no route {request.method} {path}"
        if path.endswith("/") and _a_route(request, path.rstrip("/")):
            message += f" (routes end without a slash: {path.rstrip('/')})"
        error = EdgeError(
            404,
            "NOT_FOUND",
            message,
            openai_code="unknown_url",
            openai_type="invalid_request_error",
        )
    else:
        error = EdgeError(exc.status_code, "HTTP_ERROR", str(exc.detail))
    headers = dict(exc.headers or {})
    if "Allow" in headers:  # Starlette joins a set: the same list in the same order each time
        headers["Allow"] = ", ".join(sorted(headers["Allow"].split(", ")))
    return JSONResponse(error.body_for(path), status_code=exc.status_code, headers=headers)


def _a_route(request: Request, path: str) -> bool:
    """Whether one of the app's routes takes `path` (by any method)."""
    scope = {**request.scope, "path": path}
    return any(route.matches(scope)[0] != Match.NONE for route in request.app.router.routes)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """200 while the server reports SERVING, 503 once this edge starts draining."""
    ctx = EdgeContext.of(request)
    ready = ctx.drain.ready and await ctx.upstream.ready()
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


async def page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def metrics(request: Request) -> Response:
    ctx = EdgeContext.of(request)
    ctx.metrics.buffer_bytes.set(ctx.streams.bytes)
    return PlainTextResponse(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)


Accounted = list[tuple[Route, RouteName]]


def _middleware(
    settings: EdgeSettings, ctx: EdgeContext, traces: Tracing, accounted: Accounted
) -> list[Middleware]:
    """Outermost first: security headers on every answer, the Host check of a loopback edge,
    CORS answers preflights, tracing (a span per API request), accounting
    (each request's outcome and its log line, from its arrival), the drain gate refuses, then
    keys, then where the request comes from and its content type."""
    middleware: list[Middleware] = [Middleware(SecurityHeadersMiddleware)]
    if is_loopback(settings.host):
        middleware.append(Middleware(LoopbackHostMiddleware, allowed=settings.allowed_hosts))
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["*"],
                expose_headers=["X-Request-ID"],
            )
        )
    # Outside the gates, so requests they refuse (draining, keys) have spans and are counted;
    # accounting inside tracing, so each request's line carries its trace and span ids.
    middleware.append(Middleware(TracingMiddleware, tracer=traces.tracer))
    middleware.append(Middleware(AccountingMiddleware, metrics=ctx.metrics, routes=accounted))
    middleware.append(Middleware(DrainMiddleware, drain=ctx.drain))
    if api_keys := settings.all_api_keys():
        middleware.append(Middleware(ApiKeyMiddleware, keys=api_keys))
    middleware.append(Middleware(CrossSiteMiddleware, origins=settings.cors_origins))
    middleware.append(Middleware(JsonOnlyMiddleware))
    return middleware


def _without_head(route: Route) -> Route:
    """The route without the HEAD Starlette adds to a GET one: a HEAD of a generating route
    would start (or attach to) a stream its headers-only answer never reads, so it is a 405."""
    assert route.methods is not None
    route.methods.discard("HEAD")
    return route


def _accounted_routes() -> Accounted:
    """The API routes that start or follow generations, with the label of their outcomes.
    A cancel is not one: it ends a stream, whose own request counts the outcome. A request id
    may hold '/': the stream routes take the rest of the path up to their last segment."""
    return [
        (_without_head(Route("/v1/generate", native.generate, methods=["GET", "POST"])), NATIVE),
        (
            _without_head(
                Route("/v1/generate/{request_id:path}/events", native.resume, methods=["GET"])
            ),
            NATIVE,
        ),
        (Route("/v1/completions", openai_api.completions, methods=["POST"]), COMPLETIONS),
        (Route("/v1/chat/completions", openai_api.chat_completions, methods=["POST"]), CHAT),
    ]


def _routes(settings: EdgeSettings, accounted: Accounted) -> list[BaseRoute]:
    routes: list[BaseRoute] = [
        Route("/", page),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        *(route for route, _ in accounted),
        Route("/v1/generate/{request_id:path}/cancel", native.cancel, methods=["POST"]),
        Route("/v1/models", openai_api.models, methods=["GET"]),
        # A model id may hold slashes ("org/name"), as OpenAI's and the Hub's do.
        Route("/v1/models/{model:path}", openai_api.model, methods=["GET"]),
        # vLLM's token routes, where vLLM serves them and beside the rest of the API.
        Route("/tokenize", token_routes.tokenize, methods=["POST"]),
        Route("/detokenize", token_routes.detokenize, methods=["POST"]),
        Route("/v1/tokenize", token_routes.tokenize, methods=["POST"]),
        Route("/v1/detokenize", token_routes.detokenize, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    if settings.metrics:
        routes.append(Route("/metrics", metrics))
    return routes


def create_app(
    settings: EdgeSettings, upstream: Upstream | None = None, tracing: Tracing | None = None
) -> Starlette:
    traces = tracing or Tracing.from_endpoint(settings.otlp_endpoint)
    metrics = EdgeMetrics()
    # An upstream passed in reports its failovers to whatever its maker gave it.
    upstream = upstream or Upstream.from_settings(settings, failovers_counted(metrics))
    ctx = EdgeContext(
        settings=settings,
        upstream=upstream,
        streams=resume_store(settings, upstream, native_event),
        metrics=metrics,
    )

    accounted = _accounted_routes()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await ctx.upstream.connect(limit_s=1.0)
        yield
        await ctx.streams.close()
        await ctx.upstream.close()
        traces.shutdown()

    app = Starlette(
        routes=_routes(settings, accounted),
        middleware=_middleware(settings, ctx, traces, accounted),
        lifespan=lifespan,
        exception_handlers={
            EdgeError: _edge_error,
            HTTPException: _http_error,
            ClientLeft: _client_left,
        },
    )
    # A path with a slash too many is a 404 naming the route, not a redirect built from the
    # Host header (an empty 307 that SDKs follow with the body and others do not).
    app.router.redirect_slashes = False
    app.state.ctx = ctx
    return app
