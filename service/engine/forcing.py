"""Settings of a model folder that make Hugging Face's `generate` force or ban tokens. The
engine applies none of them, so a folder that sets one is refused at load: served anyway, it
would decode other tokens than its reference without a word."""

from __future__ import annotations

from pathlib import Path
from typing import Any

FORCING: dict[str, str] = {
    "suppress_tokens": "bans these ids at every step",
    "begin_suppress_tokens": "bans these ids at the first step",
    "bad_words_ids": "bans these token sequences",
    "sequence_bias": "biases these token sequences",
    "force_words_ids": "forces these token sequences into the output",
    "forced_decoder_ids": "forces these ids at these steps",
    "forced_bos_token_id": "forces this id as the first token",
    "forced_eos_token_id": "forces this id as the last token at the length limit",
    "no_repeat_ngram_size": "bans repeating any n-gram of this size",
    "min_length": "bans EOS until the sequence has this length",
    "min_new_tokens": "bans EOS until this many tokens are generated",
    "exponential_decay_length_penalty": "raises EOS's score as the output grows",
}
"""Each setting with what `generate` does with it (when set to other than its default)."""

GENAI_FORCING = ("min_length", "no_repeat_ngram_size")
"""genai_config.json search settings ONNX Runtime GenAI's Generator applies by default."""


def forcing(settings: dict[str, Any], path: Path) -> str | None:
    """Why `settings` (generation_config.json, or config.json where there is none) cannot be
    served, where one of them forces or bans tokens; None where none does."""
    for key, effect in FORCING.items():
        value = settings.get(key)
        if value not in (None, 0, [], {}):
            return (
                f"{path} sets {key} = {_short(value)}: transformers' generate {effect}, "
                "which tokenwire does not do, so its tokens would differ from the model's "
                "reference; remove the key to serve the model without it (min_tokens, "
                "logit_bias and stop_token_ids are per request)"
            )
    return None


def genai_forcing(genai: dict[str, Any], path: Path) -> str | None:
    """Why a genai_config.json cannot be served, where its search section sets what the
    Generator applies to every request's tokens (the sampling defaults there are a request's
    own choice); None where it does not."""
    search = genai.get("search")
    if not isinstance(search, dict):
        return None
    for key in GENAI_FORCING:
        value = search.get(key)
        if value not in (None, 0):
            return (
                f"{path} search.{key} = {_short(value)}: ONNX Runtime GenAI {FORCING[key]}, "
                "which tokenwire does not do; set it to 0 to serve the model without it "
                "(min_tokens is per request)"
            )
    return None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."
