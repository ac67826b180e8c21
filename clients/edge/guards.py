"""ASGI middleware that runs before any route: API keys, cross-site and JSON-only checks, and
the drain gate."""

from __future__ import annotations

import hashlib
import hmac

from starlette.datastructures import Headers, QueryParams
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenwire.common.settings import is_loopback
from tokenwire.edge.errors import EdgeError, request_id_header

OPEN_PATHS = ("/healthz", "/readyz", "/static/", "/favicon.ico")
TOKEN_PATHS = ("/tokenize", "/detokenize")
"""vLLM's token routes, outside /v1/ where vLLM serves them: API routes all the same."""
PRINCIPAL = "tokenwire.principal"
"""Scope key: a fingerprint of the API key that authenticated the request (absent: no keys)."""


def is_api(path: str) -> bool:
    """Whether `path` is an API route, which the drain and cross-site gates cover: /v1/* and
    the token routes."""
    return path.startswith("/v1/") or path in TOKEN_PATHS


def principal_of(scope: Scope) -> str | None:
    value = scope.get(PRINCIPAL)
    return value if isinstance(value, str) else None


async def _refuse(scope: Scope, receive: Receive, send: Send, error: EdgeError) -> None:
    headers = {**error.headers(), **_extra_headers(error), **request_id_header(scope)}
    response = JSONResponse(
        error.body_for(scope.get("path", "")), status_code=error.status, headers=headers
    )
    await response(scope, receive, send)


def _extra_headers(error: EdgeError) -> dict[str, str]:
    extra = {401: {"WWW-Authenticate": "Bearer"}, 503: {"Connection": "close"}}
    return extra.get(error.status, {})


class ApiKeyMiddleware:
    """Every route but health and the page's files needs `Authorization: Bearer <key>`.

    The key's fingerprint is put in the scope, so streams can belong to the key that started them.
    """

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]) -> None:
        self.app = app
        self.keys = tuple(k.encode() for k in keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path == "/" or path.startswith(OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization", "").encode("latin-1")
        token = header[7:] if header[:7].lower() == b"bearer " else b""
        # Compare against every key, so the time taken does not say which one matched.
        matches = [hmac.compare_digest(token, key) for key in self.keys]
        if any(matches):
            scope[PRINCIPAL] = hashlib.sha256(token).hexdigest()[:32]
            await self.app(scope, receive, send)
            return
        message = "a valid `Authorization: Bearer <key>` is required"
        await _refuse(scope, receive, send, EdgeError(401, "UNAUTHENTICATED", message))


def _is_json(content_type: str) -> bool:
    """application/json, with no parameter but an optional UTF-8 charset."""
    media, *params = (part.strip().lower() for part in content_type.split(";"))
    if media != "application/json":
        return False
    for param in filter(None, params):  # tolerate a stray ';'
        name, _, value = param.partition("=")
        if name.strip() != "charset" or value.strip().strip('"') not in {"utf-8", "utf8"}:
            return False
    return True


class JsonOnlyMiddleware:
    """POSTs must say `Content-Type: application/json` (415 otherwise).

    Browsers send text/plain, form and multipart POSTs (and bodiless ones) to other origins
    without a CORS preflight; requiring JSON keeps another site from starting or cancelling a
    generation with a user's cookies or network position.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            content_type = Headers(scope=scope).get("content-type", "")
            if not _is_json(content_type):
                error = EdgeError(
                    415,
                    "UNSUPPORTED_MEDIA_TYPE",
                    "Content-Type: must be application/json",
                    param="Content-Type",
                )
                await _refuse(scope, receive, send, error)
                return
        await self.app(scope, receive, send)


class CrossSiteMiddleware:
    """Refuse API requests (is_api) a browser marks as cross-site, unless their Origin is allowed.

    Browsers label every request with `Sec-Fetch-Site`; a page on another site can still send
    simple GETs (an `<img>` pointing at `/v1/generate?prompt=...` starts a generation). Clients
    that are not browsers send no such header and are not affected.
    """

    def __init__(self, app: ASGIApp, origins: tuple[str, ...]) -> None:
        self.app = app
        self.origins = frozenset(origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_api(scope.get("path", "")):
            headers = Headers(scope=scope)
            site = headers.get("sec-fetch-site", "").lower()
            if site in {"cross-site", "same-site"} and headers.get("origin") not in self.origins:
                message = "cross-site requests need an allowed Origin (TOKENWIRE_CORS_ORIGINS)"
                await _refuse(scope, receive, send, EdgeError(403, "PERMISSION_DENIED", message))
                return
        await self.app(scope, receive, send)


def _host_name(header: str) -> str:
    """The host part of a Host header value, or of an allowed name, as compared: lowercase,
    without port, brackets or a trailing dot ("[::1]:8000" -> "::1", "A.example.:80" ->
    "a.example")."""
    header = header.strip().lower()
    if header.startswith("[") and "]" in header:
        name, _, rest = header[1:].partition("]")
    elif header.count(":") == 1:
        name, rest = header.partition(":")[0], header[header.index(":") :]
    else:
        name, rest = header, ""
    port = rest[1:]
    if rest and not (rest.startswith(":") and (port.isdigit() or not port) and port.isascii()):
        return header  # anything but a port after the host ("[::1]evil.com"): no name of ours
    return name.rstrip(".")


class LoopbackHostMiddleware:
    """On an edge bound to a loopback address, refuse requests whose Host header names
    anything else. A page on another site that makes its own name resolve to 127.0.0.1 (DNS
    rebinding) is same-origin to the browser, so neither Sec-Fetch-Site nor CORS stops it from
    reading the edge's answers; the Host header it sends still names that site."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...] = ()) -> None:
        self.app = app
        self.allowed = frozenset(_host_name(name) for name in allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._allows(Headers(scope=scope).get("host", "")):
            message = (
                "the Host header must name a loopback address (localhost, 127.0.0.1, [::1]) "
                "on an edge that listens on one; a reverse proxy's own Host goes in "
                "TOKENWIRE_ALLOWED_HOSTS"
            )
            await _refuse(scope, receive, send, EdgeError(403, "PERMISSION_DENIED", message))
            return
        await self.app(scope, receive, send)

    def _allows(self, header: str) -> bool:
        host = _host_name(header)
        return is_loopback(host) or host in self.allowed


PAGE_HEADERS = (
    # The page loads its script, style and data from the edge alone and is framed by no one.
    (
        b"content-security-policy",
        b"default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)


class SecurityHeadersMiddleware:
    """`X-Content-Type-Options: nosniff` on every answer (a JSON or event-stream body is never
    read as a page or a script), and on the page and its files a content security policy
    that lets them load from the edge only and be framed by no other page."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        extra = [(b"x-content-type-options", b"nosniff")]
        if path == "/" or path.startswith("/static/"):
            extra.extend(PAGE_HEADERS)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, with_headers)


class Drain:
    """Where the edge is in its drain, and how many API requests are in flight."""

    def __init__(self) -> None:
        self.ready = True
        """False from the first moment of a drain: /readyz answers 503."""
        self.draining = False
        """True once new API requests are refused (after the drain notice)."""
        self.hurry = False
        """True when the grace is cut short (a second signal): end what still runs now."""
        self.in_flight = 0


def continues_a_stream(scope: Scope) -> bool:
    """Resume and cancel requests finish work already started, so they pass while draining."""
    path: str = scope.get("path", "")
    if path.startswith("/v1/generate/") and path.endswith(("/events", "/cancel")):
        return True
    if path != "/v1/generate":
        return False
    # As the route reads it: an empty Last-Event-ID starts a new stream, so it is no resume.
    query = QueryParams(scope.get("query_string", b""))
    return bool(Headers(scope=scope).get("last-event-id") or query.get("last_event_id"))


class DrainMiddleware:
    """Counts API requests in flight; while draining, new ones get 503 with `Connection: close`."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_api(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        if self.drain.draining and not continues_a_stream(scope):
            error = EdgeError(
                503, "UNAVAILABLE", "the edge is shutting down; retry", retry_after_s=1
            )
            await _refuse(scope, receive, send, error)
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1
