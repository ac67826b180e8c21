"""Single rows padded to two: on a CPU whose one-row MatMulNBits kernel rounds otherwise than
its batched one, no forward of an int4 graph computes one position of one row (a lone row's
decode step, a one-token prompt, a prompt's last one-token chunk, a continuation's ids fed one
per forward): each runs beside a scratch row, so a request is computed as in any batch.

The padding is forced here (pad_single_rows), so that it is tested on every CPU; whether the
load chooses it is the probe's (test_model_loading, test_model_families)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.fakes import CountingModel
from tokenwire.server.domain import (
    CompletionEvent,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from tokenwire.server.engine import Engine, EngineConfig
from tokenwire.server.tokenizer import Tokenizer

INT4 = Path(__file__).resolve().parent.parent / "models" / "fixtures-genai" / "llama-int4"


def _request(
    name: str, prompt: tuple[int, ...], continuation: tuple[int, ...] = ()
) -> GenerationRequest:
    return GenerationRequest(
        name,
        "",
        prompt_ids=prompt,
        max_tokens=12,
        sampling=SamplingParams(temperature=0.0),
        ignore_eos=True,
        continuation=continuation,
    )


async def _ids(engine: Engine, request: GenerationRequest) -> list[int]:
    events = [event async for event in engine.submit(request).events()]
    assert isinstance(events[-1], CompletionEvent)
    return [e.token_id for e in events if isinstance(e, TokenEvent)]


async def test_no_forward_computes_one_position_of_one_row_where_single_rows_are_padded() -> None:
    """A one-token prompt alone, a 9-token prompt prefilled in chunks of 4 (its last chunk
    one token) beside it, a lone row's decode steps and a continuation fed one id per
    forward: every forward the engine runs computes two positions or more."""
    model = CountingModel(INT4, provider="cpu", intra_op_threads=1, pad_single_rows=True)
    engine = Engine(model, Tokenizer.from_dir(INT4), EngineConfig(prefill_chunk_tokens=4))
    engine.start()
    try:
        one = (96,)
        nine = (164, 162, 210, 41, 287, 159, 54, 246, 206)
        await asyncio.gather(
            _ids(engine, _request("one", one)), _ids(engine, _request("nine", nine))
        )
        whole = await _ids(engine, _request("alone", nine))
        await _ids(engine, _request("rest", nine, tuple(whole[:5])))
    finally:
        engine.shutdown()
    assert model.prefills
    assert model.decodes
    assert min(model.positions) == 2
