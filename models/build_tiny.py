"""Build the bundled tokenwire model reproducibly: tokenizer, training, ONNX export, checks.

A byte-level BPE tokenizer and a small Llama-architecture causal LM are trained on the Python
standard library sources of the interpreter running this script, then exported to ONNX in the
Hugging Face Optimum "text-generation-with-past" layout:

  inputs  input_ids [b, s] int64, attention_mask [b, p+s] int64, position_ids [b, s] int64,
          past_key_values.{i}.key|value [b, kv_heads, p, head_dim] float32
  outputs logits [b, s, vocab] float32, present.{i}.key|value [b, kv_heads, p+s, head_dim]

The graph is written with onnx.helper from the trained weights (no tracing), so its attention
semantics are exact: query at buffer index p+s sees key j iff j <= p+s and attention_mask[j]==1;
rotary positions come only from position_ids. With --steps 0 the weights stay at their seeded
random initialisation (used for benchmark models).

Run: python models/build_tiny.py --out models/tiny-py   (inside the build env, see `make model`)
"""

# torch is not installed where `make typecheck` runs, so nn.Module is Any to mypy; the model
# classes below subclass it.
# mypy: allow-subclassing-any

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn

SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
NAME = "tokenwire-tiny-py"


# ----------------------------------------------------------------------------- corpus, tokenizer
def corpus_files(limit_bytes: int) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "turtledemo"}
    files = sorted(
        p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)
    )
    chosen, total = [], 0
    for path in files:
        size = path.stat().st_size
        if total + size > limit_bytes:
            continue
        chosen.append(path)
        total += size
    return chosen


def read_corpus(files: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def train_tokenizer(texts: list[str], vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


# ----------------------------------------------------------------------------- the torch model
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(context: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    freqs = np.outer(np.arange(context, dtype=np.float64), inv)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        h, d = cfg["hidden_size"], cfg["head_dim"]
        self.heads, self.kv_heads, self.head_dim = (
            cfg["num_attention_heads"],
            cfg["num_key_value_heads"],
            d,
        )
        self.q_proj = nn.Linear(h, self.heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.heads * d, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        h, i = cfg["hidden_size"], cfg["intermediate_size"]
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        eps = cfg["rms_norm_eps"]
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])


class LlamaForCausalLM(nn.Module):
    """Parameter names match Hugging Face's LlamaForCausalLM (tied embeddings)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.model = Decoder(cfg)
        cos, sin = rope_tables(cfg["max_position_embeddings"], cfg["head_dim"], cfg["rope_theta"])
        self.register_buffer(
            "cos", torch.from_numpy(np.concatenate([cos, cos], -1)), persistent=False
        )
        self.register_buffer(
            "sin", torch.from_numpy(np.concatenate([sin, sin], -1)), persistent=False
        )
        std = 0.02
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=std)
        for layer in self.model.layers:  # scaled residual projections (GPT-2 style)
            nn.init.normal_(
                layer.self_attn.o_proj.weight, std=std / math.sqrt(2 * len(self.model.layers))
            )
            nn.init.normal_(
                layer.mlp.down_proj.weight, std=std / math.sqrt(2 * len(self.model.layers))
            )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        s = ids.shape[1]
        cos, sin = self.cos[:s], self.sin[:s]
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.model.norm(x) @ self.model.embed_tokens.weight.T


# ----------------------------------------------------------------------------- training
def train(model: LlamaForCausalLM, data: np.ndarray, args: argparse.Namespace) -> float:
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = torch.from_numpy(data.astype(np.int64))
    warmup = max(1, args.steps // 20)
    loss_value, started = float("nan"), time.time()
    model.train()
    for step in range(1, args.steps + 1):
        lr = (
            args.lr
            * min(1.0, step / warmup)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        )
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(tokens) - args.seq - 1, (args.batch,), generator=gen)
        batch = torch.stack([tokens[i : i + args.seq + 1] for i in starts.tolist()])
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = float(loss.detach())
        if step % 25 == 0 or step == args.steps:
            rate = step * args.batch * args.seq / (time.time() - started)
            print(
                f"step {step:5d}/{args.steps}  loss {loss_value:.3f}  lr {lr:.2e}  "
                f"{rate:,.0f} tok/s",
                flush=True,
            )
    model.eval()
    return loss_value


# ----------------------------------------------------------------------------- ONNX graph
class GraphBuilder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value: npt.ArrayLike, hint: str) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(
        self,
        op_type: str,
        inputs: list[str],
        hint: str = "",
        outputs: list[str] | None = None,
        **attrs: object,
    ) -> str:
        outs = outputs or [self.name(hint or op_type.lower())]
        self.nodes.append(helper.make_node(op_type, inputs, outs, **attrs))
        return outs[0]


def export_onnx(model: LlamaForCausalLM, cfg: dict[str, Any], path: Path) -> None:
    g = GraphBuilder()
    w = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    layers, heads, kvh, d = (
        cfg["num_hidden_layers"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["head_dim"],
    )
    eps = cfg["rms_norm_eps"]
    cos, sin = rope_tables(cfg["max_position_embeddings"], d, cfg["rope_theta"])
    cos_t, sin_t = g.const(cos, "cos_table"), g.const(sin, "sin_table")

    def i64(*v: int) -> str:
        return g.const(np.asarray(v, dtype=np.int64), "i64")

    def scalar(v: int) -> str:
        return g.const(np.int64(v), "s64")

    embed = g.const(w["model.embed_tokens.weight"], "embed_tokens")
    x = g.op("Gather", [embed, "input_ids"], "embedded")

    # Rotary tables for these positions: [b, 1, s, d] (cos|cos and sin|sin, HF rotate_half form).
    cos_p = g.op("Gather", [cos_t, "position_ids"], "cos_pos")
    sin_p = g.op("Gather", [sin_t, "position_ids"], "sin_pos")
    cos_f = g.op("Unsqueeze", [g.op("Concat", [cos_p, cos_p], axis=-1), i64(1)], "cos")
    sin_f = g.op("Unsqueeze", [g.op("Concat", [sin_p, sin_p], axis=-1), i64(1)], "sin")

    # Additive mask [b, 1, s, t]: causal by buffer index, and the caller's attention_mask.
    total = g.op("Gather", [g.op("Shape", ["attention_mask"]), scalar(1)], "total")
    seq = g.op("Gather", [g.op("Shape", ["input_ids"]), scalar(1)], "seq")
    past = g.op("Sub", [total, seq], "past")
    key_idx = g.op("Range", [scalar(0), total, scalar(1)], "key_idx")
    query_idx = g.op("Range", [past, total, scalar(1)], "query_idx")
    causal = g.op(
        "LessOrEqual",
        [g.op("Unsqueeze", [key_idx, i64(0)]), g.op("Unsqueeze", [query_idx, i64(1)])],
        "causal",
    )
    keep = g.op(
        "Cast", [g.op("Unsqueeze", ["attention_mask", i64(1, 2)])], "keep_pad", to=TensorProto.BOOL
    )
    allowed = g.op("And", [causal, keep], "allowed")
    bias = g.op(
        "Where",
        [allowed, g.const(np.float32(0.0), "zero"), g.const(np.float32(-1e9), "neg")],
        "mask_bias",
    )

    scale = g.const(np.float32(1.0 / math.sqrt(d)), "scale")
    rep = heads // kvh
    half = d // 2

    def rms(inp: str, weight: str) -> str:
        var = g.op("ReduceMean", [g.op("Mul", [inp, inp]), i64(-1)], "var", keepdims=1)
        inv = g.op(
            "Reciprocal", [g.op("Sqrt", [g.op("Add", [var, g.const(np.float32(eps), "eps")])])]
        )
        return g.op("Mul", [g.op("Mul", [inp, inv]), g.const(w[weight], weight)], "normed")

    def linear(inp: str, weight: str) -> str:
        return g.op("MatMul", [inp, g.const(np.ascontiguousarray(w[weight].T), weight)], "proj")

    def heads_first(t: str, n: int) -> str:
        shaped = g.op("Reshape", [t, i64(0, 0, n, d)], "split_heads")
        return g.op("Transpose", [shaped], "heads", perm=[0, 2, 1, 3])

    def rope(t: str) -> str:
        lo, hi = g.name("lo"), g.name("hi")
        g.op("Split", [t, i64(half, half)], outputs=[lo, hi], axis=-1)
        rotated = g.op("Concat", [g.op("Neg", [hi]), lo], "rotated", axis=-1)
        return g.op("Add", [g.op("Mul", [t, cos_f]), g.op("Mul", [rotated, sin_f])], "roped")

    def repeat_kv(t: str) -> str:
        if rep == 1:
            return t
        shape = g.op("Shape", [t])
        b_ = g.op("Gather", [shape, i64(0)])
        t_ = g.op("Gather", [shape, i64(2)])
        expanded_shape = g.op("Concat", [b_, i64(kvh, rep), t_, i64(d)], axis=0)
        expanded = g.op("Expand", [g.op("Unsqueeze", [t, i64(2)]), expanded_shape], "expanded")
        flat_shape = g.op("Concat", [b_, i64(heads), t_, i64(d)], axis=0)
        return g.op("Reshape", [expanded, flat_shape], "repeated")

    for i in range(layers):
        p = f"model.layers.{i}."
        h = rms(x, p + "input_layernorm.weight")
        q = rope(heads_first(linear(h, p + "self_attn.q_proj.weight"), heads))
        k = rope(heads_first(linear(h, p + "self_attn.k_proj.weight"), kvh))
        v = heads_first(linear(h, p + "self_attn.v_proj.weight"), kvh)
        k_all = g.op(
            "Concat", [f"past_key_values.{i}.key", k], outputs=[f"present.{i}.key"], axis=2
        )
        v_all = g.op(
            "Concat", [f"past_key_values.{i}.value", v], outputs=[f"present.{i}.value"], axis=2
        )
        scores = g.op(
            "Mul",
            [g.op("MatMul", [q, g.op("Transpose", [repeat_kv(k_all)], perm=[0, 1, 3, 2])]), scale],
            "scores",
        )
        probs = g.op("Softmax", [g.op("Add", [scores, bias])], "probs", axis=-1)
        ctx = g.op("Transpose", [g.op("MatMul", [probs, repeat_kv(v_all)])], perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, i64(0, 0, heads * d)], "ctx")
        x = g.op("Add", [x, linear(ctx, p + "self_attn.o_proj.weight")], "resid")
        h = rms(x, p + "post_attention_layernorm.weight")
        gate = linear(h, p + "mlp.gate_proj.weight")
        act = g.op(
            "Mul",
            [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), linear(h, p + "mlp.up_proj.weight")],
        )
        x = g.op("Add", [x, linear(act, p + "mlp.down_proj.weight")], "resid")

    final = rms(x, "model.norm.weight")
    lm_head = g.op("Transpose", [embed], "lm_head", perm=[1, 0])
    g.op("MatMul", [final, lm_head], outputs=["logits"])

    f32, i64t = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("input_ids", i64t, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info(
            "attention_mask", i64t, ["batch_size", "total_sequence_length"]
        ),
        helper.make_tensor_value_info("position_ids", i64t, ["batch_size", "sequence_length"]),
    ]
    outputs = [
        helper.make_tensor_value_info(
            "logits", f32, ["batch_size", "sequence_length", cfg["vocab_size"]]
        )
    ]
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kind}",
                    f32,
                    ["batch_size", kvh, "past_sequence_length", d],
                )
            )
            outputs.append(
                helper.make_tensor_value_info(
                    f"present.{i}.{kind}", f32, ["batch_size", kvh, "total_sequence_length", d]
                )
            )
    graph = helper.make_graph(g.nodes, NAME, inputs, outputs, g.inits)
    onnx_model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="tokenwire"
    )
    onnx_model.ir_version = 9
    onnx.checker.check_model(onnx_model, full_check=True)
    onnx.save(onnx_model, str(path))


# ----------------------------------------------------------------------------- checks
def check_parity(
    model: LlamaForCausalLM, cfg: dict[str, Any], onnx_path: Path, tok: Tokenizer
) -> str:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    layers, kvh, d = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]

    def run(
        ids: list[list[int]], mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray] | None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        b = len(ids)
        past = past or [np.zeros((b, kvh, 0, d), np.float32) for _ in range(2 * layers)]
        feed = {
            "input_ids": np.asarray(ids, np.int64),
            "attention_mask": mask.astype(np.int64),
            "position_ids": pos.astype(np.int64),
        }
        for i in range(layers):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = (
                past[2 * i],
                past[2 * i + 1],
            )
        out = sess.run(None, feed)
        return out[0], out[1:]

    prompt = tok.encode("def fib(n):\n    if n < 2:").ids
    n = len(prompt)
    ort_logits, _ = run([prompt], np.ones((1, n)), np.arange(n)[None], None)
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).numpy()
    diff = float(np.abs(ort_logits - ref).max())
    assert diff < 1e-3, f"ONNX vs torch logits differ by {diff}"

    # (b) cached decode == full recomputation for 16 greedy steps
    seq, cached = list(prompt), []
    logits, past = run([prompt], np.ones((1, n)), np.arange(n)[None], None)
    for _ in range(16):
        cached.append(int(logits[0, -1].argmax()))
        seq.append(cached[-1])
        t = len(seq)
        logits, past = run([[seq[-1]]], np.ones((1, t)), np.array([[t - 1]]), past)
    full, recomputed = list(prompt), []
    for _ in range(16):
        t = len(full)
        lg, _ = run([full], np.ones((1, t)), np.arange(t)[None], None)
        recomputed.append(int(lg[0, -1].argmax()))
        full.append(recomputed[-1])
    assert cached == recomputed, f"cached {cached} != recomputed {recomputed}"

    # (c) left-padded batch == each row alone
    a, b = tok.encode("import os").ids, tok.encode("class Stack:\n    def push(self, item):").ids
    width = max(len(a), len(b))
    rows, masks, poss = [], [], []
    for r in (a, b):
        pad = width - len(r)
        rows.append([0] * pad + r)
        masks.append([0] * pad + [1] * len(r))
        poss.append([0] * pad + list(range(len(r))))
    batched, _ = run(rows, np.array(masks), np.array(poss), None)
    for row, r in enumerate((a, b)):
        alone, _ = run([r], np.ones((1, len(r))), np.arange(len(r))[None], None)
        diff = float(np.abs(batched[row, -1] - alone[0, -1]).max())
        assert diff < 1e-3, f"padded row {row} differs by {diff}"
        assert not np.isnan(batched).any()

    # sample
    seq = tok.encode("def fib(n):").ids
    logits, past = run([seq], np.ones((1, len(seq))), np.arange(len(seq))[None], None)
    for _ in range(64):
        nxt = int(logits[0, -1].argmax())
        seq.append(nxt)
        t = len(seq)
        logits, past = run([[nxt]], np.ones((1, t)), np.array([[t - 1]]), past)
    return tok.decode(seq)


def save_hf(model: LlamaForCausalLM, onnx_dir: Path, hf_dir: Path) -> None:
    """The same weights as a Hugging Face LlamaForCausalLM directory (for other runtimes)."""
    from safetensors.torch import save_file

    hf_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        (hf_dir / name).write_bytes((onnx_dir / name).read_bytes())


# ----------------------------------------------------------------------------- main
def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "tiny-py")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=20261124)
    ap.add_argument("--corpus-bytes", type=int, default=12_000_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default=NAME)
    ap.add_argument(
        "--save-hf",
        type=Path,
        default=None,
        help="also write a Hugging Face directory (config + model.safetensors + tokenizer)",
    )
    ap.add_argument("--skip-checks", action="store_true", help="skip the ONNX parity checks")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.time()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    files = corpus_files(args.corpus_bytes)
    texts = read_corpus(files)
    corpus_hash = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    print(f"corpus: {len(files)} files, {sum(map(len, texts)):,} chars", flush=True)
    tok = train_tokenizer(texts, args.vocab)
    eos = tok.token_to_id("<|endoftext|>")
    assert eos is not None, "<|endoftext|> is one of SPECIAL_TOKENS"
    tok.save(str(out / "tokenizer.json"))
    print(f"tokenizer: {tok.get_vocab_size()} tokens", flush=True)

    cfg = {
        "_name_or_path": args.name,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        # A corpus too small for --vocab merges leaves the tokenizer smaller; the embedding keeps
        # the requested size (padded rows, as many released models have).
        "vocab_size": max(args.vocab, tok.get_vocab_size()),
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.hidden // args.heads,
        "max_position_embeddings": args.context,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    model = LlamaForCausalLM(cfg)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params:,} parameters", flush=True)

    loss = float("nan")
    if args.steps > 0:
        ids: list[int] = []
        for batch in tok.encode_batch(texts):
            ids.extend(batch.ids)
            ids.append(eos)
        data = np.asarray(ids, dtype=np.int32)
        print(f"training on {len(data):,} tokens", flush=True)
        loss = train(model, data, args)

    export_onnx(model, cfg, out / "model.onnx")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": eos, "eos_token_id": eos, "max_length": args.context}, indent=2)
        + "\n"
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": None,
                "add_bos_token": False,
                "add_eos_token": False,
                "model_max_length": args.context,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
        + "\n"
    )
    if args.save_hf is not None:
        save_hf(model, out, args.save_hf)
    if not args.skip_checks:
        sample = check_parity(model, cfg, out / "model.onnx", tok)
        print(
            "parity checks passed\n--- greedy sample ---\n" + sample + "\n---------------------",
            flush=True,
        )
    manifest = {
        "name": args.name,
        "seed": args.seed,
        "hyperparameters": {k: v for k, v in vars(args).items() if k not in {"out"}},
        "parameters": params,
        "final_loss": loss,
        "corpus": {
            "source": "CPython standard library sources (PSF license)",
            "python": sys.version.split()[0],
            "files": len(files),
            "chars": sum(map(len, texts)),
            "sha256": corpus_hash,
        },
        "build_seconds": round(time.time() - started, 1),
        "files": {p.name: sha256(p) for p in sorted(out.iterdir()) if p.name != "MANIFEST.json"},
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    print(f"wrote {out} in {manifest['build_seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
