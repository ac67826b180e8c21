"""Plain domain types shared by the engine and the transports: requests, events, errors."""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import TypeAlias


class FinishReason(enum.Enum):
    """Why a generation ended. Values are the label values used in logs and metrics."""

    STOP = "stop"
    LENGTH = "length"
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"
    DEADLINE_EXCEEDED = "deadline_exceeded"


class TokenwireError(Exception):
    """Base of the errors the service reports to its callers."""


class InvalidRequest(TokenwireError):
    """A request field is outside its allowed range. The message names the field."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        shown = value if not isinstance(value, str) or len(value) <= 40 else f"{value[:40]}..."
        super().__init__(f"{field}: {reason}, got {shown!r}")


class Overloaded(TokenwireError):
    """The server cannot accept more work now; retry after the hint."""

    def __init__(self, reason: str, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(reason)


class Unavailable(TokenwireError):
    """The server is not accepting requests (warming up or draining)."""


class EngineStopped(TokenwireError):
    """The engine failed or stopped before finishing this request (INTERNAL to the caller)."""


@dataclasses.dataclass(frozen=True, slots=True)
class SamplingParams:
    """How the next token is chosen. temperature 0 means greedy."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits."""

    def __post_init__(self) -> None:
        _check_range("sampling.temperature", self.temperature, 0.0, 2.0, "between 0 and 2")
        if self.top_k < 0:
            raise InvalidRequest("sampling.top_k", self.top_k, "must be >= 0 (0 disables)")
        if not (0.0 < self.top_p <= 1.0) or math.isnan(self.top_p):
            raise InvalidRequest("sampling.top_p", self.top_p, "must be in (0, 1]")
        if not (0.0 < self.repetition_penalty <= 2.0) or math.isnan(self.repetition_penalty):
            raise InvalidRequest(
                "sampling.repetition_penalty", self.repetition_penalty, "must be in (0, 2]"
            )
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise InvalidRequest("sampling.seed", self.seed, "must be in [0, 2^64)")
        for name in ("presence_penalty", "frequency_penalty"):
            _check_range(f"sampling.{name}", getattr(self, name), -2.0, 2.0, "between -2 and 2")
        _check_range("sampling.min_p", self.min_p, 0.0, 1.0, "between 0 and 1")
        for token_id, bias in self.logit_bias:
            _check_range(
                f"sampling.logit_bias[{token_id}]", bias, -100.0, 100.0, "between -100 and 100"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes the logits: the batch's one argmax serves it."""
        return (
            self.greedy
            and self.repetition_penalty == 1.0
            and self.presence_penalty == 0.0
            and self.frequency_penalty == 0.0
            and not self.logit_bias
        )


def _check_range(field: str, value: float, low: float, high: float, allowed: str) -> None:
    if math.isnan(value) or not low <= value <= high:
        raise InvalidRequest(field, value, f"must be {allowed}")


@dataclasses.dataclass(frozen=True, slots=True)
class RequestLimits:
    """Bounds every request is checked against before it is queued."""

    context_length: int
    max_tokens_limit: int
    default_max_tokens: int
    max_prompt_bytes: int
    max_stop_strings: int
    max_stop_length: int
    context_set_by: str = ""
    """The server setting context_length is, where it is below the model's context
    (max_context_tokens or max_kv_tokens); empty where it is the model's."""

    @property
    def context(self) -> str:
        """The context length as refusals state it, with what sets it where not the model."""
        bound = f" (the server's {self.context_set_by})" if self.context_set_by else ""
        return f"{self.context_length}{bound}"


MAX_STOP_TOKEN_IDS = 1024
"""Most stop_token_ids one request may list (each sampled token is looked up among them)."""


@dataclasses.dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation as the engine sees it. Field checks that need no limits run here."""

    request_id: str
    prompt: str
    max_tokens: int = 0
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    deadline: float | None = None
    """Absolute time.monotonic() after which generation ends with DEADLINE_EXCEEDED."""
    add_special_tokens: bool = True
    """Tokenize as the model's tokenizer does by default (e.g. with BOS); False for templates."""
    continuation: tuple[int, ...] = ()
    """Token ids an interrupted stream already delivered; generation goes on after them."""
    retry: bool = False
    """It retries a broken stream of its id (continuation may be empty): a running request of
    that id is replaced, not a reason to refuse it."""
    prompt_ids: tuple[int, ...] = ()
    """Pre-tokenised input, fed as is; exclusive with prompt."""
    top_logprobs: int = 0
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if bool(self.prompt) == bool(self.prompt_ids):
            raise InvalidRequest(
                "prompt", self.prompt, "give either a non-empty prompt or prompt_ids, not both"
            )
        if not 0 <= self.top_logprobs <= 20:
            raise InvalidRequest("top_logprobs", self.top_logprobs, "must be between 0 and 20")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs", self.top_logprobs, "needs logprobs set")
        if self.min_tokens < 0:
            raise InvalidRequest("min_tokens", self.min_tokens, "must be >= 0")
        if self.max_tokens < 0:
            raise InvalidRequest("max_tokens", self.max_tokens, "must be >= 0 (0 = default)")
        if self.max_tokens and self.min_tokens > self.max_tokens:
            # Contradictory: the stream would end at max_tokens with min_tokens unmet.
            raise InvalidRequest(
                "min_tokens", self.min_tokens, f"must be at most max_tokens ({self.max_tokens})"
            )
        for i, stop in enumerate(self.stop):
            if not stop:
                raise InvalidRequest(f"stop[{i}]", stop, "must be a non-empty string")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequest(
                "stop_token_ids",
                f"<{len(self.stop_token_ids)} ids>",
                f"must hold at most {MAX_STOP_TOKEN_IDS}",
            )

    def check(self, limits: RequestLimits) -> None:
        """Raise InvalidRequest when a field breaks one of the server's limits."""
        check_text_size("prompt", self.prompt, limits.max_prompt_bytes)
        if self.max_tokens > limits.max_tokens_limit:
            raise InvalidRequest(
                "max_tokens",
                self.max_tokens,
                f"must be between 1 and {limits.max_tokens_limit} (0 = default)",
            )
        if len(self.stop) > limits.max_stop_strings:
            raise InvalidRequest(
                "stop",
                f"<{len(self.stop)} strings>",
                f"must hold at most {limits.max_stop_strings}",
            )
        for i, stop in enumerate(self.stop):
            if len(stop) > limits.max_stop_length:
                raise InvalidRequest(
                    f"stop[{i}]", stop, f"must be at most {limits.max_stop_length} characters"
                )

    def token_budget(self, prompt_tokens: int, limits: RequestLimits) -> int:
        """How many tokens may be generated; raise when the prompt leaves no room."""
        room = limits.context_length - prompt_tokens
        if room < 1:
            raise InvalidRequest(
                "prompt_ids" if self.prompt_ids else "prompt",
                f"<{prompt_tokens} tokens>",
                f"must be shorter than the context length of {limits.context} tokens",
            )
        if self.max_tokens == 0:
            budget = min(limits.default_max_tokens, room)
            if self.min_tokens > budget:
                raise InvalidRequest(
                    "min_tokens",
                    self.min_tokens,
                    f"must be at most {budget}, the tokens this request may generate without "
                    "max_tokens (set max_tokens to ask for more)",
                )
            return budget
        if self.max_tokens > room:
            raise InvalidRequest(
                "max_tokens",
                self.max_tokens,
                f"must be at most {room}: the prompt has {prompt_tokens} tokens and the "
                f"context length is {limits.context}",
            )
        return self.max_tokens


def check_text_size(field: str, text: str, max_bytes: int) -> None:
    """A text the server takes holds at most max_bytes of UTF-8 (max_prompt_bytes)."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidRequest(field, f"<{size} bytes>", f"must be at most {max_bytes} bytes")


@dataclasses.dataclass(frozen=True, slots=True)
class TokenizeRequest:
    """A text whose token ids are asked for, as a GenerationRequest's prompt would have them."""

    text: str
    add_special_tokens: bool = True
    """As GenerationRequest.add_special_tokens: False for a text rendered from a template."""
    with_pieces: bool = False
    """Also each token's own text and bytes."""

    def __post_init__(self) -> None:
        if not self.text:
            raise InvalidRequest("text", self.text, "must be a non-empty string")

    def check(self, limits: RequestLimits) -> None:
        """The text is held to the prompt's size limit."""
        check_text_size("text", self.text, limits.max_prompt_bytes)


@dataclasses.dataclass(frozen=True, slots=True)
class DetokenizeRequest:
    """Token ids whose text is asked for."""

    token_ids: tuple[int, ...]
    skip_special_tokens: bool = False

    def check(self, vocab: int, most: int) -> None:
        """At most `most` ids (max_prompt_bytes: as many as the longest text the server takes
        holds tokens, so that a reply stays within what such a text gives), every one in the
        vocabulary; the first that is not is named by its index."""
        if len(self.token_ids) > most:
            raise InvalidRequest(
                "token_ids", f"<{len(self.token_ids)} ids>", f"must hold at most {most} ids"
            )
        for i, token_id in enumerate(self.token_ids):
            if not 0 <= token_id < vocab:
                raise InvalidRequest(
                    f"token_ids[{i}]", token_id, f"must be a token id below {vocab}"
                )


@dataclasses.dataclass(frozen=True, slots=True)
class Tokens:
    """A text's token ids, with each token's own text and bytes where they were asked for."""

    ids: tuple[int, ...]
    pieces: tuple[str, ...] = ()
    """Each token's own text (Tokenizer.token_text), as a generated token's token_text."""
    piece_bytes: tuple[bytes, ...] = ()
    """Each token's own bytes (Tokenizer.token_bytes), as a generated token's token_bytes."""


@dataclasses.dataclass(frozen=True, slots=True)
class TopLogprob:
    """One likely token at a position, under the unmodified distribution."""

    token_id: int
    logprob: float
    text: str
    token_bytes: bytes
    """The token's own bytes (Tokenizer.token_bytes): exact where text is part of a character."""


@dataclasses.dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token and the text it releases (possibly empty)."""

    text: str
    token_id: int
    index: int
    logprob: float | None = None
    top_logprobs: tuple[TopLogprob, ...] = ()
    token_text: str | None = None
    """The token's own text alone, where logprobs were asked for (text is the delta)."""
    token_bytes: bytes | None = None
    """The token's own bytes, where logprobs were asked for: exact where token_text is only
    part of a character (U+FFFD), so that consecutive tokens' bytes join into characters."""


@dataclasses.dataclass(frozen=True, slots=True)
class UsageEvent:
    """Counts and timings of a finished generation, in seconds."""

    request_id: str
    prompt_tokens: int
    completion_tokens: int
    queue_time_s: float
    time_to_first_token_s: float
    decode_time_s: float
    total_time_s: float
    inter_token_latencies_s: tuple[float, ...] = ()
    """Gaps between consecutive tokens, measured where they were generated."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclasses.dataclass(frozen=True, slots=True)
class CompletionEvent:
    """The last event of every accepted generation."""

    finish_reason: FinishReason
    stop_sequence: str = ""


Event: TypeAlias = TokenEvent | UsageEvent | CompletionEvent
