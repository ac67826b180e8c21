"""Streams that survive a replica: continue on the next target from what was received.

When a stream breaks with UNAVAILABLE (the server died, or went away past its drain), the
client asks the next target to continue the same generation: same prompt and options, the
seed the first server reported (`x-tokenwire-seed`), and the token ids already delivered as
`continuation_ids`. The server streams from the next index with the uninterrupted stream's
text and finish conditions, and a Usage that counts the whole stream's tokens (its timings are
the continuation's), so the caller sees one event sequence: no index twice, none missing, one
Usage, one Completion. A stream that breaks after its Usage keeps that Usage (its counts and
timings are the real ones) and takes only the Completion from the continuation, which has
nothing left to generate; where the continuation generates, the stream had been cancelled
before its end, and it ends with a cancelled Completion.

The same rule opens a stream: a target that answers UNAVAILABLE before any event passes the
request to the next one (with a single target, to the same one again, with the backoff, until
the failovers or the deadline run out). A stream continues only where the same model is
served (the model name, vocabulary size and EOS ids): another model's tokens spliced into the
stream would be wrong output, so the stream ends with ModelMismatch instead. Every attempt's
initial metadata names the model of the server that streams it (`x-tokenwire-model`), and is
checked before any of its events is passed on; with several targets, GetModelInfo is also
asked before the delivered ids are sent to another one; a target that does not answer it
within MODEL_CHECK_S (a host that takes connections and never answers) counts as unavailable.
The call's deadline covers every attempt: a continuation gets the time that is left. A stream
that broke after its Completion is over: nothing continues it.

The Python client and the SSE edge both drive their streams through `Targets` and `Resumption`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from tokenwire.client.errors import DeadlineExceeded, ModelMismatch, ServerError, TokenwireError
from tokenwire.common import model_identity
from tokenwire.v1 import generate_pb2 as pb

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
NOT_SENT = ("failed to connect to all addresses", "connections to all backends failing")
"""What gRPC's channel says when it picked no connection for a call: the request never left."""
MAX_FAILOVERS = 4
MODEL_CHECK_S = 10.0
"""How long a target may take to say which model it serves before a stream moves on."""


def attempt_s(deadline: float, others: int) -> float:
    """How long a unary call (Tokenize, Detokenize, GetModelInfo) may wait for one target: what
    is left of the call's deadline (time.monotonic()), and at most MODEL_CHECK_S while `others`
    targets are left to try, so a target that takes connections and never answers costs the
    call that long, as it costs a stream, before the call moves on."""
    left = max(0.0, deadline - time.monotonic())
    return min(left, MODEL_CHECK_S) if others else left


def moves_on(error: grpc.RpcError, deadline: float, others: int) -> grpc.StatusCode | None:
    """Where a unary call whose attempt failed with `error` goes on to the next target, the
    code to skip this one with: its UNAVAILABLE, or UNAVAILABLE for an attempt that ran out
    of its MODEL_CHECK_S while the call had time left; None where the error ends the call."""
    if not others:
        return None
    code = error.code()
    if code in RETRYABLE:
        return code
    timed_out = code == grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.UNAVAILABLE if timed_out and deadline - time.monotonic() > 0.01 else None


def checked(error: grpc.RpcError, target: str) -> grpc.RpcError:
    """The error a model check of `target` that failed with `error` counts as: Unanswered
    where it ran out of its MODEL_CHECK_S, else its own."""
    return Unanswered(target) if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED else error


class Unanswered(grpc.RpcError):
    """A target's model check that ran out of its MODEL_CHECK_S while the call had time left:
    UNAVAILABLE, as from a target that refuses connections, so the stream moves on."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self._details = f"{target} did not say which model it serves within {MODEL_CHECK_S:g} s"

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[Any, ...]:  # grpc's stubs keep their type private
        return ()


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


@dataclasses.dataclass(frozen=True, slots=True)
class ServedModel:
    """What two servers must share for one to continue the token ids the other generated."""

    name: str
    vocab_size: int
    eos_token_ids: tuple[int, ...]

    @classmethod
    def of(cls, reply: pb.GetModelInfoResponse) -> ServedModel:
        return cls(reply.model, reply.vocab_size, tuple(sorted(reply.eos_token_ids)))

    @classmethod
    def of_header(cls, value: str) -> ServedModel | None:
        """The model an `x-tokenwire-model` value names; None for one that is not readable."""
        parsed = model_identity.parse_model_header(value)
        return None if parsed is None else cls(*parsed)

    def header(self) -> str:
        """Its `x-tokenwire-model` value."""
        return model_identity.model_header(self.name, self.vocab_size, self.eos_token_ids)

    def __str__(self) -> str:
        return f"{self.name} (vocabulary {self.vocab_size}, eos ids {list(self.eos_token_ids)})"


class CutShort(grpc.RpcError):
    """A call that ended with OK before its stream's Completion (every accepted stream ends
    with a Completion or an error status): taken as a break, UNAVAILABLE, which the stream
    goes on from where failover may, and which its caller gets where it may not."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "the stream ended without its Completion"

    def trailing_metadata(self) -> tuple[()]:
        return ()


@dataclasses.dataclass
class Resumption:
    """One stream across the targets it runs on: what it delivered, and how to ask for the rest."""

    first: pb.GenerateRequest
    """The request as the caller made it (the edge sets the id the server accepted)."""
    deadline: float
    """time.monotonic() at which the whole call, failovers included, runs out of time."""
    target: int = 0
    """Index of the target the stream is on (see Targets)."""
    delivered: list[int] = dataclasses.field(default_factory=list)
    seed: int | None = None
    request_id: str = ""
    failovers: int = 0
    usage_delivered: bool = False
    model: ServedModel | None = None
    """The model whose tokens the stream delivers, where the targets' models are checked."""
    model_target: str = ""
    retried: grpc.StatusCode | None = None
    """The status that ended the last attempt the stream went on from."""
    completed: bool = False
    """The Completion was delivered: the stream is over, whatever its call does next."""
    begun: bool = False
    """A server accepted an attempt, or may have (see broke), or another edge began the
    stream: the next attempt retries the stream, and replaces it where that server still runs
    it."""
    budget: int | None = None
    """The tokens the server whose tokens the stream delivers gave it (`x-tokenwire-max-tokens`):
    a continuation of a request that left max_tokens to its server asks for this length, since
    another replica's default may differ."""
    mismatch: ModelMismatch | None = None
    """The last target found serving another model than the stream's: what the stream ends
    with where its failovers run out, rather than a later target's going away."""

    @classmethod
    def start(cls, request: pb.GenerateRequest, timeout_s: float, target: int = 0) -> Resumption:
        return cls(request, time.monotonic() + timeout_s, target)

    def request(self) -> pb.GenerateRequest:
        """The request for the next attempt: the first one, after what was delivered."""
        message = pb.GenerateRequest()
        message.CopyFrom(self.first)
        message.request_id = message.request_id or self.request_id
        message.retry = self.begun
        if message.max_tokens == 0 and self.budget is not None and self.continuing:
            message.max_tokens = self.budget
        return continued(message, self.delivered, self.seed)

    def see_metadata(
        self, metadata: Iterable[tuple[str, str | bytes]] | None, target: str = ""
    ) -> None:
        """Read an attempt's initial metadata, before any of its events is passed on: the seed,
        the request id, and the model of the server that streams (ModelMismatch when a
        continuation's is not the one whose tokens were delivered). A server sends the request
        id when it accepts a stream (a refusal has none): the stream has begun."""
        accepted = False
        for key, value in metadata or ():
            text = value.decode() if isinstance(value, bytes) else value
            if key == "x-tokenwire-seed" and self.seed is None:
                self.seed = int(text)
            elif key == "x-tokenwire-max-tokens" and not self.continuing:
                # The budget of the server whose tokens a continuation goes on from: an
                # attempt that broke before delivering any passes the stream on whole.
                self.budget = int(text)
            elif key == "x-request-id":
                self.begun = True
                self.request_id = self.request_id or text
                accepted = True
            elif key == model_identity.HEADER and (served := ServedModel.of_header(text)):
                self.confirm_model(target, served)
        if accepted:
            # Accepted, and of the stream's model (confirm_model raised otherwise): a
            # mismatch met on the way is no longer why the stream may end.
            self.mismatch = None

    def broke(self, error: TokenwireError, *, called: bool = True) -> None:
        """Note how an attempt ended (`called`: its Generate call was made; not where its
        model check failed first): UNAVAILABLE from this side's channel after the request may
        have gone out (a lost connection; a server's refusal carries its status details, and
        a channel that reached no server says so) may have ended a stream its server had
        accepted before its headers came, so the next attempt retries the stream's id rather
        than being refused it as taken."""
        unsent = not called or any(words in error.message for words in NOT_SENT)
        if error.code == grpc.StatusCode.UNAVAILABLE and error.from_channel and not unsent:
            self.begun = True

    def timeout_s(self) -> float:
        """The time left for the next attempt; DeadlineExceeded when none is."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            after = f" (the last attempt ended with {self.retried.name})" if self.retried else ""
            raise DeadlineExceeded(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the call's deadline passed before the stream could go on{after}",
            )
        return left

    def admit(self, message: pb.GenerateResponse) -> pb.GenerateResponse | None:
        """Record one message and give the one to pass on in its place: itself, or None for
        one not to pass on (a continuation's Usage when the stream had delivered its own before
        it broke, and anything after the Completion).

        A stream that broke between its Usage and its Completion had ended: its continuation
        has nothing to generate where it had ended at its length, an EOS or stop id (delivered
        as its last token) or a stop string. One that goes on generating shows the stream was
        cancelled (Cancel, or a drain past its grace) before its end: the stream ends there,
        with a cancelled Completion, as it did on its first server."""
        kind = message.WhichOneof("event")
        if self.completed:
            return None
        if kind == "usage":
            seen, self.usage_delivered = self.usage_delivered, True
            return None if seen else message
        if kind == "completion":
            self.completed = True
        if kind == "token":
            if message.token.index != len(self.delivered):
                # A continuation goes on at the index after the delivered tokens; one that does
                # not (a server that ignored continuation_ids) would splice a second stream in.
                raise ServerError(
                    grpc.StatusCode.INTERNAL,
                    f"the stream went on with token index {message.token.index} after "
                    f"{len(self.delivered)} delivered tokens",
                )
            if self.usage_delivered:
                self.completed = True
                return pb.GenerateResponse(
                    completion=pb.Completion(finish_reason=pb.FINISH_REASON_CANCELLED)
                )
            self.delivered.append(message.token.id)
        return message

    @property
    def continuing(self) -> bool:
        """Whether the next attempt goes on from output already delivered."""
        return bool(self.delivered) or self.usage_delivered

    def confirm_model(self, target: str, served: ServedModel) -> None:
        """ModelMismatch when `target` serves another model than the one whose tokens the
        stream delivered; before anything was delivered, its model becomes the stream's."""
        if self.model is None or not self.continuing:
            self.model, self.model_target = served, target
        elif served != self.model:
            self.mismatch = ModelMismatch(
                grpc.StatusCode.UNAVAILABLE,
                f"the stream cannot continue on {target}: it serves {served}, but the stream's "
                f"tokens came from {self.model} on {self.model_target}",
            )
            raise self.mismatch

    def ending(self, error: TokenwireError) -> TokenwireError:
        """The error a stream that cannot go on ends with: `error`, or, where that is only a
        target gone away, the model mismatch found on the way (the reason no target served
        the rest)."""
        if self.mismatch is not None and error.code in RETRYABLE:
            return self.mismatch
        return error

    def model_check_s(self) -> float:
        """The time a target's model check may take: MODEL_CHECK_S, or what is left."""
        return min(MODEL_CHECK_S, self.timeout_s())

    def unanswered(self, error: grpc.RpcError, target: str) -> grpc.RpcError:
        """The error a failed model check of `target` counts as: Unanswered (a failover) when
        it ran out of its own time while the call has time left, else the check's error."""
        return checked(error, target) if self.deadline > time.monotonic() else error

    def may_continue(self, code: grpc.StatusCode, enabled: bool = True) -> bool:
        """True (and one failover used) when the stream should go on at the next target."""
        if not enabled or code not in RETRYABLE or self.failovers >= MAX_FAILOVERS:
            return False
        self.failovers += 1
        self.retried = code
        return True

    @property
    def backoff_s(self) -> float:
        """Wait before the next attempt: 0 for the first failover, then doubling to 1 s (never
        past the deadline)."""
        wait = 0.0 if self.failovers <= 1 else min(1.0, 0.1 * 2 ** (self.failovers - 2))
        return max(0.0, min(wait, self.deadline - time.monotonic()))


class Targets:
    """The targets streams fail over across: which one a stream tries next, and the model each
    serves (asked once per channel, again before a stream continues there, and forgotten when
    a call there fails with UNAVAILABLE: what comes back may serve another model)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.next = 0
        self._models: dict[int, ServedModel] = {}

    @property
    def several(self) -> bool:
        """Whether a stream may move to another channel (then the models are checked)."""
        return len(self.names) > 1

    def model(self, resume: Resumption) -> ServedModel | None:
        """The model of resume.target when it is known well enough for this attempt."""
        return None if resume.continuing else self._models.get(resume.target)

    def remember(self, index: int, reply: pb.GetModelInfoResponse) -> ServedModel:
        served = self._models[index] = ServedModel.of(reply)
        return served

    def move_on(self, resume: Resumption, code: grpc.StatusCode) -> None:
        """After `code` ended an attempt on resume.target: the stream goes to the next target,
        and so do the streams that start after it."""
        resume.target = self.skip(resume.target, code)

    def skip(self, index: int, code: grpc.StatusCode) -> int:
        """The target after `index`, where `code` ended a call; new calls start there too."""
        if code in RETRYABLE:
            self._models.pop(index, None)
        self.next = (index + 1) % len(self.names)
        return self.next
