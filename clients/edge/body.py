"""Reading request bodies and query strings into typed values, naming the field on error.

Every number is range-checked here, before it can reach a protobuf field (where an
out-of-range value raises ValueError, i.e. a 500): integers against their wire type and the
documented range, floats for finiteness and the documented range, as the 32-bit floats the
wire carries too (an open lower end is refused by the server where the value rounds onto it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import struct
from collections.abc import Mapping
from typing import Any

from starlette.requests import ClientDisconnect, Request

from tokenwire.edge.errors import EdgeError
from tokenwire.edge.jsonsafe import OutOfRange, decode_object

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
# ASCII only: str.isdigit() accepts '²' and int() then raises.
_QUERY_INT = re.compile(r"[+-]?[0-9]{1,40}", re.ASCII)
_QUERY_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", re.ASCII)
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


@dataclasses.dataclass(frozen=True, slots=True)
class IntRange:
    low: int
    high: int

    def describe(self) -> str:
        return f"an integer between {self.low} and {self.high}"


@dataclasses.dataclass(frozen=True, slots=True)
class FloatRange:
    low: float
    high: float
    low_open: bool = False

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return math.isfinite(value) and above and value <= self.high

    def lost_on_the_wire(self, value: float) -> bool:
        """Whether a value within the range leaves it as the 32-bit float the wire carries:
        above an open lower end here, at it there (1e-46 is 0.0 as a float32)."""
        return self.low_open and as_float32(value) <= self.low

    def describe(self) -> str:
        left = "(" if self.low_open else "["
        return f"a number in {left}{self.low:g}, {self.high:g}]"


# The documented ranges (docs/api.md) and, where wider, the protobuf wire types.
INT_RANGES: dict[str, IntRange] = {
    "max_tokens": IntRange(0, UINT32_MAX),
    "max_completion_tokens": IntRange(0, UINT32_MAX),
    # -1 is vLLM's "off" (as 0), which clients written for vLLM send.
    "top_k": IntRange(-1, UINT32_MAX),
    # OpenAI and vLLM take any 64-bit integer, negative ones included.
    "seed": IntRange(-(2**63), UINT64_MAX),
    "n": IntRange(1, 8),
    "logprobs": IntRange(0, 5),
    "top_logprobs": IntRange(0, 20),
    "min_tokens": IntRange(0, UINT32_MAX),
}
FLOAT_RANGES: dict[str, FloatRange] = {
    "temperature": FloatRange(0.0, 2.0),
    "top_p": FloatRange(0.0, 1.0, low_open=True),
    "repetition_penalty": FloatRange(0.0, 2.0, low_open=True),
    "presence_penalty": FloatRange(-2.0, 2.0),
    "frequency_penalty": FloatRange(-2.0, 2.0),
    "min_p": FloatRange(0.0, 1.0),
}


BODY_TIMEOUT_S = 30.0
"""How long a request body may take to arrive, whole."""


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The JSON object body; 413 past `limit` bytes, 408 if it takes over BODY_TIMEOUT_S to
    arrive (a client trickling it would hold a request open, and a drain, for ever), 400
    naming the problem otherwise."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    raw = bytearray()
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > limit:
                    raise _too_large(limit)
    except TimeoutError:
        raise EdgeError(
            408, "REQUEST_TIMEOUT", f"the request body did not arrive within {BODY_TIMEOUT_S:g} s"
        ) from None
    except ClientDisconnect:
        # Nobody is left to answer; 499 is the edge's code for a caller that went away.
        raise EdgeError(499, "CANCELLED", "the client closed the connection") from None
    return decode_object(bytes(raw))


def _too_large(limit: int) -> EdgeError:
    return EdgeError(413, "PAYLOAD_TOO_LARGE", f"request body must be at most {limit} bytes")


def _range_code(value: int | OutOfRange, allowed: IntRange) -> str:
    """OpenAI's code for an integer out of its range."""
    if isinstance(value, OutOfRange):
        return "invalid_value"
    return "integer_below_min_value" if value < allowed.low else "integer_above_max_value"


class Fields:
    """Typed access to a JSON object or a query string; errors name the field."""

    def __init__(self, source: Mapping[str, Any], *, from_query: bool = False) -> None:
        self._source = source
        self._from_query = from_query

    def names(self) -> list[str]:
        return [str(name) for name in self._source]

    def has(self, name: str) -> bool:
        return self._source.get(name) is not None

    def _wrong_type(self, name: str, reason: str) -> EdgeError:
        """The 400 for a value of the wrong JSON type: OpenAI's `invalid_type`. A query value
        is always a string, so there it is a value that does not parse: `invalid_value`."""
        return EdgeError.invalid(name, reason, None if self._from_query else "invalid_type")

    def string(self, name: str, default: str = "") -> str:
        value = self._source.get(name, default)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self._wrong_type(name, "must be a string")
        return value

    def integer(
        self, name: str, default: int | None = None, allowed: IntRange | None = None
    ) -> int | None:
        """An integer within `allowed` (by default INT_RANGES[name]); None (or default) when
        absent."""
        value = self._source.get(name)
        if value is None:
            return default
        allowed = allowed or INT_RANGES[name]
        if self._from_query and isinstance(value, str):
            if not _QUERY_INT.fullmatch(value):
                raise EdgeError.invalid(name, f"must be {allowed.describe()}")
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int | OutOfRange):
            raise self._wrong_type(name, f"must be {allowed.describe()}")
        if isinstance(value, OutOfRange) or not allowed.low <= value <= allowed.high:
            raise EdgeError.invalid(
                name, f"must be {allowed.describe()}, got {value!r}", _range_code(value, allowed)
            )
        return value

    def top_k(self) -> int:
        """top_k, 0 (off) when absent; -1, vLLM's spelling of off, is 0 too."""
        return max(0, self.integer("top_k", 0) or 0)

    def seed(self) -> int | None:
        """seed as the wire's unsigned 64 bits: a negative one is its two's complement, so
        every seed a client may send still names one sequence of draws of its own."""
        value = self.integer("seed")
        return None if value is None else value % (UINT64_MAX + 1)

    def number(self, name: str) -> float | None:
        """A finite number within FLOAT_RANGES[name]; None when absent."""
        value = self._source.get(name)
        if value is None:
            return None
        allowed = FLOAT_RANGES[name]
        if self._from_query and isinstance(value, str):
            if len(value) > 64 or not _QUERY_FLOAT.fullmatch(value):
                raise EdgeError.invalid(name, f"must be {allowed.describe()}")
            value = float(value)
        # bool is an int, but not a JSON number.
        if isinstance(value, bool) or not isinstance(value, int | float | OutOfRange):
            raise self._wrong_type(name, f"must be {allowed.describe()}")
        # An int past 2^53 has no exact float (past ~10^308, none at all).
        if (
            isinstance(value, OutOfRange)
            or (isinstance(value, int) and abs(value) > 2**53)
            or not allowed.contains(float(value))
        ):
            raise EdgeError.invalid(name, f"must be {allowed.describe()}")
        if allowed.lost_on_the_wire(float(value)):
            raise EdgeError.invalid(
                name,
                f"must be {allowed.describe()}, got {value!r}, which is "
                f"{as_float32(float(value)):g} as the 32-bit float the server receives",
            )
        return float(value)

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self._source.get(name)
        if value is None:
            return default
        if self._from_query and isinstance(value, str):
            lowered = value.lower()
            if lowered in _TRUE or lowered in _FALSE:
                return lowered in _TRUE
        if not isinstance(value, bool):
            raise self._wrong_type(name, "must be true or false")
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
        raise self._wrong_type(name, "must be a string or a list of strings")

    def token_ids(self, name: str) -> tuple[int, ...]:
        """A list of token ids (each an unsigned 32-bit integer; the server checks the
        vocabulary); () when absent."""
        value = self._source.get(name)
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self._wrong_type(name, "must be a list of token ids")
        return checked_token_ids(value, name, None if self._from_query else "invalid_type")

    def token_biases(self, name: str) -> tuple[tuple[int, float], ...]:
        """OpenAI's logit_bias: {"<token id>": bias}, biases in [-100, 100]; () when absent."""
        raw = self._source.get(name)
        if raw is None:
            return ()
        if not isinstance(raw, dict):
            raise self._wrong_type(name, "must be an object of token id -> bias")
        bias: dict[int, float] = {}
        for key, value in raw.items():
            if not (
                isinstance(key, str)
                and key.isascii()
                and key.isdigit()
                and len(key) <= 10
                and int(key) <= UINT32_MAX
            ):
                raise EdgeError.invalid(name, f"keys must be token ids, got {key[:40]!r}")
            reason = f"biases must be between -100 and 100 ({key})"
            if isinstance(value, bool) or not isinstance(value, int | float | OutOfRange):
                raise self._wrong_type(name, reason)
            if isinstance(value, OutOfRange) or not -100 <= value <= 100:
                raise EdgeError.invalid(name, reason)
            token = int(key)
            if token in bias:
                # "5" and "05" are two keys for one token: neither bias may win silently.
                raise EdgeError.invalid(name, f"token {token} has two biases (keys for one id)")
            bias[token] = float(value)
        return tuple(sorted(bias.items()))

    def raw(self, name: str) -> Any:
        return self._source.get(name)

    def as_sent(self) -> dict[str, str]:
        """The server's name of a field -> the field as this request sent it, where they
        differ: one `stop` string is the server's `stop[0]` (a list's entries keep their
        place, `stop[1]`)."""
        return {"stop[0]": "stop"} if isinstance(self._source.get("stop"), str) else {}


def as_float32(value: float) -> float:
    """`value` rounded to a 32-bit float, as a protobuf float field carries it (a value within
    float32's range: every documented range is)."""
    packed: float = struct.unpack("<f", struct.pack("<f", value))[0]
    return packed


def checked_token_ids(
    value: list[Any], name: str, wrong_type: str | None = "invalid_type"
) -> tuple[int, ...]:
    """`value` as token ids; the 400 names the first entry that is not one: `wrong_type` for
    an entry that is not an integer, `invalid_value` for one outside 0..2^32-1."""
    for index, entry in enumerate(value):
        if isinstance(entry, bool) or not isinstance(entry, int):
            raise EdgeError.invalid(
                f"{name}[{index}]", "must be a token id (an integer)", wrong_type
            )
        if not 0 <= entry <= UINT32_MAX:
            raise EdgeError.invalid(
                f"{name}[{index}]", f"must be a token id between 0 and {UINT32_MAX}"
            )
    return tuple(value)


def token_ids_of(value: Any) -> tuple[int, ...] | None:
    """`value` as token ids (a list of unsigned 32-bit integers), or None if it is not one."""
    if isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= UINT32_MAX for v in value
    ):
        return tuple(value)
    return None
