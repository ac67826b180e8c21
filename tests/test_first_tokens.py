"""A prefill's first tokens leave before the next decode forward takes the CPU."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import start_server
from tests.fakes import CountingModel
from tokenwire.server.config import BUNDLED_MODEL_DIR
from tokenwire.server.domain import GenerationRequest, TokenEvent
from tokenwire.server.engine import scheduler
from tokenwire.server.engine.logits import Logits
from tokenwire.server.engine.mailbox import Mailbox, publish_all
from tokenwire.server.engine.types import CacheTensor, IntArray
from tokenwire.server.tokenizer import Tokenizer


class _WatchedDecode(CountingModel):
    """Notes, as each decode forward starts, its rows and whether the consumer had its first
    token."""

    def __init__(self, model_dir: Path, **options: Any) -> None:
        self.received = threading.Event()
        self.seen_at_decode: list[bool] = []
        self.decode_rows: list[int] = []
        super().__init__(model_dir, **options)

    def forward(
        self, input_ids: IntArray, attention_mask: IntArray, *args: Any, **kwargs: Any
    ) -> tuple[Logits, Sequence[CacheTensor]]:
        if kwargs.get("decode"):
            self.decode_rows.append(len(input_ids))
            self.seen_at_decode.append(self.received.is_set())
        return super().forward(input_ids, attention_mask, *args, **kwargs)


async def test_on_the_cpu_the_first_decode_waits_until_the_first_token_is_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the CPU provider the decode forward right after a prefill starts once the consumer
    has run with the prefill's first token (the wait is bounded; here by 10 s)."""
    monkeypatch.setattr(scheduler, "FIRST_TOKEN_WAIT_S", 10.0)
    model = _WatchedDecode(BUNDLED_MODEL_DIR, provider="cpu")
    running = await start_server(model, Tokenizer.from_dir(BUNDLED_MODEL_DIR))
    try:
        handle = running.engine.submit(
            GenerationRequest("one", "Hello", max_tokens=4, ignore_eos=True)
        )
        async for event in handle.events():
            if isinstance(event, TokenEvent):
                model.received.set()
    finally:
        await running.server.drain()
    assert model.seen_at_decode[0]


async def test_a_prefill_beside_running_streams_does_not_hold_their_decode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request that joins running streams gets no wait for its first token: the decode
    forward of the step that prefilled it starts at once, for every row alike."""
    monkeypatch.setattr(scheduler, "FIRST_TOKEN_WAIT_S", 10.0)
    model = _WatchedDecode(BUNDLED_MODEL_DIR, provider="cpu")
    running = await start_server(model, Tokenizer.from_dir(BUNDLED_MODEL_DIR))
    engine = running.engine
    try:
        first = engine.submit(GenerationRequest("one", "Hello", max_tokens=200, ignore_eos=True))
        await anext(first.events())
        model.decode_rows.clear()
        model.seen_at_decode.clear()
        joining = engine.submit(GenerationRequest("two", "Hi", max_tokens=4, ignore_eos=True))
        async for event in joining.events():
            if isinstance(event, TokenEvent):
                model.received.set()
        async for _ in first.events():
            pass
    finally:
        await running.server.drain()
    assert not model.seen_at_decode[model.decode_rows.index(2)]


def test_handing_over_is_reported_once_the_consumer_has_run() -> None:
    """publish_all sets its event after the consumer woken by the delivery has taken it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        mailbox = asyncio.run_coroutine_threadsafe(_mailbox(), loop).result(5)
        taken: list[object] = []
        consumer = asyncio.run_coroutine_threadsafe(_take_one(mailbox, taken), loop)
        handed = threading.Event()
        publish_all([(mailbox, [TokenEvent(token_id=1, text="a", index=0)])], handed)
        assert handed.wait(5)
        assert len(taken) == 1
        consumer.result(5)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_handing_over_to_a_closed_loop_is_reported_at_once() -> None:
    """With no loop left to take the events, publish_all sets its event straight away."""
    loop = asyncio.new_event_loop()
    mailbox = Mailbox(loop)
    loop.close()
    handed = threading.Event()
    publish_all([(mailbox, [TokenEvent(token_id=1, text="a", index=0)])], handed)
    assert handed.is_set()


async def _mailbox() -> Mailbox:
    return Mailbox(asyncio.get_running_loop())


async def _take_one(mailbox: Mailbox, taken: list[object]) -> None:
    async for event in mailbox.events():
        taken.append(event)
        return
