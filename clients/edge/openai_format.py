"""OpenAI's JSON shapes for the pipeline's events: whole responses, stream chunks, logprobs,
usage, and the errors of generations cut short. `completions` and `chat` differ only here."""

from __future__ import annotations

import codecs
import dataclasses
import time
from typing import Any

from tokenwire.client.messages import Completion, StreamEvent, Token, Usage
from tokenwire.edge.errors import EdgeError
from tokenwire.edge.logprob_json import finite_logprob, listed_alternatives

FINISH = {"stop": "stop", "stop_sequence": "stop", "length": "length"}
"""OpenAI's finish_reason for each way the server finishes a generation. OpenAI has none for
a generation cut short (a deadline, a cancel): an OpenAI answer reports those as errors."""


def _deadline_passed() -> EdgeError:
    return EdgeError(
        504,
        "DEADLINE_EXCEEDED",
        "the generation did not finish within its deadline (the edge's upstream timeout)",
    )


def _cancelled() -> EdgeError:
    return EdgeError(
        503,
        "CANCELLED",
        "the generation was cancelled before it finished (its server or this edge was "
        "shutting down, or a cancel named it); retry the request",
    )


CUT_SHORT = {"DEADLINE_EXCEEDED": _deadline_passed, "CANCELLED": _cancelled}
"""The OpenAI error of a generation cut short, by the gRPC status (or finish reason) saying
how. Never a 499: the caller of a whole response or a stream that left is not answered."""


def openai_error(error: EdgeError) -> EdgeError:
    """The error an OpenAI answer gives for `error`: for a deadline one 504, for a cancel one
    503, the same whichever side noticed it (the server, in its finish reason, or gRPC)."""
    made = CUT_SHORT.get(error.code)
    return error if made is None else made()


def finish_reason(event: Completion) -> str:
    """OpenAI's finish_reason of a generation that finished; raises the EdgeError of one cut
    short (openai_error's) or ended with a reason this edge does not know (502)."""
    reason = FINISH.get(event.finish_reason)
    if reason is not None:
        return reason
    made = CUT_SHORT.get(event.finish_reason.upper())
    if made is not None:
        raise made()
    raise EdgeError(
        502,
        "UNKNOWN",
        f"the server ended the generation with a finish reason OpenAI has no name for "
        f"({event.finish_reason[:40]!r})",
    )


class Shape:
    """The JSON shapes of one route (completions or chat)."""

    def __init__(self, chat: bool, request_id: str, model: str) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        self.model = model
        self.created = int(time.time())

    def envelope(self, choices: list[dict[str, Any]], *, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": f"{kind}.chunk" if chunk and self.chat else kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def role(self, index: int) -> dict[str, Any]:
        """A chat choice's first stream chunk, as OpenAI and vLLM send it: the role, empty
        content, no logprobs (the first token comes in a chunk of its own, so the SDKs'
        stream helpers, which start a choice from this chunk, count each token once)."""
        delta = {"role": "assistant", "content": ""}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}

    def delta(
        self, index: int, token: Token | None, finish: str | None, offset: int = 0
    ) -> dict[str, Any]:
        """One choice's stream chunk: its token's text (and logprobs, the token's text_offset
        being `offset`, the length of the choice's tokens before it), or its finish."""
        text = token.text if token else ""
        if self.chat:
            delta: dict[str, Any] = {"content": text} if token is not None else {}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        if token is not None and token.logprob is not None:
            choice["logprobs"] = logprobs([token], chat=self.chat, text_offset=offset)
        return choice

    def whole(self, index: int, result: Collected) -> dict[str, Any]:
        text = "".join(t.text for t in result.tokens)
        wanted = any(t.logprob is not None for t in result.tokens)
        probs = logprobs(result.tokens, chat=self.chat) if wanted else None
        if self.chat:
            choice: dict[str, Any] = {
                "index": index,
                "message": {"role": "assistant", "content": text},
            }
        else:
            choice = {"index": index, "text": text}
        return choice | {"logprobs": probs, "finish_reason": result.finish}


def logprobs(tokens: list[Token], *, chat: bool, text_offset: int = 0) -> dict[str, Any]:
    """OpenAI's logprobs of these tokens (completions: the first one's text_offset is
    `text_offset`); every log-probability a number JSON can carry (logprob_json)."""
    if chat:
        content = [
            {
                "token": t.own_text,
                "logprob": _logprob(t),
                # The token's own bytes, which join into the characters that span tokens.
                "bytes": list(t.own_bytes),
                "top_logprobs": [
                    {"token": a.text, "logprob": a.logprob, "bytes": list(a.own_bytes)}
                    for a in listed_alternatives(t.top_logprobs)
                ],
            }
            for t in tokens
        ]
        return {"content": content}
    counter = TextOffsets(text_offset)
    offsets = [counter.of(t) for t in tokens]
    return {
        "tokens": [t.own_text for t in tokens],
        "token_logprobs": [_logprob(t) for t in tokens],
        # The legacy format: one {text: logprob} object per position, the sampled token's
        # first and then the `logprobs` most likely (up to logprobs + 1 entries, as OpenAI
        # and vLLM give them; logprobs=0 lists the sampled token alone).
        "top_logprobs": [_sampled_and_top(t) for t in tokens],
        "text_offset": offsets,
    }


def _sampled_and_top(token: Token) -> dict[str, float | None]:
    listed: dict[str, float | None] = {token.own_text: _logprob(token)}
    for alternative in listed_alternatives(token.top_logprobs):
        listed.setdefault(alternative.text, alternative.logprob)
    return listed


class TextOffsets:
    """Where each token of a choice starts in its text (completions' text_offset): the length
    of the characters the tokens before it make of their own bytes, decoded as they join. A
    token that holds part of a character adds nothing until the one that completes it; text a
    stop string held back counts where its tokens came, not where the stream let it out."""

    def __init__(self, start: int = 0) -> None:
        self.at = start
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def of(self, token: Token) -> int:
        """The token's offset; the next token's is past the characters its bytes complete.
        Where its bytes break off a character the tokens before it began, the U+FFFD that
        character becomes is theirs: the token starts after it."""
        data = token.own_bytes or b""
        pending, _ = self._decoder.getstate()
        at = self.at + (1 if pending and data and _breaks(pending, data[:1]) else 0)
        self.at += len(self._decoder.decode(data))
        return at


def _breaks(pending: bytes, byte: bytes) -> bool:
    """Whether `byte` cannot follow `pending`, the start of a UTF-8 character (which then
    decodes as one U+FFFD)."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(pending + byte)
    except UnicodeDecodeError:
        return True
    return False


def _logprob(token: Token) -> float | None:
    return None if token.logprob is None else finite_logprob(token.logprob)


@dataclasses.dataclass
class Collected:
    """What one choice's generation produced, for a whole (non-streamed) response."""

    tokens: list[Token] = dataclasses.field(default_factory=list)
    usage: Usage | None = None
    finish: str = "stop"

    def see(self, event: StreamEvent) -> None:
        if isinstance(event, Token):
            self.tokens.append(event)
        elif isinstance(event, Usage):
            self.usage = event
        else:
            self.finish = finish_reason(event)


def usage(usages: list[Usage | None], n: int = 1) -> dict[str, int] | None:
    """Usage of all generations, `n` per prompt: each prompt once (its choices share it),
    completion tokens summed."""
    if all(u is None for u in usages):
        return None
    groups = (usages[k : k + n] for k in range(0, len(usages), n))
    prompt = sum(next((u.prompt_tokens for u in g if u is not None), 0) for g in groups)
    completion = sum(u.completion_tokens for u in usages if u is not None)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
