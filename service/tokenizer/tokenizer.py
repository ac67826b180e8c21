"""The model's tokenizer, loaded from a Hugging Face tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HfTokenizer
from tokenizers import processors

# transformers tokenizer classes whose constructor rebuilds the post-processor from
# tokenizer_config.json's add_bos_token / add_eos_token (their defaults here), whatever
# tokenizer.json's says: `tokenizer(text)` adds what these flags say.
_FLAGGED_CLASSES: dict[str, tuple[bool, bool]] = {
    "LlamaTokenizer": (True, False),
    "CodeLlamaTokenizer": (True, False),
    "GemmaTokenizer": (True, False),
    "CohereTokenizer": (True, False),
    "GPTNeoXTokenizer": (False, False),
}


class TokenizerLoadError(RuntimeError):
    """tokenizer.json (or what tokenizer_config.json says of it) cannot be used."""


class Tokenizer:
    """Encodes prompts and decodes ids; a thin, typed face over `tokenizers`."""

    def __init__(self, inner: HfTokenizer) -> None:
        self.inner = inner

    @classmethod
    def from_dir(cls, model_dir: Path) -> Tokenizer:
        """tokenizer.json, with the special tokens `tokenizer(text)` adds in transformers:
        tokenizer.json's own, or, for the classes whose constructor decides them from
        tokenizer_config.json's add_bos_token and add_eos_token (Llama, Gemma, ...), those."""
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerLoadError(f"{path} is missing")
        try:
            inner = HfTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception for unreadable files
            raise TokenizerLoadError(f"{path} cannot be loaded: {exc}") from exc
        tokenizer = cls(inner)
        tokenizer._apply_flags(model_dir / "tokenizer_config.json")
        return tokenizer

    def _apply_flags(self, config_path: Path) -> None:
        config = _read_config(config_path)
        name = config.get("tokenizer_class")
        defaults = (
            _FLAGGED_CLASSES.get(name.removesuffix("Fast")) if isinstance(name, str) else None
        )
        if defaults is None:
            return
        add_bos, add_eos = (
            _flag(config, key, default, config_path)
            for key, default in zip(("add_bos_token", "add_eos_token"), defaults, strict=True)
        )
        special: dict[str, tuple[str, int]] = {}
        for wanted, key in ((add_bos, "bos_token"), (add_eos, "eos_token")):
            text = _token_text(config.get(key))
            token_id = self.token_id(text) if text else None
            if wanted and token_id is None:
                raise TokenizerLoadError(
                    f"{config_path} asks for add_{key} but its {key} {text!r} is not a token of "
                    "tokenizer.json"
                )
            if wanted and token_id is not None:
                special[key] = (text, token_id)

        def sequence(name: str, type_id: int) -> list[str]:
            around = [special[k][0] for k in ("bos_token", "eos_token") if k in special]
            body = [name] if "bos_token" not in special else [around.pop(0), name]
            return [f"{piece}:{type_id}" for piece in [*body, *around]]

        single = " ".join(sequence("$A", 0))
        pair = " ".join([*sequence("$A", 0), *sequence("$B", 1)])
        self.inner.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=list(special.values())
        )

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


def _read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerLoadError(f"{path} cannot be read as JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerLoadError(f"{path} is not a JSON object")
    return data


def _flag(config: dict[str, Any], key: str, default: bool, path: Path) -> bool:
    value = config.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise TokenizerLoadError(f"{path} {key} must be true or false, got {value!r}")
    return value


def _token_text(value: object) -> str:
    """tokenizer_config writes special tokens as text or as {"content": text, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""
