"""The edge's vLLM token routes, POST /tokenize and /detokenize: what they count and give back,
the fields they refuse by name, and the gates every API route has."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODEL, RunningEdge, RunningServer, start_edge, start_server
from tests.replicas import SlowReplica
from tokenwire.edge.metrics import Outcome, RouteName
from tokenwire.server.engine import OnnxCausalLM
from tokenwire.server.tokenizer import Tokenizer

LLAMA = Path(__file__).resolve().parent.parent / "models" / "fixtures" / "llama"
"""A fixture model whose tokenizer adds BOS (the bundled one adds no special token)."""
TURNS = [
    {"role": "system", "content": "Answer in Python."},
    {"role": "user", "content": "Write a function that adds two numbers."},
]


@pytest.fixture
async def http(edge: RunningEdge) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=edge.url, timeout=30) as client:
        yield client


async def _ok(http: httpx.AsyncClient, path: str, body: dict[str, object]) -> dict[str, object]:
    response = await http.post(path, json=body)
    assert response.status_code == 200, response.text
    reply: dict[str, object] = response.json()
    return reply


async def _error(
    http: httpx.AsyncClient, path: str, body: dict[str, object], status: int = 400
) -> dict[str, object]:
    response = await http.post(path, json=body)
    assert response.status_code == status, response.text
    error: dict[str, object] = response.json()["error"]
    return error


async def test_tokenize_counts_a_prompt_as_the_server_tokenizes_it(
    http: httpx.AsyncClient, served: RunningServer
) -> None:
    """/tokenize of a prompt gives the server's ids, their count and the context length."""
    prompt = "def fib(n):\n    return n"
    body = await _ok(http, "/tokenize", {"model": MODEL, "prompt": prompt})
    ids = served.engine.tokenizer.encode(prompt, add_special_tokens=True)
    assert body == {
        "count": len(ids),
        "max_model_len": served.engine.limits.context_length,
        "tokens": ids,
    }


async def test_tokenize_counts_messages_as_the_chat_route_does(http: httpx.AsyncClient) -> None:
    """/tokenize of a chat's messages counts what /v1/chat/completions reports as the
    prompt_tokens of the same messages."""
    counted = await _ok(http, "/tokenize", {"model": MODEL, "messages": TURNS})
    chat = await _ok(
        http, "/v1/chat/completions", {"model": MODEL, "messages": TURNS, "max_tokens": 1}
    )
    usage = chat["usage"]
    assert isinstance(usage, dict)
    assert counted["count"] == usage["prompt_tokens"] > 0


async def test_a_chat_without_a_template_of_the_models_own_gets_its_bos() -> None:
    """Before a model with no chat template whose tokenizer adds BOS, a chat rendered with the
    default template gets that BOS, as the same text sent as a prompt does (the model's own
    template would write it), and /tokenize of the messages counts what the chat route
    reports as its prompt_tokens."""
    model = OnnxCausalLM(LLAMA, provider="cpu", intra_op_threads=1)
    tokenizer = Tokenizer.from_dir(LLAMA)
    running = await start_server(model, tokenizer)
    edge = await start_edge(running.target)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            counted = await _ok(http, "/tokenize", {"messages": TURNS})
            chat = await _ok(http, "/v1/chat/completions", {"messages": TURNS, "max_tokens": 1})
    finally:
        await edge.edge.stop()
        await running.server.drain()
    bos = tokenizer.encode("Hello", add_special_tokens=True)[0]
    assert bos not in tokenizer.encode("Hello")
    ids = counted["tokens"]
    assert isinstance(ids, list)
    assert ids[0] == bos
    usage = chat["usage"]
    assert isinstance(usage, dict)
    assert counted["count"] == usage["prompt_tokens"] == len(ids)


async def test_add_generation_prompt_false_leaves_out_the_assistant_turn(
    http: httpx.AsyncClient,
) -> None:
    """add_generation_prompt false tokenizes the conversation without the assistant turn's
    start: the same ids up to it, and fewer."""
    full = await _ok(http, "/tokenize", {"messages": TURNS})
    bare = await _ok(http, "/tokenize", {"messages": TURNS, "add_generation_prompt": False})
    tokens, fewer = full["tokens"], bare["tokens"]
    assert isinstance(tokens, list)
    assert isinstance(fewer, list)
    assert 0 < len(fewer) < len(tokens)
    assert tokens[: len(fewer)] == fewer


async def test_return_token_strs_gives_each_tokens_text(http: httpx.AsyncClient) -> None:
    """return_token_strs adds token_strs, one per token, which join to an ASCII prompt."""
    prompt = "import os\nprint(os.getcwd())\n"
    body = await _ok(http, "/tokenize", {"prompt": prompt, "return_token_strs": True})
    strs = body["token_strs"]
    assert isinstance(strs, list)
    assert len(strs) == body["count"]
    assert "".join(strs) == prompt


async def test_detokenize_gives_back_the_prompt_tokenize_took(http: httpx.AsyncClient) -> None:
    """/detokenize of /tokenize's tokens is {"prompt": the text}."""
    prompt = "class Point:\n    x: int = 0  # héllo\n"
    tokens = (await _ok(http, "/tokenize", {"prompt": prompt}))["tokens"]
    assert await _ok(http, "/detokenize", {"model": MODEL, "tokens": tokens}) == {"prompt": prompt}


@pytest.mark.parametrize("path", ["/v1/tokenize", "/v1/detokenize"])
async def test_the_routes_answer_under_v1_too(http: httpx.AsyncClient, path: str) -> None:
    """/v1/tokenize and /v1/detokenize answer as the routes vLLM names do."""
    body = {"prompt": "x = 1"} if path.endswith("/tokenize") else {"tokens": [87, 284, 352]}
    assert await _ok(http, path, body) == await _ok(http, path.removeprefix("/v1"), body)


async def test_a_target_gone_away_passes_the_call_to_the_next(
    served: RunningServer, onnx_model: OnnxCausalLM, tokenizer: Tokenizer
) -> None:
    """With several targets, /tokenize and /detokenize go on at the next target when the one
    they go to has gone away since the edge last asked it."""
    gone = await start_server(onnx_model, tokenizer)
    edge = await start_edge(f"{gone.target},{served.target}")
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            assert (await http.get("/v1/models")).status_code == 200  # asked of the first
            await gone.server.drain()
            tokens = (await _ok(http, "/tokenize", {"prompt": "x = 1"}))["tokens"]
            text = await _ok(http, "/detokenize", {"tokens": tokens})
    finally:
        await edge.edge.stop()
    assert text == {"prompt": "x = 1"}


async def test_the_upstream_timeout_covers_every_target_a_call_tries(
    served: RunningServer,
) -> None:
    """A /tokenize that a failing replica passes on to the next target has one upstream
    timeout for both: the first replica's answer (UNAVAILABLE after 1 s) takes half of its
    2 s, the second would answer after 1.3 s more, and the caller gets a 504 when the 2 s are
    up instead of an answer (200) after 2.3 s or more."""
    replicas = [
        SlowReplica(served.target, 1.0, gives_up=True),
        SlowReplica(served.target, 1.3, gives_up=False),
    ]
    for replica in replicas:
        await replica.start()
    edge = await start_edge(",".join(r.target for r in replicas), upstream_timeout_s=2.0)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            started = time.monotonic()
            error = await _error(http, "/tokenize", {"prompt": "x = 1"}, status=504)
            took = time.monotonic() - started
    finally:
        await edge.edge.stop()
        for replica in replicas:
            await replica.stop()
    assert error["code"] == "deadline_exceeded", error
    assert took < 2.8, took  # the old code answered 200 after 2.3 s or more


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {"prompt": ""}, "prompt"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": 7}, "prompt"),
        ("/tokenize", {"prompt": "x", "messages": TURNS}, "prompt"),
        ("/tokenize", {"messages": []}, "messages"),
        ("/tokenize", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ("/tokenize", {"prompt": "x", "add_generation_prompt": True}, "add_generation_prompt"),
        ("/tokenize", {"prompt": "x", "return_token_strs": "yes"}, "return_token_strs"),
        ("/tokenize", {"prompt": "x", "temperature": 0}, "temperature"),
        ("/detokenize", {}, "tokens"),
        ("/detokenize", {"tokens": "1 2"}, "tokens"),
        ("/detokenize", {"tokens": [1, 2, 4096]}, "tokens[2]"),
        ("/detokenize", {"tokens": [1], "skip_special_tokens": True}, "skip_special_tokens"),
    ],
)
async def test_a_bad_field_is_a_400_naming_it(
    http: httpx.AsyncClient, path: str, body: dict[str, object], param: str
) -> None:
    """A field of the wrong type or value, a missing one, one the route does not read, and an
    id past the vocabulary are OpenAI 400s naming the field as the request named it."""
    error = await _error(http, path, body)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert str(error["message"]).startswith(f"{param}:")


async def test_a_text_over_the_servers_limit_is_a_400_naming_prompt(
    http: httpx.AsyncClient, served: RunningServer
) -> None:
    """A prompt over the server's max_prompt_bytes is the server's refusal of `text`, named
    `prompt` (`messages` for a chat)."""
    limit = served.server.settings.max_prompt_bytes
    error = await _error(http, "/tokenize", {"prompt": "x" * (limit + 1)})
    assert error["param"] == "prompt"
    assert f"at most {limit} bytes" in str(error["message"])
    turns = [{"role": "user", "content": "x" * (limit + 1)}]
    assert (await _error(http, "/tokenize", {"messages": turns}))["param"] == "messages"


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
async def test_a_model_not_served_is_a_404(http: httpx.AsyncClient, path: str) -> None:
    """`model` naming another model is OpenAI's 404 model_not_found."""
    body = {"model": "gpt-4", "prompt": "x", "tokens": [1]}
    body.pop("tokens" if path == "/tokenize" else "prompt")
    error = await _error(http, path, body, 404)
    assert (error["code"], error["param"]) == ("model_not_found", "model")


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
async def test_the_routes_need_a_key_where_keys_are_set(served: RunningServer, path: str) -> None:
    """With API keys on, a request without one is a 401, one with a key is answered."""
    body = {"prompt": "x"} if path == "/tokenize" else {"tokens": [1]}
    edge = await start_edge(served.target, api_keys=("k-one",))
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            missing = await http.post(path, json=body)
            keyed = await http.post(path, json=body, headers={"Authorization": "Bearer k-one"})
    finally:
        await edge.edge.stop()
    assert (missing.status_code, keyed.status_code) == (401, 200)
    assert missing.json()["error"]["code"] == "invalid_api_key"


async def test_a_body_that_is_not_json_is_a_415(http: httpx.AsyncClient) -> None:
    """/tokenize takes only application/json, as every POST route does."""
    response = await http.post(
        "/tokenize", content=b"prompt=x", headers={"Content-Type": "text/plain"}
    )
    assert response.status_code == 415


async def test_a_body_over_the_limit_is_a_413(served: RunningServer) -> None:
    """/tokenize reads at most TOKENWIRE_MAX_BODY_BYTES, as every route does."""
    edge = await start_edge(served.target, max_body_bytes=1024)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            response = await http.post("/tokenize", json={"prompt": "x" * 2000})
    finally:
        await edge.edge.stop()
    assert response.status_code == 413


async def test_a_cross_site_request_is_a_403(http: httpx.AsyncClient) -> None:
    """A request a browser marks cross-site from an Origin not allowed is refused, as on the
    /v1/ routes."""
    headers = {"Sec-Fetch-Site": "cross-site", "Origin": "https://elsewhere.example"}
    response = await http.post("/tokenize", json={"prompt": "x"}, headers=headers)
    assert response.status_code == 403


async def test_a_draining_edge_refuses_the_routes_with_503(
    http: httpx.AsyncClient, edge: RunningEdge
) -> None:
    """Once the edge drains, /tokenize is a 503, as every new API request is."""
    drain = edge.edge.ctx.drain
    drain.draining = True
    try:
        response = await http.post("/tokenize", json={"prompt": "x"})
    finally:
        drain.draining = False
    assert response.status_code == 503


async def test_the_routes_count_in_no_metric(http: httpx.AsyncClient, edge: RunningEdge) -> None:
    """Answered or refused, a /tokenize or /detokenize serves no stream: the edge's stream
    counts stay at zero."""
    await _ok(http, "/tokenize", {"prompt": "x"})
    await _ok(http, "/detokenize", {"tokens": [1]})
    await _error(http, "/tokenize", {"prompt": ""})
    registry = edge.edge.ctx.metrics.registry
    counts = [
        registry.get_sample_value(
            "tokenwire_edge_streams_total", {"route": route, "outcome": outcome}
        )
        for route in RouteName
        for outcome in Outcome
    ]
    assert set(counts) == {0.0}
