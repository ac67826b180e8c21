"""SentencePiece-style tokenizers, written from code into a folder for tests (no download).

Two layouts of the models that came from SentencePiece, over one small Unigram vocabulary with
byte fallback (a character the vocabulary lacks is spelt as its UTF-8 bytes, `<0x0A>` ...):
- `llama2`: Llama 2 / Mistral, a normalizer that prepends "▁" and turns spaces into it, and a
  decoder that turns "▁" back into spaces, fuses byte tokens and strips the first space;
- `metaspace`: Gemma-like, a Metaspace pre-tokenizer and decoder (prepend scheme "first").
Both decoders drop the space that begins a text, so "▁world" alone decodes to "world".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SPECIALS = ("<unk>", "<s>", "</s>")
PIECES = ("▁", "▁Hello", "▁world", "▁a", "▁b", "▁the", "a", "b", "o", "l", "e", "x", ";", ".")
"""Pieces after the specials and the 256 byte tokens, longest first in the Unigram's choice."""


def write(folder: Path, layout: str) -> Path:
    """Write `layout`'s tokenizer.json into folder (made if missing) and return folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(LAYOUTS[layout]()), encoding="utf-8")
    return folder


def _vocab() -> list[list[object]]:
    specials: list[list[object]] = [[token, 0.0] for token in SPECIALS]
    byte_tokens: list[list[object]] = [[f"<0x{b:02X}>", 0.0] for b in range(256)]
    # A longer piece scores higher, so the Unigram model prefers "▁Hello" to its letters.
    pieces: list[list[object]] = [[piece, -10.0 / len(piece)] for piece in PIECES]
    return specials + byte_tokens + pieces


def _model() -> dict[str, Any]:
    return {"type": "Unigram", "unk_id": 0, "vocab": _vocab(), "byte_fallback": True}


def _added() -> list[dict[str, Any]]:
    return [
        {
            "id": i,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, token in enumerate(SPECIALS)
    ]


def _llama2() -> dict[str, Any]:
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _added(),
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": _model(),
    }


def _metaspace() -> dict[str, Any]:
    metaspace = {"replacement": "▁", "prepend_scheme": "first", "split": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _added(),
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", **metaspace},
        "post_processor": None,
        "decoder": {
            "type": "Sequence",
            "decoders": [{"type": "ByteFallback"}, {"type": "Metaspace", **metaspace}],
        },
        "model": _model(),
    }


LAYOUTS = {"llama2": _llama2, "metaspace": _metaspace}
