"""Choosing each row's next token from a step's logits.

Plain greedy rows take one argmax over the batch (computed where the logits are: on the
device for a replayed CUDA step, see logits.py); the whole distribution reaches the host only
when some row samples or reports logprobs. The rows that sample are drawn together in one pass
(sampling.sample). A row whose choice or text fails ends with an error and the others go on.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import structlog

from tokenwire.server.domain import TopLogprob
from tokenwire.server.engine.logits import Logits
from tokenwire.server.engine.sampling import (
    Scores,
    log_normaliser,
    log_softmax_at,
    sample,
    top_logprobs,
)
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
        if all(seq.plain and not seq.needs_scores for seq in rows):
            # The common step: one argmax serves every row, and nothing else is read.
            for seq, token in zip(rows, logits.argmax(self._vocab).tolist(), strict=True):
                try:
                    seq.accept(token, None, now, ())
                except Exception as exc:  # one request's text must not fail the others
                    log.exception("engine.sample_failed", request_id=seq.request_id)
                    seq.fail("sampling failed", exc)
            return
        # One argmax serves every plain greedy row.
        argmax = logits.argmax(self._vocab).tolist() if any(s.plain for s in rows) else None
        # The whole distribution reaches the host only when some row samples or reports it.
        wanted = any(seq.needs_scores for seq in rows)
        scores = logits.host()[:, : self._vocab] if wanted else None
        chosen: dict[int, int | Exception] = {}
        if scores is not None:
            chosen = self._chosen_from_scores(rows, scores)
        for i, seq in enumerate(rows):
            try:
                choice = chosen.get(i)
                if isinstance(choice, Exception):
                    raise choice
                if choice is None:
                    assert argmax is not None  # a plain greedy row: the step's argmax is made
                    token = argmax[i]
                else:
                    token = choice
                if scores is None:
                    seq.accept(token, None, now, ())
                    continue
                row, request = scores[i], seq.request
                if not (request.logprobs or request.top_logprobs):
                    seq.accept(token, None, now, ())
                    continue
                norm = log_normaliser(row)  # once per row, for its logprob and alternatives
                logprob = log_softmax_at(row, token, norm) if request.logprobs else None
                seq.accept(token, logprob, now, self._alternatives(seq, row, norm))
            except Exception as exc:  # one request's sampling or text must not fail others
                log.exception("engine.sample_failed", request_id=seq.request_id)
                seq.fail("sampling failed", exc)

    def _chosen_from_scores(
        self, rows: list[Sequence], scores: FloatArray
    ) -> dict[int, int | Exception]:
        """The token (or the error) of every row that is not plain greedy, by row index: its
        scores adjusted row by row in one float64 copy, the sampling rows then drawn in one
        pass."""
        chosen: dict[int, int | Exception] = {}
        picked = [i for i, seq in enumerate(rows) if not seq.plain]
        if not picked:
            return chosen
        adjusted = scores if len(picked) == len(rows) else scores[picked]
        # Rows that only sample are drawn from the float32 logits as they are (a float64 copy
        # draws the same); bias, penalties, suppression or non-finite logits need the copy.
        copy = not np.isfinite(adjusted).all() or any(
            rows[i].sampler.changes_scores or rows[i].suppressed for i in picked
        )
        if copy:
            adjusted = adjusted.astype(np.float64)
        drawing: list[int] = []
        for j, i in enumerate(picked):
            seq = rows[i]
            try:
                if copy:
                    seq.sampler.adjust(adjusted[j], seq.prompt_ids, seq.generated, seq.suppressed)
            except Exception as exc:
                chosen[i] = exc
                continue
            if seq.request.sampling.greedy:
                chosen[i] = int(adjusted[j].argmax())
            else:
                drawing.append(j)
        if drawing:
            at = [picked[j] for j in drawing]
            some = adjusted if len(drawing) == len(picked) else adjusted[drawing]
            chosen.update(self._draw([rows[i] for i in at], some, at))
        return chosen

    @staticmethod
    def _draw(
        rows: list[Sequence], adjusted: Scores | FloatArray, at: list[int]
    ) -> dict[int, int | Exception]:
        """One pass over all sampling rows (row k is rows[k], step row at[k]); should it fail,
        each row alone, so that only the row that breaks it fails."""
        samplers = [seq.sampler for seq in rows]
        indices = [len(seq.generated) for seq in rows]
        try:
            return dict(zip(at, sample(adjusted, samplers, indices), strict=True))
        except Exception:
            log.warning("engine.batched_sampling_failed", rows=len(rows))
        alone: dict[int, int | Exception] = {}
        for k, i in enumerate(at):
            try:
                alone[i] = sample(adjusted[k : k + 1], samplers[k : k + 1], indices[k : k + 1])[0]
            except Exception as exc:
                alone[i] = exc
        return alone

    def _alternatives(
        self, seq: Sequence, row: FloatArray, normaliser: float
    ) -> tuple[TopLogprob, ...]:
        if not seq.request.top_logprobs:
            return ()
        return tuple(
            # The bytes from the row's own text pipeline, as its chosen token's (Sequence.accept).
            TopLogprob(
                token_id, logprob, self._token_text(token_id), seq.text.token_bytes(token_id)
            )
            for token_id, logprob in top_logprobs(row, seq.request.top_logprobs, normaliser)
        )
