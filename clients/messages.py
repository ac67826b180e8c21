"""What the tokenwire clients yield and take: Token, Usage and Completion events, ModelInfo and
GenerateOptions, plain frozen dataclasses, and their conversions from and to the wire."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TypeAlias

import grpc

from tokenwire.client.errors import InvalidArgument
from tokenwire.common import request_ids
from tokenwire.v1 import generate_pb2 as pb


@dataclasses.dataclass(frozen=True, slots=True)
class TopLogprob:
    """One likely token at a position (unmodified distribution)."""

    id: int
    logprob: float
    text: str
    token_bytes: bytes | None = None
    """The token's own bytes, exact where text is only part of a character (None: the server
    sent none)."""

    @property
    def own_bytes(self) -> bytes:
        """The token's own bytes where the server sent them, else its text's UTF-8."""
        return self.text.encode() if self.token_bytes is None else self.token_bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Token:
    text: str
    id: int
    index: int
    logprob: float | None = None
    top_logprobs: tuple[TopLogprob, ...] = ()
    token_text: str | None = None
    """The token's own text alone, where logprobs were asked for (`text` is the delta)."""
    token_bytes: bytes | None = None
    """The token's own bytes, where logprobs were asked for: exact where token_text is only
    part of a multi-byte character (U+FFFD), so that consecutive tokens' bytes join into the
    characters they spell."""

    @property
    def own_text(self) -> str:
        """The token's own text where the server sent it, else its delta."""
        return self.text if self.token_text is None else self.token_text

    @property
    def own_bytes(self) -> bytes:
        """The token's own bytes where the server sent them (servers before token_bytes send
        none), else its own text's UTF-8."""
        return self.own_text.encode() if self.token_bytes is None else self.token_bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    queue_time_ms: float
    time_to_first_token_ms: float
    decode_time_ms: float
    total_time_ms: float
    request_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class Completion:
    finish_reason: str
    """One of stop, length, stop_sequence, cancelled, deadline_exceeded."""
    stop_sequence: str = ""


StreamEvent: TypeAlias = Token | Usage | Completion


@dataclasses.dataclass(frozen=True, slots=True)
class ModelInfo:
    model: str
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    provider: str
    max_tokens_limit: int
    default_max_tokens: int
    max_batch_size: int
    chat_template: str = ""
    bos_token: str = ""
    eos_token: str = ""
    template_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Each special token's text by name (bos_token, eos_token, unk_token, pad_token, ...,
    image_token, ...), the variables the chat template is given; empty from a server that
    sends only bos_token and eos_token."""
    max_requests: int = 0
    """Requests the server holds at once (rows and queue); 0 from a server that does not say."""


@dataclasses.dataclass(frozen=True, slots=True)
class Tokenization:
    """A text's token ids as the server feeds them to the model for it as a prompt (their count
    is the Usage.prompt_tokens of that Generate), and the context they must fit in."""

    ids: tuple[int, ...]
    context_length: int
    """Longest prompt plus generated tokens a request may hold (ModelInfo.context_length)."""
    pieces: tuple[str, ...] = ()
    """With pieces asked for, each token's own text, one per id (as Token.token_text)."""
    piece_bytes: tuple[bytes, ...] = ()
    """With pieces asked for, each token's own bytes, one per id (as Token.token_bytes): exact
    where a piece is part of a multi-byte character, so that they join into the text's UTF-8."""


@dataclasses.dataclass(frozen=True, slots=True)
class GenerateOptions:
    """Everything a Generate call can ask for besides the prompt. None means server default."""

    max_tokens: int = 0
    temperature: float | None = None
    top_k: int = 0
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    """Stop strings; one str is one stop string."""
    ignore_eos: bool = False
    logprobs: bool = False
    request_id: str = ""
    add_special_tokens: bool | None = None
    """None: the tokenizer's own rule (e.g. add BOS); False for an already templated prompt."""
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_p: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    top_logprobs: int = 0
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    prompt_ids: tuple[int, ...] = ()
    """Token ids fed to the model as they are (no special tokens added), in place of a prompt
    text: generate with prompt "" and these."""

    def __post_init__(self) -> None:
        """Integers the wire cannot carry are InvalidArgument naming the field, as the server's
        refusals are (the server checks its own, narrower limits)."""
        u32, u64 = 2**32 - 1, 2**64 - 1
        if isinstance(self.stop, str):
            # A str is a Sequence[str] of its letters; one string is what `stop="x"` means.
            object.__setattr__(self, "stop", (self.stop,))
        if self.request_id and not request_ids.carried(self.request_id):
            # Sent as x-request-id metadata too, which grpc would refuse locally (INTERNAL).
            raise InvalidArgument(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request_id: {request_ids.RULE}, got {request_ids.shown(self.request_id)}",
                field="request_id",
            )
        # Fields are named as the server names them: the sampling ones by their place in the
        # request (sampling.top_k), whichever side refuses them.
        for name in ("max_tokens", "top_logprobs", "min_tokens"):
            _check_integer(name, getattr(self, name), u32)
        _check_integer("sampling.top_k", self.top_k, u32)
        if self.seed is not None:
            _check_integer("sampling.seed", self.seed, u64)
        for name, ids in (("prompt_ids", self.prompt_ids), ("stop_token_ids", self.stop_token_ids)):
            for i, token in enumerate(ids):
                _check_integer(f"{name}[{i}]", token, u32)
        seen: set[int] = set()
        for token, _ in self.logit_bias:
            # Named by the token, as the server names logit_bias entries.
            _check_integer(f"sampling.logit_bias[{token}]", token, u32)
            if token in seen:
                raise InvalidArgument(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"sampling.logit_bias[{token}]: a token may have one bias, got two",
                    field=f"sampling.logit_bias[{token}]",
                )
            seen.add(token)

    def to_pb(self, prompt: str) -> pb.GenerateRequest:
        sampling = pb.SamplingParams(top_k=self.top_k)
        for name in (
            "temperature",
            "top_p",
            "repetition_penalty",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "min_p",
        ):
            value = getattr(self, name)
            if value is not None:
                setattr(sampling, name, value)
        sampling.logit_bias.update(dict(self.logit_bias))
        return pb.GenerateRequest(
            prompt=prompt,
            max_tokens=self.max_tokens,
            sampling=sampling,
            stop=list(self.stop),
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs,
            request_id=self.request_id,
            add_special_tokens=self.add_special_tokens,
            top_logprobs=self.top_logprobs,
            min_tokens=self.min_tokens,
            stop_token_ids=list(self.stop_token_ids),
            prompt_ids=list(self.prompt_ids),
        )


def _check_integer(field: str, value: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise InvalidArgument(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{field}: must be an integer between 0 and {high}, got {value!r}",
            field=field,
        )


_FINISH_NAMES = {
    value: name.removeprefix("FINISH_REASON_").lower() for name, value in pb.FinishReason.items()
}


def event_from_pb(message: pb.GenerateResponse) -> StreamEvent:
    kind = message.WhichOneof("event")
    if kind == "token":
        t = message.token
        alternatives = tuple(
            TopLogprob(
                a.id, a.logprob, a.text, a.token_bytes if a.HasField("token_bytes") else None
            )
            for a in t.top_logprobs
        )
        return Token(
            t.text,
            t.id,
            t.index,
            t.logprob if t.HasField("logprob") else None,
            alternatives,
            t.token_text if t.HasField("token_text") else None,
            t.token_bytes if t.HasField("token_bytes") else None,
        )
    if kind == "usage":
        u = message.usage
        return Usage(
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            total_tokens=u.total_tokens,
            queue_time_ms=u.queue_time_ms,
            time_to_first_token_ms=u.time_to_first_token_ms,
            decode_time_ms=u.decode_time_ms,
            total_time_ms=u.total_time_ms,
            request_id=u.request_id,
        )
    if kind == "completion":
        c = message.completion
        return Completion(_FINISH_NAMES.get(c.finish_reason, "unspecified"), c.stop_sequence)
    raise ValueError(f"unknown GenerateResponse event {kind!r}")


def model_info_from_pb(m: pb.GetModelInfoResponse) -> ModelInfo:
    return ModelInfo(
        model=m.model,
        context_length=m.context_length,
        vocab_size=m.vocab_size,
        eos_token_ids=tuple(m.eos_token_ids),
        provider=m.provider,
        max_tokens_limit=m.max_tokens_limit,
        default_max_tokens=m.default_max_tokens,
        max_batch_size=m.max_batch_size,
        chat_template=m.chat_template,
        bos_token=m.bos_token,
        eos_token=m.eos_token,
        template_tokens=dict(m.template_tokens),
        max_requests=m.max_requests,
    )


def tokenize_request(text: str, add_special_tokens: bool, with_pieces: bool) -> pb.TokenizeRequest:
    return pb.TokenizeRequest(
        text=text, add_special_tokens=add_special_tokens, with_pieces=with_pieces
    )


def tokenization_from_pb(m: pb.TokenizeResponse) -> Tokenization:
    return Tokenization(
        ids=tuple(m.token_ids),
        context_length=m.context_length,
        pieces=tuple(m.pieces),
        piece_bytes=tuple(m.piece_bytes),
    )


def detokenize_request(ids: Sequence[int], skip_special_tokens: bool) -> pb.DetokenizeRequest:
    """The request for `ids`; an id the wire cannot carry is InvalidArgument naming it
    (`token_ids[i]`), as the server names one past the vocabulary."""
    for i, token in enumerate(ids):
        _check_integer(f"token_ids[{i}]", token, 2**32 - 1)
    return pb.DetokenizeRequest(token_ids=list(ids), skip_special_tokens=skip_special_tokens)
