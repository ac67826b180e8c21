"""JSON request bodies decoded without surprises: every malformed body is a 400 naming the problem.

The standard library's decoder is kept (no extra dependency) but guarded: the bytes must be
UTF-8, nesting is bounded (past Python's recursion limit the decoder raises RecursionError,
which is caught; below it the decoded value is walked), integers too long to be any
field's value become an `OutOfRange` marker (so the field's own check names it) instead of
`ValueError: Exceeds the limit (4300 digits)`, NaN/Infinity literals and repeated keys are
refused, and no string may hold a lone surrogate (protobuf and UTF-8 encoders reject them later,
far from the field).
"""

from __future__ import annotations

import json
from typing import Any

from tokenwire.edge.errors import EdgeError

MAX_DEPTH = 32
# 2^64 has 20 digits; anything past 40 characters is out of every integer field's range.
MAX_INT_CHARS = 40


class OutOfRange:
    """An integer literal too long to be in range for any field; checks name the field."""

    __slots__ = ("digits",)

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<integer of {self.digits} digits>"


def _parse_int(literal: str) -> int | OutOfRange:
    if len(literal) > MAX_INT_CHARS:
        return OutOfRange(len(literal.lstrip("-")))
    return int(literal)


class _Refused(Exception):
    """Raised from inside the decoder's hooks; turned into a 400 naming the body."""


def _parse_constant(literal: str) -> float:
    raise _Refused(f"must be standard JSON ({literal} is not a JSON value)")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose keys are all different: with a repeated key, decoders disagree on which
    value counts (the last one, here), so the request would not say one thing."""
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _Refused(f"must not repeat a key in an object ({key[:40]!r} is repeated)")
        found[key] = value
    return found


def decode_object(raw: bytes) -> dict[str, Any]:
    """The JSON object in `raw`; EdgeError 400 (field `body` or the offending path) otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EdgeError.invalid("body", f"must be UTF-8 (bad byte at {exc.start})") from None
    try:
        body = json.loads(
            text or "{}",
            parse_int=_parse_int,
            parse_constant=_parse_constant,
            object_pairs_hook=_unique_keys,
        )
    except json.JSONDecodeError as exc:
        raise EdgeError.invalid("body", f"must be JSON ({exc.msg} at {exc.pos})") from None
    except _Refused as exc:
        raise EdgeError.invalid("body", str(exc)) from None
    except RecursionError:  # the C decoder stops at Python's recursion limit, cleanly
        raise EdgeError.invalid("body", f"must nest at most {MAX_DEPTH} levels") from None
    if not isinstance(body, dict):
        raise EdgeError.invalid("body", "must be a JSON object")
    _check_shape(body)
    return body


# A path into the body as a linked list, formatted only when a check fails.
Path = tuple["Path | None", str | int]


def _check_shape(body: dict[str, Any]) -> None:
    """Refuse nesting past MAX_DEPTH and lone surrogates (valid in JSON escapes, invalid in
    UTF-8) in any key or value, naming the field where they are."""
    pending: list[tuple[dict[str, Any] | list[Any], int, Path | None]] = [(body, 1, None)]
    while pending:
        container, depth, path = pending.pop()
        items = container.items() if isinstance(container, dict) else enumerate(container)
        for key, item in items:
            if isinstance(key, str):
                _check_text(path, key)
            if isinstance(item, str):
                _check_text((path, key), item)
            elif isinstance(item, list | dict):
                if depth >= MAX_DEPTH:
                    raise EdgeError.invalid(
                        _root((path, key)), f"must nest at most {MAX_DEPTH} levels"
                    )
                pending.append((item, depth + 1, (path, key)))


def _root(path: Path) -> str:
    while path[0] is not None:
        path = path[0]
    return _name(path[1])


def _format(path: Path | None) -> str:
    parts: list[str | int] = []
    while path is not None:
        path, segment = path
        parts.append(segment)
    text = ""
    for segment in reversed(parts):
        text += f"[{segment}]" if isinstance(segment, int) else f".{_name(segment)}"
    return text.lstrip(".") or "body"


def _name(key: str | int) -> str:
    text = str(key)
    return text if len(text) <= 64 and text.isprintable() else "<key>"


def _check_text(path: Path | None, text: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        field = _format(path)
        raise EdgeError.invalid(
            field, "must not contain lone surrogates (\\ud800-\\udfff)"
        ) from None
