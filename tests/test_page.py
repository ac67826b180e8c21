"""The browser page, driven in headless Chromium against the real edge and server."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright

from tests.conftest import RunningEdge, RunningServer, eventually, start_edge, start_server
from tests.fakes import ScriptedModel
from tokenwire.server.engine import ModelSpec
from tokenwire.server.tokenizer import Tokenizer

DOCS = Path(__file__).resolve().parent.parent / "docs"
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


async def _open(browser: Browser, edge: RunningEdge) -> Page:
    page = await browser.new_page(viewport={"width": 1100, "height": 820})
    await page.goto(edge.url + "/")
    return page


async def test_tokens_appear_with_stats_and_finish(
    browser: Browser, edge: RunningEdge, tmp_path: Path
) -> None:
    """Generate streams text into the page, then shows TTFT, tokens/s, finish reason and usage.

    The screenshot goes to a temporary folder, or to docs/screenshot.png when
    TOKENWIRE_UPDATE_SCREENSHOT=1 asks for the documentation's picture to be refreshed."""
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
    refresh = os.environ.get("TOKENWIRE_UPDATE_SCREENSHOT") == "1"
    shot = DOCS / "screenshot.png" if refresh else tmp_path / "screenshot.png"
    await page.screenshot(path=str(shot))
    assert shot.stat().st_size > 0


async def test_stop_button_cancels_the_generation(
    browser: Browser, spec: ModelSpec, tokenizer: Tokenizer
) -> None:
    """Stop during a long generation ends it in the page and frees the server's slot."""
    prompt = "loop"
    endless = [tokenizer.encode(" x")[0]] * 450
    model = ScriptedModel.continuing(spec, len(tokenizer.encode(prompt)), endless, 0.01)
    server: RunningServer = await start_server(model, tokenizer)
    edge = await start_edge(server.target)
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
