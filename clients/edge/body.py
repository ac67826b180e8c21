"""Reading request bodies and query strings into typed values, naming the field on error."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request

from clients.edge.errors import EdgeError


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The JSON object body; 413 past `limit` bytes, 400 when it is not a JSON object."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise EdgeError(413, "PAYLOAD_TOO_LARGE", f"request body must be at most {limit} bytes")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise EdgeError(413, "PAYLOAD_TOO_LARGE", f"request body must be at most {limit} bytes")
    try:
        body = json.loads(raw or b"{}")
    except json.JSONDecodeError as exc:
        raise EdgeError.invalid("body", f"must be JSON ({exc.msg})") from None
    if not isinstance(body, dict):
        raise EdgeError.invalid("body", "must be a JSON object")
    return body


class Fields:
    """Typed access to a JSON object or a query string; errors name the field."""

    def __init__(self, source: Mapping[str, Any], *, from_query: bool = False) -> None:
        self._source = source
        self._from_query = from_query

    def has(self, name: str) -> bool:
        return self._source.get(name) is not None

    def string(self, name: str, default: str = "") -> str:
        value = self._source.get(name, default)
        if value is None:
            return default
        if not isinstance(value, str):
            raise EdgeError.invalid(name, "must be a string")
        return value

    def integer(self, name: str, default: int | None = None) -> int | None:
        value = self._source.get(name)
        if value is None:
            return default
        if self._from_query and isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise EdgeError.invalid(name, "must be an integer")
        return value

    def number(self, name: str) -> float | None:
        value = self._source.get(name)
        if value is None:
            return None
        if self._from_query and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise EdgeError.invalid(name, "must be a number") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise EdgeError.invalid(name, "must be a number")
        return float(value)

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self._source.get(name)
        if value is None:
            return default
        if self._from_query and isinstance(value, str):
            return value.lower() in {"1", "true", "yes", "on"}
        if not isinstance(value, bool):
            raise EdgeError.invalid(name, "must be true or false")
        return value

    def strings(self, name: str) -> tuple[str, ...]:
        """A string or a list of strings (OpenAI's `stop`)."""
        value = self._source.get(name)
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise EdgeError.invalid(name, "must be a string or a list of strings")

    def raw(self, name: str) -> Any:
        return self._source.get(name)
