"""The edge application: routes, auth, request ids, error mapping, lifecycle."""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from clients.edge import native, openai_api
from clients.edge.context import EdgeContext
from clients.edge.errors import EdgeError
from clients.edge.metrics import EdgeMetrics
from clients.edge.resumable import ResumableStreams
from clients.edge.settings import EdgeSettings
from clients.edge.upstream import Upstream

STATIC = Path(__file__).parent / "static"
OPEN_PATHS = ("/healthz", "/readyz", "/static/", "/favicon.ico")


class ApiKeyMiddleware:
    """Every route but health and the page's files needs `Authorization: Bearer <key>`."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]) -> None:
        self.app = app
        self.keys = tuple(k.encode() for k in keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path == "/" or path.startswith(OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        token = header[7:] if header[:7].lower() == b"bearer " else b""
        if any(hmac.compare_digest(token, key) for key in self.keys):
            await self.app(scope, receive, send)
            return
        error = EdgeError(
            401, "UNAUTHENTICATED", "a valid `Authorization: Bearer <key>` is required"
        )
        response = JSONResponse(
            _body(path, error), status_code=401, headers={"WWW-Authenticate": "Bearer"}
        )
        await response(scope, receive, send)


def _body(path: str, error: EdgeError) -> dict[str, object]:
    return error.native_body() if path.startswith("/v1/generate") else error.openai_body()


async def _edge_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EdgeError)
    ctx = EdgeContext.of(request)
    path = request.url.path
    route = (
        "native" if path.startswith("/v1/generate") else "chat" if "chat" in path else "completions"
    )
    if exc.status in {400, 413, 429, 503}:
        ctx.outcome(route, "rejected")
    return JSONResponse(_body(path, exc), status_code=exc.status, headers=exc.headers())


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    ready = await EdgeContext.of(request).upstream.ready()
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


async def page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def metrics(request: Request) -> Response:
    ctx = EdgeContext.of(request)
    ctx.metrics.buffer_bytes.set(ctx.streams.bytes)
    return PlainTextResponse(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(settings: EdgeSettings, upstream: Upstream | None = None) -> Starlette:
    edge_metrics = EdgeMetrics()
    ctx = EdgeContext(
        settings=settings,
        upstream=upstream or Upstream.from_settings(settings),
        streams=ResumableStreams(
            settings.resume_window_s,
            settings.resume_stream_bytes,
            settings.resume_total_bytes,
            on_outcome=lambda outcome: edge_metrics.streams.labels("native", outcome).inc(),
        ),
        metrics=edge_metrics,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await ctx.upstream.connect(limit_s=1.0)
        yield
        ctx.streams.close()
        await ctx.upstream.close()

    middleware = []
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
    if settings.api_keys:
        middleware.append(Middleware(ApiKeyMiddleware, keys=settings.api_keys))
    routes = [
        Route("/", page),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/v1/generate", native.generate_post, methods=["POST"]),
        Route("/v1/generate", native.generate_get, methods=["GET"]),
        Route("/v1/generate/{request_id}/events", native.resume, methods=["GET"]),
        Route("/v1/generate/{request_id}/cancel", native.cancel, methods=["POST"]),
        Route("/v1/completions", openai_api.completions, methods=["POST"]),
        Route("/v1/chat/completions", openai_api.chat_completions, methods=["POST"]),
        Route("/v1/models", openai_api.models, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    if settings.metrics:
        routes.append(Route("/metrics", metrics))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={EdgeError: _edge_error},
    )
    app.state.ctx = ctx
    return app
