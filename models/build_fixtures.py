"""Build tiny random-initialised ONNX fixture models of many architecture families, reproducibly.

For each family in FAMILIES this writes models/fixtures/<family>/ with:
  model.onnx              Optimum "text-generation-with-past" single graph (optimum-onnx exporter):
                          input_ids, attention_mask, [position_ids], past_key_values.{i}.key|value
                          -> logits, present.{i}.key|value
  config.json, generation_config.json        Hugging Face files of the random model
  tokenizer.json, tokenizer_config.json, special_tokens_map.json
                          a tiny byte-level BPE trained here, saved by PreTrainedTokenizerFast
  reference.json          PyTorch greedy references, logit margins, the graph's layout and its
                          position semantics measured with ONNX Runtime

Nothing is downloaded: every model is built from a config with seeded random weights. Seeds are
searched (deterministically) until every reference token has a comfortable top-1/top-2 margin.

Run: python models/build_fixtures.py   (inside models/.venv-fixtures, see `make fixtures`)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers
from optimum.utils import logging as optimum_logging
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

NEW_TOKENS = 20
VOCAB = 320
HIDDEN, HEADS, LAYERS, FFN = 32, 4, 2, 64
CONTEXT = 256
# Attention windows (Mistral, Gemma 2/3, GPT-Neo's local layers) shorter than most prompts, so
# they cut attention in the references and in every batch the tests serve.
WINDOW = 8
MIN_REL_MARGIN = 1e-3  # (top1 - top2) / max|logit| of that step, over every reference token
SEED_TRIES = 1000
PAD_LEFT = (1, 3, 8)  # masked pad columns tried by the position-semantics probes
THREADS = 2

# ----------------------------------------------------------------------------- corpus, prompts
CORPUS = """\
The quick brown fox jumps over the lazy dog. A stream of tokens flows from the model to the
client, one at a time, while the scheduler keeps the batch full. Every request gets a slot, a
mailbox and a deadline; when the client goes away the slot is freed at the next step.

def fibonacci(n: int) -> int:
    \"\"\"Return the n-th Fibonacci number.\"\"\"
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)


class Scheduler:
    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self.running: list[str] = []

    def admit(self, request: str) -> bool:
        if len(self.running) >= self.max_batch:
            return False
        self.running.append(request)
        return True

for i in range(10):
    print(i, fibonacci(i))

Once upon a time there was a little model that wanted to write poems. It read the whole
library twice, then it wrote: the sea is blue, the sky is wide, and the tokens come out one by
one. 0123456789 +-*/=<>()[]{} "quoted" 'single' numbers like 3.14159 and 2.71828 appear too.
Unicode: cafe, naive, smorgasbord, ol\u00e9, \u00fcber, \u65e5\u672c\u8a9e, \U0001f642.
"""

PROMPTS = [
    "a",
    "def",
    "Hello world",
    "def fibonacci(n):",
    "The quick brown fox",
    "Once upon a time there was a",
    "The sea is blue, the sky is wide, and",
    "class Scheduler:\n    def admit(self, req",
]
LONG_PROMPT = (
    "Every request gets a slot, a mailbox and a deadline; when the client goes away the slot is "
    "freed.\nfor i in range(10):\n"
)


# ----------------------------------------------------------------------------- tokenizers
@dataclasses.dataclass(frozen=True)
class TokenizerStyle:
    """Special tokens (in id order from 0) and which of them the post-processor prepends."""

    specials: tuple[str, ...]
    bos: str
    eos: str
    unk: str
    pad: str
    adds_bos: bool


TOKENIZER_STYLES = {
    # GPT-2 / GPT-NeoX / Qwen / StarCoder: one special, nothing added to the text.
    "gpt2": TokenizerStyle(
        ("<|endoftext|>",),
        "<|endoftext|>",
        "<|endoftext|>",
        "<|endoftext|>",
        "<|endoftext|>",
        False,
    ),
    # Llama 2 / Mistral / Phi-3 / Cohere: <s> prepended by the post-processor.
    "llama": TokenizerStyle(
        ("<unk>", "<s>", "</s>", "<pad>"), "<s>", "</s>", "<unk>", "<pad>", True
    ),
    # Gemma: <pad>=0, <eos>=1, <bos>=2, <unk>=3; <bos> prepended.
    "gemma": TokenizerStyle(
        ("<pad>", "<eos>", "<bos>", "<unk>"), "<bos>", "<eos>", "<unk>", "<pad>", True
    ),
    # OPT: the prepended BOS is </s>, the same id as EOS (a real OPT quirk).
    "opt": TokenizerStyle(
        ("<s>", "<pad>", "</s>", "<unk>"), "</s>", "</s>", "<unk>", "<pad>", True
    ),
}


def train_tokenizer(style: TokenizerStyle, context: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=list(style.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer)
    if style.adds_bos:
        bos_id = tok.token_to_id(style.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{style.bos} $A",
            pair=f"{style.bos} $A {style.bos} $B",
            special_tokens=[(style.bos, bos_id)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=style.bos,
        eos_token=style.eos,
        unk_token=style.unk,
        pad_token=style.pad,
        model_max_length=context,
        clean_up_tokenization_spaces=False,
    )


# ----------------------------------------------------------------------------- families
@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture: its config keys, tokenizer style, context key and init scale."""

    model_type: str
    config: dict[str, Any]
    tokenizer: str
    context_key: str | None  # the config key holding the context length (None: ALiBi, no limit)
    init_std: float = 0.5
    min_distinct: int = NEW_TOKENS // 4  # distinct ids required in every reference output


LLAMA_LIKE = {
    "hidden_size": HIDDEN,
    "intermediate_size": FFN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "max_position_embeddings": CONTEXT,
}
GQA = {**LLAMA_LIKE, "num_key_value_heads": 2}
MPE = "max_position_embeddings"
GEMMA23 = {
    **GQA,
    "head_dim": 16,
    "query_pre_attn_scalar": 16,
    "sliding_window": WINDOW,
    "tie_word_embeddings": False,
}
# The decoder of an encoder-decoder family, served alone (BartForCausalLM, ...): positions come
# from the cache width (learned in BART, sinusoidal in Marian). The encoder is not built, but
# config.json's num_hidden_layers is its layer count (and transformers sizes generate()'s cache
# by it), so it equals the decoder's.
SEQ2SEQ_DECODER = {
    "d_model": HIDDEN,
    "decoder_layers": LAYERS,
    "decoder_attention_heads": HEADS,
    "decoder_ffn_dim": FFN,
    "encoder_layers": LAYERS,
    "encoder_attention_heads": HEADS,
    "encoder_ffn_dim": FFN,
    "max_position_embeddings": CONTEXT,
}

FAMILIES: dict[str, Family] = {
    "llama": Family("llama", GQA, "llama", MPE),
    "mistral": Family("mistral", {**GQA, "sliding_window": WINDOW}, "llama", MPE),
    "qwen2": Family("qwen2", {**GQA, "tie_word_embeddings": True}, "gpt2", MPE),
    # head_dim 16 != hidden / heads (8): q_proj widens, as in real Qwen3 checkpoints.
    "qwen3": Family("qwen3", {**GQA, "head_dim": 16, "tie_word_embeddings": True}, "gpt2", MPE),
    "phi3": Family("phi3", GQA, "llama", MPE),
    "phi": Family("phi", {**LLAMA_LIKE, "partial_rotary_factor": 0.5}, "gpt2", MPE),
    # Gemma: multi-query (1 KV head), head_dim 16 != hidden / heads, no position_ids input.
    "gemma": Family(
        "gemma",
        {**LLAMA_LIKE, "num_key_value_heads": 1, "head_dim": 16},
        "gemma",
        MPE,
        init_std=1.0,
    ),
    # Untied: with Gemma 2/3's post-sublayer norms a tied random model only repeats its input.
    "gemma2": Family("gemma2", GEMMA23, "gemma", MPE),
    "gemma3_text": Family("gemma3_text", GEMMA23, "gemma", MPE),
    # The multimodal Gemma 3 (Gemma3ForConditionalGeneration) exported for text: the language
    # model's config nested as text_config, a tiny vision tower the text graph leaves out.
    "gemma3": Family(
        "gemma3",
        {
            "text_config": GEMMA23,
            "vision_config": {
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 28,
                "patch_size": 14,
            },
            "mm_tokens_per_image": 4,
        },
        "gemma",
        MPE,
    ),
    "granite": Family("granite", GQA, "gpt2", MPE),
    "olmo": Family("olmo", GQA, "gpt2", MPE),
    "stablelm": Family("stablelm", {**GQA, "partial_rotary_factor": 0.25}, "gpt2", MPE),
    "cohere": Family("cohere", GQA, "llama", MPE),
    "arcee": Family("arcee", GQA, "llama", MPE),
    "olmo2": Family("olmo2", GQA, "gpt2", MPE),
    # Rotary on interleaved pairs; head_dim stated (Helium's config defaults to 128).
    "helium": Family("helium", {**GQA, "head_dim": HIDDEN // HEADS}, "gpt2", MPE),
    # Every other layer without rotary (NoPE).
    "smollm3": Family("smollm3", {**GQA, "no_rope_layer_interval": 2}, "gpt2", MPE),
    # Positions counted from the cache width; rotary on half of each head.
    "nemotron": Family("nemotron", {**GQA, "partial_rotary_factor": 0.5}, "gpt2", MPE),
    "glm": Family("glm", {**GQA, "head_dim": 8, "partial_rotary_factor": 0.5}, "gpt2", MPE),
    "qwen3_moe": Family(
        "qwen3_moe",
        {
            **GQA,
            "head_dim": 16,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "decoder_sparse_step": 1,
        },
        "gpt2",
        MPE,
    ),
    # Attention sinks, a windowed layer beside a full one, experts.
    "gpt_oss": Family(
        "gpt_oss",
        {
            **GQA,
            "head_dim": 16,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        "gpt2",
        MPE,
    ),
    # Multi-head latent attention: keys 16 wide (8 without rotary + 8 rotary), values 8.
    "deepseek_v3": Family(
        "deepseek_v3",
        {
            **GQA,
            "num_key_value_heads": HEADS,
            "kv_lora_rank": 16,
            "q_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 8,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
        },
        "llama",
        MPE,
    ),
    "gpt2": Family(
        "gpt2",
        {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_inner": FFN, "n_positions": 128},
        "gpt2",
        "n_positions",
    ),
    "gptj": Family(
        "gptj",
        {
            "n_embd": HIDDEN,
            "n_layer": LAYERS,
            "n_head": HEADS,
            "n_inner": FFN,
            "rotary_dim": 4,
            "n_positions": CONTEXT,
        },
        "gpt2",
        "n_positions",
    ),
    "gpt_neo": Family(
        "gpt_neo",
        {
            "hidden_size": HIDDEN,
            "num_layers": LAYERS,
            "num_heads": HEADS,
            "intermediate_size": FFN,
            "attention_types": [[["global", "local"], 1]],
            "window_size": WINDOW,
            "max_position_embeddings": CONTEXT,
        },
        "gpt2",
        MPE,
    ),
    "gpt_neox": Family("gpt_neox", {**LLAMA_LIKE, "rotary_pct": 0.25}, "gpt2", MPE),
    "codegen": Family(
        "codegen",
        {
            "n_embd": HIDDEN,
            "n_layer": LAYERS,
            "n_head": HEADS,
            "n_inner": FFN,
            "rotary_dim": 4,
            "n_positions": CONTEXT,
            "n_ctx": CONTEXT,
        },
        "gpt2",
        "n_positions",
    ),
    "gpt_bigcode": Family(
        "gpt_bigcode",
        {
            "n_embd": HIDDEN,
            "n_layer": LAYERS,
            "n_head": HEADS,
            "n_inner": FFN,
            "n_positions": CONTEXT,
            "multi_query": True,
        },
        "gpt2",
        "n_positions",
    ),
    "falcon": Family(
        "falcon",
        {
            "hidden_size": HIDDEN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "multi_query": True,
            "new_decoder_architecture": False,
            "parallel_attn": True,
            "alibi": False,
            "max_position_embeddings": CONTEXT,
        },
        "gpt2",
        MPE,
    ),
    # Untied, and fewer distinct ids asked for: ALiBi's local heads make a random BLOOM fall
    # into short cycles of the last token.
    "bloom": Family(
        "bloom",
        {"hidden_size": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "tie_word_embeddings": False},
        "gpt2",
        None,
        min_distinct=3,
    ),
    "opt": Family(
        "opt",
        {
            "hidden_size": HIDDEN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "ffn_dim": FFN,
            "word_embed_proj_dim": HIDDEN,
            "max_position_embeddings": CONTEXT,
        },
        "opt",
        MPE,
    ),
    # OPT's tokenizer: BART's decoder starts from </s> (its decoder_start_token_id) too.
    "bart": Family("bart", SEQ2SEQ_DECODER, "opt", MPE),
    "marian": Family("marian", SEQ2SEQ_DECODER, "gpt2", MPE),
    "mpt": Family(
        "mpt",
        {
            "d_model": HIDDEN,
            "n_layers": LAYERS,
            "n_heads": HEADS,
            "expansion_ratio": 2,
            "max_seq_len": CONTEXT,
        },
        "gpt2",
        "max_seq_len",
    ),
}


def text_config(family: Family) -> dict[str, Any]:
    """The language model's config keys (a multimodal config nests them as text_config)."""
    nested = family.config.get("text_config")
    return dict(nested) if isinstance(nested, dict) else family.config


def context_length(family: Family) -> int:
    return int(text_config(family).get(family.context_key or "", CONTEXT))


def build_model(family: Family, tok: PreTrainedTokenizerFast, seed: int) -> PreTrainedModel:
    """A seeded random model; every matrix is re-drawn from N(0, init_std) so logits spread out."""
    tokens = {
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "initializer_range": family.init_std,
    }
    text = text_config(family)
    nested = "text_config" in family.config
    if nested:  # the ids at both levels, the vocabulary only where the language model reads it
        config = {**family.config, "text_config": {**text, **tokens}}
        tokens = {k: v for k, v in tokens.items() if k != "vocab_size"}
    else:
        config = family.config
    cfg = AutoConfig.for_model(family.model_type, **config, **tokens)
    # Some configs drop keys they do not declare.
    for key, value in text.items():
        setattr(cfg.get_text_config() if nested else cfg, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():  # tied weights appear once
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * family.init_std)
    # No EOS here: generate() would copy a model-level EOS into the reference runs' config.
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id
    )
    return model.eval()


# ----------------------------------------------------------------------------- PyTorch references
@dataclasses.dataclass
class Reference:
    text: str
    prompt_ids: list[int]
    output_ids: list[int]
    min_margin: float  # smallest top1 - top2 logit gap over the generated tokens
    min_rel_margin: float  # the same gap divided by that step's max |logit|
    long: bool


def torch_greedy(
    model: PreTrainedModel, tok: PreTrainedTokenizerFast, text: str, long: bool
) -> Reference:
    """Solo (batch 1) fp32 greedy run; EOS never stops it and no logits processor is active."""
    prompt_ids = list(tok(text)["input_ids"])
    gen_cfg = GenerationConfig(
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        eos_token_id=None,  # no stop and no EOS suppression: plain argmax for exactly N steps
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        # PreTrainedModel's type lacks GenerationMixin (the *ForCausalLM classes mix it in).
        # unused-ignore: where transformers is not installed (`make typecheck`) it is Any.
        out = model.generate(  # type: ignore[operator, unused-ignore]
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=gen_cfg,
            output_logits=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[0, len(prompt_ids) :].tolist()
    assert len(new) == NEW_TOKENS, f"generate stopped early: {len(new)} tokens"
    margins, rel = [], []
    for step, logits in enumerate(out.logits):
        row = logits[0].double()
        top = torch.topk(row, 2).values
        assert int(row.argmax()) == new[step]
        margins.append(float(top[0] - top[1]))
        rel.append(float((top[0] - top[1]) / row.abs().max()))
    return Reference(text, prompt_ids, new, min(margins), min(rel), long)


def acceptable(ref: Reference, tok: PreTrainedTokenizerFast, min_distinct: int) -> bool:
    """A comfortable margin, a varied output, and no EOS generated (so EOS stops change nothing)."""
    return (
        ref.min_rel_margin >= MIN_REL_MARGIN
        and len(set(ref.output_ids)) >= min_distinct
        and tok.eos_token_id not in ref.output_ids
    )


def references(
    model: PreTrainedModel, tok: PreTrainedTokenizerFast, min_distinct: int
) -> list[Reference] | None:
    """All prompts' references, or None as soon as one is not acceptable."""
    refs = []
    for text, long in [*((t, False) for t in PROMPTS), (LONG_PROMPT, True)]:
        ref = torch_greedy(model, tok, text, long)
        if not acceptable(ref, tok, min_distinct):
            return None
        refs.append(ref)
    return refs


def choose_seed(
    name: str, family: Family, tok: PreTrainedTokenizerFast
) -> tuple[int, PreTrainedModel, list[Reference]]:
    """The first seed from a per-family start (so families differ) whose references all pass."""
    start = zlib.crc32(name.encode()) % 1_000_000
    for seed in range(start, start + SEED_TRIES):
        model = build_model(family, tok, seed)
        refs = references(model, tok, family.min_distinct)
        if refs is not None:
            return seed, model, refs
    raise RuntimeError(f"no seed in {SEED_TRIES} tries gives acceptable references")


# ----------------------------------------------------------------------------- ONNX export, layout
def export_onnx(model: PreTrainedModel, path: Path) -> None:
    from optimum.exporters.onnx import onnx_export_from_model

    with tempfile.TemporaryDirectory() as tmp:
        onnx_export_from_model(model, tmp, task="text-generation-with-past", do_validation=False)
        files = sorted(p.name for p in Path(tmp).iterdir())
        assert "model.onnx" in files, files
        assert not any(f.endswith("_data") for f in files), f"external data: {files}"
        shutil.copyfile(Path(tmp) / "model.onnx", path)


def _dims(value: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _dtype(value: onnx.ValueInfoProto) -> str:
    return str(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))


def graph_layout(path: Path) -> dict[str, Any]:
    proto = onnx.load(str(path))
    graph = proto.graph
    inputs = {v.name: v for v in graph.input}
    outputs = {v.name: v for v in graph.output}
    key, value = inputs["past_key_values.0.key"], inputs["past_key_values.0.value"]
    key_dims, value_dims = _dims(key), _dims(value)
    for dims in (key_dims, value_dims):
        assert len(dims) == 4, f"expected [batch, kv_heads, past, head_dim], got {dims}"
    return {
        "inputs": list(inputs),
        "outputs": list(outputs),
        "has_position_ids": "position_ids" in inputs,
        "num_layers": sum(
            1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key")
        ),
        "input_dims": {
            n: _dims(v) for n, v in inputs.items() if not n.startswith("past_key_values.")
        },
        "past_key_shape": key_dims,
        "past_value_shape": value_dims,
        "present_key_shape": _dims(outputs["present.0.key"]),
        "present_value_shape": _dims(outputs["present.0.value"]),
        "logits_shape": _dims(outputs["logits"]),
        "num_kv_heads": key_dims[1],
        "key_head_dim": key_dims[3],
        "value_head_dim": value_dims[3],
        "dtype": _dtype(key),
        "input_ids_dtype": _dtype(inputs["input_ids"]),
        "attention_mask_dtype": _dtype(inputs["attention_mask"]),
        "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
    }


# ----------------------------------------------------------------------------- ONNX Runtime probes
class OrtDecoder:
    """A plain greedy loop over the exported graph, with the padding probes."""

    def __init__(self, path: Path, layout: dict[str, Any], pad_id: int) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = THREADS
        self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.layout = layout
        self.pad_id = pad_id

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        heads, k_dim, v_dim = (
            self.layout[k] for k in ("num_kv_heads", "key_head_dim", "value_head_dim")
        )
        past = {}
        for i in range(self.layout["num_layers"]):
            past[f"past_key_values.{i}.key"] = np.zeros((batch, heads, 0, k_dim), np.float32)
            past[f"past_key_values.{i}.value"] = np.zeros((batch, heads, 0, v_dim), np.float32)
        return past

    def _step(
        self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One forward pass over [batch, seq] inputs: last-position logits [batch, vocab], past."""
        feed = {"input_ids": ids, "attention_mask": mask, **past}
        if self.layout["has_position_ids"]:
            feed["position_ids"] = positions
        names = [o.name for o in self.sess.get_outputs()]
        values = dict(zip(names, self.sess.run(names, feed), strict=True))
        present = {
            n.replace("present.", "past_key_values.", 1): v
            for n, v in values.items()
            if n.startswith("present.")
        }
        return values["logits"][:, -1], present

    def greedy_batch(
        self, prompts: list[list[int]], steps: int, pad_left: int = 0, shift: int = 0
    ) -> tuple[list[list[int]], np.ndarray]:
        """Left-padded prefill of all rows, then one token per row per step.

        Each row gets `pad_left` masked pad tokens plus enough to reach the longest prompt; masked
        pad positions get position id 1 and real tokens count from 0, as transformers does. With
        `shift`, that many masked zero columns are inserted at the left of every past tensor and
        of the mask right after the prefill (what a batch cache does when a longer row joins).
        Returns the ids per row and the step logits [steps, batch, vocab].
        """
        width = pad_left + max(map(len, prompts))
        pads = [width - len(p) for p in prompts]
        ids = np.array([[self.pad_id] * k + p for k, p in zip(pads, prompts, strict=True)])
        mask = np.array([[0] * k + [1] * len(p) for k, p in zip(pads, prompts, strict=True)])
        positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)
        logits, past = self._step(ids, mask, positions, self._empty_past(len(prompts)))
        if shift:
            past = {n: np.pad(v, ((0, 0), (0, 0), (shift, 0), (0, 0))) for n, v in past.items()}
            mask = np.pad(mask, ((0, 0), (shift, 0)))
        lengths = np.array([len(p) for p in prompts])
        rows = [logits]
        for step in range(1, steps):
            mask = np.pad(mask, ((0, 0), (0, 1)), constant_values=1)
            nxt = rows[-1].argmax(axis=1)[:, None]
            logits, past = self._step(nxt, mask, (lengths + step - 1)[:, None], past)
            rows.append(logits)
        stacked = np.stack(rows)
        return stacked.argmax(axis=2).T.tolist(), stacked

    def greedy(
        self, prompt: list[int], steps: int, pad_left: int = 0, shift: int = 0
    ) -> tuple[list[int], np.ndarray]:
        """greedy_batch for one row: its ids and step logits [steps, vocab]."""
        ids, logits = self.greedy_batch([prompt], steps, pad_left, shift)
        return ids[0], logits[:, 0]


def probe_graph(decoder: OrtDecoder, refs: list[Reference]) -> dict[str, Any]:
    """ORT must reproduce the PyTorch ids; then measure what padding does to this graph."""
    base = [decoder.greedy(r.prompt_ids, NEW_TOKENS) for r in refs]
    mismatched = [
        i for i, (r, (ids, _)) in enumerate(zip(refs, base, strict=True)) if ids != r.output_ids
    ]
    assert 0 not in mismatched, "ONNX Runtime greedy ids differ from PyTorch on prompt 0"
    assert not mismatched, f"ONNX Runtime greedy ids differ from PyTorch on prompts {mismatched}"
    found: dict[str, Any] = {
        "ort_greedy_matches_torch_prompts": len(refs),
        "probe": f"every prompt, k in {list(PAD_LEFT)} masked columns (pad id {decoder.pad_id}, "
        "position id 1 for pads, real tokens' positions from 0); ids compared with no padding. "
        "batched: all prompts in one batch, left-padded to the longest, compared with solo",
    }
    for name, key in (("left_pad_from_start", "pad_left"), ("shift_mid_sequence", "shift")):
        same, diff = True, 0.0
        for r, (ids, logits) in zip(refs, base, strict=True):
            for k in PAD_LEFT:
                got, got_logits = decoder.greedy(r.prompt_ids, NEW_TOKENS, **{key: k})
                same = same and got == ids
                diff = max(diff, float(np.abs(got_logits - logits).max()))
        found[f"{name}_ok"] = same
        found[f"{name}_max_abs_logit_diff"] = diff
    batch_ids, batch_logits = decoder.greedy_batch([r.prompt_ids for r in refs], NEW_TOKENS)
    found["batched_left_pad_ok"] = batch_ids == [ids for ids, _ in base]
    found["batched_left_pad_max_abs_logit_diff"] = float(
        np.abs(batch_logits - np.stack([logits for _, logits in base], axis=1)).max()
    )
    return found


# ----------------------------------------------------------------------------- writing a fixture
def _one_line(match: re.Match[str]) -> str:
    return "[" + re.sub(r"\s*\n\s*", " ", match[0][1:-1]).strip() + "]"


def write_json(path: Path, data: object) -> None:
    """Indented JSON with flat lists (ids, shapes, names) kept on one line each."""
    text = re.sub(r"\[[^\[\]{}]*\]", _one_line, json.dumps(data, indent=2, ensure_ascii=False))
    path.write_text(text + "\n", encoding="utf-8")


def build_family(name: str, family: Family, out: Path) -> dict[str, Any]:
    started = time.time()
    style = TOKENIZER_STYLES[family.tokenizer]
    tok = train_tokenizer(style, context_length(family))
    seed, model, refs = choose_seed(name, family, tok)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tok.save_pretrained(str(out))
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(str(out))
    GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    ).save_pretrained(str(out))
    export_onnx(model, out / "model.onnx")
    layout = graph_layout(out / "model.onnx")
    layout.update(probe_graph(OrtDecoder(out / "model.onnx", layout, tok.pad_token_id), refs))
    check_tokenizer_files(out, refs)
    reference = {
        "family": name,
        "model_type": family.model_type,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "seed": seed,
        "init_std": family.init_std,
        "tokenizer_adds_bos": style.adds_bos,
        "context_key": family.context_key,
        "context_length": context_length(family) if family.context_key else None,
        "max_new_tokens": NEW_TOKENS,
        "generation": "model.generate(do_sample=False, max_new_tokens=N, min_new_tokens=N, "
        "eos_token_id=None): plain argmax for exactly N steps, solo, fp32, eager attention",
        "min_margin": min(r.min_margin for r in refs),
        "min_rel_margin": min(r.min_rel_margin for r in refs),
        "prompts": [dataclasses.asdict(r) for r in refs],
        "graph": layout,
    }
    write_json(out / "reference.json", reference)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(
        f"{name:12s} seed {seed:6d} {size / 1024:4.0f} KiB "
        f"pos_ids={layout['has_position_ids']!s:5s} "
        f"kv={layout['num_kv_heads']} dk={layout['key_head_dim']} dv={layout['value_head_dim']} "
        f"rel_margin={reference['min_rel_margin']:.2e} pad={layout['left_pad_from_start_ok']} "
        f"shift={layout['shift_mid_sequence_ok']} batch={layout['batched_left_pad_ok']} "
        f"{time.time() - started:.1f} s",
        flush=True,
    )
    return reference


def check_tokenizer_files(out: Path, refs: list[Reference]) -> None:
    """The saved tokenizer.json alone (tokenizers library) encodes exactly like transformers."""
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    reloaded = PreTrainedTokenizerFast.from_pretrained(str(out))
    for r in refs:
        assert raw.encode(r.text).ids == r.prompt_ids, r.text
        assert reloaded(r.text)["input_ids"] == r.prompt_ids, r.text


def quiet() -> None:
    """Tracing and deprecation chatter from the exporter would bury the one line per family."""
    for category in (torch.jit.TracerWarning, FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    transformers.logging.set_verbosity_error()
    # "Weight deduplication ... requires accelerate": tied matrices stay duplicated in the graph.
    optimum_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "fixtures")
    ap.add_argument("families", nargs="*", default=list(FAMILIES), help="default: all")
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)
    quiet()
    torch.use_deterministic_algorithms(True)
    failed: dict[str, str] = {}
    for name in args.families:
        try:
            build_family(name, FAMILIES[name], args.out / name)
        except Exception as exc:  # one family failing must not stop the rest
            failed[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            print(f"{name:12s} FAILED  {failed[name]}", flush=True)
    if failed:
        print("not built:\n" + "\n".join(f"  {k}: {v}" for k, v in failed.items()), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
