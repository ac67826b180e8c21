"""The model's tokenizer, loaded from a Hugging Face tokenizer.json."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HfTokenizer


class Tokenizer:
    """Encodes prompts and decodes ids; a thin, typed face over `tokenizers`."""

    def __init__(self, inner: HfTokenizer) -> None:
        self.inner = inner

    @classmethod
    def from_dir(cls, model_dir: Path) -> Tokenizer:
        return cls(HfTokenizer.from_file(str(model_dir / "tokenizer.json")))

    @property
    def vocab_size(self) -> int:
        return int(self.inner.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of text. As transformers does, special-token text (e.g. "<|user|>") maps to
        its special id; add_special_tokens adds what the tokenizer's post-processor adds (BOS for
        Llama, Mistral, Gemma, ...), as `tokenizer(text)` does by default."""
        return list(self.inner.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.inner.decode(ids, skip_special_tokens=True))

    def token_text(self, token_id: int) -> str:
        """One token's text alone, special tokens included (may be part of a character)."""
        return str(self.inner.decode([token_id], skip_special_tokens=False))

    def token_id(self, token: str) -> int | None:
        found = self.inner.token_to_id(token)
        return None if found is None else int(found)
