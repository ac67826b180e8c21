"""Choosing each row's next token from a step's logits.

Plain greedy rows take one argmax over the batch (computed where the logits are: on the
device for a replayed CUDA step, see logits.py); the whole distribution reaches the host only
when some row samples or reports logprobs. A row whose choice or text fails ends with an error
and the others go on.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from tokenwire.server.domain import TopLogprob
from tokenwire.server.engine.logits import Logits
from tokenwire.server.engine.sampling import log_softmax_at, top_logprobs
from tokenwire.server.engine.sequence import Sequence
from tokenwire.server.engine.types import FloatArray

log = structlog.get_logger("tokenwire.engine")


class TokenChooser:
    """Picks tokens for the rows of a step; ids at or past vocab_limit (padded embedding rows)
    are never chosen."""

    def __init__(self, vocab_limit: int, token_text: Callable[[int], str]) -> None:
        self._vocab = vocab_limit
        self._token_text = token_text

    def choose(self, rows: list[Sequence], logits: Logits, now: float) -> None:
        """Choose each row's next token from the step's logits (row i is rows[i]) and hand it
        to its sequence; a row whose choice fails ends with an error, the others go on."""
        # Padded embedding rows past the tokenizer's vocabulary are never sampled.
        argmax = logits.argmax(self._vocab)  # one pass serves every plain greedy row
        # The whole distribution reaches the host only when some row samples or reports it.
        scores = logits.host()[:, : self._vocab] if any(map(_needs_scores, rows)) else None
        for i, seq in enumerate(rows):
            try:
                suppress = seq.suppressed
                if seq.request.sampling.plain_greedy and not suppress:
                    token = int(argmax[i])
                else:
                    assert scores is not None  # such a row needs the scores
                    token = seq.sampler.choose(
                        scores[i],
                        index=len(seq.generated),
                        prompt=seq.prompt_ids,
                        generated=seq.generated,
                        suppress=suppress,
                    )
                if scores is None:
                    seq.accept(token, None, now, ())
                    continue
                row = scores[i]
                logprob = log_softmax_at(row, token) if seq.request.logprobs else None
                seq.accept(token, logprob, now, self._alternatives(seq, row))
            except Exception as exc:  # one request's sampling or text must not fail others
                log.exception("engine.sample_failed", request_id=seq.request_id)
                seq.fail("sampling failed", exc)

    def _alternatives(self, seq: Sequence, row: FloatArray) -> tuple[TopLogprob, ...]:
        if not seq.request.top_logprobs:
            return ()
        return tuple(
            TopLogprob(token_id, logprob, self._token_text(token_id))
            for token_id, logprob in top_logprobs(row, seq.request.top_logprobs)
        )


def _needs_scores(seq: Sequence) -> bool:
    """Whether a row needs the step's whole distribution, not just its argmax."""
    request = seq.request
    plain = request.sampling.plain_greedy and not seq.suppressed
    return not plain or bool(request.logprobs) or bool(request.top_logprobs)
