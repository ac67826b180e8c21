"""Tokenizer and incremental, UTF-8-safe detokenisation with stop-string hold-back."""

from service.tokenizer.incremental import IncrementalDetokenizer, StopMatcher, TextStream
from service.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "StopMatcher", "TextStream", "Tokenizer"]
