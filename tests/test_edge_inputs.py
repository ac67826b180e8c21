"""Hostile or malformed input to the edge is a 400 naming the field, never a 5xx.

Each case here was once a 500 (found by fuzzing): deep nesting, huge integers, bad UTF-8,
numbers outside the protobuf types, lone surrogates, Unicode digits, non-object bodies.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.conftest import MODEL, RunningServer, start_edge
from tests.fakes import RecordingObserver
from tokenwire.client.messages import GenerateOptions
from tokenwire.edge.body import Fields
from tokenwire.edge.errors import EdgeError, as_request_errors

JSON = {"Content-Type": "application/json"}
HUGE = "1" * 5000
DIGITS_401 = "1" * 401


def _body(**fields: object) -> bytes:
    return json.dumps({"prompt": "x", "max_tokens": 2, **fields}).encode()


def _raw(prefix: str, value: str) -> bytes:
    """A body whose `prefix` field holds a literal the json module would not write."""
    base = "" if prefix == "prompt" else '"prompt": "x", '
    return f'{{{base}"{prefix}": {value}}}'.encode()


NATIVE_BODIES = {
    "deep nesting past the recursion limit": (b'{"prompt": ' + b"[" * 100_000 + b"}", "body"),
    "nesting past the depth bound": (_raw("prompt", "[" * 40 + "]" * 40), "prompt"),
    "5000-digit integer": (_raw("max_tokens", HUGE), "max_tokens"),
    "invalid UTF-8": (b'{"prompt": "\xff\xfe"}', "body"),
    "max_tokens -1": (_body(max_tokens=-1), "max_tokens"),
    "max_tokens 2^32": (_body(max_tokens=4294967296), "max_tokens"),
    "top_k -2": (_body(top_k=-2), "top_k"),
    "top_k 2^32": (_body(top_k=2**32), "top_k"),
    "seed below -2^63": (_body(seed=-(2**63) - 1), "seed"),
    "seed 2^64": (_body(seed=2**64), "seed"),
    "lone surrogate in prompt": (b'{"prompt": "a\\ud800b"}', "prompt"),
    "lone surrogate in a stop list": (_raw("stop", '["\\udfff"]'), "stop[0]"),
    "lone surrogate in a stop string": (_raw("stop", '"\\ud83d"'), "stop"),
    "401-digit integer temperature": (_raw("temperature", DIGITS_401), "temperature"),
    "401-digit float temperature": (_raw("temperature", DIGITS_401 + ".5"), "temperature"),
    "NaN literal": (_raw("temperature", "NaN"), "body"),
    "Infinity literal": (_raw("top_p", "Infinity"), "body"),
    "array body": (b"[1, 2]", "body"),
    "a repeated key": (b'{"prompt": "x", "max_tokens": 3, "max_tokens": 5}', "body"),
    "string body": (b'"prompt"', "body"),
    "null body": (b"null", "body"),
    "truncated JSON": (b'{"prompt": "x"', "body"),
    "prompt of the wrong type": (_body(prompt=7), "prompt"),
    "stop of the wrong type": (_body(stop=[1]), "stop"),
    "ignore_eos of the wrong type": (_body(ignore_eos="yes"), "ignore_eos"),
    "max_tokens as a boolean": (_body(max_tokens=True), "max_tokens"),
    "max_tokens as a float": (_body(max_tokens=2.5), "max_tokens"),
    "temperature as a string": (_body(temperature="hot"), "temperature"),
    "temperature above 2": (_body(temperature=2.5), "temperature"),
    "top_p of 0": (_body(top_p=0), "top_p"),
    "repetition_penalty of 0": (_body(repetition_penalty=0), "repetition_penalty"),
    "non-ASCII request_id": (_body(request_id="é"), "request_id"),
    "request_id of 129 characters": (_body(request_id="r" * 129), "request_id"),
    "request_id with a control character": (_body(request_id="a\x7fb"), "request_id"),
    "request_id with a colon": (_body(request_id="a:b"), "request_id"),
    "request_id with a leading space": (_body(request_id=" a"), "request_id"),
    "a field the API does not have": (_body(temprature=0.5), "temprature"),
    "continuation_ids (the edge's own)": (_body(continuation_ids=[1]), "continuation_ids"),
    "logit_bias of the wrong type": (_body(logit_bias=[1]), "logit_bias"),
    "logit_bias id past 2^32": (_body(logit_bias={"4294967296": 1}), "logit_bias"),
    "logit_bias with two keys for one id": (_body(logit_bias={"5": 1, "05": -1}), "logit_bias"),
    "stop_token_ids with a boolean": (_body(stop_token_ids=[True]), "stop_token_ids[0]"),
    "stop_token_ids with a negative id": (_body(stop_token_ids=[3, -1]), "stop_token_ids[1]"),
    "prompt_ids past 2^32": (_body(prompt_ids=[2**32]), "prompt_ids[0]"),
    "top_logprobs without logprobs": (_body(top_logprobs=2), "top_logprobs"),
    "min_tokens above max_tokens": (_body(min_tokens=3), "min_tokens"),
}

OPENAI_BODIES = {
    "max_tokens -1": ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    "max_tokens 2^32": ({"prompt": "x", "max_tokens": 2**32}, "max_tokens"),
    "seed 2^64": ({"prompt": "x", "seed": 2**64}, "seed"),
    "seed below -2^63": ({"prompt": "x", "seed": -(2**63) - 1}, "seed"),
    "temperature 1e308": ({"prompt": "x", "temperature": 1e308}, "temperature"),
    "n of 9": ({"prompt": "x", "n": 9}, "n"),
    "n of 0": ({"prompt": "x", "n": 0}, "n"),
    "logprobs past 5": ({"prompt": "x", "logprobs": 99}, "logprobs"),
    "prompt batch with a number": ({"prompt": ["a", 7]}, "prompt[1]"),
    "logit_bias id past 2^32": ({"prompt": "x", "logit_bias": {"9999999999": 1}}, "logit_bias"),
    "logit_bias with two keys for one id": (
        {"prompt": "x", "logit_bias": {"7": 1, "007": 2}},
        "logit_bias",
    ),
    "prompt as an empty list": ({"prompt": []}, "prompt"),
    "prompt mixing ids and text": ({"prompt": [1, "a"]}, "prompt[1]"),
    "prompt token id past 2^32": ({"prompt": [2**32]}, "prompt[0]"),
    "prompt token id past the vocabulary": ({"prompt": [10**9]}, "prompt[0]"),
    "min_tokens above max_tokens": (
        {"prompt": "x", "max_tokens": 2, "min_tokens": 3},
        "min_tokens",
    ),
    "stream_options not an object": ({"prompt": "x", "stream_options": 3}, "stream_options"),
    "stream_options as 0": ({"prompt": "x", "stream_options": 0}, "stream_options"),
    "stream_options without a stream": (
        {"prompt": "x", "stream_options": {"include_usage": True}},
        "stream_options",
    ),
    "include_obfuscation not a boolean": (
        {"prompt": "x", "stream": True, "stream_options": {"include_obfuscation": "yes"}},
        "stream_options.include_obfuscation",
    ),
}

CHAT = b'"messages": [{"role": "user", "content": "hi"}]'
CHAT_BODIES = {
    "lone surrogate in content": (
        b'{"messages": [{"role": "user", "content": "\\udc00"}]}',
        "messages[0].content",
    ),
    "messages not a list": (b'{"messages": "hi"}', "messages"),
    "a key repeated in a message": (
        b'{"messages": [{"role": "user", "role": "system", "content": "hi"}]}',
        "body",
    ),
    "message without a role": (b'{"messages": [{"content": "hi"}]}', "messages[0]"),
    "a role OpenAI does not have": (
        b'{"messages": [{"role": "wizard", "content": "hi"}]}',
        "messages[0].role",
    ),
    "a tool turn": (
        b'{"messages": [{"role": "tool", "content": "1", "tool_call_id": "c"}]}',
        "messages[0].role",
    ),
    "an assistant turn with tool calls": (
        b'{"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "c"}]}]}',
        "messages[0].tool_calls",
    ),
    "a message field OpenAI does not have": (
        b'{"messages": [{"role": "user", "content": "hi", "mood": "calm"}]}',
        "messages[0].mood",
    ),
    "a name that is not a string": (
        b'{"messages": [{"role": "user", "content": "hi", "name": 3}]}',
        "messages[0].name",
    ),
    "max_completion_tokens 2^32": (
        b"{" + CHAT + b', "max_completion_tokens": 4294967296}',
        "max_completion_tokens",
    ),
    "5000-digit top_p": (b"{" + CHAT + b', "top_p": ' + HUGE.encode() + b"}", "top_p"),
}


@pytest.fixture(scope="module")
async def http(served: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    """One edge for the whole module: every request here is refused or short."""
    edge = await start_edge(served.target, resume_window_s=0.0)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as client:
            yield client
    finally:
        await edge.edge.stop()


def _native_field(response: httpx.Response) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert error["message"].startswith(f"{error['field']}:")
    return str(error["field"])


def _openai_param(response: httpx.Response) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    return str(error["param"])


@pytest.mark.parametrize(("raw", "field"), NATIVE_BODIES.values(), ids=NATIVE_BODIES.keys())
async def test_native_malformed_body_is_400_naming_the_field(
    http: httpx.AsyncClient, raw: bytes, field: str
) -> None:
    """POST /v1/generate with this body answers 400 with the native error body naming `field`."""
    response = await http.post("/v1/generate", content=raw, headers=JSON)
    assert _native_field(response) == field


@pytest.mark.parametrize(("body", "param"), OPENAI_BODIES.values(), ids=OPENAI_BODIES.keys())
async def test_openai_completions_bad_field_is_400_naming_it(
    http: httpx.AsyncClient, body: dict[str, object], param: str
) -> None:
    """POST /v1/completions answers 400 with an OpenAI error body whose param is the field."""
    response = await http.post("/v1/completions", json={"model": MODEL, **body})
    assert _openai_param(response) == param


TOKEN_ID_ENTRIES = {
    "a prompt id that is text": (
        {"prompt": [1, "a"]},
        "prompt[1]",
        "invalid_type",
    ),
    "a prompt id past 2^32": (
        {"prompt": [1, 2**32]},
        "prompt[1]",
        "invalid_value",
    ),
    "a batch entry's id that is text": (
        {"prompt": [[1], [2, None]]},
        "prompt[1][1]",
        "invalid_type",
    ),
}


@pytest.mark.parametrize(
    ("body", "param", "code"), TOKEN_ID_ENTRIES.values(), ids=TOKEN_ID_ENTRIES.keys()
)
async def test_a_bad_token_id_is_named_with_its_index_and_kind(
    http: httpx.AsyncClient, body: dict[str, object], param: str, code: str
) -> None:
    """A list of token ids with one bad entry is a 400 naming that entry (field[index]): an
    entry that is no integer is invalid_type, an integer that is no token id invalid_value."""
    response = await http.post("/v1/completions", json={"model": MODEL, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code)


@pytest.mark.parametrize(("raw", "param"), CHAT_BODIES.values(), ids=CHAT_BODIES.keys())
async def test_openai_chat_bad_field_is_400_naming_it(
    http: httpx.AsyncClient, raw: bytes, param: str
) -> None:
    """POST /v1/chat/completions answers 400 with an OpenAI error body naming the field."""
    response = await http.post("/v1/chat/completions", content=raw, headers=JSON)
    assert _openai_param(response) == param


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
async def test_openai_invalid_utf8_and_deep_nesting_are_400(
    http: httpx.AsyncClient, route: str
) -> None:
    """Bad UTF-8 and 100,000 levels of nesting are OpenAI 400s naming `body`."""
    bad_utf8 = await http.post(route, content=b'{"model": "\xc3"}', headers=JSON)
    deep = await http.post(route, content=b"[" * 100_000, headers=JSON)
    assert [_openai_param(bad_utf8), _openai_param(deep)] == ["body", "body"]


@pytest.mark.parametrize("header", ["abc:\u00b2", "abc:-1", "abc:", "abc:1e3", ":3", "abc:" + HUGE])
async def test_malformed_last_event_id_is_400(http: httpx.AsyncClient, header: str) -> None:
    """A Last-Event-ID that is not `<id>:<ASCII digits>` (here: Unicode digit '²') is a 400."""
    response = await http.post(
        "/v1/generate", json={}, headers={"Last-Event-ID": header.encode("utf-8")}
    )
    assert _native_field(response) == "Last-Event-ID"


async def test_unicode_digit_in_the_resume_route_is_400(http: httpx.AsyncClient) -> None:
    """GET /v1/generate/{id}/events?last_event_id=abc:² is a 400 naming Last-Event-ID."""
    response = await http.get("/v1/generate/abc/events", params={"last_event_id": "abc:\u00b2"})
    assert _native_field(response) == "Last-Event-ID"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_tokens", "\u00b2"),
        ("max_tokens", "-1"),
        ("max_tokens", "4294967296"),
        ("top_k", "\u0663"),
        ("seed", "18446744073709551616"),
        ("temperature", "\u0661.5"),
        ("temperature", "nan"),
        ("temperature", "inf"),
        ("temperature", DIGITS_401),
        ("ignore_eos", "maybe"),
    ],
)
async def test_query_parameter_out_of_range_is_400(
    http: httpx.AsyncClient, name: str, value: str
) -> None:
    """GET /v1/generate?<name>=<value> (Unicode digits, out of range, NaN) is a 400 naming it."""
    response = await http.get("/v1/generate", params={"prompt": "x", name: value})
    assert _native_field(response) == name


async def test_a_repeated_query_parameter_is_400_naming_it(http: httpx.AsyncClient) -> None:
    """GET /v1/generate?max_tokens=3&max_tokens=5 is a 400 naming max_tokens, not one of the
    two values picked silently."""
    params = [("prompt", "x"), ("max_tokens", "3"), ("max_tokens", "5")]
    response = await http.get("/v1/generate", params=params)
    assert _native_field(response) == "max_tokens"


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("prompt=%FF%FE", "prompt"),
        ("prompt=%ED%A0%80", "prompt"),  # an encoded surrogate
        ("prompt=x&stop=%FF", "stop"),
    ],
)
async def test_a_query_parameter_that_is_not_utf8_is_400_naming_it(
    http: httpx.AsyncClient, query: str, name: str
) -> None:
    """GET /v1/generate with a parameter whose percent-decoded bytes are not UTF-8 is a 400
    naming it, as a body that is not UTF-8 is, not a prompt (or stop string) of U+FFFD."""
    response = await http.get(f"/v1/generate?{query}")
    assert _native_field(response) == name


async def test_query_text_is_percent_decoded_as_utf8(http: httpx.AsyncClient) -> None:
    """GET /v1/generate?prompt=caf%C3%A9 streams the prompt "café": as many prompt tokens as
    the same prompt in a body."""
    posted = await http.post("/v1/generate", json={"prompt": "café", "max_tokens": 1})
    got = await http.get("/v1/generate?prompt=caf%C3%A9&max_tokens=1")
    assert _prompt_tokens(got.text) == _prompt_tokens(posted.text)


def _prompt_tokens(stream: str) -> int:
    """The prompt_tokens of the `usage` event of a whole SSE body."""
    usage = stream.split("event: usage\n", 1)[1].split("\n", 1)[0]
    count: int = json.loads(usage.removeprefix("data: "))["prompt_tokens"]
    return count


@pytest.mark.parametrize("value", ["\u00e9t\u00e9", "a" * 129, "a\tb", "x:1"])
async def test_bad_x_request_id_header_is_400(http: httpx.AsyncClient, value: str) -> None:
    """X-Request-ID outside printable ASCII, or too long, is a 400 naming request_id."""
    headers = {"X-Request-ID": value.encode("utf-8")}
    native = await http.post("/v1/generate", json={"prompt": "x"}, headers=headers)
    openai = await http.post(
        "/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=headers
    )
    assert (_native_field(native), _openai_param(openai)) == ("request_id", "request_id")


async def test_bad_request_id_never_reaches_the_server(
    http: httpx.AsyncClient, served: RunningServer
) -> None:
    """A refused request_id is refused before the upstream call: the server sees nothing."""
    observer = served.observer
    assert isinstance(observer, RecordingObserver)
    before = (len(observer.rejected), len(observer.finished))
    response = await http.post("/v1/generate", json={"prompt": "x", "request_id": "\u00e9"})
    assert response.status_code == 400
    assert (len(observer.rejected), len(observer.finished)) == before


async def test_largest_wire_values_are_not_a_5xx(http: httpx.AsyncClient) -> None:
    """max_tokens 2^32-1 and seed 2^64-1 fit the wire: the server judges them (400 or 200)."""
    response = await http.post(
        "/v1/generate", json={"prompt": "x", "max_tokens": 2**32 - 1, "seed": 2**64 - 1}
    )
    assert _native_field(response) == "max_tokens"
    seeded = await http.post(
        "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2, "seed": 2**64 - 1}
    )
    assert seeded.status_code == 200


@pytest.mark.parametrize(
    ("route", "content_type"),
    [
        ("/v1/generate", "text/plain"),
        ("/v1/generate", "application/x-www-form-urlencoded"),
        ("/v1/generate", "multipart/form-data; boundary=x"),
        ("/v1/generate", None),
        ("/v1/generate", "application/json; charset=latin-1"),
        ("/v1/generate/some-id/cancel", "text/plain"),
        ("/v1/generate/some-id/cancel", None),
        ("/v1/completions", "text/plain"),
        ("/v1/chat/completions", "text/plain"),
    ],
)
async def test_post_without_json_content_type_is_415(
    http: httpx.AsyncClient, route: str, content_type: str | None
) -> None:
    """POSTs a browser may send cross-site without preflight (text/plain, forms, none) are 415."""
    headers = {"Content-Type": content_type} if content_type else {}
    body = json.dumps(
        {"prompt": "x", "model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    ).encode()
    response = await http.post(route, content=body, headers=headers)
    assert response.status_code == 415
    error = response.json()["error"]
    field = error["field"] if route.startswith("/v1/generate") else error["param"]
    assert field == "Content-Type"


async def test_a_refusal_before_the_route_answers_with_the_request_id(
    http: httpx.AsyncClient,
) -> None:
    """A generating request refused before its route runs (here a body that is not JSON) still
    answers with the X-Request-ID its log line goes by, the caller's own."""
    response = await http.post(
        "/v1/chat/completions",
        content=b"x",
        headers={"Content-Type": "text/plain", "X-Request-ID": "gate-1"},
    )
    assert response.status_code == 415
    assert response.headers["X-Request-ID"] == "gate-1"


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        'application/json;charset="UTF-8"',
        "Application/JSON",
        "application/json;",
    ],
)
async def test_json_content_type_with_optional_charset_is_accepted(
    http: httpx.AsyncClient, content_type: str
) -> None:
    """application/json, with or without charset=utf-8 and in any case, starts a generation."""
    response = await http.post(
        "/v1/completions",
        content=json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 2}).encode(),
        headers={"Content-Type": content_type},
    )
    assert response.status_code == 200


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
async def test_browser_cross_site_get_is_403(http: httpx.AsyncClient, site: str) -> None:
    """A GET a browser marks as cross-site (an <img> on another site) cannot start a stream."""
    response = await http.get(
        "/v1/generate",
        params={"prompt": "x", "max_tokens": "2"},
        headers={"Sec-Fetch-Site": site, "Origin": "https://elsewhere.example"},
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "PERMISSION_DENIED"


async def test_same_origin_browser_get_streams(http: httpx.AsyncClient) -> None:
    """The edge's own page (Sec-Fetch-Site: same-origin) and non-browser clients are served."""
    response = await http.get(
        "/v1/generate",
        params={"prompt": "x", "max_tokens": "2"},
        headers={"Sec-Fetch-Site": "same-origin"},
    )
    assert response.status_code == 200


async def test_cross_site_request_from_an_allowed_origin_passes(served: RunningServer) -> None:
    """With TOKENWIRE_CORS_ORIGINS listing the page's origin, its cross-site requests pass."""
    edge = await start_edge(served.target, cors_origins=("https://app.example",))
    headers = {"Sec-Fetch-Site": "cross-site", "Origin": "https://app.example"}
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as client:
            response = await client.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": "x", "max_tokens": 2},
                headers=headers,
            )
    finally:
        await edge.edge.stop()
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://app.example"


def test_the_clients_own_refusals_become_the_requests_400() -> None:
    """An option the client library refuses while the edge builds a request (what the wire
    cannot carry) is the request's 400 naming the field, not a 500."""
    with pytest.raises(EdgeError) as caught, as_request_errors():
        GenerateOptions(logit_bias=((5, 1.0), (5, 2.0)))
    assert (caught.value.status, caught.value.param) == (400, "logit_bias[5]")


@pytest.mark.parametrize("name", ["top_p", "repetition_penalty"])
@pytest.mark.parametrize("route", ["/v1/generate", "/v1/completions"])
async def test_a_value_above_an_open_lower_end_that_is_0_as_a_float32_is_refused_as_sent(
    http: httpx.AsyncClient, route: str, name: str
) -> None:
    """top_p or repetition_penalty 1e-46 is above 0 but travels as a 32-bit float, 0.0: the
    edge refuses it, 400 naming the field, echoing 1e-46 (never "got 0.0")."""
    response = await http.post(route, json={"prompt": "x", "max_tokens": 2, name: 1e-46})
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert message.startswith(f"{name}: must be a number in (0, ")
    assert "got 1e-46" in message
    assert "got 0.0" not in message


@pytest.mark.parametrize("name", ["top_p", "repetition_penalty"])
async def test_the_smallest_positive_float32_above_an_open_lower_end_is_served(
    http: httpx.AsyncClient, name: str
) -> None:
    """top_p or repetition_penalty 2^-149, the smallest float32 above 0, is served."""
    response = await http.post(
        "/v1/completions", json={"prompt": "x", "max_tokens": 2, name: 2.0**-149}
    )
    assert response.status_code == 200, response.text


def test_a_duplicate_among_many_logit_bias_keys_is_found_in_one_pass() -> None:
    """A logit_bias of 50,000 keys and one more naming the last one's token again ("49999" and
    "049999") is refused naming that token at once: the check is one pass over the keys (a pass
    per key took the event loop, and every stream on it, for seconds)."""
    raw = {str(i): 1.0 for i in range(50_000)} | {"049999": 1.0}
    started = time.perf_counter()
    with pytest.raises(EdgeError) as refused:
        Fields({"logit_bias": raw}).token_biases("logit_bias")
    assert time.perf_counter() - started < 2.0
    assert refused.value.param == "logit_bias"
    assert "token 49999 has two biases" in refused.value.message


def test_top_k_minus_one_is_off_as_in_vllm() -> None:
    """top_k -1, vLLM's spelling of off (clients written for vLLM send it), is top_k 0."""
    assert Fields({"top_k": -1}).top_k() == 0
    assert Fields({"top_k": 7}).top_k() == 7
    assert Fields({}).top_k() == 0


def test_a_negative_seed_is_its_64_bit_twos_complement() -> None:
    """A negative seed (OpenAI and vLLM take any 64-bit integer) reaches the server as the same
    64 bits read unsigned: one seed, one sequence of draws, and distinct seeds stay distinct."""
    assert Fields({"seed": -1}).seed() == 2**64 - 1
    assert Fields({"seed": -(2**63)}).seed() == 2**63
    assert Fields({"seed": 5}).seed() == 5


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("attacker.example:8000", 403),
        ("localhost:8000", 200),
        ("[::1]:8000", 200),
        ("LOCALHOST.:8000", 200),
        ("[::ffff:127.0.0.1]:8000", 200),
        ("[::1]evil.example", 403),
        ("[::1].evil.example:80", 403),
        ("localhost:80evil", 403),
    ],
)
async def test_a_loopback_edge_answers_only_requests_naming_a_loopback_host(
    http: httpx.AsyncClient, host: str, status: int
) -> None:
    """An edge listening on 127.0.0.1 refuses (403) a request whose Host header names another
    site, as a page that rebinds its own name to 127.0.0.1 sends it (also after a bracketed
    loopback address), and serves one naming a loopback address."""
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    response = await http.post("/v1/completions", json=body, headers={"Host": host})
    assert response.status_code == status, response.text


async def test_a_loopback_edge_answers_the_hosts_it_is_told_to(served: RunningServer) -> None:
    """With TOKENWIRE_ALLOWED_HOSTS naming a reverse proxy's Host (its port and case do not
    matter), a loopback edge serves requests naming it, and still refuses others."""
    edge = await start_edge(served.target, allowed_hosts=("api.example.com:8443",))
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            named = await http.get("/healthz", headers={"Host": "API.example.com"})
            other = await http.get("/healthz", headers={"Host": "evil.example.com"})
    finally:
        await edge.edge.stop()
    assert (named.status_code, other.status_code) == (200, 403)


async def test_an_edge_listening_on_every_address_takes_any_host(served: RunningServer) -> None:
    """An edge bound to 0.0.0.0 (behind a load balancer, in a pod) serves whatever Host its
    callers name."""
    edge = await start_edge(served.target, host="0.0.0.0")
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            response = await http.get("/healthz", headers={"Host": "edge.example.com"})
    finally:
        await edge.edge.stop()
    assert response.status_code == 200
