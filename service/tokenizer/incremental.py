"""Turn a stream of token ids into a stream of text deltas that are safe to show.

Two things make naive per-token decoding wrong:
- byte-level tokens can split one UTF-8 character; decoding such a token alone yields U+FFFD.
  `tokenizers.decoders.DecodeStream` buffers until the character is whole. Bytes that form no
  character (a model can sample any) come out as U+FFFD, as the full decode shows them.
- a stop string can arrive spread over several tokens; once its first half has been sent it
  cannot be taken back. StopMatcher holds back the longest tail that could still begin one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from tokenizers.decoders import DecodeStream

from tokenwire.server.tokenizer.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Decodes one id at a time; returns only whole characters. All steps and the final flush
    join to the tokenizer's decode of all the ids (after the prompt's, see start_after)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._stream: DecodeStream | None = DecodeStream(skip_special_tokens=True)
        self._context: list[int] = []
        """The ids of the last text released (at first the prompt's last ids): what
        DecodeStream decodes the next ids after."""
        self._held: list[int] = []
        """The ids since, whose text DecodeStream holds back."""

    def start_after(self, prompt_ids: Sequence[int]) -> None:
        """Decode the ids to come as the continuation of the prompt, before the first step.

        A token's text can depend on what precedes it: SentencePiece decoders (Llama 2,
        Mistral, Gemma) drop the space that begins a text, so "▁world" alone decodes to
        "world" but to " world" after "Hello". The text is what decode(prompt + generated)
        adds to decode(prompt), as vLLM streams it. Byte-level BPE text does not change."""
        self._context = _prompt_tail(self.tokenizer, prompt_ids)
        self._held = []
        if self.tokenizer.decode(self._context).endswith("\ufffd"):
            # DecodeStream takes text ending in U+FFFD for a character still to complete, and
            # would release it again with the first token: see _after_context.
            self._stream = None
        else:
            self._stream = DecodeStream(ids=self._context, skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        self._held.append(token_id)
        if self._stream is None:
            chunk = self._after_context()
        else:
            try:
                chunk = self._stream.step(self.tokenizer.inner, token_id)
            except Exception as exc:  # tokenizers raises plain Exception
                if not str(exc).startswith(_INVALID_PREFIX):
                    raise
                chunk = self._restart()
        if not chunk:
            return ""
        self._context, self._held = self._held, []
        return str(chunk)

    def _after_context(self) -> str | None:
        """The first text after a prompt whose text ends in U+FFFD (one it was sent with, or
        the prompt's ids end inside a character): what the held ids add to the prompt tail's
        text, once that no longer ends in U+FFFD; DecodeStream goes on from there."""
        before = self.tokenizer.decode(self._context)
        after = self.tokenizer.decode(self._context + self._held)
        if after.endswith("\ufffd"):
            return None
        if not after.startswith(before):
            # The ids completed the character the prompt's ids ended inside (see _restart).
            return self._restart()
        self._stream = DecodeStream(ids=self._context + self._held, skip_special_tokens=True)
        return after[len(before) :]

    def _restart(self) -> str | None:
        """Decode the held ids anew, alone, as the start of a new stream. DecodeStream refuses
        ids that change text it has released: with byte fallback, bytes that form no character
        with the bytes before them make the decoder show the whole run of bytes as U+FFFD, the
        released character's too, and released text cannot be taken back. (vLLM restarts from
        the newest id alone, losing the held bytes; here they come out as U+FFFD where they
        come.)"""
        self._context = []
        self._stream = DecodeStream(skip_special_tokens=True)
        return self._stream.step(self.tokenizer.inner, self._held)

    def flush(self) -> str:
        """The text held back when the stream ends. DecodeStream holds text ending in an
        incomplete character (U+FFFD) until its next bytes come; when none will, the full
        decode shows U+FFFD there, and so does this."""
        if not self._held:
            return ""
        before = self.tokenizer.decode(self._context)
        after = self.tokenizer.decode(self._context + self._held)
        if not after.startswith(before):
            # Held bytes that form no character with the released ones (see _restart).
            before, after = "", self.tokenizer.decode(self._held)
        self._context, self._held = [], []
        return after[len(before) :]


_INVALID_PREFIX = "Invalid prefix encountered"
"""How DecodeStream's error begins when new ids change the text it has released."""

_PROMPT_TAIL_IDS = (4, 23)
"""The fewest and the most of the prompt's last ids the first token is decoded after (as vLLM)."""


def _prompt_tail(tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> list[int]:
    """The shortest tail of the prompt's text ids (within _PROMPT_TAIL_IDS, or all of them if
    fewer) that begins on a whole character, or none. One that begins inside a character
    decodes its first bytes as U+FFFD (with byte fallback, its whole run of byte tokens):
    its text is then not the end of the whole prompt's, which is decoded only then (a
    U+FFFD the prompt's text holds, one it was sent with, is the end of it too). Special
    tokens decode to nothing and are left out: a prompt that ends in several (chat turns'
    markers) still gives its first token the text before them, whose end decides that
    token's leading space (SentencePiece) or joins its "##" piece (WordPiece)."""
    special = tokenizer.special_ids
    if special:
        prompt_ids = [i for i in prompt_ids if i not in special]
    fewest, most = _PROMPT_TAIL_IDS
    count = len(prompt_ids)
    whole: str | None = None
    for size in range(min(fewest, count), min(most, count) + 1):
        tail = list(prompt_ids[count - size :])
        text = tokenizer.decode(tail)
        if size == count or "\ufffd" not in text:
            return tail
        whole = tokenizer.decode(list(prompt_ids)) if whole is None else whole
        if whole.endswith(text):
            return tail
    return []


class StopMatcher:
    """Finds stop strings in streamed text and withholds text that could start one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._held = ""

    def push(self, delta: str, *, armed: bool = True) -> tuple[str, str | None]:
        """Add text; return (text safe to emit, the stop string matched or None).

        After a match, the emitted text ends right before the stop string and the rest is dropped.
        Not `armed` (before min_tokens), a stop string does not stop: its text goes out, and
        only a stop string that ends in text pushed armed can match (it may begin earlier).
        """
        text = self._held + delta
        if not self._stops:
            self._held = ""
            return text, None
        # The held text may hold a stop string that ended unarmed: only one that ends in the
        # new text can match.
        match = _earliest_match(text, self._stops, ending_after=len(self._held)) if armed else None
        if match is not None:
            self._held = ""
            return text[: match[0]], match[1]
        # Armed or not, hold back from the earliest place a stop string could still begin: one
        # that ends unarmed inside a longer one must not let the longer one's start go out.
        keep = _longest_partial_suffix(text, self._stops)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], None

    def flush(self) -> str:
        """Release whatever is held back (the stream ended without a match)."""
        held, self._held = self._held, ""
        return held


def _earliest_match(text: str, stops: tuple[str, ...], ending_after: int) -> tuple[int, str] | None:
    """Where the first stop string that ends past `ending_after` begins, and which it is."""
    best: tuple[int, str] | None = None
    for stop in stops:
        at = text.find(stop, max(0, ending_after - len(stop) + 1))
        if at >= 0 and (best is None or at < best[0]):
            best = (at, stop)
    return best


def _longest_partial_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


@dataclasses.dataclass(slots=True)
class TextStream:
    """Per-request text pipeline: ids -> whole characters -> stop-string-safe deltas."""

    detokenizer: IncrementalDetokenizer
    matcher: StopMatcher

    @classmethod
    def create(cls, tokenizer: Tokenizer, stops: tuple[str, ...]) -> TextStream:
        return cls(IncrementalDetokenizer(tokenizer), StopMatcher(stops))

    def start_after(self, prompt_ids: Sequence[int]) -> None:
        """Decode the generated ids as the continuation of the prompt (see the detokenizer's)."""
        self.detokenizer.start_after(prompt_ids)

    def push(self, token_id: int, *, armed: bool = True) -> tuple[str, str | None]:
        """The text the token releases, and the stop string it completes (only `armed`)."""
        return self.matcher.push(self.detokenizer.step(token_id), armed=armed)

    def token_text(self, token_id: int) -> str:
        """One token's own text (see Tokenizer.token_text), for logprobs."""
        return self.detokenizer.tokenizer.token_text(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """One token's own bytes (see Tokenizer.token_bytes), for logprobs."""
        return self.detokenizer.tokenizer.token_bytes(token_id)

    def flush(self) -> str:
        """The rest of the text at the end of the stream: what the detokenizer and then the
        stop matcher held back (up to a stop string, should the detokenizer's tail make one)."""
        return self.finish()[0]

    def finish(self, *, armed: bool = True) -> tuple[str, str | None]:
        """flush's text, and the stop string the detokenizer's tail completes (only `armed`):
        the text the stream ends with is cut there, so the stream ends at that stop string."""
        text, stop = self.matcher.push(self.detokenizer.flush(), armed=armed)
        return (text, stop) if stop is not None else (text + self.matcher.flush(), None)
