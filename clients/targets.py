"""gRPC target strings: which ones name servers, and how a list splits into channels.

A target is what grpc's channel takes: `host:port` (a name, an IPv4 address or `[v6]`; the port
may be left out, as grpc allows), or a name with a resolver scheme: `dns:///host:port` (also
`dns:host:port` and `dns://authority/host:port`), `unix:path`, `unix-abstract:name`,
`ipv4:a:1,b:2`, `ipv6:[::1]:1,[::2]:2`, `xds:///name`, `vsock:cid:port`. A comma-separated
list of `host:port` targets is one channel each, to fail over across. Anything else (a space,
an empty address, a port past 65535) would only fail when the first call is made, as an
UNAVAILABLE from the resolver; it is refused as a setting instead.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence

TARGET_RULE = (
    "a host:port ([v6]:port), a comma-separated list of them, or dns:///host:port, unix:path, "
    "ipv4:/ipv6: address lists"
)

# gRPC target schemes whose own syntax lists several addresses ("ipv4:a:1,b:2"): such a
# target is one channel that round robin spreads over, and a broken stream retries on it.
_LIST_SCHEMES = ("ipv4:", "ipv6:", "dns:", "unix:", "unix-abstract:", "xds:")

_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?")
_PORT = re.compile(r"[0-9]{1,5}")
_VISIBLE = re.compile(r"[\x21-\x7e]+")


def split_targets(target: str | Sequence[str]) -> list[str]:
    """Targets to fail over across: "host1:port,host2:port" or a list gives one channel each;
    a target with a scheme (ipv4:a,b or dns:///name) stays one channel."""
    if isinstance(target, str) and target.strip().startswith(_LIST_SCHEMES):
        return [target.strip()]
    parts = target.split(",") if isinstance(target, str) else list(target)
    targets = [t.strip() for t in parts if t.strip()]
    if not targets:
        raise ValueError("at least one target is needed")
    return targets


def names_a_target(target: str) -> bool:
    """Whether `target` is one of the forms TARGET_RULE lists (see the module's docstring)."""
    try:
        parts = split_targets(target)
    except ValueError:
        return False
    return all(_one_target(part) for part in parts)


def _one_target(target: str) -> bool:
    scheme, _, rest = target.partition(":")
    check = _SCHEMES.get(scheme.lower()) if rest else None
    if check is not None:
        return check(rest)
    return _host_port(target, port_needed=False)


def _host_port(text: str, *, port_needed: bool) -> bool:
    """host, host:port, an IPv4 address (with a port), [v6] or [v6]:port."""
    if text.startswith("["):
        address, bracket, port = text[1:].partition("]")
        if not bracket or not _ip(address, 6):
            return False
        if not port:
            return not port_needed
        return port.startswith(":") and _port(port[1:])
    host, colon, port = text.rpartition(":")
    if not colon:
        host, port = text, ""
    if not port:
        return not port_needed and not colon and bool(_HOSTNAME.fullmatch(host))
    return bool(_HOSTNAME.fullmatch(host)) and _port(port)


def _port(text: str) -> bool:
    return bool(_PORT.fullmatch(text)) and int(text) <= 65535


def _ip(text: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def _dns(rest: str) -> bool:
    """dns:host:port, dns:///host:port or dns://authority/host:port."""
    if rest.startswith("//"):
        authority, slash, rest = rest[2:].partition("/")
        if not slash or (authority and not _host_port(authority, port_needed=False)):
            return False
    return _host_port(rest, port_needed=False)


def _addresses(version: int) -> Callable[[str], bool]:
    def check(rest: str) -> bool:
        return all(_address(item, version) for item in rest.split(","))

    return check


def _address(item: str, version: int) -> bool:
    """One address of an ipv4:/ipv6: list: the IP, with a port or without."""
    if version == 6 and not item.startswith("["):
        return _ip(item, 6)
    if version == 4 and ":" not in item:
        return _ip(item, 4)
    if version == 4:
        host, _, port = item.rpartition(":")
        return _ip(host, 4) and _port(port)
    return _host_port(item, port_needed=False)


def _path(rest: str) -> bool:
    return bool(_VISIBLE.fullmatch(rest))


_SCHEMES: dict[str, Callable[[str], bool]] = {
    "dns": _dns,
    "ipv4": _addresses(4),
    "ipv6": _addresses(6),
    "unix": _path,
    "unix-abstract": _path,
    "xds": _path,
    "vsock": _path,
}
