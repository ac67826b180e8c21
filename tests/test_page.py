"""The browser page, driven in headless Chromium against the real edge and server."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from httpx_sse import aconnect_sse
from playwright.async_api import Browser, Page, Route, async_playwright

from tests.conftest import RunningEdge, RunningServer, eventually, start_edge, start_server
from tests.fakes import ScriptedModel
from tokenwire.server.engine import ModelSpec
from tokenwire.server.tokenizer import Tokenizer

CHECKOUT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium")
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if CHROMIUM is None:
        pytest.fail("Chromium is missing: install the Debian package `chromium` (make test does)")
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        await browser.close()


async def _open(
    browser: Browser, edge: RunningEdge, *, csp: bool = False, console: list[str] | None = None
) -> Page:
    """The edge's page in a new tab. The tests' own probes (wait_for_function) are scripts the
    page's content security policy forbids, so the policy is off unless `csp`. `console`
    collects the page's errors and warnings ("error: ..."), from before it starts loading."""
    page = await browser.new_page(viewport={"width": 1100, "height": 820}, bypass_csp=not csp)
    if console is not None:
        page.on(
            "console",
            lambda message: (
                console.append(f"{message.type}: {message.text}")
                if message.type in ("error", "warning")
                else None
            ),
        )
    await page.goto(edge.url + "/")
    return page


async def test_the_page_runs_under_its_content_security_policy(
    browser: Browser, edge: RunningEdge
) -> None:
    """With the edge's content security policy in force, the page loads (its icon included)
    and its own script streams a generation to its end, and from the first byte of the page on
    the browser reports no error or warning: no violation of the policy, no failed load."""
    console: list[str] = []
    page = await _open(browser, edge, csp=True, console=console)
    await page.fill("#prompt", "def fib(n):")
    await page.fill("#max_tokens", "8")
    await page.click("#generate")
    for _ in range(300):
        if await page.text_content("#status") == "done":
            break
        await asyncio.sleep(0.1)
    assert await page.text_content("#status") == "done"
    assert await page.text_content("#output")
    assert console == []


async def test_tokens_appear_with_stats_and_finish(
    browser: Browser, edge: RunningEdge, tmp_path: Path
) -> None:
    """Generate streams text into the page, then shows TTFT, tokens/s, finish reason and usage.

    The page's screenshot goes to a temporary folder, or to the file that
    TOKENWIRE_UPDATE_SCREENSHOT names (an absolute path outside the checkout: a test writes
    nothing in the tree). To refresh the README's picture by hand, run this test with
    TOKENWIRE_UPDATE_SCREENSHOT=/tmp/screenshot.png, then
    `cp /tmp/screenshot.png docs/screenshot.png`."""
    page = await _open(browser, edge)
    await page.fill("#prompt", "def fib(n):")
    await page.fill("#max_tokens", "48")
    await page.fill("#temperature", "0")
    await page.click("#generate")
    await page.wait_for_function("document.getElementById('finish').textContent !== '\u2013'")
    output = await page.text_content("#output")
    assert output
    assert (await page.text_content("#finish")) in {"length", "stop"}
    assert (await page.text_content("#ttft") or "").endswith("ms")
    assert (await page.text_content("#status")) == "done"
    assert "+" in (await page.text_content("#usage") or "")
    shot = _screenshot_path(tmp_path)
    await page.screenshot(path=str(shot))
    assert shot.stat().st_size > 0


def _screenshot_path(tmp_path: Path) -> Path:
    """Where the screenshot goes: TOKENWIRE_UPDATE_SCREENSHOT's file, else tmp_path."""
    asked = os.environ.get("TOKENWIRE_UPDATE_SCREENSHOT")
    if not asked:
        return tmp_path / "screenshot.png"
    path = Path(asked)
    if not path.is_absolute() or path.resolve().is_relative_to(CHECKOUT):
        pytest.fail(
            f"TOKENWIRE_UPDATE_SCREENSHOT={asked!r}: name an absolute path outside the checkout "
            "(e.g. /tmp/screenshot.png), then copy it to docs/screenshot.png yourself"
        )
    return path


LOOP = "loop"


async def _looping(
    spec: ModelSpec, tokenizer: Tokenizer, **overrides: object
) -> tuple[RunningServer, RunningEdge]:
    """A server whose model answers LOOP with 450 tokens, one every 10 ms, and its edge."""
    endless = [tokenizer.encode(" x")[0]] * 450
    model = ScriptedModel.continuing(spec, len(tokenizer.encode(LOOP)), endless, 0.01)
    server = await start_server(model, tokenizer, **overrides)
    return server, await start_edge(server.target)


async def test_stop_button_cancels_the_generation(
    browser: Browser, spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """Stop during a long generation ends it in the page and frees the server's slot."""
    prompt = LOOP
    server, edge = await _looping(spec, tokenizer)
    try:
        page = await _open(browser, edge)
        await page.fill("#prompt", prompt)
        await page.fill("#max_tokens", "450")
        await page.click("#generate")
        await page.wait_for_function("document.getElementById('output').textContent.length > 10")
        await page.click("#stop_button")
        await page.wait_for_function("document.getElementById('status').textContent === 'stopped'")
        freed = await eventually(lambda: server.engine.active_count == 0, within_s=2)
        shown = await page.text_content("#finish")
    finally:
        await edge.edge.stop()
        await server.server.drain()
    assert freed
    assert shown == "cancelled"


SSE = (
    'id: r:1\r\nevent: token\r\ndata: {"text":"a","id":1,"index":0}\r\n\r\n'
    ": a comment\r\n"
    'id: r:2\r\nevent: token\r\ndata: {"text":"\u00e9\u00e8","id":2,"index":1}\r\n\r\n'
    'id: r:3\r\nevent: done\r\ndata: {"finish_reason":"length","stop_sequence":""}\r\n\r\n'
)
READ_IN_PIECES = """async ([text, size]) => {
  const bytes = new TextEncoder().encode(text);
  const stream = new ReadableStream({
    start(controller) {
      for (let i = 0; i < bytes.length; i += size) controller.enqueue(bytes.slice(i, i + size));
      controller.close();
    },
  });
  const events = [];
  await readEvents(new Response(stream), (ev) => events.push([ev.event, ev.id, ev.data]));
  return events;
}"""


async def test_events_cut_anywhere_by_the_network_parse_alike(
    browser: Browser, edge: RunningEdge
) -> None:
    """The page reads the same events whatever sizes the network cuts the body into, a cut
    between the \\r and \\n of a line end, or inside a character, included."""
    page = await _open(browser, edge)
    whole = await page.evaluate(READ_IN_PIECES, [SSE, len(SSE.encode())])
    assert [event for event, _, _ in whole] == ["token", "token", "done"]
    for size in (1, 2, 3, 7, 37):
        assert await page.evaluate(READ_IN_PIECES, [SSE, size]) == whole, size


async def test_stop_before_the_first_event_cancels_the_request(
    browser: Browser, spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """Stop while the request still waits in the server's queue cancels it there: it never
    takes the slot when the slot frees (the page names its request id itself)."""
    prompt = LOOP
    server, edge = await _looping(spec, tokenizer, max_batch_size=1)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            body = {"prompt": prompt, "max_tokens": 450}
            async with aconnect_sse(
                http, "POST", "/v1/generate", json=body, headers={"X-Request-ID": "occupier"}
            ) as occupier:
                await anext(occupier.aiter_sse())  # the one slot is taken
                page = await _open(browser, edge)
                await page.fill("#prompt", prompt)
                await page.fill("#max_tokens", "450")
                await page.click("#generate")
                assert await eventually(lambda: server.engine.waiting_count == 1, within_s=5)
                await page.click("#stop_button")
                await http.post("/v1/generate/occupier/cancel", json={})
            idle = await eventually(lambda: server.engine.active_count == 0, within_s=1)
    finally:
        await edge.edge.stop()
        await server.server.drain()
    assert idle


async def test_a_stream_cut_again_and_again_still_completes(
    browser: Browser, edge: RunningEdge
) -> None:
    """A stream whose every connection breaks after a few events resumes as often as it takes:
    only drops in a row that bring no event make the page give up."""
    page = await _open(browser, edge)
    cuts = 0

    async def cut_short(route: Route) -> None:
        nonlocal cuts
        response = await route.fetch()
        events = (await response.body()).split(b"\n\n")
        cuts += len(events) > 5
        await route.fulfill(response=response, body=b"\n\n".join(events[:4]) + b"\n\n")

    await page.route("**/v1/generate**", cut_short)
    assert await _sixty_greedy_tokens(page) == ("done", "60")
    assert cuts >= 10


async def _sixty_greedy_tokens(page: Page) -> tuple[str | None, str | None]:
    """Generate 60 greedy tokens on the page: its status and token count once settled."""
    await page.fill("#prompt", "def fib(n):")
    await page.fill("#max_tokens", "60")
    await page.fill("#temperature", "0")
    await page.click("#generate")
    return await _settled(page)


UNREACHABLE = (
    b'event: error\ndata: {"code":"UNAVAILABLE","status":503,'
    b'"message":"the resume store is unavailable"}'
)
"""The error event an edge makes up (no id) when its resume store is out of reach."""


async def test_an_edge_error_without_an_id_is_resumed_past(
    browser: Browser, edge: RunningEdge
) -> None:
    """A connection that ends with the edge's own 503 `error` (no id: the resume store was out
    of reach) is resumed from the last event, as a dropped one is: the stream completes."""
    page = await _open(browser, edge)
    cut = False

    async def store_out_of_reach(route: Route) -> None:
        nonlocal cut
        if cut:
            await route.continue_()
            return
        cut = True
        response = await route.fetch()
        events = (await response.body()).split(b"\n\n")
        await route.fulfill(response=response, body=b"\n\n".join([*events[:3], UNREACHABLE, b""]))

    await page.route("**/v1/generate**", store_out_of_reach)
    assert await _sixty_greedy_tokens(page) == ("done", "60")


async def test_a_late_cancel_answer_does_not_touch_the_next_run(
    browser: Browser, spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """Stop ends the run on the page at once; its cancel's answer, however late, does not mark
    the run started after it as stopped or cancelled."""
    prompt = LOOP
    server, edge = await _looping(spec, tokenizer)
    next_run_done = asyncio.Event()
    try:
        page = await _open(browser, edge)

        async def late_cancel(route: Route) -> None:
            # The cancel reaches the edge only once the next run is done: its answer is late.
            await next_run_done.wait()
            await route.continue_()

        await page.route("**/cancel", late_cancel)
        await page.fill("#prompt", prompt)
        await page.fill("#max_tokens", "450")
        await page.click("#generate")
        await page.wait_for_function("document.getElementById('output').textContent.length > 10")
        async with page.expect_response("**/cancel") as cancel_answer:
            await page.click("#stop_button")
            stopped = await page.text_content("#status")
            await page.fill("#max_tokens", "5")
            await page.click("#generate")
            await page.wait_for_function("document.getElementById('status').textContent === 'done'")
            next_run_done.set()
        await (await cancel_answer.value).finished()
        # One more turn of the page's event loop: any reaction to the answer has run.
        await page.evaluate("() => new Promise((resolve) => setTimeout(resolve, 0))")
        after = (await page.text_content("#status"), await page.text_content("#finish"))
    finally:
        next_run_done.set()
        await edge.edge.stop()
        await server.server.drain()
    assert stopped == "stopped"
    assert after == ("done", "length")


FORWARDED = ("content-type", "accept", "authorization", "x-request-id", "last-event-id")


async def _reach_the_edge(route: Route, edge: RunningEdge) -> httpx.Response:
    """Send the page's request on to the edge and close the connection once the edge's answer
    has begun, before its first event: the edge has the stream, and the server goes on
    generating it. The answer's status and headers are returned."""
    request = route.request
    headers = {name: value for name, value in request.headers.items() if name in FORWARDED}
    async with httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
        path = request.url.removeprefix(edge.url)
        sent = http.build_request(
            request.method, path, headers=headers, content=request.post_data_buffer
        )
        response = await http.send(sent, stream=True)
        await response.aclose()
    return response


async def _headers_only(route: Route, edge: RunningEdge) -> None:
    """The page's request reaches the edge, and the page gets the answer's status and content
    type alone, as from a proxy that closes the connection before the first event."""
    response = await _reach_the_edge(route, edge)
    await route.fulfill(
        status=response.status_code,
        headers={"content-type": response.headers["content-type"]},
        body=b"",
    )


async def _settled(page: Page) -> tuple[str | None, str | None]:
    """The page's status and token count once its run is done or has failed."""
    await page.wait_for_function(
        "['done', 'error'].includes(document.getElementById('status').textContent)",
        timeout=20_000,
    )
    return await page.text_content("#status"), await page.text_content("#count")


async def test_a_stream_cut_before_its_first_event_resumes_from_its_start(
    browser: Browser, edge: RunningEdge
) -> None:
    """A connection that breaks before the stream's first event (a proxy passed the answer's
    headers, then closed it) is resumed, not given up: the page replays the stream from its
    first event with GET /v1/generate/{request_id}/events and shows all of it, generated once."""
    page = await _open(browser, edge)
    methods: list[str] = []

    async def cut_the_first_post(route: Route) -> None:
        methods.append(route.request.method)
        if methods == ["POST"]:
            await _headers_only(route, edge)
        else:
            await route.continue_()

    await page.route("**/v1/generate**", cut_the_first_post)
    await page.fill("#prompt", "def fib(n):")
    await page.fill("#max_tokens", "60")
    await page.fill("#temperature", "0")
    await page.click("#generate")
    assert await _settled(page) == ("done", "60")
    assert methods[:2] == ["POST", "GET"]
    assert methods.count("POST") == 1


@pytest.mark.parametrize("reached", [False, True], ids=["lost", "still-opening"])
async def test_a_request_the_edge_does_not_know_yet_is_sent_again_under_its_id(
    browser: Browser, edge: RunningEdge, reached: bool
) -> None:
    """A POST that breaks before its answer leaves the page not knowing whether the edge has the
    stream. Its resume's 404 says the edge does not have it: the page sends the POST again under
    the same request id, which starts the stream where the first never arrived, and is a 409
    where the first is still opening the stream (it never runs twice): the page resumes then."""
    page = await _open(browser, edge)
    answers: list[tuple[str, int]] = []
    page.on(
        "response",
        lambda response: (
            answers.append((response.request.method, response.status))
            if "/v1/generate" in response.url
            else None
        ),
    )

    async def first_post_breaks(route: Route) -> None:
        if reached:
            await _reach_the_edge(route, edge)
        await route.abort("connectionreset")

    async def first_resume_unknown(route: Route) -> None:
        body = {"error": {"code": "NOT_FOUND", "status": 404, "message": "no stream"}}
        await route.fulfill(status=404, json=body)

    await page.route("**/v1/generate", first_post_breaks, times=1)
    if reached:  # the edge's own answer while it opens the stream, which takes longer here
        await page.route("**/events", first_resume_unknown, times=1)
    await page.fill("#prompt", "def fib(n):")
    await page.fill("#max_tokens", "60")
    await page.fill("#temperature", "0")
    await page.click("#generate")
    assert await _settled(page) == ("done", "60")
    if reached:
        assert answers == [("GET", 404), ("POST", 409), ("GET", 200)]
    else:
        assert answers == [("GET", 404), ("POST", 200)]


GONE_EVENT = b'event: error\ndata: {"code":"GONE","status":410,"message":"events dropped"}\n\n'
"""The error event (no id) an edge makes up for a reader whose events are no longer kept."""


@pytest.mark.parametrize("answer", ["refused", "error-event"])
async def test_a_page_that_gives_up_cancels_its_stream(
    browser: Browser, spec: ModelSpec, tokenizer: Tokenizer, answer: str
) -> None:
    """When the page gives up on a stream, here because its resume after a connection broken
    before the first event is refused (410), or answered with the edge's own GONE `error` (no
    id: the events are no longer kept), it shows why and cancels the stream: the server stops
    generating it instead of running on for nobody."""
    server, edge = await _looping(spec, tokenizer)
    cancels: list[str] = []
    try:
        page = await _open(browser, edge)

        async def gone(route: Route) -> None:
            if answer == "refused":
                body = {"error": {"code": "GONE", "status": 410, "message": "events dropped"}}
                await route.fulfill(status=410, json=body)
            else:
                await route.fulfill(status=200, content_type="text/event-stream", body=GONE_EVENT)

        async def cancel(route: Route) -> None:
            cancels.append(route.request.url)
            await route.continue_()

        await page.route("**/v1/generate", lambda route: _headers_only(route, edge))
        await page.route("**/events", gone)
        await page.route("**/cancel", cancel)
        await page.fill("#prompt", LOOP)
        await page.fill("#max_tokens", "450")
        await page.click("#generate")
        settled = await _settled(page)
        shown = await page.text_content("#finish")
        freed = await eventually(lambda: server.engine.active_count == 0, within_s=2)
    finally:
        await edge.edge.stop()
        await server.server.drain()
    assert settled == ("error", "0")
    assert len(cancels) == 1
    assert freed
    assert shown == "error 410: events dropped"


async def _focused(page: Page) -> str:
    return str(await page.evaluate("document.activeElement.id"))


async def test_status_and_finish_are_announced_but_not_each_token(
    browser: Browser, spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """Screen readers hear the status and the finish (an error's message included) politely as
    they change, but not the output token by token: the output is a labelled region, not a live
    one, marked busy while it streams."""
    server, edge = await _looping(spec, tokenizer)
    try:
        page = await _open(browser, edge)
        roles = [
            await page.get_attribute("#status", "role"),
            await page.get_attribute("#finish", "aria-live"),
            await page.get_attribute("#output", "aria-live"),
            await page.get_attribute("#output", "aria-label"),
        ]
        await page.fill("#prompt", LOOP)
        await page.fill("#max_tokens", "450")
        await page.click("#generate")
        await page.wait_for_function("document.getElementById('output').textContent.length > 10")
        streaming = await page.get_attribute("#output", "aria-busy")
        await page.click("#stop_button")
        stopped = await page.get_attribute("#output", "aria-busy")
    finally:
        await edge.edge.stop()
        await server.server.drain()
    assert roles == ["status", "polite", None, "output"]
    assert (streaming, stopped) == ("true", "false")


async def test_focus_stays_on_a_control_and_keys_generate_and_stop(
    browser: Browser, spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """Generate hands the focus to Stop, and Stop, or the run's end, hands it back to Generate:
    it never drops to the page's body. Ctrl+Enter generates and Escape stops, from the prompt
    too, where the focus stays."""
    server, edge = await _looping(spec, tokenizer)
    try:
        page = await _open(browser, edge)
        shortcuts = [
            await page.get_attribute("#generate", "aria-keyshortcuts"),
            await page.get_attribute("#stop_button", "aria-keyshortcuts"),
        ]
        await page.fill("#prompt", LOOP)
        await page.fill("#max_tokens", "450")
        await page.click("#generate")
        after_generate = await _focused(page)
        await page.click("#stop_button")
        after_stop = await _focused(page)

        await page.focus("#prompt")
        await page.keyboard.press("Control+Enter")
        await page.wait_for_function("document.getElementById('output').textContent.length > 10")
        by_key = await page.text_content("#status")
        await page.keyboard.press("Escape")
        stopped_by_key = (await page.text_content("#status"), await _focused(page))

        await page.fill("#max_tokens", "3")
        await page.click("#generate")
        await page.wait_for_function("document.getElementById('status').textContent === 'done'")
        after_the_end = await _focused(page)
        idle = await eventually(lambda: server.engine.active_count == 0, within_s=2)
    finally:
        await edge.edge.stop()
        await server.server.drain()
    assert shortcuts == ["Control+Enter", "Escape"]
    assert (after_generate, after_stop) == ("stop_button", "generate")
    assert by_key == "streaming"
    assert stopped_by_key == ("stopped", "prompt")
    assert after_the_end == "generate"
    assert idle
