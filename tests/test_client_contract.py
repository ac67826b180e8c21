"""The Python client's contract at its edges: timeouts, how a stream ends, a closed client,
stop strings, and how `tokenwire generate` reports a stream cut short or output it cannot
write."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import threading
import typing
from collections.abc import AsyncGenerator, Callable, Generator
from typing import Any

import grpc
import grpc_testing
import pytest

from tests.conftest import RunningServer
from tokenwire.client import (
    AsyncTokenwireClient,
    Cancelled,
    Completion,
    DeadlineExceeded,
    GenerateOptions,
    StreamEvent,
    TokenwireClient,
)
from tokenwire.v1 import generate_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"]
GENERATE = SERVICE.methods_by_name["Generate"]
LONG = GenerateOptions(max_tokens=400, ignore_eos=True)
NOWHERE = "127.0.0.1:9"
"""A target nothing is asked of: the tests that use it never reach a call."""
BAD_TIMEOUTS = [0, -1, math.nan, math.inf, 9e9, 1e10]
CLI = [sys.executable, "-m", "tokenwire.client.command", "generate"]


def _scripted_stream(reason: int, status: grpc.StatusCode) -> list[object]:
    """Play one Generate call on a scripted channel that sends a Usage and a Completion with
    `reason`, and ends the call with `status` once the client has passed the Completion on;
    what the client yielded, then what it raised (if anything)."""
    channel = grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())
    completion_seen = threading.Event()

    def play() -> None:
        _metadata, _request, rpc = channel.take_unary_stream(GENERATE)
        rpc.send_initial_metadata(())
        rpc.send_response(pb.GenerateResponse(usage=pb.Usage(request_id="r")))
        rpc.send_response(pb.GenerateResponse(completion=pb.Completion(finish_reason=reason)))
        completion_seen.wait(5)
        rpc.terminate((), status, "after the completion")

    thread = threading.Thread(target=play, daemon=True)
    thread.start()
    seen: list[object] = []
    try:
        for event in TokenwireClient(channel=channel).generate("hi"):
            seen.append(event)
            if isinstance(event, Completion):
                completion_seen.set()
    except Exception as error:  # what the stream raised is the test's subject
        seen.append(error)
    thread.join(5)
    assert not thread.is_alive(), "the scripted server's thread did not finish"
    return seen


@pytest.mark.parametrize("timeout_s", BAD_TIMEOUTS)
def test_a_client_refuses_a_timeout_that_is_not_a_finite_number_above_0(timeout_s: float) -> None:
    """Both clients refuse timeout_s 0, -1, nan, inf or past 1,000,000 s when made, with
    ValueError naming timeout_s (0 used to expire every call at once, inf and 1e10 to raise
    OverflowError, 9e9 to expire every call at once)."""
    with pytest.raises(ValueError, match="timeout_s"):
        TokenwireClient(NOWHERE, timeout_s=timeout_s)
    with pytest.raises(ValueError, match="timeout_s"):
        AsyncTokenwireClient(NOWHERE, timeout_s=timeout_s)


@pytest.mark.parametrize("timeout_s", BAD_TIMEOUTS)
async def test_generate_refuses_a_timeout_that_is_not_a_finite_number_above_0(
    served: RunningServer, timeout_s: float
) -> None:
    """generate(timeout_s=0, -1, nan, inf or past 1,000,000 s) is ValueError naming timeout_s
    (0 used to mean the client's default)."""
    async with AsyncTokenwireClient(served.target) as client:
        with pytest.raises(ValueError, match="timeout_s"):
            async for _ in client.generate("x", GenerateOptions(max_tokens=2), timeout_s=timeout_s):
                pass


def test_a_stream_ends_at_its_completion() -> None:
    """The stream ends once its Completion is passed on: what the call does after it (here it
    fails with INTERNAL) raises nothing."""
    seen = _scripted_stream(pb.FINISH_REASON_LENGTH, grpc.StatusCode.INTERNAL)
    assert seen[-1] == Completion("length")


def test_a_completion_at_the_deadline_is_passed_on_then_raised_as_deadline_exceeded() -> None:
    """A `deadline_exceeded` Completion (the server noticed the deadline first) is yielded,
    then the stream raises DeadlineExceeded, as it does when the client notices first."""
    seen = _scripted_stream(pb.FINISH_REASON_DEADLINE_EXCEEDED, grpc.StatusCode.OK)
    assert seen[-2] == Completion("deadline_exceeded")
    assert isinstance(seen[-1], DeadlineExceeded)


async def test_a_deadline_is_deadline_exceeded_whichever_side_notices_it(
    served: RunningServer,
) -> None:
    """Streams that outlive their 50 ms deadline all raise DeadlineExceeded, whether the
    server ended them first (with a deadline_exceeded Completion) or the client's call did."""
    ends: list[str] = []
    async with AsyncTokenwireClient(served.target) as client:
        for _ in range(12):
            try:
                async for _event in client.generate("x", LONG, timeout_s=0.05):
                    pass
                ends.append("returned")
            except DeadlineExceeded:
                ends.append("DeadlineExceeded")
    assert set(ends) == {"DeadlineExceeded"}


async def test_closing_an_async_client_ends_another_tasks_stream_with_cancelled(
    paced: RunningServer,
) -> None:
    """A task reading a stream when another closes the client gets Cancelled, not the
    asyncio.CancelledError of a task that was never cancelled."""
    client = AsyncTokenwireClient(paced.target)
    first = asyncio.Event()

    async def read() -> None:
        async for _event in client.generate("x", LONG):
            first.set()

    reader = asyncio.create_task(read())
    await asyncio.wait_for(first.wait(), 30)
    await client.close()
    with pytest.raises(Cancelled):
        await reader
    assert not reader.cancelled()


SYNC_CALLS: dict[str, Callable[[TokenwireClient], object]] = {
    "generate": lambda c: c.generate("x"),
    "model_info": lambda c: c.model_info(),
    "cancel": lambda c: c.cancel("a"),
    "tokenize": lambda c: c.tokenize("x"),
    "detokenize": lambda c: c.detokenize([1]),
    "enter": lambda c: c.__enter__(),
}


@pytest.mark.parametrize("name", SYNC_CALLS)
def test_a_closed_client_raises_value_error_on_every_method(name: str) -> None:
    """Every method of a closed TokenwireClient raises ValueError('... client is closed'),
    not a grpc internal error (and generate at once, not at the first event)."""
    client = TokenwireClient(NOWHERE)
    client.close()
    with pytest.raises(ValueError, match="client is closed"):
        SYNC_CALLS[name](client)


ASYNC_CALLS: dict[str, Callable[[AsyncTokenwireClient], Any]] = {
    "generate": lambda c: c.generate("x").__anext__(),
    "model_info": lambda c: c.model_info(),
    "cancel": lambda c: c.cancel("a"),
    "tokenize": lambda c: c.tokenize("x"),
    "detokenize": lambda c: c.detokenize([1]),
    "enter": lambda c: c.__aenter__(),
}


@pytest.mark.parametrize("name", ASYNC_CALLS)
async def test_a_closed_async_client_raises_value_error_on_every_method(name: str) -> None:
    """Every method of a closed AsyncTokenwireClient raises ValueError('... client is
    closed'), not grpc's UsageError."""
    client = AsyncTokenwireClient(NOWHERE)
    await client.close()
    with pytest.raises(ValueError, match="client is closed"):
        await ASYNC_CALLS[name](client)


def test_generate_is_typed_as_a_generator_one_can_close() -> None:
    """generate() is annotated as a generator (sync and async), so `events.close()` and
    `await events.aclose()`, which cancel a stored stream, type-check."""
    sync = typing.get_type_hints(TokenwireClient.generate)["return"]
    aio = typing.get_type_hints(AsyncTokenwireClient.generate)["return"]
    assert sync == Generator[StreamEvent, None, None]
    assert aio == AsyncGenerator[StreamEvent, None]


def test_one_stop_string_given_as_a_str_is_one_stop_string() -> None:
    """GenerateOptions(stop="return") asks to stop at "return", not at any of its letters."""
    options = GenerateOptions(stop="return")
    assert options.stop == ("return",)
    assert list(options.to_pb("x").stop) == ["return"]


async def test_the_cli_fails_a_stream_cancelled_by_someone_else(paced: RunningServer) -> None:
    """A stream that a Cancel from elsewhere cut short exits 1 with an `error:` line, not 0
    as if it had finished."""
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "x",
        "--target",
        paced.target,
        "--max-tokens",
        "400",
        "--ignore-eos",
        "--request-id",
        "cli-cancelled",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.read(1), timeout=30)
    async with AsyncTokenwireClient(paced.target) as client:
        assert await client.cancel("cli-cancelled")
    _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 1
    assert b"error:" in err
    assert b"cancelled" in err


@pytest.mark.parametrize(
    ("redirect", "reason"),
    [(">/dev/full", "No space left on device"), (">&-", "no standard output")],
)
async def test_the_cli_reports_output_it_cannot_write_in_one_line(
    served: RunningServer, redirect: str, reason: str
) -> None:
    """stdout on a full device, or closed, ends the CLI with status 1 and one `error:` line
    on stderr, not a traceback."""
    command = [
        "sh",
        "-c",
        f'exec "$0" "$@" {redirect}',
        *CLI,
        "x",
        "--target",
        served.target,
        "--max-tokens",
        "4",
    ]
    done = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error:"), done.stderr
    assert reason in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr


async def test_the_async_clients_unary_calls_pass_a_target_that_is_down_for_the_next(
    served: RunningServer,
) -> None:
    """With a target that refuses connections first, model_info, tokenize and detokenize are
    answered by the next target, as a stream fails over (they asked the first one only)."""
    async with AsyncTokenwireClient([NOWHERE, served.target], timeout_s=20) as client:
        info = await client.model_info()
        ids = (await client.tokenize("def f():")).ids
        text = await client.detokenize(ids)
    assert (info.vocab_size > 0, text) == (True, "def f():")


async def test_the_blocking_clients_unary_calls_pass_a_target_that_is_down_for_the_next(
    served: RunningServer,
) -> None:
    """The blocking client, too, asks the next target where the first refuses connections."""

    def ask() -> tuple[int, str]:
        with TokenwireClient([NOWHERE, served.target], timeout_s=20) as client:
            info = client.model_info()
            return info.vocab_size, client.detokenize(client.tokenize("def f():").ids)

    vocab_size, text = await asyncio.to_thread(ask)
    assert (vocab_size > 0, text) == (True, "def f():")
