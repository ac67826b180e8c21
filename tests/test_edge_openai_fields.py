"""The objects inside an OpenAI request are read as strictly as its top-level fields: a key the
edge does not read is a 400 naming its full path, never dropped silently. Real server and edge
on 127.0.0.1, requests as raw JSON (the SDK's types would refuse some of these bodies)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL, RunningEdge

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
