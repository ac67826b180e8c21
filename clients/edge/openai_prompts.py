"""A completions request's prompts, as OpenAI takes them: a string, a list of token ids, or a
list of either (a batch). Each prompt of a batch is generated `n` times; OpenAI numbers the
choices prompt by prompt (choice `i` of prompt `k` is `index` k * n + i), as vLLM does."""

from __future__ import annotations

from typing import Any

from tokenwire.client.messages import ModelInfo
from tokenwire.edge.body import Fields, checked_token_ids, token_ids_of
from tokenwire.edge.errors import EdgeError

MAX_GENERATIONS = 64
"""The most generations one request opens (prompts times n): a batch runs as that many
streams at the server, where each takes a row of its batch like any other request."""

Prompt = tuple[str, tuple[int, ...]]
"""One prompt: its text, or its token ids (fed to the model as they are, no special tokens
added); the other one empty."""

_SHAPES = (
    "must be a string, a non-empty list of token ids, or a non-empty list of either "
    "(a batch of prompts)"
)


def completion_prompts(fields: Fields, n: int) -> tuple[tuple[Prompt, ...], bool]:
    """The prompts of a completions request, each checked, and whether they came as a batch:
    one for a string or a list of token ids, one per entry for a list of strings or of token
    id lists (a batch)."""
    prompt = fields.raw("prompt")
    if isinstance(prompt, str):
        return (_text(prompt, "prompt"),), False
    ids = token_ids_of(prompt)
    if ids:
        return (("", ids),), False
    if not isinstance(prompt, list):
        # No prompt at all is a missing value; a number or an object, a wrong type.
        raise EdgeError.invalid("prompt", _SHAPES, None if prompt is None else "invalid_type")
    if not prompt:
        raise EdgeError.invalid("prompt", _SHAPES)
    if _is_int(prompt[0]):
        # A list that starts with an integer is token ids: the 400 names the first entry
        # that is not one.
        return (("", checked_token_ids(prompt, "prompt")),), False
    if len(prompt) * n > MAX_GENERATIONS:
        raise EdgeError.invalid(
            "prompt",
            f"a batch of {len(prompt)} prompts with n={n} asks for {len(prompt) * n} "
            f"generations, more than the {MAX_GENERATIONS} one request may open: "
            "send the batch in parts",
            "unsupported_value",
        )
    return tuple(_entry(entry, k) for k, entry in enumerate(prompt)), True


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(entry: Any, index: int) -> Prompt:
    if isinstance(entry, str):
        return _text(entry, f"prompt[{index}]")
    if isinstance(entry, list) and entry and _is_int(entry[0]):
        return "", checked_token_ids(entry, f"prompt[{index}]")
    raise EdgeError.invalid(
        f"prompt[{index}]",
        "must be a string or a non-empty list of token ids",
        None if isinstance(entry, list) else "invalid_type",
    )


def _text(prompt: str, where: str) -> Prompt:
    if not prompt:
        raise EdgeError.invalid(where, "must not be empty")
    return prompt, ()


def check_generations(n: int, generations: int, info: ModelInfo) -> None:
    """A 400 for a request that opens more generations than the server holds at once (its
    rows and queue): refused as overloaded however long it waits, it could never run. Names
    `n`, or `prompt` for a batch."""
    if not info.max_requests or generations <= info.max_requests:
        return
    field = "n" if generations == n else "prompt"
    raise EdgeError.invalid(
        field,
        f"asks for {generations} generations at once, more than the {info.max_requests} "
        "requests the server holds at once (its rows and queue)",
        "unsupported_value",
    )
