"""The rule a request id follows everywhere: what gRPC metadata (`x-request-id`) can carry.

The server refuses any other id as INVALID_ARGUMENT naming request_id; the client refuses it the
same way before sending it (grpc would fail the call locally, as INTERNAL), and the edge adds
its own narrower rule on top.
"""

from __future__ import annotations

MAX_LENGTH = 128
RULE = f"must be non-empty, at most {MAX_LENGTH} printable ASCII characters (0x20-0x7E)"


def carried(request_id: str) -> bool:
    """Whether `request_id` is 1..MAX_LENGTH printable ASCII characters."""
    return 1 <= len(request_id) <= MAX_LENGTH and all(" " <= c <= "~" for c in request_id)


def shown(request_id: str) -> str:
    """The id as an error message quotes it: repr, cut after 40 characters."""
    return repr(request_id if len(request_id) <= 40 else f"{request_id[:40]}...")
