"""Streams that survive a replica: continue on the next target from what was received.

When a stream breaks with UNAVAILABLE (the server died, or went away past its drain), the
client asks the next target to continue the same generation: same prompt and options, the
seed the first server reported (`x-tokenwire-seed`), and the token ids already delivered as
`continuation_ids`. The server streams from the next index with the uninterrupted stream's
text, finish conditions and Usage, so the caller sees one event sequence: no index twice, none
missing, one Usage, one Completion.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import grpc

from tokenwire.v1 import generate_pb2 as pb

if TYPE_CHECKING:
    from tokenwire.client.client import GenerateOptions

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
MAX_FAILOVERS = 4


# gRPC target schemes whose own syntax lists several addresses ("ipv4:a:1,b:2"): such a
# target is one channel that round robin spreads over, and a broken stream retries on it.
_LIST_SCHEMES = ("ipv4:", "ipv6:", "dns:", "unix:", "unix-abstract:", "xds:")


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
    """Whether split_targets finds at least one target in `target`."""
    return bool(target.replace(",", "").strip())


TARGET_RULE = "a host:port, a comma-separated list of them, or dns:///name:port"


def continued(
    request: pb.GenerateRequest, delivered: Sequence[int], seed: int | None
) -> pb.GenerateRequest:
    """The same request, continuing after `delivered` with the seed the first server used."""
    message = pb.GenerateRequest()
    message.CopyFrom(request)
    message.continuation_ids.extend(delivered)
    if seed is not None and not message.sampling.HasField("seed"):
        message.sampling.seed = seed
    return message


@dataclasses.dataclass
class Resumption:
    """What a broken stream had delivered, and how to ask for the rest."""

    prompt: str
    options: GenerateOptions
    delivered: list[int] = dataclasses.field(default_factory=list)
    seed: int | None = None
    request_id: str = ""
    failovers: int = 0

    def request(self) -> pb.GenerateRequest:
        options = dataclasses.replace(
            self.options, request_id=self.options.request_id or self.request_id
        )
        return continued(options.to_pb(self.prompt), self.delivered, self.seed)

    def see_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
        for key, value in metadata or ():
            text = value.decode() if isinstance(value, bytes) else value
            if key == "x-tokenwire-seed" and self.seed is None:
                self.seed = int(text)
            elif key == "x-request-id" and not self.request_id:
                self.request_id = text

    def may_continue(self, error: grpc.RpcError, enabled: bool) -> bool:
        """True (and one failover used) when the stream should continue on the next target."""
        code: grpc.StatusCode = error.code()
        if not enabled or code not in RETRYABLE or self.failovers >= MAX_FAILOVERS:
            return False
        self.failovers += 1
        return True

    @property
    def backoff_s(self) -> float:
        """Wait before the next attempt: 0 for the first failover, then doubling to 1 s."""
        return 0.0 if self.failovers <= 1 else min(1.0, 0.1 * 2 ** (self.failovers - 2))
