"""Property-based fuzzing of every edge route against a real edge and a real server.

Properties: no input gets a 5xx, every request is answered within a bound, error bodies have
the route's shape, and after the run the edge and the server are healthy with their full
capacity free. `make test` runs a few hundred examples in all, derandomised so a run is
repeatable; `TOKENWIRE_FUZZ_EXAMPLES=2000` runs that many per route, with fresh randomness.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import MODEL, RunningEdge, RunningServer, eventually, start_edge, start_server
from tests.fakes import RecordingObserver
from tokenwire.server.config import BUNDLED_MODEL_DIR
from tokenwire.server.engine import OnnxCausalLM
from tokenwire.server.tokenizer import Tokenizer

KEY = "fuzz-key"
CAPACITY = 4
REQUEST_LIMIT_S = 20.0
MAX_EVENTS = 24
_CUSTOM = os.environ.get("TOKENWIRE_FUZZ_EXAMPLES")
FUZZ = settings(
    max_examples=int(_CUSTOM or 40),
    deadline=None,
    derandomize=_CUSTOM is None,
    database=None,  # no saved examples: the derandomised run is the record
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --- values -------------------------------------------------------------------------------

ANY_CHAR = st.characters(codec=None, exclude_categories=())  # lone surrogates included
TEXT = st.text(ANY_CHAR, max_size=24)
INTS = st.one_of(
    st.integers(-5, 20),
    st.sampled_from([-1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1, 2**64, -(2**63)]),
    st.integers(-(2**80), 2**80),
)
FLOATS = st.one_of(
    st.floats(0, 2),
    st.sampled_from([1e-38, 1e-45, 5e-324, 1e38, 3.5e38, 1e308, -0.0, 2.0000001]),
    st.floats(),  # NaN and infinities are written as bare NaN/Infinity literals
)
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXT)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
# Literals json.dumps will not write: huge numbers, deep nesting, escapes of lone surrogates.
LITERALS = st.sampled_from(
    [
        "1" * 5000,
        "-" + "9" * 45,
        "1" * 401,
        "1" * 401 + ".5",
        "1e400",
        "-1e400",
        "0." + "0" * 400 + "1",
        "NaN",
        "-Infinity",
        "[" * 5000,
        "[" * 40 + "]" * 40,
        '"\\ud800"',
        '["\\udfff", "x"]',
        '{"a": ' * 40 + "1" + "}" * 40,
        "[]",
        "{}",
        '""',
    ]
)
PRINTABLE_ID = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1)
SAMPLING = {
    "max_tokens": st.integers(0, 8),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1, exclude_min=True),
    "stop": st.one_of(st.text(min_size=1, max_size=8), st.lists(st.text(min_size=1, max_size=8))),
    "seed": st.integers(0, 2**64 - 1),
}
# Token ids within the vocabulary, past it, and past what the wire carries (2^32).
TOKEN_ID = st.one_of(st.integers(0, 4000), st.integers(0, 2**33))
EXTENSIONS = {
    "min_p": st.floats(0, 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "min_tokens": st.integers(0, 8),
    "logit_bias": st.dictionaries(TOKEN_ID.map(str), st.floats(-100, 100), max_size=3),
}
# Values each field accepts, so that many bodies get past validation into the engine.
NATIVE_VALID: dict[str, st.SearchStrategy[Any]] = {
    **SAMPLING,
    **EXTENSIONS,
    "prompt_ids": st.lists(TOKEN_ID, min_size=1, max_size=8),
    "stop_token_ids": st.lists(TOKEN_ID, max_size=3),
    "top_logprobs": st.integers(0, 5),
    "add_special_tokens": st.booleans(),
    "prompt": st.text(min_size=1, max_size=40),
    "top_k": st.integers(0, 50),
    "repetition_penalty": st.floats(0, 2, exclude_min=True),
    "ignore_eos": st.booleans(),
    "logprobs": st.booleans(),
    "request_id": PRINTABLE_ID.map(lambda text: text[:128].replace(":", "-")),
}
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant"]),
        "content": st.text(max_size=40),
    },
    optional={"name": st.text(max_size=8)},
)
OPENAI_VALID: dict[str, st.SearchStrategy[Any]] = {
    **SAMPLING,
    **EXTENSIONS,
    # Mostly the served model, so that bodies get past the model check into generation.
    "model": st.one_of(st.just(MODEL), st.just(MODEL), st.text(max_size=12)),
    "prompt": st.one_of(
        st.text(min_size=1, max_size=40),
        st.lists(st.text(), min_size=1, max_size=1),
        st.lists(TOKEN_ID, min_size=1, max_size=8),
    ),
    "messages": st.lists(MESSAGE, min_size=1, max_size=3),
    "max_completion_tokens": st.integers(0, 8),
    "logprobs": st.one_of(st.booleans(), st.integers(0, 5)),
    "n": st.integers(1, 3),
    "user": st.text(max_size=12),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
}
HEADER_TEXT = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=160
).map(lambda value: value.strip(" \t").encode("latin-1"))
CONTENT_TYPES = st.one_of(
    st.sampled_from(
        [
            b"application/json",
            b"application/json; charset=utf-8",
            b"application/json; charset=latin-1",
            b"text/plain",
            b"application/x-www-form-urlencoded",
            b"",
        ]
    ),
    HEADER_TEXT,
)


def _plausible(
    valid: dict[str, st.SearchStrategy[Any]], base: dict[str, Any], *, wild: bool
) -> st.SearchStrategy[bytes]:
    """A sensible body; when `wild`, with some fields replaced by anything at all."""
    fields = st.sampled_from(sorted(valid))

    def render(parts: tuple[dict[str, Any], dict[str, Any], dict[str, str]]) -> bytes:
        good, bad, literals = parts
        # A field a literal sets is left out of the rest: a repeated key is refused first.
        kept = {k: v for k, v in {**base, **good, **bad}.items() if k not in literals}
        body = json.dumps(kept)[:-1]
        extra = "".join(f", {json.dumps(name)}: {literal}" for name, literal in literals.items())
        return (body + extra + "}").encode("utf-8", "surrogatepass")

    return st.tuples(
        st.fixed_dictionaries({}, optional=valid),
        st.dictionaries(fields, VALUES, max_size=2 if wild else 0),
        st.dictionaries(fields, LITERALS, max_size=1 if wild else 0),
    ).map(render)


def _bodies(
    valid: dict[str, st.SearchStrategy[Any]], base: dict[str, Any]
) -> st.SearchStrategy[bytes]:
    """Sensible bodies, bodies with wild fields, arbitrary JSON values, and arbitrary bytes."""
    return st.one_of(
        _plausible(valid, base, wild=False),
        _plausible(valid, base, wild=True),
        _plausible(valid, base, wild=True),
        VALUES.map(lambda value: json.dumps(value).encode("utf-8", "surrogatepass")),
        st.binary(max_size=64),
    )


@st.composite
def _headers(draw: st.DrawFn, *, content_type: bool = False) -> dict[str, bytes]:
    """Mostly the right key and JSON; sometimes anything in a header a client can send."""
    headers = {"Authorization": draw(st.sampled_from([b"Bearer " + KEY.encode()] * 5 + [b""]))}
    if content_type:
        headers["Content-Type"] = draw(
            st.one_of(st.just(b"application/json"), st.just(b"application/json"), CONTENT_TYPES)
        )
    for name in ("X-Request-ID", "Last-Event-ID"):
        if draw(st.integers(0, 3)) == 0:
            headers[name] = draw(HEADER_TEXT)
    return {name: value for name, value in headers.items() if value}


# --- the edge under test --------------------------------------------------------------------


@pytest.fixture(scope="module")
async def target(tokenizer: Tokenizer) -> AsyncIterator[tuple[RunningServer, RunningEdge]]:
    """A capacity-4 server on the bundled model behind a keyed edge with a short resume window."""
    model = OnnxCausalLM(BUNDLED_MODEL_DIR, provider="cpu", intra_op_threads=2)
    server = await start_server(
        model, tokenizer, RecordingObserver(), max_batch_size=CAPACITY, max_queue=CAPACITY
    )
    edge = await start_edge(server.target, api_keys=(KEY,), resume_window_s=2.0)
    yield server, edge
    await edge.edge.stop()
    await server.server.drain()


@pytest.fixture(scope="module")
async def http(
    target: tuple[RunningServer, RunningEdge],
) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=target[1].url, timeout=REQUEST_LIMIT_S) as client:
        yield client


SEEN_IDS: list[str] = []


async def _exchange(
    http: httpx.AsyncClient, method: str, url: str, **kwargs: Any
) -> tuple[int, str, bytes]:
    """Send, read the answer (at most MAX_EVENTS events of a stream), within REQUEST_LIMIT_S."""
    async with asyncio.timeout(REQUEST_LIMIT_S), http.stream(method, url, **kwargs) as response:
        kind = response.headers.get("content-type", "")
        body = b""
        events = 0
        async for chunk in response.aiter_bytes():
            body += chunk
            events = body.count(b"\n\n")
            if events >= MAX_EVENTS:
                break
        request_id = response.headers.get("x-request-id")
        if request_id and response.status_code == 200:
            SEEN_IDS.append(request_id)
        return response.status_code, kind, body


def _check(status: int, kind: str, body: bytes, *, native: bool) -> None:
    """No 5xx; JSON errors have the route's error shape."""
    event(f"HTTP {status}")  # the mix is shown by pytest --hypothesis-show-statistics
    assert status < 500, body[:500]
    if status >= 400 and kind.startswith("application/json"):
        error = json.loads(body)["error"]
        keys = {"code", "status", "message"} if native else {"message", "type", "param", "code"}
        assert keys <= set(error), error


# --- one property test per route ------------------------------------------------------------

CHAT_BASE = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.one_of(st.just("user"), VALUES)}, optional={"content": VALUES}
    ),
    max_size=3,
)


@FUZZ
@given(
    body=_bodies(NATIVE_VALID, {"prompt": "def f():", "max_tokens": 4}),
    headers=_headers(content_type=True),
)
async def test_native_post_never_5xx(
    http: httpx.AsyncClient, body: bytes, headers: dict[str, bytes]
) -> None:
    """POST /v1/generate with any body and headers: never a 5xx, always answered in time."""
    answer = await _exchange(http, "POST", "/v1/generate", content=body, headers=headers)
    _check(*answer, native=True)


@FUZZ
@given(
    params=st.one_of(
        st.fixed_dictionaries({}, optional=NATIVE_VALID).map(
            lambda fields: {name: json.dumps(value).strip('"') for name, value in fields.items()}
        ),
        st.dictionaries(
            st.sampled_from([*NATIVE_VALID, "last_event_id"]), st.text(max_size=24), max_size=5
        ),
    ),
    headers=_headers(),
)
async def test_native_get_never_5xx(
    http: httpx.AsyncClient, params: dict[str, str], headers: dict[str, bytes]
) -> None:
    """GET /v1/generate?... (EventSource) with any query: never a 5xx, answered in time."""
    answer = await _exchange(
        http, "GET", "/v1/generate", params={"max_tokens": "4", **params}, headers=headers
    )
    _check(*answer, native=True)


# An id either drawn at random or one of the streams started so far (picked by index, so that
# what is drawn does not depend on how many there are).
IDS = st.one_of(st.text(max_size=40), st.integers(0, 10_000))


def _id(drawn: str | int) -> str:
    if isinstance(drawn, str):
        return drawn
    return SEEN_IDS[drawn % len(SEEN_IDS)] if SEEN_IDS else "none"


@FUZZ
@given(
    drawn=IDS,
    seq=st.one_of(st.integers(-3, 40).map(str), st.text(max_size=8)),
    in_query=st.booleans(),
    headers=_headers(),
)
async def test_resume_route_never_5xx(
    http: httpx.AsyncClient, drawn: str | int, seq: str, in_query: bool, headers: dict[str, bytes]
) -> None:
    """GET /v1/generate/{id}/events for known, unknown and odd ids and event ids: never a 5xx."""
    request_id = _id(drawn)
    query = {"last_event_id": f"{request_id}:{seq}"} if in_query else {}
    url = f"/v1/generate/{quote(request_id, safe='')}/events"
    answer = await _exchange(http, "GET", url, params=query, headers=headers)
    _check(*answer, native=True)


@FUZZ
@given(drawn=IDS, body=st.binary(max_size=32), headers=_headers(content_type=True))
async def test_cancel_route_never_5xx(
    http: httpx.AsyncClient, drawn: str | int, body: bytes, headers: dict[str, bytes]
) -> None:
    """POST /v1/generate/{id}/cancel with any id, body and content type: never a 5xx."""
    url = f"/v1/generate/{quote(_id(drawn), safe='')}/cancel"
    _check(*await _exchange(http, "POST", url, content=body, headers=headers), native=True)


@FUZZ
@given(
    body=_bodies(OPENAI_VALID, {"model": MODEL, "prompt": "import os", "max_tokens": 4}),
    headers=_headers(content_type=True),
)
async def test_completions_never_5xx(
    http: httpx.AsyncClient, body: bytes, headers: dict[str, bytes]
) -> None:
    """POST /v1/completions with any body: never a 5xx; errors are OpenAI error bodies."""
    answer = await _exchange(http, "POST", "/v1/completions", content=body, headers=headers)
    _check(*answer, native=False)


@FUZZ
@given(
    body=st.one_of(
        _bodies(OPENAI_VALID, CHAT_BASE),
        MESSAGES.map(
            lambda m: json.dumps({**CHAT_BASE, "messages": m}).encode("utf-8", "surrogatepass")
        ),
    ),
    headers=_headers(content_type=True),
)
async def test_chat_completions_never_5xx(
    http: httpx.AsyncClient, body: bytes, headers: dict[str, bytes]
) -> None:
    """POST /v1/chat/completions with any body or messages: never a 5xx; OpenAI error bodies."""
    answer = await _exchange(http, "POST", "/v1/chat/completions", content=body, headers=headers)
    _check(*answer, native=False)


@FUZZ
@given(
    path=st.sampled_from(["/v1/models", "/readyz", "/healthz"]),
    params=st.dictionaries(st.text(max_size=8), st.text(max_size=24), max_size=3),
    headers=_headers(),
)
async def test_models_and_health_never_5xx(
    http: httpx.AsyncClient, path: str, params: dict[str, str], headers: dict[str, bytes]
) -> None:
    """GET /v1/models, /readyz and /healthz with any query and headers: never a 5xx."""
    _check(*await _exchange(http, "GET", path, params=params, headers=headers), native=False)


async def test_after_the_fuzz_the_edge_and_server_are_healthy_at_full_capacity(
    http: httpx.AsyncClient, target: tuple[RunningServer, RunningEdge]
) -> None:
    """Once the fuzzing is over: ready, nothing running, no buffered bytes left, and as many
    concurrent streams as the server has slots all complete."""
    server, edge = target
    assert await eventually(lambda: server.engine.active_count == 0, within_s=10)
    assert await eventually(lambda: edge.streams.bytes == 0 and not edge.streams, within_s=10)
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "def f():", "max_tokens": 16, "ignore_eos": True}
    ready = await http.get("/readyz")
    replies = await asyncio.gather(
        *(http.post("/v1/generate", json=body, headers=auth) for _ in range(CAPACITY))
    )
    assert ready.status_code == 200
    assert [r.status_code for r in replies] == [200] * CAPACITY
    assert all(r.text.count("event: done") == 1 for r in replies)
