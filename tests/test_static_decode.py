"""Decode steps on fixed bindings (the steps CUDA replays as graphs), run on the CPU provider."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tokenwire.server.domain import GenerationRequest, SamplingParams, TokenEvent
from tokenwire.server.engine import Engine, EngineConfig, OnnxCausalLM
from tokenwire.server.engine.static_decode import StaticDecode
from tokenwire.server.tokenizer import Tokenizer

GENAI_FP32 = Path(__file__).resolve().parent.parent / "models" / "fixtures-genai" / "llama-fp32"


async def _greedy(model: OnnxCausalLM, prompt: tuple[int, ...], new: int) -> list[int]:
    engine = Engine(model, Tokenizer.from_dir(GENAI_FP32), EngineConfig(max_batch_size=1))
    engine.start()
    request = GenerationRequest(
        "fixed",
        "",
        prompt_ids=prompt,
        max_tokens=new,
        sampling=SamplingParams(temperature=0.0),
        ignore_eos=True,
    )
    try:
        events = engine.submit(request).events()
        return [e.token_id async for e in events if isinstance(e, TokenEvent)]
    finally:
        engine.shutdown()


async def test_a_growing_row_is_decoded_on_one_binding_per_power_of_two_width() -> None:
    """A row whose attention grows from 31 to 69 entries runs on two fixed bindings (mask
    widths 64 and 128): not one per length, and not the whole 512-entry capacity; its greedy
    ids equal those of steps bound afresh each time."""
    prompt = tuple(range(10, 40))
    fixed = OnnxCausalLM(GENAI_FP32, provider="cpu", intra_op_threads=1, static_decode=True)
    plain = OnnxCausalLM(GENAI_FP32, provider="cpu", intra_op_threads=1, static_decode=False)
    ids = await _greedy(fixed, prompt, 40)
    assert fixed.decode_graphs == 2
    assert ids == await _greedy(plain, prompt, 40)


async def test_the_cpu_provider_captures_nothing_and_binds_per_step_by_default() -> None:
    """CUDA graphs asked for on the CPU provider change nothing: no capture, and decode steps
    keep the per-step bindings (their mask only as wide as the longest row)."""
    model = OnnxCausalLM(GENAI_FP32, provider="cpu", intra_op_threads=1, cuda_graph=True)
    assert len(await _greedy(model, tuple(range(10, 20)), 8)) == 8
    assert not model.captures_graphs
    assert model.decode_graphs == 0


async def test_decode_logits_kept_per_row_count_give_each_row_its_own_ids() -> None:
    """Two rows decoded together, then one after the other leaves, read their logits from host
    arrays kept per row count (2, then 1), and each row's greedy ids equal its ids alone."""
    model = OnnxCausalLM(GENAI_FP32, provider="cpu", intra_op_threads=1)
    engine = Engine(model, Tokenizer.from_dir(GENAI_FP32), EngineConfig(max_batch_size=2))
    engine.start()
    prompts, lengths = (tuple(range(10, 30)), tuple(range(50, 62))), (6, 14)

    async def one(i: int) -> list[int]:
        request = GenerationRequest(
            f"row{i}",
            "",
            prompt_ids=prompts[i],
            max_tokens=lengths[i],
            sampling=SamplingParams(temperature=0.0),
            ignore_eos=True,
        )
        events = engine.submit(request).events()
        return [e.token_id async for e in events if isinstance(e, TokenEvent)]

    try:
        together = await asyncio.gather(one(0), one(1))
    finally:
        engine.shutdown()
    assert model.host_logits_rows == [1, 2]
    alone = OnnxCausalLM(GENAI_FP32, provider="cpu", intra_op_threads=1)
    assert together == [await _greedy(alone, prompts[i], lengths[i]) for i in range(2)]


async def test_a_step_onnx_runtime_refuses_on_fixed_bindings_runs_on_bindings_per_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fixed-binding step that ONNX Runtime refuses at run time (a CUDA graph it cannot
    capture) runs again on bindings made per step, from then on: requests get the greedy ids
    they get without fixed bindings, instead of all failing at their first decode step."""
    prompt = tuple(range(10, 20))
    plain = OnnxCausalLM(GENAI_FP32, provider="cpu", intra_op_threads=1, static_decode=False)
    expected = await _greedy(plain, prompt, 8)
    refusals = []

    def refuse(self: StaticDecode, *args: object) -> object:
        refusals.append(self)
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : operation not permitted when capturing")

    monkeypatch.setattr(StaticDecode, "run", refuse)
    fixed = OnnxCausalLM(GENAI_FP32, provider="cpu", intra_op_threads=1, static_decode=True)
    assert [await _greedy(fixed, prompt, 8) for _ in range(2)] == [expected, expected]
    assert len(refusals) == 1
