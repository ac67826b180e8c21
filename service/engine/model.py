"""An ONNX Runtime causal LM in the Hugging Face Optimum "with past" layout.

Shapes come from config.json and the graph's input names, not from constants, so any
Llama-like Optimum export loads the same way:
  inputs  input_ids [b, s], attention_mask [b, p+s], position_ids [b, s] (optional),
          past_key_values.{i}.key|value [b, kv_heads, p, head_dim]
  outputs logits [b, s, vocab], present.{i}.key|value [b, kv_heads, p+s, head_dim]
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]


class ModelLoadError(RuntimeError):
    """The model directory is missing a file or has a layout the engine cannot drive."""


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSpec:
    """What the engine needs to know about a model, read from its directory."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    eos_token_ids: frozenset[int]
    chat_template: str = ""

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelSpec:
        config = _read_json(model_dir / "config.json")
        generation = _read_json(model_dir / "generation_config.json", required=False)
        tokenizer_config = _read_json(model_dir / "tokenizer_config.json", required=False)
        heads = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        eos = _as_ids(generation.get("eos_token_id", config.get("eos_token_id")))
        return cls(
            name=str(config.get("_name_or_path") or model_dir.name),
            num_layers=int(config["num_hidden_layers"]),
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            vocab_size=int(config["vocab_size"]),
            context_length=int(config.get("max_position_embeddings", 2048)),
            eos_token_ids=frozenset(eos),
            chat_template=str(tokenizer_config.get("chat_template") or ""),
        )


def _read_json(path: Path, *, required: bool = True) -> dict[str, Any]:
    if not path.exists():
        if required:
            raise ModelLoadError(f"{path} is missing")
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return data


def _as_ids(value: object) -> list[int]:
    if value is None:
        return []
    if isinstance(value, list):
        return [int(v) for v in value]
    return [int(str(value))]


def cuda_device_present() -> bool:
    """True when an NVIDIA driver exposes a device; avoids noisy CUDA probes on CPU hosts."""
    return Path("/proc/driver/nvidia").exists() or Path("/dev/nvidia0").exists()


def choose_providers(preference: str) -> list[str]:
    """Execution providers to ask for: CUDA first where usable, CPU always as the fallback."""
    wants_cuda = preference == "cuda" or (preference == "auto" and cuda_device_present())
    if wants_cuda and CUDA in ort.get_available_providers():
        return [CUDA, CPU]
    return [CPU]


class CausalLM(Protocol):
    """What the scheduler needs from a model: its shape, an empty cache, and one step."""

    spec: ModelSpec
    provider: str

    def empty_cache(self, batch: int = 1) -> list[FloatArray]: ...

    def forward(
        self,
        input_ids: IntArray,
        attention_mask: IntArray,
        position_ids: IntArray,
        past: list[FloatArray],
    ) -> tuple[FloatArray, list[FloatArray]]: ...


class OnnxCausalLM:
    """One ONNX Runtime session over a decoder with a KV cache. Not thread-safe: one caller."""

    def __init__(
        self,
        model_dir: Path,
        *,
        provider: str = "auto",
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
        spinning: bool = True,
    ) -> None:
        self.spec = ModelSpec.from_dir(model_dir)
        onnx_path = model_dir / "model.onnx"
        if not onnx_path.exists():
            raise ModelLoadError(f"{onnx_path} is missing")
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spinning:
            # Idle ORT workers sleep instead of spinning: gives the CPU back to the event loop
            # (and to co-located processes) between steps, at a small wake-up cost per step.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            os.fspath(onnx_path), options, providers=choose_providers(provider)
        )
        self.provider: str = self.session.get_providers()[0]
        self._input_names = {i.name for i in self.session.get_inputs()}
        self.past_names = self._past_input_names()
        self.cache_dtype = _cache_dtype(self.session, self.past_names[0])
        self.output_names = ["logits"] + [
            n.replace("past_key_values", "present") for n in self.past_names
        ]
        self._has_position_ids = "position_ids" in self._input_names

    def _past_input_names(self) -> list[str]:
        found = {m.groups() for n in self._input_names if (m := _PAST.match(n))}
        layers = sorted({int(layer) for layer, _ in found})
        if len(found) != 2 * len(layers) or layers != list(range(self.spec.num_layers)):
            raise ModelLoadError(
                f"model.onnx has past inputs for layers {layers}, config.json says "
                f"{self.spec.num_layers} layers; expected past_key_values.N.key/value for each"
            )
        return [f"past_key_values.{i}.{kind}" for i in layers for kind in ("key", "value")]

    def empty_cache(self, batch: int = 1) -> list[FloatArray]:
        shape = (batch, self.spec.num_kv_heads, 0, self.spec.head_dim)
        return [np.zeros(shape, dtype=self.cache_dtype) for _ in self.past_names]

    def forward(
        self,
        input_ids: IntArray,
        attention_mask: IntArray,
        position_ids: IntArray,
        past: list[FloatArray],
    ) -> tuple[FloatArray, list[FloatArray]]:
        """Run one step; return the last position's logits [b, vocab] and the new cache."""
        feed: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._has_position_ids:
            feed["position_ids"] = position_ids
        feed.update(zip(self.past_names, past, strict=True))
        outputs = self.session.run(self.output_names, feed)
        logits = np.asarray(outputs[0][:, -1, :], dtype=np.float32)
        return logits, list(outputs[1:])


def _cache_dtype(session: ort.InferenceSession, name: str) -> type[np.floating[Any]]:
    kind = next(i.type for i in session.get_inputs() if i.name == name)
    return np.float16 if kind == "tensor(float16)" else np.float32
