"""The KV cache's shape, read from the graph: the graph is the source of truth.

An Optimum "with past" export names its cache inputs `past_key_values.{layer}.{key|value}`
(`key_value` where a family fuses them) and its outputs `present.{layer}.{...}`. Each input's
declared shape says the rest: axis 0 is the batch, exactly one other axis is symbolic (the
sequence), every remaining axis is fixed (KV heads, head dim). Keys and values may differ
(multi-query attention has one KV head; MLA exports have different key and value dims).
The model's config (config.json, or genai_config.json) only cross-checks these numbers: when it
disagrees, the load fails with both values.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from tokenwire.server.engine.spec import ModelLoadError, ModelSpec

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value|key_value)$")
_OTHER_STATE = re.compile(r"^past(?!_key_values\.)[._].*\d")
"""A per-layer state input that is not a KV cache (a convolution's, a recurrent layer's)."""
_ORT_DTYPES: dict[str, type[np.floating[Any]]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
}


class NodeArg(Protocol):
    """The part of onnxruntime.NodeArg this module reads."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> Sequence[int | str | None]: ...

    @property
    def type(self) -> str: ...


@dataclasses.dataclass(frozen=True, slots=True)
class CacheTensor:
    """One cache input: its name, the present output that replaces it, and its layout."""

    name: str
    present: str
    shape: tuple[int, ...]
    """Fixed dims with the sequence axis set to 0 (batch axis 0 is filled in per use)."""
    seq_axis: int


@dataclasses.dataclass(frozen=True, slots=True)
class CacheLayout:
    """Every cache tensor of the graph, in layer order, and the cache dtype."""

    tensors: tuple[CacheTensor, ...]
    dtype: type[np.floating[Any]]
    num_layers: int

    @property
    def past_names(self) -> list[str]:
        return [t.name for t in self.tensors]

    @property
    def present_names(self) -> list[str]:
        return [t.present for t in self.tensors]

    def describe(self) -> str:
        """Shapes as a log-friendly string, e.g. "key [b, 2, s, 16], value [b, 2, s, 8]"."""
        seen: dict[str, str] = {}
        for t in self.tensors:
            kind = t.name.rsplit(".", 1)[1]
            dims = ["s" if i == t.seq_axis else str(d) for i, d in enumerate(t.shape)]
            seen.setdefault(kind, f"{kind} [b, {', '.join(dims[1:])}]")
        return ", ".join(seen.values())


def read_layout(
    inputs: Sequence[NodeArg], outputs: Sequence[NodeArg], spec: ModelSpec, graph: str
) -> CacheLayout:
    """Read the cache layout from the session's inputs and outputs, and check it against spec.
    `graph` names the graph's file in errors."""
    by_layer: dict[int, list[NodeArg]] = {}
    other_states = []
    for arg in inputs:
        if match := _PAST.match(arg.name):
            by_layer.setdefault(int(match.group(1)), []).append(arg)
        elif _OTHER_STATE.match(arg.name):
            other_states.append(arg.name)
    if other_states:
        raise ModelLoadError(
            f"{graph} has state inputs besides its KV cache ({', '.join(other_states[:4])}"
            f"{', ...' if len(other_states) > 4 else ''}): tokenwire carries a KV cache as "
            "past_key_values.N.key/value (Optimum's and ONNX Runtime GenAI's layout) and no "
            "other state (a convolution's or recurrent layer's, or a cache in another layout "
            "such as past_N)"
        )
    if not by_layer:
        raise ModelLoadError(
            f"{graph} has no past_key_values.N.key/value inputs: the engine drives decoder "
            "graphs with a KV cache (Optimum task text-generation-with-past)"
        )
    layers = sorted(by_layer)
    if layers != list(range(len(layers))):
        raise ModelLoadError(f"{graph} has past inputs for layers {layers}: not 0..N-1")
    by_name = {o.name: o for o in outputs}
    tensors = tuple(
        _cache_tensor(arg, by_name, spec, graph)
        for layer in layers
        for arg in sorted(by_layer[layer], key=lambda a: a.name)
    )
    dtypes = sorted({next(a.type for a in inputs if a.name == t.name) for t in tensors})
    if len(dtypes) != 1 or dtypes[0] not in _ORT_DTYPES:
        raise ModelLoadError(
            f"{graph} cache inputs have element types {dtypes}: tokenwire serves caches of "
            f"{' or '.join(sorted(_ORT_DTYPES))} (not a quantized KV cache, such as ONNX "
            "Runtime GenAI's builder writes with kv_cache_quant_scheme)"
        )
    layout = CacheLayout(tensors, _ORT_DTYPES[dtypes[0]], len(layers))
    check_against_config(layout, spec, graph)
    return layout


def _cache_tensor(
    arg: NodeArg, outputs: dict[str, NodeArg], spec: ModelSpec, graph: str
) -> CacheTensor:
    present = arg.name.replace("past_key_values", "present", 1)
    output = outputs.get(present)
    if output is None:
        raise ModelLoadError(f"{graph} has input {arg.name} but no output {present}")
    if output.type != arg.type:
        # The next step feeds this output back as that input (an export that casts some
        # layers' caches, as Optimum's fp16 export of Gemma 2 does).
        raise ModelLoadError(
            f"{graph} output {present} is {output.type} but input {arg.name}, which the next "
            f"step feeds it to, is {arg.type}"
        )
    dims = list(arg.shape)
    seq_axis = _sequence_axis(dims, f"{graph} input {arg.name}")
    fixed: list[int] = []
    for i, dim in enumerate(dims):
        if i in (0, seq_axis):
            fixed.append(0)
        elif isinstance(dim, int):
            fixed.append(dim)
        elif i == len(dims) - 1 and spec.head_dim is not None:
            # GenAI's builder leaves the head dim symbolic; its config states it (a wrong one
            # fails the first forward at load, where model.py names the config).
            fixed.append(spec.head_dim)
        else:
            raise ModelLoadError(
                f"{graph} input {arg.name} has shape {dims}: its axis {i} is dynamic and "
                "neither the sequence nor a head dim the model's config states"
            )
    return CacheTensor(arg.name, present, tuple(fixed), seq_axis)


def _sequence_axis(dims: list[int | str | None], where: str) -> int:
    """The dynamic axis after the batch axis: the only one, or the only one named "...seq..."."""
    dynamic = [i for i, d in enumerate(dims) if not isinstance(d, int) and i > 0]
    if len(dynamic) > 1:
        dynamic = [i for i in dynamic if "seq" in str(dims[i]).lower()]
    if len(dynamic) != 1 or isinstance(dims[0], int):
        raise ModelLoadError(
            f"{where} has shape {dims}: the engine drives caches with a dynamic batch axis "
            "first and one dynamic sequence axis (a graph exported with fixed shapes, as "
            "optimum-cli's --no-dynamic-axes writes, cannot serve)"
        )
    return dynamic[0]


def check_against_config(layout: CacheLayout, spec: ModelSpec, graph: str) -> None:
    """Fail with one line naming both values where the model's config contradicts the graph."""
    config = spec.config_file
    if spec.num_layers is not None and spec.num_layers != layout.num_layers:
        raise ModelLoadError(
            f"{config} says {spec.num_layers} layers but {graph} has cache inputs for "
            f"{layout.num_layers} layers"
        )
    standard = [t for t in layout.tensors if len(t.shape) == 4 and t.seq_axis == 2]
    if spec.num_kv_heads is not None:
        for t in standard:
            if t.shape[1] != spec.num_kv_heads:
                raise ModelLoadError(
                    f"{config} says {spec.num_kv_heads} key/value heads but {graph} input "
                    f"{t.name} has {t.shape[1]}"
                )
    if spec.head_dim is not None:
        for t in standard:
            if t.name.endswith(".key") and t.shape[3] != spec.head_dim:
                raise ModelLoadError(
                    f"{config} says head_dim {spec.head_dim} but {graph} input {t.name} "
                    f"has {t.shape[3]}"
                )


LOGITS_TYPES = frozenset({"tensor(float)", "tensor(float16)"})
ID_INPUTS = ("input_ids", "attention_mask", "position_ids")


def check_types(inputs: Sequence[NodeArg], outputs: Sequence[NodeArg], graph: str) -> None:
    """The engine feeds int64 ids, mask and positions and reads float32 or float16 logits: a
    graph typed otherwise is refused naming the tensor (its first forward would fail with
    ONNX Runtime's word for it, or read the logits wrongly)."""
    for arg in inputs:
        if arg.name in ID_INPUTS and arg.type != "tensor(int64)":
            raise ModelLoadError(
                f"{graph} input {arg.name} is {arg.type}: the engine feeds it as tensor(int64) "
                "(export the graph with int64 ids, mask and positions)"
            )
    for arg in outputs:
        if arg.name == "logits" and arg.type not in LOGITS_TYPES:
            raise ModelLoadError(
                f"{graph} output logits is {arg.type}: the engine reads tensor(float) or "
                "tensor(float16) logits"
            )


def check_io(
    inputs: Sequence[NodeArg], outputs: Sequence[NodeArg], spec: ModelSpec, graph: str
) -> None:
    """The graph's logits (their width, their positions) and the types of what the engine
    feeds and reads."""
    check_vocab(outputs, spec, graph)
    check_types(inputs, outputs, graph)


def check_vocab(outputs: Sequence[NodeArg], spec: ModelSpec, graph: str) -> None:
    """The logits' last axis, where the graph fixes it, must equal the config's vocab size."""
    logits = next((o for o in outputs if o.name == "logits"), None)
    if logits is None:
        raise ModelLoadError(f"{graph} has no 'logits' output")
    shape = list(logits.shape or ())
    if len(shape) == 3 and shape[1] == 1:
        raise ModelLoadError(
            f"{graph} logits cover only the last position of each row (logits {shape}, as "
            "ONNX Runtime GenAI's builder writes with prune_lm_head=true): rows of different "
            "lengths share a prefill here, each read at its own last position; rebuild the "
            "graph without prune_lm_head"
        )
    width = shape[-1] if shape else None
    if isinstance(width, int) and width != spec.vocab_size:
        raise ModelLoadError(
            f"{spec.config_file} says vocab size {spec.vocab_size} but {graph} logits have {width}"
        )
