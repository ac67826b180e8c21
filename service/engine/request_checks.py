"""Checks of a request's token ids against the model's vocabulary, each naming the field (and
the entry) at fault, and the tokenizer's added tokens the model has no row for."""

from __future__ import annotations

import structlog

from tokenwire.server.domain import GenerationRequest, InvalidRequest
from tokenwire.server.engine.spec import ModelLoadError
from tokenwire.server.tokenizer import Tokenizer

log = structlog.get_logger("tokenwire.engine")

MAX_IDS_LOGGED = 16


def check_ids(request: GenerationRequest, vocab: int) -> None:
    """Every token id a request names must be in the vocabulary. A list's entry is named by its
    index, a logit_bias entry by its key (the token id), as its value check names it."""
    named = (
        ("prompt_ids", enumerate(request.prompt_ids)),
        ("stop_token_ids", enumerate(request.stop_token_ids)),
        ("sampling.logit_bias", ((i, i) for i, _ in request.sampling.logit_bias)),
    )
    for field, ids in named:
        for key, token_id in ids:
            if not 0 <= token_id < vocab:
                raise InvalidRequest(
                    f"{field}[{key}]", token_id, f"must be a token id below {vocab}"
                )


def check_encoded(prompt_ids: list[int], beyond: dict[int, str], vocab_size: int) -> None:
    """The prompt's text must not encode to an added token the model has no row for."""
    for token_id in prompt_ids:
        text = beyond.get(token_id)
        if text is not None:
            raise InvalidRequest(
                "prompt",
                text,
                f"holds the token {text!r} (id {token_id}), which the tokenizer has but the "
                f"model's vocabulary of {vocab_size} ids does not",
            )


def check_continuation(continuation: tuple[int, ...], budget: int, vocab: int) -> None:
    """A continuation holds at most the request's budget of ids, each in the vocabulary."""
    if len(continuation) > budget:
        raise InvalidRequest(
            "continuation_ids",
            f"<{len(continuation)} ids>",
            f"must hold at most max_tokens ({budget}) ids",
        )
    for i, token_id in enumerate(continuation):
        if not 0 <= token_id < vocab:
            raise InvalidRequest(
                f"continuation_ids[{i}]", token_id, f"must be a token id below {vocab}"
            )


SMALL_TOKENIZER = 0.9
"""A tokenizer naming fewer than this share of the model's rows is logged at start."""


def added_ids_beyond(tokenizer: Tokenizer, vocab_size: int) -> dict[int, str]:
    """The tokenizer's added tokens at ids the model has no row for (id -> text), logged once.

    Raises ModelLoadError when the tokenizer's own vocabulary is larger than the model's: that
    tokenizer belongs to another model, and ordinary text would encode to ids beyond it. One
    that names far fewer ids than the model has rows is logged (model padding is a few per
    cent)."""
    base = tokenizer.inner.get_vocab(with_added_tokens=False)
    base_size = max(base.values(), default=-1) + 1
    if base_size > vocab_size:
        raise ModelLoadError(
            f"tokenizer.json has a vocabulary of {base_size} tokens but the model's has "
            f"{vocab_size}: it is not this model's tokenizer"
        )
    if tokenizer.vocab_size < SMALL_TOKENIZER * vocab_size:
        # Models pad their embedding by a few per cent at most; a tokenizer naming far fewer
        # ids is most likely another model's, and tokens are chosen among the ids it names.
        log.warning(
            "model.tokenizer_smaller_than_vocab",
            vocab_size=vocab_size,
            tokenizer_size=tokenizer.vocab_size,
            reason="tokens are chosen among the ids the tokenizer names, the model's other "
            "rows masked: if this tokenizer is another model's, every answer is wrong",
        )
    beyond = {
        int(token_id): str(token.content)
        for token_id, token in tokenizer.inner.get_added_tokens_decoder().items()
        if token_id >= vocab_size
    }
    if beyond:
        # Such a model can still serve, but not a prompt that holds one of these tokens.
        log.warning(
            "model.tokenizer_ids_beyond_vocab",
            vocab_size=vocab_size,
            count=len(beyond),
            ids=sorted(beyond)[:MAX_IDS_LOGGED],
        )
    return beyond
