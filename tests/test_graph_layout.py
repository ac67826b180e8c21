"""A graph's cache inputs and outputs, as ONNX Runtime lists them, are read into the layout the
engine drives, or refused in one line naming the graph file and the input or output at fault."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import onnxruntime as ort
import pytest

from tokenwire.server.config import BUNDLED_MODEL_DIR
from tokenwire.server.engine import ModelLoadError, ModelSpec
from tokenwire.server.engine.graph import check_types, check_vocab, read_layout

GENAI_LLAMA = BUNDLED_MODEL_DIR.parent / "fixtures-genai" / "llama-fp32"
GEMMA3 = BUNDLED_MODEL_DIR.parent / "fixtures" / "gemma3"


@dataclasses.dataclass(frozen=True)
class Arg:
    """An input or output of a graph, as ONNX Runtime's session lists it."""

    name: str
    shape: list[int | str]
    type: str = "tensor(float)"


def cache(
    spec: ModelSpec, dtype: str = "tensor(float)", batch: int | str = "batch"
) -> tuple[list[Arg], list[Arg]]:
    """The cache inputs and outputs of a graph of the spec's shape."""
    assert spec.num_kv_heads is not None
    assert spec.head_dim is not None
    shape: list[int | str] = [batch, spec.num_kv_heads, "past_sequence_length", spec.head_dim]
    inputs, outputs = [], []
    for layer in range(spec.num_layers or 0):
        for kind in ("key", "value"):
            inputs.append(Arg(f"past_key_values.{layer}.{kind}", shape, dtype))
            outputs.append(Arg(f"present.{layer}.{kind}", shape, dtype))
    return inputs, outputs


def test_the_layout_of_a_well_formed_cache_is_read() -> None:
    """Cache inputs with a dynamic batch and sequence axis, each with its present output of the
    same type, are read as the spec's layers (the baseline of the refusals below)."""
    spec = ModelSpec.from_dir(GENAI_LLAMA)
    inputs, outputs = cache(spec)
    assert read_layout(inputs, outputs, spec, "model.onnx").num_layers == spec.num_layers


def test_a_cache_of_fixed_shape_is_refused_naming_the_graph_and_input() -> None:
    """A cache input without a dynamic batch axis (an export with --no-dynamic-axes) is refused
    naming the graph file and the input."""
    spec = ModelSpec.from_dir(GENAI_LLAMA)
    inputs, outputs = cache(spec, batch=2)
    with pytest.raises(
        ModelLoadError, match=re.escape("model.onnx input past_key_values.0.key has shape [2, ")
    ):
        read_layout(inputs, outputs, spec, "model.onnx")


def test_a_present_output_of_another_type_than_its_past_is_refused_naming_both() -> None:
    """A present output whose element type differs from the past input the next step feeds it
    to (an fp16 export that casts one layer's cache to float) is refused naming both, not left
    to fail the load's second forward with a message that blames the config."""
    spec = ModelSpec.from_dir(GENAI_LLAMA)
    inputs, outputs = cache(spec, "tensor(float16)")
    outputs[2] = Arg(outputs[2].name, outputs[2].shape, "tensor(float)")
    with pytest.raises(
        ModelLoadError,
        match=re.escape(
            "model.onnx output present.1.key is tensor(float) but input past_key_values.1.key"
        ),
    ):
        read_layout(inputs, outputs, spec, "model.onnx")


def test_logits_of_the_last_position_only_are_refused() -> None:
    """A graph whose logits hold one position per row (GenAI's builder with
    prune_lm_head=true) is refused naming the option, not failed with an IndexError on the
    first prefill of rows of different lengths."""
    spec = ModelSpec.from_dir(GENAI_LLAMA)
    pruned = [Arg("logits", ["batch", 1, spec.vocab_size])]
    with pytest.raises(ModelLoadError, match=r"logits cover only the last position.*prune_lm"):
        check_vocab(pruned, spec, "model.onnx")


def test_a_quantized_kv_cache_is_refused_naming_its_element_type() -> None:
    """Cache inputs of int8 (GenAI's kv_cache_quant_scheme) are refused naming that type and
    the types served."""
    spec = ModelSpec.from_dir(GENAI_LLAMA)
    inputs, outputs = cache(spec, "tensor(int8)")
    with pytest.raises(ModelLoadError, match=re.escape("element types ['tensor(int8)']")):
        read_layout(inputs, outputs, spec, "model.onnx")


def test_state_inputs_besides_the_kv_cache_are_refused_naming_them() -> None:
    """A graph that also carries a convolution's state per layer (a hybrid model) is refused
    naming those inputs, not as a KV cache with missing layers."""
    spec = ModelSpec.from_dir(GENAI_LLAMA)
    inputs, outputs = cache(spec)
    inputs.append(Arg("past_conv.0", ["batch", 16, 3]))
    with pytest.raises(ModelLoadError, match=r"state inputs besides its KV cache \(past_conv\.0\)"):
        read_layout(inputs, outputs, spec, "model.onnx")


def test_a_multimodal_exports_cache_is_checked_against_its_nested_text_config(
    tmp_path: Path,
) -> None:
    """The multimodal Gemma 3 export (Gemma3ForConditionalGeneration) states its language
    model's vocabulary, context, layers, KV heads and head dim only under text_config: they are
    read from there, its graph's cache matches them, and a nested value the graph contradicts
    is refused naming both."""
    config = json.loads((GEMMA3 / "config.json").read_text())
    assert not {"vocab_size", "max_position_embeddings", "num_hidden_layers"} & set(config)
    spec = ModelSpec.from_dir(GEMMA3)
    stated = (spec.vocab_size, spec.context_length, spec.num_layers, spec.num_kv_heads)
    assert (*stated, spec.head_dim) == (320, 256, 2, 2, 16)
    session = ort.InferenceSession(str(GEMMA3 / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs, outputs = session.get_inputs(), session.get_outputs()
    assert read_layout(inputs, outputs, spec, "model.onnx").num_layers == 2
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(GEMMA3 / name, tmp_path / name)
    config["text_config"]["num_key_value_heads"] = 4
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelLoadError,
        match=re.escape("says 4 key/value heads but model.onnx input past_key_values.0.key has 2"),
    ):
        read_layout(inputs, outputs, ModelSpec.from_dir(tmp_path), "model.onnx")


def test_a_decoders_depth_comes_from_its_decoder_layers(tmp_path: Path) -> None:
    """The decoder of an encoder-decoder (BART's, served alone) whose encoder is deeper than
    it (as distilbart's 12 encoder and 6 decoder layers) is read by decoder_layers, which its
    graph's cache matches, not by num_hidden_layers (the encoder's): it loads."""
    bart = BUNDLED_MODEL_DIR.parent / "fixtures" / "bart"
    config = json.loads((bart / "config.json").read_text())
    deeper = {"encoder_layers": 6, "num_hidden_layers": 6}
    (tmp_path / "config.json").write_text(json.dumps(config | deeper))
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(bart / name, tmp_path / name)
    spec = ModelSpec.from_dir(tmp_path)
    assert spec.num_layers == 2
    session = ort.InferenceSession(str(bart / "model.onnx"), providers=["CPUExecutionProvider"])
    layout = read_layout(session.get_inputs(), session.get_outputs(), spec, "model.onnx")
    assert layout.num_layers == 2


@pytest.mark.parametrize(
    ("inputs", "outputs", "named"),
    [
        ([Arg("attention_mask", ["batch", "width"], "tensor(int32)")], [], "attention_mask"),
        ([Arg("position_ids", ["batch", "width"], "tensor(int32)")], [], "position_ids"),
        ([], [Arg("logits", ["batch", "width", 320], "tensor(bfloat16)")], "logits"),
    ],
)
def test_a_graph_typed_unlike_what_the_engine_feeds_is_refused_naming_the_tensor(
    inputs: list[Arg], outputs: list[Arg], named: str
) -> None:
    """Ids, mask or positions other than int64, or logits other than float32/float16, are
    refused naming the tensor and its type (not blamed on a probe forward at load)."""
    with pytest.raises(ModelLoadError, match=rf"model.onnx (input|output) {named} is tensor\("):
        check_types(inputs, outputs, "model.onnx")


def test_the_bundled_graphs_types_are_what_the_engine_feeds() -> None:
    """The bundled graph (int64 inputs, float logits) passes the type check."""
    session = ort.InferenceSession(
        str(BUNDLED_MODEL_DIR / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    check_types(session.get_inputs(), session.get_outputs(), "model.onnx")
