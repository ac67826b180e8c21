"""One way to read a process's settings: flags, then TOKENWIRE_* variables, then defaults.

A process declares its settings once, as a frozen dataclass whose fields are made with
`setting()`: the default, one line of meaning, and optionally the variable's name when it is not
TOKENWIRE_<FIELD>. From that declaration come the command-line flags (`add_flags`), the reading
(`read_settings`) and the documentation table (`settings_table`), so the server, the edge and
the client parse booleans, numbers, lists and paths by the same rules, and an error names the
variable or flag it came from and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import socket
import types
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

ENV_PREFIX = "TOKENWIRE_"
_META = "tokenwire.setting"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
BOOLEANS = "1/0, true/false, yes/no, on/off"
MAX_SECONDS = 1_000_000
"""The longest any duration setting (`*_s`) may be: about 11.6 days. Durations reach gRPC as
milliseconds in 32-bit integers (2**31 ms is about 24.8 days; connection ageing adds a few
seconds to its grace) and as call deadlines, and reach the event loop's timers: bounded well
inside all of them, a value too large is a settings error, not an overflow at start or a
deadline that has passed before the call begins."""

S = TypeVar("S")


class SettingsError(ValueError):
    """A setting has a value outside its allowed range; `where` is a field, variable or flag."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message


def require(cond: bool, field: str, allowed: str, value: object) -> None:
    """The one validation message: `<field>: must be <allowed>, got <value>`."""
    if not cond:
        raise SettingsError(field, f"must be {allowed}, got {value!r}")


def require_seconds(value: float, field: str, least: float = 0, *, above: bool = False) -> None:
    """A duration setting: at least `least` (above it, with above=True) and at most
    MAX_SECONDS; NaN and infinities are out of range."""
    low = value > least if above else value >= least
    lowest = f"above {least} and at most" if above else f"between {least} and"
    require(low and value <= MAX_SECONDS, field, f"{lowest} {MAX_SECONDS} seconds", value)


def host_port(host: str, port: int) -> str:
    """A host setting and a port as an address or a URL writes them: `host:port`, with an IPv6
    literal in brackets (`[::1]:50051`), where a bare one would read as part of the port."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def host_family(host: str) -> socket.AddressFamily:
    """The socket family to listen on a host setting with: IPv6 for an IPv6 literal, else IPv4
    (a name listens on its IPv4 address)."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name, IPv6 with or without brackets) is this machine's
    loopback: localhost, 127.0.0.0/8 or ::1."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return (mapped or address).is_loopback


def require_collector_url(value: str, field: str) -> None:
    """An OTLP/gRPC collector's address: empty (no export), or an http:// (plaintext) or
    https:// (TLS) URL with a host and, if any, a numeric port. The scheme is required: without
    one the exporter would silently pick TLS; and a URL that does not parse would stop the
    process only when the exporter is made, with a traceback."""
    if not value:
        return
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 (reading it checks it: a port that is no number raises)
    except ValueError:
        usable = False
    else:
        usable = value.startswith(("http://", "https://")) and bool(parts.hostname)
    require(usable, field, "an http:// (plaintext) or https:// URL with a host, or empty", value)


@dataclasses.dataclass(frozen=True, slots=True)
class _Meta:
    meaning: str
    env: str | None
    flag: bool
    shown: str | None


def setting(
    default: Any,
    meaning: str,
    *,
    env: str | None = None,
    flag: bool = True,
    secret: bool = False,
    shown: str | None = None,
) -> Any:
    """A settings field. env: the variable's name when not TOKENWIRE_<FIELD>; flag=False for
    values that must not show in `ps`; secret: kept out of repr; shown: the default as the docs
    write it."""
    meta = _Meta(meaning, env, flag, shown)
    return dataclasses.field(default=default, repr=not secret, metadata={_META: meta})


@dataclasses.dataclass(frozen=True, slots=True)
class Spec:
    """How one field is named, parsed and documented."""

    name: str
    env: str
    flag: str | None
    default: Any
    meaning: str
    shown: str
    kind: Any
    parse: Callable[[str], Any]


def specs(cls: type[Any]) -> list[Spec]:
    """The fields of a settings dataclass, with their variable, flag and parser."""
    hints = get_type_hints(cls)
    out = []
    for field in dataclasses.fields(cls):
        meta = field.metadata.get(_META) or _Meta("", None, True, None)
        kind = hints[field.name]
        out.append(
            Spec(
                name=field.name,
                env=meta.env or ENV_PREFIX + field.name.upper(),
                flag="--" + field.name.replace("_", "-") if meta.flag else None,
                default=field.default,
                meaning=meta.meaning,
                shown=meta.shown or _show(field.default),
                kind=kind,
                parse=_parser(kind),
            )
        )
    return out


def read_settings(
    cls: type[S],
    flags: Mapping[str, Any] | argparse.Namespace | None = None,
    env: Mapping[str, str] | None = None,
) -> S:
    """Build cls from flags (values that are not None), then variables, then defaults.

    flags: parsed command-line values by field name (other keys are ignored); env: the
    variables (os.environ when None), where an empty one counts as unset. A value that cannot
    be read or is out of range raises SettingsError naming the variable or flag it came from.
    """
    given = vars(flags) if isinstance(flags, argparse.Namespace) else dict(flags or {})
    source = os.environ if env is None else env
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for spec in specs(cls):
        if given.get(spec.name) is not None:
            values[spec.name] = given[spec.name]
            origins[spec.name] = spec.flag or spec.name
        elif (raw := source.get(spec.env, "")).strip():  # empty counts as unset
            try:
                values[spec.name] = spec.parse(raw)
            except ValueError as exc:
                raise SettingsError(spec.env, f"cannot read {raw!r}: {exc}") from None
            origins[spec.name] = spec.env
    try:
        return cls(**values)
    except SettingsError as exc:
        origin = origins.get(exc.where)
        if origin is None:
            raise
        raise SettingsError(exc.where, f"{exc.message} (from {origin})") from None


def add_flags(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """One flag per field (secrets excepted), each defaulting to None so variables apply."""
    for spec in specs(cls):
        if spec.flag is None:
            continue
        text = f"{spec.meaning} ({spec.env}, default {spec.shown})".replace("%", "%%")
        if spec.kind is bool:
            parser.add_argument(
                spec.flag,
                dest=spec.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=text,
            )
            continue
        choices = get_args(spec.kind) if get_origin(spec.kind) is Literal else None
        parser.add_argument(
            spec.flag,
            dest=spec.name,
            type=_flag_type(spec.parse),
            choices=choices,
            default=None,
            help=text,
        )


def settings_table(cls: type[Any]) -> str:
    """The documentation table: variable, flag, default, meaning; one row a field."""
    rows = ["| variable | flag | default | meaning |", "| --- | --- | --- | --- |"]
    for spec in specs(cls):
        flag = f"`{spec.flag}`" if spec.flag else ""
        rows.append(f"| `{spec.env}` | {flag} | {spec.shown} | {spec.meaning} |")
    return "\n".join(rows)


def parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected one of {BOOLEANS}")


def parse_list(raw: str) -> tuple[str, ...]:
    """Comma-separated; blanks around items and empty items are dropped. A value that is only
    separators (",") is refused: it would read as no items at all, as if unset (for API keys,
    authentication off), which is not what such a value asks for."""
    items = tuple(part.strip() for part in raw.split(",") if part.strip())
    if raw.strip() and not items:
        raise ValueError("a list of no items (leave it unset for none)")
    return items


def _number(kind: type[int] | type[float], what: str) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        try:
            value = kind(raw.strip())
        except ValueError:
            raise ValueError(f"expected {what}") from None
        # `inf` and `nan` read as floats, but no setting means them: an infinite duration
        # would overflow where it becomes milliseconds, or wait forever.
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"expected {what}")
        return value

    return parse


def _choice(allowed: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip()
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return value

    return parse


def _optional(inner: Callable[[str], Any]) -> Callable[[str], Any]:
    # An empty variable means "not set" for optional values (paths, mostly).
    return lambda raw: inner(raw) if raw.strip() else None


_SIMPLE: dict[Any, Callable[[str], Any]] = {
    bool: parse_bool,
    int: _number(int, "an integer"),
    float: _number(float, "a finite number"),
    str: str,
    Path: Path,
}


def _parser(kind: Any) -> Callable[[str], Any]:
    if kind in _SIMPLE:
        return _SIMPLE[kind]
    origin = get_origin(kind)
    if origin is Literal:
        return _choice(get_args(kind))
    if origin is tuple:
        return parse_list
    if origin in (Union, types.UnionType):
        rest = [arg for arg in get_args(kind) if arg is not type(None)]
        if len(rest) == 1:
            return _optional(_parser(rest[0]))
    raise TypeError(f"no parser for settings of type {kind!r}")


def _flag_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    # argparse names the flag in its message when the type raises ArgumentTypeError.
    def convert(raw: str) -> Any:
        try:
            return parse(raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {raw!r}: {exc}") from None

    return convert


def _show(default: Any) -> str:
    if isinstance(default, bool):
        return "true" if default else "false"
    if default is None or default in ("", ()):
        return "(none)"
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)
