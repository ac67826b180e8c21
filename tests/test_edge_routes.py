"""Unknown routes and wrong methods answer JSON in the route family's error shape, not text."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.conftest import RunningEdge


@pytest.fixture
async def http(edge: RunningEdge) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=edge.url, timeout=30) as client:
        yield client


@pytest.mark.parametrize("path", ["/v1/nope", "/v1/chat/completion", "/nothing", "/static/x.js"])
async def test_unknown_route_is_an_openai_json_404(http: httpx.AsyncClient, path: str) -> None:
    """An unknown path outside /v1/generate is a 404 with OpenAI's error body."""
    response = await http.get(path)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("invalid_request_error", "unknown_url")


@pytest.mark.parametrize("path", ["/v1/chat/completions/", "/v1/completions/", "/tokenize/"])
async def test_a_route_with_a_trailing_slash_is_a_json_404_naming_the_route(
    http: httpx.AsyncClient, path: str
) -> None:
    """A POST to a route's path with a trailing slash is a JSON 404 that names the route, not
    an empty redirect."""
    response = await http.post(path, json={})
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert f"without a slash: {path.rstrip('/')}" in response.json()["error"]["message"]


async def test_a_404_names_no_route_for_an_unknown_path_with_a_trailing_slash(
    http: httpx.AsyncClient,
) -> None:
    """An unknown path with a trailing slash (`/v1/nope/`) is a 404 that suggests no route."""
    response = await http.post("/v1/nope/", json={})
    assert response.status_code == 404
    assert "without a slash" not in response.json()["error"]["message"]


async def test_unknown_native_route_is_a_native_json_404(http: httpx.AsyncClient) -> None:
    """An unknown path under /v1/generate is a 404 with the native error body."""
    response = await http.get("/v1/generate/some-id/nope")
    assert response.status_code == 404
    assert response.json()["error"] == {
        "code": "NOT_FOUND",
        "status": 404,
        "message": "no route GET /v1/generate/some-id/nope",
    }


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/v1/chat/completions", {"POST"}),
        ("GET", "/v1/completions", {"POST"}),
        ("DELETE", "/v1/models", {"GET", "HEAD"}),
    ],
)
async def test_wrong_method_on_an_openai_route_is_json_405_with_allow(
    http: httpx.AsyncClient, method: str, path: str, allow: set[str]
) -> None:
    """A method the route does not serve is a 405 with OpenAI's body and an Allow header."""
    response = await http.request(method, path)
    assert response.status_code == 405
    assert set(response.headers["allow"].replace(" ", "").split(",")) == allow
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "method_not_allowed",
        None,
    )


async def test_wrong_method_on_a_native_route_names_every_allowed_method(
    http: httpx.AsyncClient,
) -> None:
    """PUT /v1/generate is a native 405 whose Allow lists both GET and POST."""
    response = await http.put("/v1/generate", json={})
    assert response.status_code == 405
    assert {"GET", "POST"} <= set(response.headers["allow"].replace(" ", "").split(","))
    assert response.json()["error"]["code"] == "METHOD_NOT_ALLOWED"


@pytest.mark.parametrize("path", ["/", "/static/app.js"])
async def test_the_page_and_its_files_carry_a_content_security_policy(
    http: httpx.AsyncClient, path: str
) -> None:
    """The page and its files come with a policy that loads from the edge alone and lets no
    other page frame them, and with nosniff."""
    response = await http.get(path)
    assert response.status_code == 200
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    assert response.headers["x-content-type-options"] == "nosniff"


async def test_api_answers_carry_nosniff(http: httpx.AsyncClient) -> None:
    """API answers (here /v1/models and a 404) are never sniffed into another content type."""
    for path in ("/v1/models", "/v1/nothing"):
        response = await http.get(path)
        assert response.headers["x-content-type-options"] == "nosniff", path
