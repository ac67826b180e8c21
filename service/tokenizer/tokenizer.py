"""The model's tokenizer, loaded from a Hugging Face tokenizer.json."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as HfTokenizer

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


def _gpt2_byte_of() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: byte-level BPE spells each byte as one
    printable character (printable Latin-1 bytes as themselves, the rest from U+0100 on)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    kept += range(ord("®"), ord("ÿ") + 1)
    shifted = [b for b in range(256) if b not in kept]
    return {chr(b): b for b in kept} | {chr(256 + n): b for n, b in enumerate(shifted)}


_GPT2_BYTE_OF = _gpt2_byte_of()
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
"""A byte fallback token, as tokenizers' ByteFallback decoder reads it."""


def _byte_level_bytes(piece: str) -> bytes | None:
    try:
        return bytes(_GPT2_BYTE_OF[c] for c in piece)
    except KeyError:  # not a byte-level spelling: let the decoder say
        return None


def _byte_fallback_bytes(piece: str) -> bytes | None:
    found = _BYTE_TOKEN.fullmatch(piece)
    return None if found is None else bytes([int(found.group(1), 16)])


def _no_bytes(piece: str) -> bytes | None:
    return None


NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
"""The special tokens every transformers tokenizer has a name for (SPECIAL_TOKENS_ATTRIBUTES)."""


def tokenizer_settings(
    config: dict[str, Any], special_tokens_map: dict[str, Any]
) -> dict[str, Any]:
    """tokenizer_config.json's entries as transformers reads them beside special_tokens_map.json:
    that file is read only where tokenizer_config.json has no added_tokens_decoder, and then
    its entries replace tokenizer_config.json's; beside an added_tokens_decoder,
    tokenizer_config.json's bos_token, eos_token, ... are the ones, and special_tokens_map.json
    only names those it does not (where transformers takes the tokenizer class's default,
    which that file states: `<s>` for a Llama tokenizer)."""
    if "added_tokens_decoder" in config:
        return {**{k: v for k, v in special_tokens_map.items() if k not in config}, **config}
    return {**config, **special_tokens_map}


def template_tokens(config: dict[str, Any], special_tokens_map: dict[str, Any]) -> dict[str, str]:
    """The text of each special token by name, as transformers' `special_tokens_map` holds it
    (the variables apply_chat_template gives a chat template): every `*_token` entry of the
    files as tokenizer_settings reads them whose value is a token's text (null ones, flags and
    lists are not), and the named tokens of an extra_special_tokens (or older
    additional_special_tokens) object, such as {"image_token": "<image>"}. As in transformers,
    tokenizer_config.json's own text for a name outside NAMED_SPECIAL_TOKENS, and those named
    tokens, are set last, over what special_tokens_map.json says; a list of extra special
    tokens has no names and is left out."""
    tokens: dict[str, str] = {}
    for key, value in tokenizer_settings(config, special_tokens_map).items():
        text = _token_value(value)
        if key.endswith("_token") and text is not None:
            tokens[key] = text
    late: list[object] = [
        {
            key: value
            for key, value in config.items()
            if key.endswith("_token") and key not in NAMED_SPECIAL_TOKENS and isinstance(value, str)
        },
        config.get("extra_special_tokens") or config.get("additional_special_tokens"),
    ]
    if "added_tokens_decoder" not in config:
        late.append(special_tokens_map.get("extra_special_tokens"))
    for named in late:
        if not isinstance(named, dict):
            continue
        for key, value in named.items():
            text = _token_value(value)
            if isinstance(key, str) and text is not None:
                tokens[key] = text
    return tokens


_MIXED = " (are tokenizer.json and tokenizer_config.json from the same model?)"


class TokenizerLoadError(RuntimeError):
    """tokenizer.json (or what tokenizer_config.json says of it) cannot be used."""


class Tokenizer:
    """Encodes prompts and decodes ids; a thin, typed face over `tokenizers`."""

    def __init__(self, inner: HfTokenizer) -> None:
        self.inner = inner

    @classmethod
    def from_dir(cls, model_dir: Path) -> Tokenizer:
        """tokenizer.json as transformers loads it: with the added tokens tokenizer_config.json
        declares (`added_tokens_decoder`) registered, and with the special tokens
        `tokenizer(text)` adds: tokenizer.json's own, or, for the classes whose constructor
        decides them from tokenizer_config.json's add_bos_token and add_eos_token (Llama,
        Gemma, ...), those (their bos and eos as tokenizer_settings reads them)."""
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerLoadError(f"{path} is missing")
        try:
            inner = HfTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception for unreadable files
            raise TokenizerLoadError(f"{path} cannot be loaded: {exc}") from exc
        tokenizer = cls(inner)
        config_path = model_dir / "tokenizer_config.json"
        config = _read_config(config_path)
        tokenizer._add_declared(config, config_path)
        specials = _read_config(model_dir / "special_tokens_map.json")
        tokenizer._apply_flags(tokenizer_settings(config, specials), config_path)
        return tokenizer

    def _add_declared(self, config: dict[str, Any], config_path: Path) -> None:
        """Register each token of tokenizer_config.json's added_tokens_decoder that
        tokenizer.json does not hold as an added token (transformers does so at load, so that
        its text encodes to its one id); refuse one whose id the two files disagree on."""
        declared = config.get("added_tokens_decoder")
        if declared is None:
            return
        if not isinstance(declared, dict):
            raise TokenizerLoadError(f"{config_path} added_tokens_decoder must be an object")
        registered = {int(i): t.content for i, t in self.inner.get_added_tokens_decoder().items()}
        for key, entry in declared.items():
            content = entry.get("content") if isinstance(entry, dict) else None
            if not (isinstance(key, str) and key.isdigit() and isinstance(content, str)):
                raise TokenizerLoadError(
                    f"{config_path} added_tokens_decoder[{key!r}] must be an id with a content"
                )
            token_id = int(key)
            if registered.get(token_id) == content:
                continue
            held = self.token_id(content)
            if held is not None and held != token_id:
                raise TokenizerLoadError(
                    f"{config_path} declares {content!r} as id {token_id} but tokenizer.json "
                    f"has it as id {held}{_MIXED}"
                )
            special = entry.get("special") is True
            token = AddedToken(
                content,
                single_word=entry.get("single_word") is True,
                lstrip=entry.get("lstrip") is True,
                rstrip=entry.get("rstrip") is True,
                normalized=entry.get("normalized", not special) is True,
                special=special,
            )
            add = self.inner.add_special_tokens if special else self.inner.add_tokens
            add([token])
            if self.token_id(content) != token_id:
                raise TokenizerLoadError(
                    f"{config_path} declares {content!r} as id {token_id}, which tokenizer.json "
                    f"has no place for{_MIXED}"
                )

    def _apply_flags(self, config: dict[str, Any], config_path: Path) -> None:
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
        """The tokenizer's id range: its highest id + 1 (a vocabulary whose ids leave a gap,
        as tokenizers ported from tiktoken have, holds fewer tokens than that)."""
        return max(self.inner.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of text. As transformers does, special-token text (e.g. "<|user|>") maps to
        its special id; add_special_tokens adds what the tokenizer's post-processor adds (BOS for
        Llama, Mistral, Gemma, ...), as `tokenizer(text)` does by default."""
        return list(self.inner.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.inner.decode(ids, skip_special_tokens=True))

    def token_text(self, token_id: int) -> str:
        """One token's text alone, special tokens included (may be part of a character), as
        it reads after other text: SentencePiece decoders (Llama 2, Mistral, Gemma) drop the
        space that begins a text, so "▁Hello" decoded alone is "Hello" but " Hello" after a
        letter. Byte-level BPE text is the token's alone either way."""
        alone = [token_id]
        if self._lead is None:
            return str(self.inner.decode(alone, skip_special_tokens=False))
        lead_id, lead = self._lead
        text = str(self.inner.decode([lead_id, token_id], skip_special_tokens=False))
        if text.startswith(lead):
            return text[len(lead) :]
        return str(self.inner.decode(alone, skip_special_tokens=False))

    @functools.cached_property
    def _lead(self) -> tuple[int, str] | None:
        """A token that decodes to one plain letter, to decode a token after (see token_text)."""
        for letter in "axeo":
            token_id = self.token_id(letter)
            if token_id is not None and self.inner.decode([token_id]) == letter:
                return token_id, letter
        return None

    def token_bytes(self, token_id: int) -> bytes:
        """One token's own bytes (OpenAI's logprobs `bytes`): token_text's UTF-8, but exact
        where token_text holds only part of a character (U+FFFD), so that the bytes of
        consecutive tokens join into the characters they spell. Exact for byte-level BPE
        vocabularies (GPT-2's byte alphabet) and byte fallback tokens (`<0xNN>`); an added
        token goes through the decoder as the stream's text does (SentencePiece's "▁foo" is
        " foo"). Computed per call, only for requests that ask for logprobs."""
        piece = self.inner.id_to_token(token_id)
        spelt = None if piece is None else self._piece_bytes(piece)
        return self.token_text(token_id).encode() if spelt is None else spelt

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of the special added tokens: text decodes without them."""
        added = self.inner.get_added_tokens_decoder().items()
        return frozenset(int(i) for i, token in added if token.special)

    @functools.cached_property
    def _piece_bytes(self) -> Callable[[str], bytes | None]:
        """How the decoder turns a vocabulary piece into bytes, where that is exact (None:
        the piece's text is its token_text). A decoder that is GPT-2's ByteLevel alone maps
        every piece through the byte alphabet; one with ByteFallback makes `<0xNN>` its byte
        (and its other pieces, SentencePiece's "▁" spaces included, are their token_text)."""
        decoder = self.inner.decoder
        state = json.loads(decoder.__getstate__()) if decoder is not None else {}
        steps = state.get("decoders", []) if state.get("type") == "Sequence" else [state]
        kinds = [step.get("type") for step in steps]
        if kinds == ["ByteLevel"]:
            return _byte_level_bytes
        if "ByteFallback" in kinds:
            return _byte_fallback_bytes
        return _no_bytes

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


def _token_value(value: object) -> str | None:
    """A special token's text: the files write it as text or as {"content": text, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _token_text(value: object) -> str:
    """A special token's text, or "" where the value is none."""
    return _token_value(value) or ""
