"""The objects inside an OpenAI request are read as strictly as its top-level fields: a key the
edge does not read is a 400 naming its full path, never dropped silently; a value of the wrong
JSON type is told apart from a value out of range by its code. Real server and edge on
127.0.0.1, requests as raw JSON (the SDK's types would refuse some of these bodies)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL, RunningEdge, start_edge

CHAT_PATH = "/v1/chat/completions"
USER = {"role": "user", "content": "hi"}
# A request body with one key its objects do not define, and the path the 400 must name.
UNKNOWN_KEYS = {
    "stream_options": (
        {"stream": True, "stream_options": {"include_usage": False, "bogus": 1}},
        "stream_options.bogus",
    ),
    "response_format": (
        {
            "response_format": {
                "type": "text",
                "json_schema": {"name": "answer", "schema": {"type": "object"}},
            }
        },
        "response_format.json_schema",
    ),
    "text content part": (
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "hi"},
                        {"type": "text", "text": "there", "cache_control": {"type": "x"}},
                    ],
                },
            ]
        },
        "messages[1].content[1].cache_control",
    ),
}


@pytest.fixture
async def http(edge: RunningEdge) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=edge.url, timeout=30) as client:
        yield client


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [USER], "max_tokens": 2, **fields}


@pytest.mark.parametrize(("body", "path"), UNKNOWN_KEYS.values(), ids=UNKNOWN_KEYS.keys())
async def test_an_unknown_key_of_a_nested_object_is_400_naming_its_path(
    http: httpx.AsyncClient, body: dict[str, Any], path: str
) -> None:
    """A key an object of the request does not have (stream_options, response_format, a text
    content part) is refused as an unknown top-level field is: 400 unknown_parameter, with
    the key's full path in `param` and at the start of the message."""
    response = await http.post(CHAT_PATH, json=_chat(**body))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        path,
        "unknown_parameter",
    )
    assert error["message"].startswith(f"{path}:")


COMPLETIONS_PATH = "/v1/completions"
# A field sent with a value of the wrong JSON type; `param` must name the field.
WRONG_TYPES: dict[str, tuple[str, Any]] = {
    "temperature as a string": ("temperature", "0.7"),
    "top_p as a boolean": ("top_p", True),
    "stream as a string": ("stream", "yes"),
    "ignore_eos as an integer": ("ignore_eos", 1),
    "model as an integer": ("model", 3),
    "stop as an integer": ("stop", 5),
    "stop as a list of integers": ("stop", [5]),
    "n as a string": ("n", "2"),
    "logit_bias bias as a string": ("logit_bias", {"5": "1"}),
    "prompt as an object": ("prompt", {"text": "hi"}),
    "batch entry as a number": ("prompt", ["hi", 2.5]),
    "user as an integer": ("user", 5),
    "store as a string": ("store", "true"),
    "metadata as a list": ("metadata", ["a"]),
    "metadata value as a number": ("metadata", {"team": 7}),
    "service_tier as a boolean": ("service_tier", True),
    "prompt_cache_key as an object": ("prompt_cache_key", {}),
    "safety_identifier as an integer": ("safety_identifier", 9),
    "best_of as a float": ("best_of", 1.0),
    "echo as a string": ("echo", "false"),
}


# Where `param` names a place inside the field rather than the field.
PARAMS = {json.dumps(["hi", 2.5]): "prompt[1]", json.dumps({"team": 7}): "metadata.team"}


@pytest.mark.parametrize(("name", "value"), WRONG_TYPES.values(), ids=WRONG_TYPES.keys())
async def test_a_value_of_the_wrong_json_type_is_invalid_type(
    http: httpx.AsyncClient, name: str, value: Any
) -> None:
    """A field whose JSON value has the wrong type (a string for a number, an integer for a
    boolean or a string...) is 400 with OpenAI's code `invalid_type`, naming the field."""
    body = {"model": MODEL, "prompt": "def f():", "max_tokens": 2, name: value}
    response = await http.post(COMPLETIONS_PATH, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        PARAMS.get(json.dumps(value), name),
        "invalid_type",
    )


WRONG_MESSAGES: dict[str, tuple[Any, str]] = {
    "messages as an object": (USER, "messages"),
    "a message as a string": (["hi"], "messages[0]"),
    "a role as a number": ([{"role": 1, "content": "hi"}], "messages[0]"),
    "content as a number": ([{"role": "user", "content": 7}], "messages[0].content"),
    "a content part as a string": ([{"role": "user", "content": ["hi"]}], "messages[0].content"),
    "a part's text as a number": (
        [{"role": "user", "content": [{"type": "text", "text": 7}]}],
        "messages[0].content",
    ),
}


@pytest.mark.parametrize(("messages", "path"), WRONG_MESSAGES.values(), ids=WRONG_MESSAGES.keys())
async def test_a_chat_message_of_the_wrong_json_type_is_invalid_type(
    http: httpx.AsyncClient, messages: Any, path: str
) -> None:
    """`messages`, a message, its role, its content or a content part of the wrong JSON type
    is 400 `invalid_type`, naming where it is."""
    response = await http.post(CHAT_PATH, json=_chat(messages=messages))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (path, "invalid_type")


# A value of the right JSON type that the field does not allow, and the code it gets.
WRONG_VALUES: dict[str, tuple[str, Any, str]] = {
    "temperature above its range": ("temperature", 3.0, "invalid_value"),
    "top_p an integer past 2^53": ("top_p", 2**53 + 1, "invalid_value"),
    "logit_bias bias above its range": ("logit_bias", {"5": 101}, "invalid_value"),
    "n above its range": ("n", 9, "integer_above_max_value"),
    "an empty prompt": ("prompt", "", "invalid_value"),
}


@pytest.mark.parametrize(("name", "value", "code"), WRONG_VALUES.values(), ids=WRONG_VALUES.keys())
async def test_a_value_of_the_right_type_out_of_range_keeps_its_range_code(
    http: httpx.AsyncClient, name: str, value: Any, code: str
) -> None:
    """A value of the right JSON type outside the field's range is 400 with its range code
    (`invalid_value`, or OpenAI's integer bound codes), not `invalid_type`."""
    body = {"model": MODEL, "prompt": "def f():", "max_tokens": 2, name: value}
    response = await http.post(COMPLETIONS_PATH, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (name, code)


# A value OpenAI refuses that the edge used to take: (path, body, param, code).
OPENAI_REFUSES: dict[str, tuple[str, dict[str, Any], str, str]] = {
    "parallel_tool_calls as a string": (
        CHAT_PATH,
        _chat(parallel_tool_calls="yes"),
        "parallel_tool_calls",
        "invalid_type",
    ),
    "an unknown service_tier": (
        CHAT_PATH,
        _chat(service_tier="fast"),
        "service_tier",
        "invalid_value",
    ),
    "content as an empty list of parts": (
        CHAT_PATH,
        {"model": MODEL, "messages": [{"role": "user", "content": []}]},
        "messages[0].content",
        "empty_array",
    ),
    "best_of below n": (
        COMPLETIONS_PATH,
        {"model": MODEL, "prompt": "x", "max_tokens": 2, "best_of": 1, "n": 2},
        "best_of",
        "invalid_value",
    ),
}


@pytest.mark.parametrize(
    ("path", "body", "param", "code"), OPENAI_REFUSES.values(), ids=OPENAI_REFUSES.keys()
)
async def test_values_openai_refuses_are_400_naming_the_field(
    http: httpx.AsyncClient, path: str, body: dict[str, Any], param: str, code: str
) -> None:
    """A non-boolean parallel_tool_calls, a service_tier OpenAI does not have, a message
    content of no parts, and best_of below n are 400 naming the field, as OpenAI answers."""
    response = await http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code)


# A chat field (or a message's) that is only accepted empty, sent as an object: (body, param).
NOT_LISTS: dict[str, tuple[dict[str, Any], str]] = {
    "tools": (_chat(tools={}), "tools"),
    "functions": (_chat(functions={}), "functions"),
    "a message's tool_calls": (
        _chat(messages=[{"role": "assistant", "content": "a", "tool_calls": {}}, USER]),
        "messages[0].tool_calls",
    ),
}


@pytest.mark.parametrize(("body", "param"), NOT_LISTS.values(), ids=NOT_LISTS.keys())
async def test_an_object_for_a_list_taken_only_empty_is_invalid_type(
    http: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    """`tools`, `functions` and a message's `tool_calls`, accepted as [] (or null), sent as
    an object ({}) are 400 `invalid_type` naming the field, as OpenAI answers: an object is
    no empty list, and is never ignored."""
    response = await http.post(CHAT_PATH, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, "invalid_type")
    assert error["message"].startswith(f"{param}:")


# A stop the server refuses, as sent, and the field the 400 names: (stop, param).
BAD_STOPS: dict[str, tuple[Any, str]] = {
    "one empty string": ("", "stop"),
    "one string of 65 characters": ("s" * 65, "stop"),
    "an empty string in a list": (["end", ""], "stop[1]"),
    "a list of one string of 65 characters": (["s" * 65], "stop[0]"),
}


@pytest.mark.parametrize("path", [COMPLETIONS_PATH, CHAT_PATH])
@pytest.mark.parametrize(("stop", "param"), BAD_STOPS.values(), ids=BAD_STOPS.keys())
async def test_a_refused_stop_is_named_as_sent(
    http: httpx.AsyncClient, path: str, stop: Any, param: str
) -> None:
    """A stop the server refuses (empty, longer than its limit) sent as one string is named
    `stop`, in `param` and at the start of the message; an entry of a list is named by its
    place (`stop[1]`)."""
    body = _chat() if path == CHAT_PATH else {"prompt": "x", "max_tokens": 2}
    response = await http.post(path, json=body | {"stop": stop})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, "invalid_value")
    assert error["message"].startswith(f"{param}: ")


@pytest.mark.parametrize(
    ("path", "name"),
    [
        (COMPLETIONS_PATH, "max_tokens"),
        (CHAT_PATH, "max_tokens"),
        (CHAT_PATH, "max_completion_tokens"),
    ],
)
@pytest.mark.parametrize("value", [-1, -(2**40)])
async def test_a_negative_max_tokens_is_below_the_minimum_of_1(
    http: httpx.AsyncClient, path: str, name: str, value: int
) -> None:
    """A negative max_tokens (or max_completion_tokens) is 400 `integer_below_min_value`
    saying the field's minimum, 1, as 0 is: never a range from 0, which is refused too."""
    body = {"model": MODEL, "messages": [USER]} if path == CHAT_PATH else {"prompt": "x"}
    response = await http.post(path, json=body | {name: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (name, "integer_below_min_value")
    assert error["message"] == f"{name}: must be at least 1, got {value}"


# A request naming a model this edge does not serve, with a field it refuses too.
UNKNOWN_MODEL_AND_BAD_FIELD: dict[str, tuple[str, dict[str, Any]]] = {
    "max_tokens -1": (COMPLETIONS_PATH, {"prompt": "x", "max_tokens": -1}),
    "temperature as a string": (COMPLETIONS_PATH, {"prompt": "x", "temperature": "0.7"}),
    "an unknown field": (CHAT_PATH, {"messages": [USER], "bogus": 1}),
    "no messages": (CHAT_PATH, {"messages": []}),
}


@pytest.mark.parametrize(
    ("path", "body"), UNKNOWN_MODEL_AND_BAD_FIELD.values(), ids=UNKNOWN_MODEL_AND_BAD_FIELD.keys()
)
async def test_an_unknown_model_is_404_whatever_else_is_wrong(
    http: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> None:
    """A request whose `model` this edge does not serve is the 404 `model_not_found` even
    when a field of it would be a 400, once the edge knows the served model (here from
    /v1/models): the model is what the caller must fix first."""
    assert (await http.get("/v1/models")).status_code == 200
    response = await http.post(path, json=body | {"model": "org/other-model"})
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("model", "model_not_found")


async def test_a_refused_request_naming_a_model_waits_for_no_server() -> None:
    """A request the edge refuses for a field (best_of 2) that names a model is answered at
    once even where the server takes connections and never answers: the model's check uses
    what the edge already knows, and asks no server for it."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        edge = await start_edge(f"127.0.0.1:{silent.getsockname()[1]}")
        try:
            async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
                started = time.monotonic()
                body = {"model": "whatever", "prompt": "x", "best_of": 2}
                response = await http.post(COMPLETIONS_PATH, json=body)
                took = time.monotonic() - started
        finally:
            await edge.edge.stop()
    assert response.status_code == 400
    assert took < 2.0
