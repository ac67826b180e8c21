"""Typed tokenwire clients (async and sync) over the generated stubs.

Both yield Token events as they arrive, then one Usage, then one Completion, and end there.
Failures raise the TokenwireError subclass for their status; a deadline is DeadlineExceeded
whichever side noticed it (the server's `deadline_exceeded` Completion is passed on, then
raised as DeadlineExceeded). Closing the stream's generator cancels the RPC, which frees the
server's batch slot at its next step. A call's timeout covers the whole stream, failovers
included (see failover.py). Every method of a closed client raises ValueError.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from collections.abc import AsyncGenerator, Generator, Sequence
from typing import Any, TypeAlias

import grpc

from tokenwire.client import blocking
from tokenwire.client.errors import Cancelled, DeadlineExceeded, InvalidArgument, from_rpc_error
from tokenwire.client.failover import Resumption, ServedModel, Targets
from tokenwire.client.security import ChannelSecurity, aio_channel, sync_channel
from tokenwire.client.targets import split_targets
from tokenwire.common import defaults, request_ids
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

DEFAULT_TARGET = defaults.GRPC_TARGET
DEFAULT_TIMEOUT_S = 120.0
SERVICE = "tokenwire.v1.GenerationService"

# Spread over every address a dns:/// or ipv4: target resolves to, and retry UNAVAILABLE
# transparently while nothing has been received (a replica draining or gone).
SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": SERVICE}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.service_config", SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    ("grpc.keepalive_time_ms", 30_000),
]


@dataclasses.dataclass(frozen=True, slots=True)
class TopLogprob:
    """One likely token at a position (unmodified distribution)."""

    id: int
    logprob: float
    text: str


@dataclasses.dataclass(frozen=True, slots=True)
class Token:
    text: str
    id: int
    index: int
    logprob: float | None = None
    top_logprobs: tuple[TopLogprob, ...] = ()
    token_text: str | None = None
    """The token's own text alone, where logprobs were asked for (`text` is the delta)."""

    @property
    def own_text(self) -> str:
        """The token's own text where the server sent it, else its delta."""
        return self.text if self.token_text is None else self.token_text


@dataclasses.dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    queue_time_ms: float
    time_to_first_token_ms: float
    decode_time_ms: float
    total_time_ms: float
    request_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class Completion:
    finish_reason: str
    """One of stop, length, stop_sequence, cancelled, deadline_exceeded."""
    stop_sequence: str = ""


StreamEvent: TypeAlias = Token | Usage | Completion


@dataclasses.dataclass(frozen=True, slots=True)
class ModelInfo:
    model: str
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    provider: str
    max_tokens_limit: int
    default_max_tokens: int
    max_batch_size: int
    chat_template: str = ""
    bos_token: str = ""
    eos_token: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class GenerateOptions:
    """Everything a Generate call can ask for besides the prompt. None means server default."""

    max_tokens: int = 0
    temperature: float | None = None
    top_k: int = 0
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    """Stop strings; one str is one stop string."""
    ignore_eos: bool = False
    logprobs: bool = False
    request_id: str = ""
    add_special_tokens: bool | None = None
    """None: the tokenizer's own rule (e.g. add BOS); False for an already templated prompt."""
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_p: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    top_logprobs: int = 0
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    prompt_ids: tuple[int, ...] = ()
    """Token ids fed to the model as they are (no special tokens added), in place of a prompt
    text: generate with prompt "" and these."""

    def __post_init__(self) -> None:
        """Integers the wire cannot carry are InvalidArgument naming the field, as the server's
        refusals are (the server checks its own, narrower limits)."""
        u32, u64 = 2**32 - 1, 2**64 - 1
        if isinstance(self.stop, str):
            # A str is a Sequence[str] of its letters; one string is what `stop="x"` means.
            object.__setattr__(self, "stop", (self.stop,))
        if self.request_id and not request_ids.carried(self.request_id):
            # Sent as x-request-id metadata too, which grpc would refuse locally (INTERNAL).
            raise InvalidArgument(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request_id: {request_ids.RULE}, got {request_ids.shown(self.request_id)}",
                field="request_id",
            )
        for name in ("max_tokens", "top_k", "top_logprobs", "min_tokens"):
            _check_integer(name, getattr(self, name), u32)
        if self.seed is not None:
            _check_integer("seed", self.seed, u64)
        for name, ids in (("prompt_ids", self.prompt_ids), ("stop_token_ids", self.stop_token_ids)):
            for i, token in enumerate(ids):
                _check_integer(f"{name}[{i}]", token, u32)
        seen: set[int] = set()
        for token, _ in self.logit_bias:
            # Named by the token, as the server names logit_bias entries.
            _check_integer(f"logit_bias[{token}]", token, u32)
            if token in seen:
                raise InvalidArgument(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"logit_bias[{token}]: a token may have one bias, got two",
                    field=f"logit_bias[{token}]",
                )
            seen.add(token)

    def to_pb(self, prompt: str) -> pb.GenerateRequest:
        sampling = pb.SamplingParams(top_k=self.top_k)
        for name in (
            "temperature",
            "top_p",
            "repetition_penalty",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "min_p",
        ):
            value = getattr(self, name)
            if value is not None:
                setattr(sampling, name, value)
        sampling.logit_bias.update(dict(self.logit_bias))
        return pb.GenerateRequest(
            prompt=prompt,
            max_tokens=self.max_tokens,
            sampling=sampling,
            stop=list(self.stop),
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs,
            request_id=self.request_id,
            add_special_tokens=self.add_special_tokens,
            top_logprobs=self.top_logprobs,
            min_tokens=self.min_tokens,
            stop_token_ids=list(self.stop_token_ids),
            prompt_ids=list(self.prompt_ids),
        )


def _check_integer(field: str, value: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise InvalidArgument(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{field}: must be an integer between 0 and {high}, got {value!r}",
            field=field,
        )


_FINISH_NAMES = {
    value: name.removeprefix("FINISH_REASON_").lower() for name, value in pb.FinishReason.items()
}


def event_from_pb(message: pb.GenerateResponse) -> StreamEvent:
    kind = message.WhichOneof("event")
    if kind == "token":
        t = message.token
        alternatives = tuple(TopLogprob(a.id, a.logprob, a.text) for a in t.top_logprobs)
        return Token(
            t.text,
            t.id,
            t.index,
            t.logprob if t.HasField("logprob") else None,
            alternatives,
            t.token_text if t.HasField("token_text") else None,
        )
    if kind == "usage":
        u = message.usage
        return Usage(
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            total_tokens=u.total_tokens,
            queue_time_ms=u.queue_time_ms,
            time_to_first_token_ms=u.time_to_first_token_ms,
            decode_time_ms=u.decode_time_ms,
            total_time_ms=u.total_time_ms,
            request_id=u.request_id,
        )
    if kind == "completion":
        c = message.completion
        return Completion(_FINISH_NAMES.get(c.finish_reason, "unspecified"), c.stop_sequence)
    raise ValueError(f"unknown GenerateResponse event {kind!r}")


def model_info_from_pb(m: pb.GetModelInfoResponse) -> ModelInfo:
    return ModelInfo(
        model=m.model,
        context_length=m.context_length,
        vocab_size=m.vocab_size,
        eos_token_ids=tuple(m.eos_token_ids),
        provider=m.provider,
        max_tokens_limit=m.max_tokens_limit,
        default_max_tokens=m.default_max_tokens,
        max_batch_size=m.max_batch_size,
        chat_template=m.chat_template,
        bos_token=m.bos_token,
        eos_token=m.eos_token,
    )


CLOSED = "the tokenwire client is closed"
"""The message of the ValueError every method of a closed client raises."""


def _timeout(seconds: float) -> float:
    """`timeout_s` as given, when it is a finite number of seconds above 0 (else ValueError:
    0 or less would expire every call at once, inf is beyond what grpc can carry)."""
    try:
        valid = not isinstance(seconds, bool) and math.isfinite(seconds) and seconds > 0
    except TypeError:  # not a number at all
        valid = False
    if not valid:
        raise ValueError(f"timeout_s: must be a finite number of seconds above 0, got {seconds!r}")
    return seconds


def _ended(event: StreamEvent) -> bool:
    """Whether `event`, just passed on, ends the stream; DeadlineExceeded where it ended at the
    server's deadline, so a deadline surfaces the same whichever side noticed it first."""
    if not isinstance(event, Completion):
        return False
    if event.finish_reason == "deadline_exceeded":
        raise DeadlineExceeded(
            grpc.StatusCode.DEADLINE_EXCEEDED, "the server ended the stream at its deadline"
        )
    return True


def _closed_call(closed: bool) -> Cancelled:
    """The error of a call that the closing of its channel cancelled."""
    why = ": the client was closed" if closed else ""
    return Cancelled(grpc.StatusCode.CANCELLED, f"the call was cancelled{why}")


def _metadata(request_id: str) -> tuple[tuple[str, str], ...]:
    return (("x-request-id", request_id),) if request_id else ()


class AsyncTokenwireClient:
    """grpc.aio client. Use as `async with AsyncTokenwireClient(target) as client:`.

    security adds TLS and an API key (see ChannelSecurity); a given channel is used as is.
    """

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        channel: grpc.aio.Channel | None = None,
        security: ChannelSecurity | None = None,
    ) -> None:
        self.timeout_s = _timeout(timeout_s)
        """Default deadline of a call, in seconds; a stream's failovers share it."""
        self.security = security or ChannelSecurity()
        names = ["the given channel"] if channel else split_targets(target)
        self._channels = (
            [channel]
            if channel
            else [aio_channel(t, self.security, CHANNEL_OPTIONS) for t in names]
        )
        self._stubs = [pb_grpc.GenerationServiceStub(c) for c in self._channels]
        self._stub = self._stubs[0]
        self._targets = Targets(names)
        self._closed = False

    async def __aenter__(self) -> AsyncTokenwireClient:
        self._check_open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channels: running calls end with Cancelled, later ones raise ValueError."""
        self._closed = True
        for channel in self._channels:
            await channel.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(CLOSED)

    def generate(
        self,
        prompt: str,
        options: GenerateOptions | None = None,
        *,
        timeout_s: float | None = None,
        failover: bool = True,
    ) -> AsyncGenerator[StreamEvent, None]:
        """Stream one generation. `timeout_s` (default: the client's) bounds the whole call.

        Closing the generator (`await events.aclose()`, or leaving an `async for` over a
        generator not kept elsewhere) cancels the call. With several targets (or a dns:///
        name), a target that answers UNAVAILABLE before the stream starts, or a stream that
        breaks with UNAVAILABLE, goes on at the next target (see failover.py) unless failover
        is False: the continuation gets the time left, and runs only where the same model is
        served (else ModelMismatch)."""
        self._check_open()
        seconds = self.timeout_s if timeout_s is None else _timeout(timeout_s)
        return self._stream(prompt, options or GenerateOptions(), seconds, failover)

    async def _stream(
        self, prompt: str, options: GenerateOptions, timeout_s: float, failover: bool
    ) -> AsyncGenerator[StreamEvent, None]:
        resume = Resumption.start(options.to_pb(prompt), timeout_s, self._targets.next)
        metadata = _metadata(options.request_id) + self.security.metadata()
        check = failover and self._targets.several
        while True:
            self._check_open()
            call = None
            try:
                if check:
                    await self._confirm_model(resume)
                call = self._stubs[resume.target].Generate(
                    resume.request(), timeout=resume.timeout_s(), metadata=metadata
                )
                name = self._targets.names[resume.target]
                resume.see_metadata(await call.initial_metadata(), name)
                async for message in call:
                    if resume.admit(message):
                        event = event_from_pb(message)
                        yield event
                        if _ended(event):
                            return
                return
            except asyncio.CancelledError:
                # grpc.aio raises CancelledError in the reader of a call that close() cancelled;
                # only the cancellation of the reading task itself should propagate as one.
                task = asyncio.current_task()
                if call is None or not call.cancelled() or (task and task.cancelling()):
                    raise
                raise _closed_call(self._closed) from None
            except grpc.RpcError as error:
                if not resume.may_continue(error.code(), failover):
                    raise from_rpc_error(error) from None
                self._targets.move_on(resume, error.code())
                await asyncio.sleep(resume.backoff_s)
            finally:
                if call is not None:
                    call.cancel()

    async def _confirm_model(self, resume: Resumption) -> None:
        """ModelMismatch unless resume.target may carry on the stream (see failover.Targets)."""
        served = self._targets.model(resume)
        if served is None:
            reply = await self._stubs[resume.target].GetModelInfo(
                pb.GetModelInfoRequest(),
                timeout=resume.timeout_s(),
                metadata=self.security.metadata(),
            )
            served = self._targets.remember(resume.target, reply)
        resume.confirm_model(self._targets.names[resume.target], served)

    async def model_info(self) -> ModelInfo:
        self._check_open()
        try:
            reply = await self._stub.GetModelInfo(
                pb.GetModelInfoRequest(), timeout=self.timeout_s, metadata=self.security.metadata()
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return model_info_from_pb(reply)

    async def cancel(self, request_id: str) -> bool:
        self._check_open()
        try:
            reply = await self._stub.Cancel(
                pb.CancelRequest(request_id=request_id),
                timeout=self.timeout_s,
                metadata=self.security.metadata(),
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return reply.cancelled


class TokenwireClient:
    """Blocking client. Closing the generator early (`events.close()`, Ctrl-C) cancels the RPC."""

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        channel: grpc.Channel | None = None,
        security: ChannelSecurity | None = None,
    ) -> None:
        self.timeout_s = _timeout(timeout_s)
        """Default deadline of a call, in seconds; a stream's failovers share it."""
        self.security = security or ChannelSecurity()
        names = ["the given channel"] if channel else split_targets(target)
        self._channels = (
            [channel]
            if channel
            else [sync_channel(t, self.security, CHANNEL_OPTIONS) for t in names]
        )
        self._stubs = [pb_grpc.GenerationServiceStub(c) for c in self._channels]
        self._stub = self._stubs[0]
        self._targets = Targets(names)
        self._closed = False

    def __enter__(self) -> TokenwireClient:
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channels: running calls end with Cancelled, later ones raise ValueError."""
        self._closed = True
        for channel in self._channels:
            channel.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(CLOSED)

    def generate(
        self,
        prompt: str,
        options: GenerateOptions | None = None,
        *,
        timeout_s: float | None = None,
        failover: bool = True,
    ) -> Generator[StreamEvent, None, None]:
        """Stream one generation, continuing on the next target if it breaks; `timeout_s`
        bounds the whole call, and closing the generator (`events.close()`, or leaving a `for`
        over a generator not kept elsewhere) cancels it (see the async client's generate)."""
        self._check_open()
        seconds = self.timeout_s if timeout_s is None else _timeout(timeout_s)
        return self._stream(prompt, options or GenerateOptions(), seconds, failover)

    def _stream(
        self, prompt: str, options: GenerateOptions, timeout_s: float, failover: bool
    ) -> Generator[StreamEvent, None, None]:
        resume = Resumption.start(options.to_pb(prompt), timeout_s, self._targets.next)
        metadata = _metadata(options.request_id) + self.security.metadata()
        check = failover and self._targets.several
        while True:
            self._check_open()
            call = None
            try:
                if check:
                    self._confirm_model(resume)
                call = self._stubs[resume.target].Generate(
                    resume.request(), timeout=resume.timeout_s(), metadata=metadata
                )
                header = False
                for message in blocking.messages(call, resume.deadline):
                    if not header:
                        # Read once a message came: a call that failed first may never
                        # complete its header (see blocking.py).
                        header = True
                        name = self._targets.names[resume.target]
                        resume.see_metadata(call.initial_metadata(), name)
                    if resume.admit(message):
                        event = event_from_pb(message)
                        yield event
                        if _ended(event):
                            return
                return
            except grpc.RpcError as error:
                if not resume.may_continue(error.code(), failover):
                    raise from_rpc_error(error) from None
                self._targets.move_on(resume, error.code())
                time.sleep(resume.backoff_s)
            finally:
                if call is not None:
                    call.cancel()

    def _confirm_model(self, resume: Resumption) -> None:
        """ModelMismatch unless resume.target may carry on the stream (see failover.Targets)."""
        served: ServedModel | None = self._targets.model(resume)
        if served is None:
            reply = self._stubs[resume.target].GetModelInfo(
                pb.GetModelInfoRequest(),
                timeout=resume.timeout_s(),
                metadata=self.security.metadata(),
            )
            served = self._targets.remember(resume.target, reply)
        resume.confirm_model(self._targets.names[resume.target], served)

    def model_info(self) -> ModelInfo:
        self._check_open()
        try:
            reply = self._stub.GetModelInfo(
                pb.GetModelInfoRequest(), timeout=self.timeout_s, metadata=self.security.metadata()
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return model_info_from_pb(reply)

    def cancel(self, request_id: str) -> bool:
        self._check_open()
        try:
            reply = self._stub.Cancel(
                pb.CancelRequest(request_id=request_id),
                timeout=self.timeout_s,
                metadata=self.security.metadata(),
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return reply.cancelled
