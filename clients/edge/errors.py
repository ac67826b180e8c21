"""The edge's errors: one conversion from the client's errors (gRPC status) to an HTTP status
and code (`edge_error`), and the error bodies of native and OpenAI-style routes."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, MutableMapping
from typing import Any

import grpc
import structlog

from tokenwire.client.errors import (
    NOT_SERVING,
    InvalidArgument,
    RequestTooLarge,
    TokenwireError,
)

log = structlog.get_logger("tokenwire.edge")

HTTP_BY_GRPC: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
OPENAI_TYPE_BY_HTTP = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    410: "not_found_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    499: "request_cancelled",
    503: "service_unavailable",
    504: "timeout",
}
# OpenAI's own codes where it has one (its API answers e.g. `rate_limit_exceeded`).
OPENAI_CODE_BY_CODE = {
    "INVALID_ARGUMENT": "invalid_value",
    "UNAUTHENTICATED": "invalid_api_key",
    "RESOURCE_EXHAUSTED": "rate_limit_exceeded",
}


def _http_field(field: str | None, message: str) -> tuple[str | None, str]:
    """The server's `sampling.top_p` is the HTTP API's flat `top_p`."""
    if field is None or not field.startswith("sampling."):
        return field, message
    flat = field.removeprefix("sampling.")
    if message.startswith(f"{field}:"):
        message = flat + message.removeprefix(field)
    return flat, message


class EdgeError(Exception):
    """An error with an HTTP status, a stable code and an optional field name."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        retry_after_s: float | None = None,
        openai_code: str | None = None,
        openai_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s
        self.openai_code = openai_code
        """OpenAI's `code` when it is more precise than the native one (`model_not_found`)."""
        self.openai_type = openai_type
        self.generation: int | None = None
        """Which of a request's generations the server refused (set by open_generations)."""

    @classmethod
    def invalid(cls, field: str, reason: str, openai_code: str | None = None) -> EdgeError:
        return cls(
            400, "INVALID_ARGUMENT", f"{field}: {reason}", param=field, openai_code=openai_code
        )

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}

    def body_for(self, path: str) -> dict[str, Any]:
        """The native body on /v1/generate routes, OpenAI's everywhere else."""
        return self.native_body() if path.startswith("/v1/generate") else self.openai_body()

    def native_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "status": self.status, "message": self.message}
        if self.param:
            body["field"] = self.param
        return {"error": body}

    def openai_body(self) -> dict[str, Any]:
        code = self.openai_code or OPENAI_CODE_BY_CODE.get(self.code, self.code.lower())
        kind = self.openai_type or OPENAI_TYPE_BY_HTTP.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": code}}

    def renamed(self, names: dict[str, str]) -> EdgeError:
        """The same error naming the field as the caller did (`prompt` -> `messages`,
        `prompt_ids[3]` -> `prompt[3]`), also at the start of the message, and naming other
        fields its reason refers to as the caller did too (`max_tokens` ->
        `max_completion_tokens`, "the prompt" -> `prompt[2]` in a batch); the caller's own
        value it echoes (after `, got `) is kept."""
        if self.param is None:
            return self
        base, bracket, rest = self.param.partition("[")
        new = names.get(self.param) or (names[base] + bracket + rest if base in names else "")
        new = new or self.param
        message = self.message
        if message.startswith(f"{self.param}:"):
            message = new + message.removeprefix(self.param)
        head, sep, tail = message.partition(":")
        reason, got, value = tail.partition(", got ")
        for server, caller in names.items():
            if "_" in server and server != caller:  # a field's name, not a word of the text
                reason = re.sub(rf"\b{re.escape(server)}\b", caller, reason)
        place = names.get("prompt", "")
        if "[" in place:  # one prompt of a batch: the reason's "the prompt" is that one
            reason = re.sub(r"\bthe prompt\b", place, reason)
        message = head + sep + reason + got + value
        if new == self.param and message == self.message:
            return self
        return EdgeError(
            self.status,
            self.code,
            message,
            param=new,
            retry_after_s=self.retry_after_s,
            openai_code=self.openai_code,
            openai_type=self.openai_type,
        )


ACCOUNT_KEY = "tokenwire.account"
"""The scope key of a generating request's Account (accounting.py)."""


def request_id_header(scope: MutableMapping[str, Any]) -> dict[str, str]:
    """X-Request-ID for an answer on an accounted (generating) route: the id its log line and
    trace go by, on a refusal as on a success (OpenAI sends it on errors too; the SDKs read it
    into the error's request_id). Empty elsewhere."""
    request_id = getattr(scope.get(ACCOUNT_KEY), "request_id", None)
    return {"X-Request-ID": request_id} if isinstance(request_id, str) else {}


def edge_error(error: TokenwireError) -> EdgeError:
    """The EdgeError of a failed upstream call, whichever route and format reports it: HTTP
    status by gRPC status, the field in the HTTP API's name, a Retry-After on every 429."""
    if isinstance(error, RequestTooLarge):
        # gRPC refused the request for its size before the server read it: not an overload to
        # retry later, but a request that no retry mends (the prompt is what grows it).
        message = f"prompt: the request is larger than the server takes ({error.message})"
        return EdgeError(413, "PAYLOAD_TOO_LARGE", message, param="prompt")
    status = HTTP_BY_GRPC.get(error.code, 502 if error.code == grpc.StatusCode.UNKNOWN else 500)
    retry = error.retry_after_s
    if retry is None and status == 429:
        retry = 1.0
    field, message = _http_field(error.field, error.message)
    if error.from_channel:
        # The edge's own channel failed (connect, TLS, DNS): its words name internal addresses
        # and certificates, which the log keeps and HTTP callers do not get.
        log.warning("edge.upstream_failed", code=error.code.name, error=error.message)
        message = _CHANNEL_MESSAGES.get(error.code, "the server cannot be reached")
        if NOT_SERVING in error.message:
            message, retry = NOT_SERVING, retry or 1.0
    overflow = error.code == grpc.StatusCode.INVALID_ARGUMENT and CONTEXT_LENGTH in message
    return EdgeError(
        status,
        error.code.name,
        message,
        param=field,
        retry_after_s=retry,
        # OpenAI's code for it, by which client libraries (LangChain, LiteLLM) tell a context
        # overflow from other bad requests, to trim the conversation or fall back.
        openai_code="context_length_exceeded" if overflow else None,
    )


CONTEXT_LENGTH = "the context length"
"""What the server's refusals of a prompt, or of a max_tokens, that the model's context cannot
hold say (`prompt: must be shorter than the context length of 512 tokens`, `max_tokens: must be
at most 500: the prompt has 12 tokens and the context length is 512`)."""


_CHANNEL_MESSAGES = {
    grpc.StatusCode.UNAVAILABLE: "the server cannot be reached",
    grpc.StatusCode.UNKNOWN: "the stream to the server broke",
    grpc.StatusCode.INTERNAL: "the stream to the server broke",
}


@contextlib.contextmanager
def as_request_errors() -> Iterator[None]:
    """The client library's own refusals of what the wire cannot carry (InvalidArgument, raised
    building GenerateOptions) as the request's 400, as the server's refusals are."""
    try:
        yield
    except InvalidArgument as error:
        raise edge_error(error) from None
