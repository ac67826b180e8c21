"""The batch-invariance scenario shared by every model family's tests.

Each prompt runs alone (one at a time), then all of them run together with arrivals chained to
progress, not to time: job i+1 starts once job i has streamed (i % 3) + 1 tokens, so joins land
mid-decode on any machine; the last job (give it the long prompt) joins while the others
decode; token budgets differ, so rows leave at different steps.
"""

from __future__ import annotations

import asyncio
import dataclasses

from tokenwire.server.domain import GenerationRequest, SamplingParams, TokenEvent
from tokenwire.server.engine import Engine

GREEDY = SamplingParams(temperature=0.0)


@dataclasses.dataclass(frozen=True)
class Job:
    prompt: str
    max_tokens: int
    sampling: SamplingParams = GREEDY


@dataclasses.dataclass
class _Chain:
    """Wait for `start`, then open `opens` after `after` tokens (or at the end, if fewer)."""

    start: asyncio.Event
    opens: asyncio.Event
    after: int


async def _run(engine: Engine, name: str, job: Job, chain: _Chain | None = None) -> list[int]:
    if chain is not None:
        await chain.start.wait()
    request = GenerationRequest(
        name, job.prompt, max_tokens=job.max_tokens, sampling=job.sampling, ignore_eos=True
    )
    ids: list[int] = []
    try:
        async for event in engine.submit(request).events():
            if isinstance(event, TokenEvent):
                ids.append(event.token_id)
                if chain is not None and len(ids) >= chain.after:
                    chain.opens.set()
    finally:
        if chain is not None:
            chain.opens.set()
    return ids


async def alone(engine: Engine, jobs: list[Job]) -> list[list[int]]:
    """Each job with the engine to itself."""
    return [await _run(engine, f"alone-{i}", job) for i, job in enumerate(jobs)]


async def at_once(engine: Engine, jobs: list[Job]) -> list[list[int]]:
    """Every job submitted at once: their rows decode side by side for as long as they last."""
    runs = (_run(engine, f"burst-{i}", job) for i, job in enumerate(jobs))
    return list(await asyncio.wait_for(asyncio.gather(*runs), 120))


async def together(engine: Engine, jobs: list[Job]) -> list[list[int]]:
    """Every job in one batch, each joining once the previous one has streamed a few tokens."""
    gates = [asyncio.Event() for _ in range(len(jobs) + 1)]
    gates[0].set()
    tasks = [
        asyncio.create_task(
            _run(engine, f"batch-{i}", job, _Chain(gates[i], gates[i + 1], i % 3 + 1))
        )
        for i, job in enumerate(jobs)
    ]
    return list(await asyncio.wait_for(asyncio.gather(*tasks), 120))
