"""What every edge route needs: settings, the upstream, the stream registry, metrics."""

from __future__ import annotations

import dataclasses
import re
import uuid

from starlette.requests import Request

from tokenwire.common import request_ids
from tokenwire.edge.errors import EdgeError
from tokenwire.edge.guards import Drain
from tokenwire.edge.metrics import EdgeMetrics
from tokenwire.edge.settings import EdgeSettings
from tokenwire.edge.store import ResumeStore
from tokenwire.edge.upstream import Upstream

MAX_REQUEST_ID = request_ids.MAX_LENGTH
# What gRPC metadata carries (printable ASCII) within the server's bound; no ':' because the
# edge's event ids are `<request_id>:<seq>`, no space at either end because it is echoed in the
# X-Request-ID response header, where HTTP forbids one.
_ID_CHAR = r"\x21-\x39\x3b-\x7e"
_REQUEST_ID = re.compile(rf"[{_ID_CHAR}](?:[ {_ID_CHAR}]{{0,{MAX_REQUEST_ID - 2}}}[{_ID_CHAR}])?")


@dataclasses.dataclass
class Opening:
    """A native stream whose id is claimed while the server is still opening it."""

    owner: str | None
    cancelled: bool = False
    """A cancel came meanwhile: the stream is cancelled as soon as it opens."""


@dataclasses.dataclass
class EdgeContext:
    settings: EdgeSettings
    upstream: Upstream
    streams: ResumeStore
    metrics: EdgeMetrics
    drain: Drain = dataclasses.field(default_factory=Drain)
    opening: dict[str, Opening] = dataclasses.field(default_factory=dict)
    """Native streams being opened, by request id."""

    @staticmethod
    def of(request: Request) -> EdgeContext:
        ctx = request.app.state.ctx
        assert isinstance(ctx, EdgeContext)
        return ctx


def request_id_of(request: Request, field: str = "") -> str:
    """The body's request_id, else the X-Request-ID header, else a new one (as the server
    takes a request's id over its x-request-id metadata); both are checked."""
    header = request.headers.get("x-request-id", "")
    for given in (header, field):
        if given:
            check_request_id(given)
    return field or header or uuid.uuid4().hex


def unique_id(request_id: str) -> str:
    """`request_id` made unique: its first characters, then random ones, within the bound
    on ids (a choice's suffix, `-<index>`, still leaves 20 random hex digits)."""
    return f"{request_id[: MAX_REQUEST_ID - 25]}-{uuid.uuid4().hex[:24]}"


def valid_request_id(request_id: str) -> bool:
    """Whether the edge takes `request_id`: 1..128 printable ASCII characters, no ':'."""
    return _REQUEST_ID.fullmatch(request_id) is not None


def check_request_id(request_id: str) -> None:
    """EdgeError 400 naming request_id unless it is 1..128 printable ASCII characters, no ':'."""
    if not valid_request_id(request_id):
        raise EdgeError.invalid(
            "request_id",
            f"must be 1 to {MAX_REQUEST_ID} printable ASCII characters (0x20-0x7E), without ':'"
            " and without a space at either end",
        )
