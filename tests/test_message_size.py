"""A request's size is refused by what names the field that grew it (the prompt, for Generate):
the server takes messages large enough for its own prompt limit to apply, and the edge answers
gRPC's size refusal as 413 naming the prompt, not as a retryable overload."""

from __future__ import annotations

import grpc
import httpx
import pytest

from tests.conftest import MODEL, RunningServer, greedy, start_edge, start_server
from tests.fakes import ScriptedModel
from tokenwire.client import AsyncTokenwireClient, GenerateOptions
from tokenwire.client.errors import InvalidArgument, Overloaded
from tokenwire.server.engine import ModelSpec
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

MIB = 1024 * 1024


async def test_a_prompt_limit_above_4_mib_applies_before_grpcs_own(
    spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """With max_prompt_bytes at 5 MiB, a 5.5 MiB prompt reaches the server's check: it is
    INVALID_ARGUMENT naming `prompt`, not gRPC's RESOURCE_EXHAUSTED naming nothing."""
    running = await start_server(ScriptedModel(spec, {}), tokenizer, max_prompt_bytes=5 * MIB)
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            call = stub.Generate(greedy("a" * (5 * MIB + MIB // 2), max_tokens=1), timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call.read()
    finally:
        await running.server.drain()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(refused.value.details()).startswith("prompt:")


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/generate", {"max_tokens": 1}),
        ("/v1/completions", {"model": MODEL, "max_tokens": 1}),
    ],
)
async def test_a_request_over_the_servers_message_limit_is_413_naming_the_prompt(
    paced: RunningServer, route: str, body: dict[str, object]
) -> None:
    """An edge that takes larger bodies than its server (max_body_bytes 8 MiB, the server's
    4 MiB messages) answers a 5 MiB prompt with 413 naming `prompt`: no retry mends it, so
    it is no 429."""
    edge = await start_edge(paced.target, max_body_bytes=8 * MIB)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            response = await http.post(route, json={**body, "prompt": "a" * (5 * MIB)})
    finally:
        await edge.edge.stop()
    error = response.json()["error"]
    assert response.status_code == 413
    assert "Retry-After" not in response.headers
    assert error.get("field", error.get("param")) == "prompt"
    assert error["message"].startswith("prompt: the request is larger than the server takes")


async def test_the_client_raises_a_request_over_the_message_limit_as_too_large(
    paced: RunningServer,
) -> None:
    """The Python client raises a 5 MiB prompt's refusal (gRPC's RESOURCE_EXHAUSTED for the
    message size) as RequestTooLarge, an InvalidArgument naming `prompt`, not as Overloaded,
    which callers retry."""
    async with AsyncTokenwireClient(paced.target) as client:
        with pytest.raises(InvalidArgument) as refused:
            await client.generate("a" * (5 * MIB), GenerateOptions(max_tokens=1)).__anext__()
    assert type(refused.value).__name__ == "RequestTooLarge"
    assert not isinstance(refused.value, Overloaded)
    assert refused.value.field == "prompt"


async def test_a_tokenize_over_the_message_limit_names_text_and_a_detokenize_token_ids(
    paced: RunningServer,
) -> None:
    """The Python client's RequestTooLarge names the field that grew the request: Tokenize's
    `text`, Detokenize's `token_ids` (not Generate's `prompt`)."""
    async with AsyncTokenwireClient(paced.target) as client:
        with pytest.raises(InvalidArgument) as text:
            await client.tokenize("a" * (5 * MIB))
        with pytest.raises(InvalidArgument) as ids:
            await client.detokenize([1] * (5 * MIB))
    assert type(text.value).__name__ == type(ids.value).__name__ == "RequestTooLarge"
    assert (text.value.field, ids.value.field) == ("text", "token_ids")
