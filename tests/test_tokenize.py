"""Tokenize and Detokenize over gRPC, through the Python clients and `tokenwire tokenize`: the
ids Generate feeds the model, their text, the refusals that name their field, keys, and what a
call costs the event loop."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import grpc
import pytest
from structlog.testing import capture_logs
from tokenizers import Tokenizer as HfTokenizer

from tests.conftest import RunningServer, collect, greedy, start_server
from tests.fakes import RecordingObserver
from tokenwire.client import (
    AsyncTokenwireClient,
    Tokenization,
    TokenwireClient,
)
from tokenwire.client.errors import InvalidArgument, Unauthenticated, from_rpc_error
from tokenwire.server.config import Settings
from tokenwire.server.domain import GenerationRequest
from tokenwire.server.engine import Engine, OnnxCausalLM
from tokenwire.server.rpc.server import TokenwireServer
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

LLAMA = Path(__file__).resolve().parent.parent / "models" / "fixtures" / "llama"
"""A fixture model whose tokenizer adds BOS (the bundled one adds no special token)."""
KEY = "tokenize-secret"
PROMPTS = ["def fib(n):", "héllo 😀 wörld", "<|user|>\nhi<|end|>\n", "x = 1\n" * 40]
LONG = "def f(x):\n    return x + 1  # héllo\n" * 200
"""Over the 4096 characters past which the server tokenizes on its tokenizer thread."""


@pytest.fixture(scope="module")
async def llama() -> AsyncIterator[RunningServer]:
    model_dir = LLAMA
    model = OnnxCausalLM(model_dir, provider="cpu", intra_op_threads=1)
    running = await start_server(model, Tokenizer.from_dir(model_dir))
    yield running
    await running.server.drain()


async def _tokenize(target: str, text: str, **fields: object) -> pb.TokenizeResponse:
    async with grpc.aio.insecure_channel(target) as channel:
        request = pb.TokenizeRequest(text=text, **fields)  # type: ignore[arg-type]
        return await pb_grpc.GenerationServiceStub(channel).Tokenize(request, timeout=30)


async def _detokenize(target: str, ids: list[int], **fields: object) -> str:
    async with grpc.aio.insecure_channel(target) as channel:
        request = pb.DetokenizeRequest(token_ids=ids, **fields)  # type: ignore[arg-type]
        reply = await pb_grpc.GenerationServiceStub(channel).Detokenize(request, timeout=30)
    return reply.text


async def _prompt_tokens(target: str, prompt: str, **fields: object) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        messages = await collect(
            pb_grpc.GenerationServiceStub(channel), greedy(prompt, max_tokens=1, **fields)
        )
    return messages[-2].usage.prompt_tokens


async def _refusal(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


@pytest.mark.parametrize("prompt", PROMPTS)
async def test_tokenize_gives_the_ids_generate_feeds_the_model(
    served: RunningServer, prompt: str
) -> None:
    """Tokenize's ids are the engine's own encoding of the prompt, and as many as the Usage of
    a Generate of that prompt counts."""
    reply = await _tokenize(served.target, prompt)
    assert list(reply.token_ids) == served.engine.tokenizer.encode(prompt, add_special_tokens=True)
    assert len(reply.token_ids) == await _prompt_tokens(served.target, prompt)


@pytest.mark.parametrize("add_special_tokens", [True, False])
async def test_tokenize_adds_special_tokens_as_generate_does(
    llama: RunningServer, add_special_tokens: bool
) -> None:
    """With a tokenizer that adds BOS, Tokenize counts what Generate counts with the same
    add_special_tokens, BOS only where it is asked for."""
    fields = {"add_special_tokens": add_special_tokens}
    reply = await _tokenize(llama.target, "Hello world", **fields)
    bos = llama.engine.tokenizer.token_id("<s>")
    assert (reply.token_ids[0] == bos) is add_special_tokens
    assert len(reply.token_ids) == await _prompt_tokens(llama.target, "Hello world", **fields)


async def test_a_long_text_gets_the_ids_of_a_short_one(served: RunningServer) -> None:
    """A text long enough for the tokenizer thread gets the engine's own encoding too, and
    its pieces too."""
    reply = await _tokenize(served.target, LONG, with_pieces=True)
    assert list(reply.token_ids) == served.engine.tokenizer.encode(LONG, add_special_tokens=True)
    assert b"".join(reply.piece_bytes) == LONG.encode()


async def test_tokenize_reports_the_context_length_of_get_model_info(
    served: RunningServer, stub: pb_grpc.GenerationServiceStub
) -> None:
    """context_length is GetModelInfo's: what a prompt of these ids must fit in."""
    info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    reply = await _tokenize(served.target, "def f():")
    assert reply.context_length == info.context_length > 0


async def test_pieces_join_to_an_ascii_text(served: RunningServer) -> None:
    """with_pieces gives one piece per id, and an ASCII text's pieces join to the text."""
    text = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    reply = await _tokenize(served.target, text, with_pieces=True)
    assert len(reply.pieces) == len(reply.piece_bytes) == len(reply.token_ids) > 1
    assert "".join(reply.pieces) == text


async def test_piece_bytes_join_to_the_texts_utf8(served: RunningServer) -> None:
    """Where a token holds part of a character (its piece reads U+FFFD), the pieces' bytes
    still join into the text's UTF-8, as Token.token_bytes do."""
    text = "héllo 😀 wörld"
    reply = await _tokenize(served.target, text, with_pieces=True)
    assert "\ufffd" in "".join(reply.pieces)
    assert b"".join(reply.piece_bytes) == text.encode()


async def test_pieces_come_only_when_asked_for(served: RunningServer) -> None:
    """Without with_pieces the reply holds ids and no pieces."""
    reply = await _tokenize(served.target, "def f():")
    assert reply.token_ids
    assert not reply.pieces
    assert not reply.piece_bytes


@pytest.mark.parametrize("prompt", PROMPTS)
async def test_detokenize_gives_back_the_text_tokenize_took(
    served: RunningServer, prompt: str
) -> None:
    """Detokenize of Tokenize's ids is the text, special tokens' text included."""
    reply = await _tokenize(served.target, prompt)
    assert await _detokenize(served.target, list(reply.token_ids)) == prompt


async def test_detokenize_leaves_special_tokens_out_when_asked(served: RunningServer) -> None:
    """skip_special_tokens drops the text of special tokens, as generated text does."""
    ids = list((await _tokenize(served.target, "<|user|>\nhi<|end|>\n")).token_ids)
    assert await _detokenize(served.target, ids, skip_special_tokens=True) == "\nhi\n"


async def test_a_long_id_list_is_decoded(served: RunningServer) -> None:
    """More ids than the tokenizer thread's threshold decode to their text too."""
    ids = served.engine.tokenizer.encode(LONG * 2)
    assert len(ids) > 4096
    assert await _detokenize(served.target, ids) == LONG * 2


async def test_more_ids_than_the_longest_text_holds_are_refused_naming_token_ids(
    served: RunningServer,
) -> None:
    """Detokenize of more ids than max_prompt_bytes (the most tokens a text the server takes
    holds) is INVALID_ARGUMENT naming `token_ids`, before any is decoded."""
    most = served.server.settings.max_prompt_bytes
    error = await _refusal(_detokenize(served.target, [5] * (most + 1)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert from_rpc_error(error).field == "token_ids"


async def test_the_client_takes_a_reply_over_grpcs_default_message_size(
    served: RunningServer,
) -> None:
    """A Detokenize reply over gRPC's 4 MiB default receive size (120,000 ids of a 41-character
    token) reaches the client whole."""
    token_id = 1897  # "\n" and 40 spaces in the bundled tokenizer
    width = len(served.engine.tokenizer.inner.decode([token_id]))
    assert width * 120_000 > 4 * 1024 * 1024
    async with AsyncTokenwireClient(served.target, timeout_s=30) as client:
        text = await client.detokenize([token_id] * 120_000)
    assert len(text) == width * 120_000


async def test_an_empty_text_is_invalid_argument_naming_text(served: RunningServer) -> None:
    """An empty text is INVALID_ARGUMENT with a BadRequest naming `text`."""
    error = await _refusal(_tokenize(served.target, ""))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert from_rpc_error(error).field == "text"
    assert (error.details() or "").startswith("text: ")


async def test_a_text_over_max_prompt_bytes_is_refused_as_a_prompt_is(
    served: RunningServer,
) -> None:
    """A text over max_prompt_bytes is INVALID_ARGUMENT naming `text` with the limit, as
    Generate refuses such a prompt."""
    limit = served.server.settings.max_prompt_bytes
    error = await _refusal(_tokenize(served.target, "x" * (limit + 1)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert from_rpc_error(error).field == "text"
    assert f"must be at most {limit} bytes" in (error.details() or "")


async def test_an_id_past_the_vocabulary_is_named_by_its_index(served: RunningServer) -> None:
    """Detokenize of an id past the vocabulary is INVALID_ARGUMENT naming `token_ids[i]`."""
    vocab = served.engine.model.spec.vocab_size
    error = await _refusal(_detokenize(served.target, [5, 7, vocab]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert from_rpc_error(error).field == "token_ids[2]"
    assert f"must be a token id below {vocab}" in (error.details() or "")


async def test_a_text_holding_a_token_the_model_lacks_is_refused_as_a_prompt_is(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """A text that encodes to an added token past the model's vocabulary is INVALID_ARGUMENT
    naming `text` and the token, as Generate refuses such a prompt: no id the model lacks."""
    inner = HfTokenizer.from_str(tokenizer.inner.to_str())
    inner.add_special_tokens(["<|beyond|>"])
    running = await start_server(onnx_model, Tokenizer(inner))
    try:
        error = await _refusal(_tokenize(running.target, "def f(): <|beyond|>"))
    finally:
        await running.server.drain()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("text: holds the token '<|beyond|>'")


async def test_tokenize_needs_a_key_where_keys_are_set(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """With API keys configured, Tokenize and Detokenize without a key are UNAUTHENTICATED,
    and with one answered."""
    keyed = await start_server(onnx_model, tokenizer, api_keys=(KEY,))
    try:
        bare = await _refusal(_tokenize(keyed.target, "def f():"))
        naked = await _refusal(_detokenize(keyed.target, [5]))
        async with grpc.aio.insecure_channel(keyed.target) as channel:
            reply = await pb_grpc.GenerationServiceStub(channel).Tokenize(
                pb.TokenizeRequest(text="def f():"),
                metadata=(("authorization", f"Bearer {KEY}"),),
                timeout=10,
            )
    finally:
        await keyed.server.drain()
    assert bare.code() == naked.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reply.token_ids


async def test_tokenize_is_unavailable_while_the_model_loads() -> None:
    """Before the engine is attached, Tokenize is UNAVAILABLE, as Generate is."""
    server = TokenwireServer(Settings(port=0))
    await server.start()
    try:
        error = await _refusal(_tokenize(f"127.0.0.1:{server.port}", "def f():"))
    finally:
        await server.drain()
    assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_tokenize_is_unavailable_while_draining(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """Once the server drains (still answering, during its drain notice), Tokenize is
    UNAVAILABLE, which clients retry on another replica."""
    running = await start_server(onnx_model, tokenizer, drain_notice_s=1.0)
    draining = asyncio.ensure_future(running.server.drain())
    try:
        while running.engine.accepting:
            await asyncio.sleep(0.01)
        error = await _refusal(_tokenize(running.target, "def f():"))
    finally:
        await draining
    assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_token_calls_count_as_no_request(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """Neither an answered nor a refused call reaches tokenwire_requests_total (the observer
    hears of none): they are not generations."""
    observer = RecordingObserver()
    running = await start_server(onnx_model, tokenizer, observer)
    try:
        await _tokenize(running.target, "def f():")
        await _detokenize(running.target, [5])
        await _refusal(_tokenize(running.target, ""))
    finally:
        await running.server.drain()
    assert observer.finished == {}
    assert observer.rejected == []


async def test_each_call_logs_one_line_without_its_text(served: RunningServer) -> None:
    """A Tokenize logs one request.tokenize line with the count, a Detokenize one
    request.detokenize line; neither holds the text."""
    text = "def secret_function():"
    with capture_logs() as logs:
        reply = await _tokenize(served.target, text)
        await _detokenize(served.target, list(reply.token_ids))
    lines = [e for e in logs if e["event"].startswith("request.")]
    assert [(e["event"], e["tokens"]) for e in lines] == [
        ("request.tokenize", len(reply.token_ids)),
        ("request.detokenize", len(reply.token_ids)),
    ]
    assert "secret_function" not in str(lines)


async def test_token_call_lines_name_the_callers_peer(served: RunningServer) -> None:
    """The request.tokenize, request.detokenize and request.rejected lines of token calls
    name the caller's peer, as a Generate request's lines do."""
    with capture_logs() as logs:
        reply = await _tokenize(served.target, "def f():")
        await _detokenize(served.target, list(reply.token_ids))
        await _refusal(_tokenize(served.target, ""))
    lines = [e for e in logs if e["event"].startswith("request.")]
    assert [e["event"] for e in lines] == [
        "request.tokenize",
        "request.detokenize",
        "request.rejected",
    ]
    assert all(str(e.get("peer", "")).startswith("ipv4:127.0.0.1:") for e in lines), lines


async def test_long_texts_beyond_what_the_server_holds_are_resource_exhausted(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """Long texts wait for the tokenizer thread at most as many as the server holds requests
    (one here); the rest are RESOURCE_EXHAUSTED at once, and those let in are answered."""
    running = await start_server(onnx_model, tokenizer, max_batch_size=1, max_queue=0)
    text = LONG * 30
    try:
        calls = [_tokenize(running.target, text, with_pieces=True) for _ in range(6)]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await running.server.drain()
    codes = [o.code() for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    answered = [o for o in outcomes if isinstance(o, pb.TokenizeResponse)]
    assert codes
    assert set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert answered


async def test_a_long_text_leaves_the_event_loop_free(served: RunningServer) -> None:
    """While the longest text the server takes is tokenized (pieces too), other calls are
    answered without waiting for it: it is tokenized off the event loop."""
    text = ("def f(x):\n    return x + 1\n" * 10_000)[: served.server.settings.max_prompt_bytes]
    async with grpc.aio.insecure_channel(served.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        started = time.perf_counter()
        long = asyncio.ensure_future(
            stub.Tokenize(pb.TokenizeRequest(text=text, with_pieces=True), timeout=60)
        )
        gaps = []
        while not long.done():
            asked = time.perf_counter()
            await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
            gaps.append(time.perf_counter() - asked)
        took = time.perf_counter() - started
        await long
    assert len(gaps) > 3, f"the long text took {took:.3f} s only"
    assert max(gaps) < took / 2


async def test_a_long_text_waits_behind_a_long_prompt_on_the_one_tokenizer_thread(
    served: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long Tokenize input queues on the thread that tokenizes Generate's long prompts:
    behind a long prompt that thread holds, it is answered only once that prompt is done (no
    second tokenizer thread takes another core from decoding)."""
    entered, gate = threading.Event(), threading.Event()
    encode = Engine._encode_released

    def gated(engine: Engine, request: GenerationRequest) -> list[int]:
        entered.set()
        gate.wait(10)
        return encode(engine, request)

    monkeypatch.setattr(Engine, "_encode_released", gated)
    try:
        async with grpc.aio.insecure_channel(served.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            generate = stub.Generate(greedy(LONG, max_tokens=1), timeout=30)
            assert await asyncio.to_thread(entered.wait, 10)
            tokenize = asyncio.ensure_future(
                stub.Tokenize(pb.TokenizeRequest(text=LONG + "#"), timeout=30)
            )
            done, _ = await asyncio.wait({tokenize}, timeout=0.5)
            assert not done, "answered while the tokenizer thread was held"
            gate.set()
            reply = await tokenize
            generate.cancel()
    finally:
        gate.set()
    assert list(reply.token_ids) == served.engine.tokenizer.encode(LONG + "#")


async def test_the_async_client_tokenizes_and_detokenizes(served: RunningServer) -> None:
    """AsyncTokenwireClient.tokenize gives ids, pieces and the context length; detokenize
    gives the text back."""
    async with AsyncTokenwireClient(served.target, timeout_s=10) as client:
        tokens = await client.tokenize("def f():", with_pieces=True)
        text = await client.detokenize(tokens.ids)
        info = await client.model_info()
    assert tokens.ids == tuple(served.engine.tokenizer.encode("def f():"))
    assert "".join(tokens.pieces) == text == "def f():"
    assert tokens.context_length == info.context_length


async def test_the_blocking_client_tokenizes_and_detokenizes(served: RunningServer) -> None:
    """TokenwireClient.tokenize and detokenize answer as the async client's do."""

    def call() -> tuple[Tokenization, str]:
        with TokenwireClient(served.target, timeout_s=10) as client:
            tokens = client.tokenize("def f():", with_pieces=True)
            return tokens, client.detokenize(tokens.ids)

    tokens, text = await asyncio.to_thread(call)
    assert tokens.ids == tuple(served.engine.tokenizer.encode("def f():"))
    assert "".join(tokens.pieces) == text == "def f():"


async def test_the_blocking_client_adds_no_bos_when_asked(llama: RunningServer) -> None:
    """The blocking client's add_special_tokens=False reaches the server: no BOS."""

    def call() -> tuple[Tokenization, Tokenization]:
        with TokenwireClient(llama.target, timeout_s=10) as client:
            return (
                client.tokenize("Hello world"),
                client.tokenize("Hello world", add_special_tokens=False),
            )

    with_bos, without = await asyncio.to_thread(call)
    assert with_bos.ids[1:] == without.ids
    assert len(with_bos.ids) == len(without.ids) + 1


async def test_the_clients_raise_invalid_argument_naming_the_field(
    served: RunningServer,
) -> None:
    """A refused call raises InvalidArgument with the server's field; an id the wire cannot
    carry is refused before it is sent, named the same way."""
    async with AsyncTokenwireClient(served.target, timeout_s=10) as client:
        with pytest.raises(InvalidArgument) as empty:
            await client.tokenize("")
        with pytest.raises(InvalidArgument) as negative:
            await client.detokenize([5, -1])
    assert empty.value.field == "text"
    assert negative.value.field == "token_ids[1]"


async def test_the_client_without_a_key_raises_unauthenticated(
    onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """Where keys are set, the client's tokenize without one raises Unauthenticated."""
    keyed = await start_server(onnx_model, tokenizer, api_keys=(KEY,))

    def call() -> None:
        with TokenwireClient(keyed.target, timeout_s=10) as client:
            client.tokenize("def f():")

    try:
        with pytest.raises(Unauthenticated):
            await asyncio.to_thread(call)
    finally:
        await keyed.server.drain()


async def _tokenize_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tokenwire.client.command", "tokenize", *args]
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=60, check=False
    )


async def test_the_cli_prints_the_ids(served: RunningServer) -> None:
    """`tokenwire tokenize TEXT --target T` prints the server's ids on one line and exits 0."""
    done = await _tokenize_cli("def fib(n):", "--target", served.target)
    assert done.returncode == 0, done.stderr
    ids = served.engine.tokenizer.encode("def fib(n):")
    assert done.stdout == " ".join(map(str, ids)) + "\n"


async def test_the_cli_prints_each_id_with_its_piece(served: RunningServer) -> None:
    """--pieces prints one line per token: its id, a tab, its text as a JSON string."""
    done = await _tokenize_cli("def f(x):\n", "--target", served.target, "--pieces")
    assert done.returncode == 0, done.stderr
    lines = [line.split("\t") for line in done.stdout.splitlines()]
    ids = served.engine.tokenizer.encode("def f(x):\n")
    assert [int(i) for i, _ in lines] == ids
    assert "".join(json.loads(piece) for _, piece in lines) == "def f(x):\n"


async def test_the_cli_reports_a_refusal_naming_the_field(served: RunningServer) -> None:
    """A refused call exits 1 with one `error:` line naming the field, no traceback."""
    done = await _tokenize_cli("", "--target", served.target)
    assert done.returncode == 1
    assert done.stderr == "error: INVALID_ARGUMENT: text: must be a non-empty string, got ''\n"
