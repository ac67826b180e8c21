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
import functools
import json
import queue
import time
from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from typing import Any, TypeVar

import grpc

from tokenwire.client import blocking
from tokenwire.client.errors import Cancelled, DeadlineExceeded, ModelMismatch, from_rpc_error
from tokenwire.client.failover import (
    CutShort,
    Resumption,
    ServedModel,
    Targets,
    attempt_s,
    moves_on,
)
from tokenwire.client.messages import (
    Completion,
    GenerateOptions,
    ModelInfo,
    StreamEvent,
    Tokenization,
    detokenize_request,
    event_from_pb,
    model_info_from_pb,
    tokenization_from_pb,
    tokenize_request,
)
from tokenwire.client.security import ChannelSecurity, aio_channel, sync_channel
from tokenwire.client.targets import split_targets
from tokenwire.common import defaults
from tokenwire.common.settings import MAX_SECONDS
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

DEFAULT_TARGET = defaults.GRPC_TARGET
DEFAULT_TIMEOUT_S = 120.0
SERVICE = "tokenwire.v1.GenerationService"

# Spread over every address a dns:/// or ipv4: target resolves to, skipping those whose health
# (grpc.health.v1, watched by the channel) is not SERVING: a replica loading or draining gets
# no new call, and a health check of the channel reaches a serving one.
BALANCING: dict[str, Any] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": ""},
}
# With one target, retry the unary calls' UNAVAILABLE transparently while nothing has been
# received (a replica that went away meanwhile). Not Generate: a stream whose connection broke
# before its headers may have been accepted, and the same request sent again would be refused
# its id by the server that still runs it; the client's own failover sends it again as a
# retry of that id (failover.py). With several targets the client's own failover moves a call
# a target answers UNAVAILABLE to the next at once, where the channel's backoff would first
# hold it up to 0.7 s at each dead target.
RETRIES: dict[str, Any] = {
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
        },
        {"name": [{"service": SERVICE, "method": "Generate"}]},
    ],
}


def channel_options(targets: int) -> list[tuple[str, Any]]:
    """The options of each channel of a client (or an edge) that has `targets` targets."""
    config = BALANCING | (RETRIES if targets == 1 else {})
    return [
        ("grpc.service_config", json.dumps(config)),
        # Transparent retries (a call that never left, a connection closing under it) stay.
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", 30_000),
        # A Tokenize or Detokenize reply grows with its input (a text's pieces, the text of
        # its ids) past gRPC's 4 MiB default; the server bounds the input instead.
        ("grpc.max_receive_message_length", -1),
    ]


CLOSED = "the tokenwire client is closed"
"""The message of the ValueError every method of a closed client raises."""

Request = TypeVar("Request")
Reply = TypeVar("Reply")


def _timeout(seconds: float) -> float:
    """`timeout_s` as given, when it is a number of seconds above 0 and at most MAX_SECONDS
    (else ValueError: 0 or less would expire every call at once, and grpc's deadlines cannot
    carry much more: 9e9 expires at once, 1e10 overflows)."""
    try:
        valid = not isinstance(seconds, bool) and 0 < seconds <= MAX_SECONDS
    except TypeError:  # not a number at all
        valid = False
    if not valid:
        raise ValueError(
            f"timeout_s: must be a number of seconds above 0 and at most {MAX_SECONDS}, "
            f"got {seconds!r}"
        )
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


async def cancel_everywhere(
    stubs: Sequence[pb_grpc.GenerationServiceAsyncStub],
    request_id: str,
    timeout_s: float,
    metadata: tuple[tuple[str, str], ...],
) -> bool:
    """Ask every stub at once to cancel `request_id` (a stream may have moved to any of their
    targets): True as soon as one had it running (the others are not waited for), False once
    none had; the first failure, as its TokenwireError, where every target failed."""
    request = pb.CancelRequest(request_id=request_id)
    asks = [
        asyncio.ensure_future(stub.Cancel(request, timeout=timeout_s, metadata=metadata))
        for stub in stubs
    ]
    failures: list[grpc.RpcError] = []
    try:
        for ask in asyncio.as_completed(asks):
            try:
                if (await ask).cancelled:
                    return True
            except grpc.RpcError as error:
                failures.append(error)
    finally:
        for ask in asks:
            if ask.done() and not ask.cancelled():
                ask.exception()  # read: a failure beside a True is no unread task error
            ask.cancel()
    return _none_cancelled(failures, len(asks))


CANCEL_TIMEOUT_S = 10.0
"""How long a cancel waits for each target's answer (all are asked at once)."""


def _none_cancelled(failures: list[grpc.RpcError], asked: int) -> bool:
    """False (no target had the stream running), or the first failure where every target
    failed."""
    if failures and len(failures) == asked:
        raise from_rpc_error(failures[0])
    return False


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
            else [aio_channel(t, self.security, channel_options(len(names))) for t in names]
        )
        self._stubs = [pb_grpc.GenerationServiceStub(c) for c in self._channels]
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
        served (a target serving another passes it on; ModelMismatch where none left does)."""
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
            if self._closed:  # closed while the stream waited to go on elsewhere
                raise _closed_call(True)
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
                    if passed := resume.admit(message):
                        event = event_from_pb(passed)
                        yield event
                        if _ended(event):
                            return
                raise CutShort
            except asyncio.CancelledError:
                # grpc.aio raises CancelledError in the reader of a call that close() cancelled;
                # only the cancellation of the reading task itself should propagate as one.
                closing = self._closing_error(call)
                if closing is None:
                    raise
                raise closing from None
            except (ModelMismatch, grpc.RpcError) as broken:
                # A target gone away, or one serving another model, passes the stream on.
                error = broken if isinstance(broken, ModelMismatch) else from_rpc_error(broken)
                resume.broke(error, called=call is not None)
                if not resume.may_continue(error.code, failover):
                    raise resume.ending(error) from None
                self._targets.move_on(resume, error.code)
                await asyncio.sleep(resume.backoff_s)
            finally:
                if call is not None:
                    call.cancel()

    def _closing_error(self, call: grpc.aio.Call | None) -> Cancelled | None:
        """The error of a stream that close() cancelled (during its call, or during its model
        check, before any call); None where the cancellation is the reading task's own."""
        task = asyncio.current_task()
        if task and task.cancelling():
            return None
        if self._closed or (call is not None and call.cancelled()):
            return _closed_call(self._closed)
        return None

    async def _confirm_model(self, resume: Resumption) -> None:
        """ModelMismatch unless resume.target may carry on the stream (see failover.Targets)."""
        served = self._targets.model(resume)
        if served is None:
            try:
                reply = await self._stubs[resume.target].GetModelInfo(
                    pb.GetModelInfoRequest(),
                    timeout=resume.model_check_s(),
                    metadata=self.security.metadata(),
                )
            except grpc.RpcError as error:
                raise resume.unanswered(error, self._targets.names[resume.target]) from None
            served = self._targets.remember(resume.target, reply)
        resume.confirm_model(self._targets.names[resume.target], served)

    async def _unary(
        self,
        method: Callable[
            [pb_grpc.GenerationServiceAsyncStub], grpc.aio.UnaryUnaryMultiCallable[Request, Reply]
        ],
        request: Request,
        grows: str = "request",
    ) -> Reply:
        """One unary call, within the client's timeout, with its key: to the target streams
        start on, and on to the next (each once) where one is UNAVAILABLE, as a stream fails
        over; a failure as its TokenwireError (one too large for the channel names `grows`)."""
        deadline = time.monotonic() + self.timeout_s
        index, left = self._targets.next, len(self._stubs)
        while True:
            left -= 1
            try:
                return await method(self._stubs[index])(
                    request, timeout=attempt_s(deadline, left), metadata=self.security.metadata()
                )
            except grpc.RpcError as error:
                code = moves_on(error, deadline, left)
                if code is None:
                    raise from_rpc_error(error, grows) from None
                index = self._targets.skip(index, code)

    async def model_info(self) -> ModelInfo:
        self._check_open()
        return model_info_from_pb(
            await self._unary(lambda stub: stub.GetModelInfo, pb.GetModelInfoRequest())
        )

    async def cancel(self, request_id: str) -> bool:
        """Cancel the caller's stream `request_id` on every target at once (a stream may have
        failed over to any of them): True as soon as one had it running, False once none had;
        the first target's error where every target failed. One target naming several
        addresses (ipv4:a,b or dns:///) reaches the address its balancer picks: closing the
        stream's generator cancels it wherever it runs."""
        self._check_open()
        return await cancel_everywhere(
            self._stubs, request_id, min(self.timeout_s, CANCEL_TIMEOUT_S), self.security.metadata()
        )

    async def tokenize(
        self, text: str, *, add_special_tokens: bool = True, with_pieces: bool = False
    ) -> Tokenization:
        """The ids the server feeds the model for `text` as a prompt (their count is that
        Generate's Usage.prompt_tokens) and its context length; with_pieces adds each token's
        own text and bytes. add_special_tokens=False for a text rendered from a chat template,
        as for GenerateOptions."""
        self._check_open()
        request = tokenize_request(text, add_special_tokens, with_pieces)
        return tokenization_from_pb(await self._unary(lambda stub: stub.Tokenize, request, "text"))

    async def detokenize(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """The text of token ids, special tokens' included unless skip_special_tokens."""
        self._check_open()
        request = detokenize_request(ids, skip_special_tokens)
        return (await self._unary(lambda stub: stub.Detokenize, request, "token_ids")).text


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
            else [sync_channel(t, self.security, channel_options(len(names))) for t in names]
        )
        self._stubs = [pb_grpc.GenerationServiceStub(c) for c in self._channels]
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
            if self._closed:  # closed while the stream waited to go on elsewhere
                raise _closed_call(True)
            call = None
            try:
                if check:
                    self._confirm_model(resume)
                call = self._stubs[resume.target].Generate(
                    resume.request(), timeout=resume.timeout_s(), metadata=metadata
                )
                name = self._targets.names[resume.target]
                header = functools.partial(resume.see_metadata, target=name)
                for message in blocking.messages(call, resume.deadline, header):
                    if passed := resume.admit(message):
                        event = event_from_pb(passed)
                        yield event
                        if _ended(event):
                            return
                raise CutShort
            except (ModelMismatch, grpc.RpcError) as broken:
                # A target gone away, or one serving another model, passes the stream on.
                error = broken if isinstance(broken, ModelMismatch) else from_rpc_error(broken)
                resume.broke(error, called=call is not None)
                if not resume.may_continue(error.code, failover):
                    raise resume.ending(error) from None
                self._targets.move_on(resume, error.code)
                time.sleep(resume.backoff_s)
            finally:
                if call is not None:
                    call.cancel()

    def _confirm_model(self, resume: Resumption) -> None:
        """ModelMismatch unless resume.target may carry on the stream (see failover.Targets)."""
        served: ServedModel | None = self._targets.model(resume)
        if served is None:
            try:
                reply = self._stubs[resume.target].GetModelInfo(
                    pb.GetModelInfoRequest(),
                    timeout=resume.model_check_s(),
                    metadata=self.security.metadata(),
                )
            except grpc.RpcError as error:
                raise resume.unanswered(error, self._targets.names[resume.target]) from None
            served = self._targets.remember(resume.target, reply)
        resume.confirm_model(self._targets.names[resume.target], served)

    def _unary(
        self,
        method: Callable[
            [pb_grpc.GenerationServiceStub], grpc.UnaryUnaryMultiCallable[Request, Reply]
        ],
        request: Request,
        grows: str = "request",
    ) -> Reply:
        """One unary call, as the async client's _unary makes it."""
        deadline = time.monotonic() + self.timeout_s
        index, left = self._targets.next, len(self._stubs)
        while True:
            left -= 1
            try:
                return method(self._stubs[index])(
                    request, timeout=attempt_s(deadline, left), metadata=self.security.metadata()
                )
            except grpc.RpcError as error:
                code = moves_on(error, deadline, left)
                if code is None:
                    raise from_rpc_error(error, grows) from None
                index = self._targets.skip(index, code)

    def model_info(self) -> ModelInfo:
        self._check_open()
        return model_info_from_pb(
            self._unary(lambda stub: stub.GetModelInfo, pb.GetModelInfoRequest())
        )

    def cancel(self, request_id: str) -> bool:
        """As the async client's cancel: every target is asked at once."""
        self._check_open()
        request = pb.CancelRequest(request_id=request_id)
        metadata = self.security.metadata()
        timeout = min(self.timeout_s, CANCEL_TIMEOUT_S)
        answers: queue.SimpleQueue[Any] = queue.SimpleQueue()
        asks = [
            stub.Cancel.future(request, timeout=timeout, metadata=metadata) for stub in self._stubs
        ]
        for ask in asks:
            ask.add_done_callback(answers.put)
        failures: list[grpc.RpcError] = []
        try:
            for _ in asks:  # as they answer, not in the targets' order
                try:
                    if answers.get().result().cancelled:
                        return True
                except grpc.RpcError as error:
                    failures.append(error)
        finally:
            for ask in asks:
                ask.cancel()
        return _none_cancelled(failures, len(asks))

    def tokenize(
        self, text: str, *, add_special_tokens: bool = True, with_pieces: bool = False
    ) -> Tokenization:
        """As the async client's tokenize."""
        self._check_open()
        request = tokenize_request(text, add_special_tokens, with_pieces)
        return tokenization_from_pb(self._unary(lambda stub: stub.Tokenize, request, "text"))

    def detokenize(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """The text of token ids, special tokens' included unless skip_special_tokens."""
        self._check_open()
        request = detokenize_request(ids, skip_special_tokens)
        return self._unary(lambda stub: stub.Detokenize, request, "token_ids").text
