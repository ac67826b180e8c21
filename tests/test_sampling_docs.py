"""What the wire contract and the edge say about sampling is what the code does.

Each test reads the sentence a reader relies on (a field's comment in the .proto, the edge's
account of the fields it reads) and checks the behaviour it describes on the real sampler or
the edge's own tables.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from tokenwire.edge import openai_request
from tokenwire.server.domain import SamplingParams
from tokenwire.server.engine.sampling import Sampler

PROTO = Path(__file__).resolve().parent.parent / "protos" / "tokenwire" / "v1" / "generate.proto"


def _comment(field: str) -> str:
    """The comment lines right above the declaration of `field` in SamplingParams."""
    lines = PROTO.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if re.search(rf"\b{field} = \d+;", line))
    above: list[str] = []
    for line in reversed(lines[:at]):
        if not line.strip().startswith("//"):
            break
        above.insert(0, line.strip().removeprefix("//").strip())
    return " ".join(above)


def _drawn(logits: np.ndarray, params: SamplingParams, n: int = 300) -> set[int]:
    sampler = Sampler(params)
    return {sampler.choose(logits, index=i) for i in range(n)}


def test_top_k_keeps_the_tokens_tied_with_the_kth_as_its_comment_says() -> None:
    """The proto says top_k keeps the tokens tied with the k-th; with top_k=1 and the two best
    tokens tied, both are drawn."""
    assert "tied with the k-th" in _comment("top_k")
    logits = np.log(np.asarray([0.4, 0.4, 0.2], dtype=np.float32))
    assert _drawn(logits, SamplingParams(temperature=1.0, top_k=1, seed=3)) == {0, 1}


def test_min_p_applies_after_temperature_as_its_comment_says() -> None:
    """The proto says min_p compares probabilities after temperature: a token 0.25 times as
    likely as the best at temperature 1 is kept by min_p 0.1, and dropped at temperature 0.5
    (0.0625 times as likely)."""
    assert "temperature" in _comment("min_p")
    logits = np.log(np.asarray([0.8, 0.2], dtype=np.float32))
    assert _drawn(logits, SamplingParams(temperature=1.0, min_p=0.1, seed=4)) == {0, 1}
    assert _drawn(logits, SamplingParams(temperature=0.5, min_p=0.1, seed=4)) == {0}


def test_the_edge_names_only_idle_fields_as_accepted_at_one_value() -> None:
    """The fields openai_request's docstring gives as accepted only at the value that asks for
    nothing are such fields, not honoured ones (presence_penalty is honoured)."""
    doc = openai_request.__doc__ or ""
    sentence = doc[doc.index("accepted at the one value") :].split(")")[0]
    named = re.findall(r"`(\w+): ", sentence)
    idle = {name for fields in openai_request.IDLE_BY_ROUTE.values() for name in fields}
    assert named
    assert set(named) <= idle
    assert not set(named) & openai_request.HONOURED
