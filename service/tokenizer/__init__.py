"""Tokenizer and incremental, UTF-8-safe detokenisation with stop-string hold-back."""

from tokenwire.server.tokenizer.counting import LongInputs, detokenize, tokenize
from tokenwire.server.tokenizer.incremental import IncrementalDetokenizer, StopMatcher, TextStream
from tokenwire.server.tokenizer.tokenizer import Tokenizer, TokenizerLoadError

__all__ = [
    "IncrementalDetokenizer",
    "LongInputs",
    "StopMatcher",
    "TextStream",
    "Tokenizer",
    "TokenizerLoadError",
    "detokenize",
    "tokenize",
]
