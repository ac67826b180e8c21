"""Build tiny ONNX Runtime GenAI model folders with GenAI greedy references.

Inside the benchmark environment (torch, transformers, onnxruntime-genai):
    bench/.venv/bin/python models/build_genai_fixtures.py        (`make genai-fixtures`)

Writes models/fixtures-genai/<family>-<precision>/: what
`python -m onnxruntime_genai.models.builder` writes for a random-initialised model of each
family in FAMILIES (GroupQueryAttention, rotary inside; int4 weights as MatMulNBits), plus
reference.json: each prompt's ids and the ids ONNX Runtime GenAI's Generator decodes greedily
from them, alone (a family's new_tokens, or up to and including EOS). The families differ where the
engine could go wrong: an attention window on alternate layers with soft-capped attention,
partial rotary, LongRoPE (rotary tables chosen by the mask's width), query/key norms.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import onnx
import onnxruntime_genai as og
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

OUT = Path(__file__).resolve().parent / "fixtures-genai"
NEW_TOKENS = 16
PROMPTS = [
    "Beautiful is better than ugly.",
    "Explicit",
    "Simple is better than complex.\nComplex is better than complicated.",
    "a",
    "Errors should never pass silently.",
    "Now is better than never.\nAlthough never is often better than *right* now.",
    "If the implementation is hard to explain, it's a bad idea.",
    "Namespaces are one honking great idea",
]
LONG = " ".join(PROMPTS[:6])
CORPUS = "\n".join(
    [
        *PROMPTS,
        "Flat is better than nested.",
        "Sparse is better than dense.",
        "Readability counts.",
        "In the face of ambiguity, refuse to guess.",
        "def main():\n    return 0\n",
        "for i in range(10):\n    print(i)\n",
    ]
)


def tokenizer() -> PreTrainedTokenizerFast:
    """A 320-entry byte-level BPE that adds BOS, as Llama's tokenizer does."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


class Family(NamedTuple):
    """A family's transformers classes, what its config sets beyond COMMON, its precisions and
    the builder's extra options."""

    config: str
    model: str
    overrides: dict[str, Any]
    precisions: tuple[str, ...] = ("fp32",)
    extra_options: str = ""
    new_tokens: int = NEW_TOKENS
    """Greedy ids per prompt in the references."""


COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "initializer_range": 0.3,
    "bos_token_id": 0,
    "eos_token_id": 1,
}
# A window of 8 tokens is shorter than most prompts, so it cuts attention in the references.
# The builder's default for windowed layers is a window-sized cache that GenAI slides; tokenwire
# serves the full-length layout (`windowed_kv_cache=false`, the window still applied by
# GroupQueryAttention).
FULL_LENGTH_CACHES = "windowed_kv_cache=false"
FAMILIES = {
    "llama": Family(
        "LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}, ("fp32", "int4")
    ),
    "gemma2": Family(
        "Gemma2Config",
        "Gemma2ForCausalLM",
        # Untied: with Gemma 2's post-sublayer norms a tied random model repeats one token.
        {
            "head_dim": 16,
            "sliding_window": 8,
            "query_pre_attn_scalar": 16,
            "tie_word_embeddings": False,
        },
        extra_options=FULL_LENGTH_CACHES,
    ),
    # Head dim 32, rotary on half of it: GroupQueryAttention wants a rotary width of 16 or more.
    "phi": Family(
        "PhiConfig",
        "PhiForCausalLM",
        {
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "partial_rotary_factor": 0.5,
            "tie_word_embeddings": False,
        },
    ),
    # LongRoPE: GenAI's graph picks its short or long rotary tables by the attention mask's
    # width (beyond original_max_position_embeddings, 64). 48 new ids: prompts of 17 ids or
    # more cross 64 entries while they decode, and the long prompt starts past them.
    "phi3_longrope": Family(
        "Phi3Config",
        "Phi3ForCausalLM",
        {
            "original_max_position_embeddings": 64,
            "rope_scaling": {
                "type": "longrope",
                "rope_type": "longrope",
                "short_factor": [1.0 + i / 10 for i in range(8)],
                "long_factor": [1.0 + i / 2 for i in range(8)],
            },
            "pad_token_id": 1,
            "tie_word_embeddings": False,
        },
        new_tokens=48,
    ),
    "qwen3": Family(
        "Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16, "tie_word_embeddings": False}
    ),
}


def hf_model(hf_dir: Path, tok: PreTrainedTokenizerFast, family: Family) -> None:
    torch.manual_seed(1234)
    config = getattr(transformers, family.config)(
        vocab_size=len(tok), **{**COMMON, **family.overrides}
    )
    getattr(transformers, family.model)(config).eval().save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)


def build(hf_dir: Path, precision: str, out: Path, cache: Path, extra_options: str) -> None:
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(hf_dir),
            "-o",
            str(out),
            "-p",
            precision,
            "-e",
            "cpu",
            "-c",
            str(cache),
            *(["--extra_options", extra_options] if extra_options else []),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # The builder stamps a per-run suffix into producer_version; keep the file byte-stable.
    graph = onnx.load(out / "model.onnx", load_external_data=False)
    graph.producer_version = og.__version__
    onnx.save(graph, out / "model.onnx")


def references(family: str, out: Path, tok: PreTrainedTokenizerFast, new: int) -> dict[str, Any]:
    model = og.Model(str(out))
    prompts = []
    for text in [*PROMPTS, LONG]:
        ids = tok(text)["input_ids"]
        params = og.GeneratorParams(model)
        # No min_length: it would hide EOS from the argmax. A run that meets EOS ends there.
        params.set_search_options(max_length=len(ids) + new, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens([ids])
        while not generator.is_done():
            generator.generate_next_token()
        prompts.append(
            {
                "text": text,
                "prompt_ids": ids,
                "long": text == LONG,
                "output_ids": [int(t) for t in generator.get_sequence(0)][len(ids) :],
            }
        )
    return {
        "family": f"{family}-genai",
        "onnxruntime_genai_version": og.__version__,
        "max_new_tokens": new,
        "prompts": prompts,
    }


def main() -> None:
    """Build every family, or the families named on the command line."""
    tok = tokenizer()
    chosen = sys.argv[1:] or list(FAMILIES)
    for name in chosen:
        family = FAMILIES[name]
        with tempfile.TemporaryDirectory() as tmp:
            hf_dir = Path(tmp) / "hf"
            hf_model(hf_dir, tok, family)
            for precision in family.precisions:
                out = OUT / f"{name}-{precision}"
                build(hf_dir, precision, out, Path(tmp) / "cache", family.extra_options)
                reference = references(name, out, tok, family.new_tokens)
                (out / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")
                size = sum(p.stat().st_size for p in out.iterdir()) // 1024
                print(f"{out.relative_to(OUT.parent.parent)}: {size} KiB", flush=True)


if __name__ == "__main__":
    main()
