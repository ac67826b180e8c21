"""Loading a model directory: config aliases, the graph as the source of truth, clean refusal."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.procs import ServerProcess, rounding_at_start
from tokenwire.server.config import BUNDLED_MODEL_DIR
from tokenwire.server.engine import ModelLoadError, ModelSpec, OnnxCausalLM, Padding
from tokenwire.server.engine.model import cuda_device_present


def _copy_with_config(tmp_path: Path, **changes: Any) -> Path:
    """The bundled model in tmp_path with config.json keys changed (None removes a key)."""
    model_dir = tmp_path / "model"
    shutil.copytree(BUNDLED_MODEL_DIR, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


def test_gpt2_style_keys_are_read(tmp_path: Path) -> None:
    """n_layer / n_head / n_positions stand in for num_hidden_layers / ... / max_position_*."""
    model_dir = _copy_with_config(
        tmp_path,
        num_hidden_layers=None,
        num_attention_heads=None,
        max_position_embeddings=None,
        n_layer=4,
        n_head=8,
        n_positions=128,
    )
    spec = ModelSpec.from_dir(model_dir)
    assert (spec.num_layers, spec.context_length) == (4, 128)


def test_mpt_style_context_key_is_read(tmp_path: Path) -> None:
    """MPT's max_seq_len gives the context length."""
    model_dir = _copy_with_config(tmp_path, max_position_embeddings=None, max_seq_len=300)
    assert ModelSpec.from_dir(model_dir).context_length == 300


def test_a_config_without_any_context_key_is_refused(tmp_path: Path) -> None:
    """No context-length key anywhere: the load fails naming the keys it looked for."""
    model_dir = _copy_with_config(tmp_path, max_position_embeddings=None)
    tokenizer_config = model_dir / "tokenizer_config.json"
    tokenizer_config.write_text(json.dumps({"model_max_length": 10**30}))
    with pytest.raises(ModelLoadError, match="max_position_embeddings, n_positions"):
        ModelSpec.from_dir(model_dir)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"num_hidden_layers": 3},
            "config.json says 3 layers but model.onnx has cache inputs for 4",
        ),
        ({"num_key_value_heads": 2}, "config.json says 2 key/value heads but model.onnx input"),
        ({"head_dim": 16}, "config.json says head_dim 16 but model.onnx input"),
        ({"vocab_size": 4000}, "config.json says vocab size 4000 but model.onnx logits have 4096"),
    ],
)
def test_config_contradicting_the_graph_names_both_values(
    tmp_path: Path, change: dict[str, int], message: str
) -> None:
    """Where config.json and the graph disagree, the load fails with one line naming both."""
    model_dir = _copy_with_config(tmp_path, **change)
    with pytest.raises(ModelLoadError, match=message):
        OnnxCausalLM(model_dir, provider="cpu")


def test_cache_shapes_come_from_the_graph(tmp_path: Path) -> None:
    """With the KV-head and head-dim keys removed, the cache layout is read from model.onnx."""
    model_dir = _copy_with_config(tmp_path, num_key_value_heads=None, head_dim=None)
    model = OnnxCausalLM(model_dir, provider="cpu")
    assert model.layout.describe() == "key [b, 4, s, 32], value [b, 4, s, 32]"


@pytest.mark.slow
def test_refused_model_is_one_log_line_and_exit_status_2(tmp_path: Path) -> None:
    """`tokenwire serve` on a model it cannot drive: status 2, one JSON refusal, no traceback."""
    model_dir = _copy_with_config(tmp_path, num_hidden_layers=3)
    done = subprocess.run(
        [sys.executable, "-m", "tokenwire.client.command", "serve", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "TOKENWIRE_MODEL_DIR": str(model_dir),
            "TOKENWIRE_METRICS_PORT": "0",
            "TOKENWIRE_LOG_FORMAT": "json",
            "PATH": "/usr/bin:/bin",
        },
        check=False,
    )
    lines = (done.stdout + done.stderr).splitlines()
    records = [json.loads(line) for line in lines]
    refusals = [r for r in records if r["event"] == "model.refused"]
    assert done.returncode == 2
    assert refusals == [
        {
            "model_dir": str(model_dir),
            "reason": "config.json says 3 layers but model.onnx has cache inputs for 4 layers",
            "event": "model.refused",
            "level": "error",
            "timestamp": refusals[0]["timestamp"],
        }
    ]


def test_falcon_multi_query_wins_over_its_kv_head_count(tmp_path: Path) -> None:
    """Falcon's multi_query (without new_decoder_architecture) means one KV head, whatever its
    num_kv_heads says, as transformers reads it."""
    model_dir = _copy_with_config(
        tmp_path, multi_query=True, new_decoder_architecture=False, num_kv_heads=4
    )
    assert ModelSpec.from_dir(model_dir).num_kv_heads == 1


@pytest.mark.skipif(cuda_device_present(), reason="a GPU is present: CUDA may really be usable")
def test_asking_for_cuda_without_a_usable_gpu_is_refused() -> None:
    """provider=cuda on a machine where ONNX Runtime cannot use CUDA is a load error naming the
    provider, not a silent run on the CPU (provider=auto is the one that falls back)."""
    with pytest.raises(ModelLoadError, match="provider cuda was asked for"):
        OnnxCausalLM(BUNDLED_MODEL_DIR, provider="cuda")
    assert OnnxCausalLM(BUNDLED_MODEL_DIR, provider="auto").provider == "CPUExecutionProvider"


@pytest.mark.parametrize(
    ("spinning", "entries"),
    [
        (True, {"session.force_spinning_stop": "1"}),
        (False, {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}),
    ],
)
def test_workers_spin_only_within_a_step(spinning: bool, entries: dict[str, str]) -> None:
    """With spinning on, ORT's workers stop spinning when a run ends (the cores go to the
    threads that send the step's tokens); with it off they never spin."""
    model = OnnxCausalLM(BUNDLED_MODEL_DIR, provider="cpu", spinning=spinning)
    options = model.session.get_session_options()
    found = {key: options.get_session_config_entry(key) for key in entries}
    assert found == entries


GENAI_LLAMA = BUNDLED_MODEL_DIR.parent / "fixtures-genai" / "llama-fp32"


def _genai_copy(tmp_path: Path, **decoder: Any) -> Path:
    """The GenAI llama fixture in tmp_path with genai_config.json's model.decoder keys set."""
    model_dir = tmp_path / "genai"
    shutil.copytree(GENAI_LLAMA, model_dir)
    path = model_dir / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"].update(decoder)
    path.write_text(json.dumps(config))
    return model_dir


def test_a_genai_folder_with_window_sized_caches_is_refused_with_the_rebuild_option(
    tmp_path: Path,
) -> None:
    """A GenAI folder whose windowed layers keep a window-sized cache (GenAI slides it) is
    refused, naming the layers and the builder option that writes full-length caches."""
    window = {"window_size": 8, "slide_key_value_cache": False, "layers": [0], "cache_slack": 0}
    model_dir = _genai_copy(tmp_path, sliding_window=window)
    with pytest.raises(ModelLoadError, match=r"layers \[0\] .* windowed_kv_cache=false"):
        OnnxCausalLM(model_dir, provider="cpu")


def test_a_genai_decoder_split_over_several_graphs_is_refused(tmp_path: Path) -> None:
    """A GenAI decoder given as a pipeline of graphs is refused with one line saying so."""
    model_dir = _genai_copy(tmp_path, pipeline=[{"embeddings": {"filename": "embeds.onnx"}}])
    with pytest.raises(ModelLoadError, match="split over several graphs"):
        ModelSpec.from_dir(model_dir)


def test_a_genai_decoder_file_of_its_own_name_is_loaded(tmp_path: Path) -> None:
    """genai_config.json's model.decoder.filename names the graph that is loaded, as published
    GenAI folders name theirs."""
    model_dir = _genai_copy(tmp_path, filename="llama-cpu-fp32.onnx")
    (model_dir / "model.onnx").rename(model_dir / "llama-cpu-fp32.onnx")
    model = OnnxCausalLM(model_dir, provider="cpu")
    assert model.padding is Padding.RIGHT  # the GroupQueryAttention graph, probed


@pytest.mark.parametrize("filename", ["../model.onnx", "sub/model.onnx", "", 3])
def test_a_genai_decoder_file_outside_the_folder_is_refused(
    tmp_path: Path, filename: object
) -> None:
    """model.decoder.filename must be a file name in the folder, not a path or another type."""
    model_dir = _genai_copy(tmp_path, filename=filename)
    with pytest.raises(ModelLoadError, match=r"model\.decoder\.filename must name a file"):
        ModelSpec.from_dir(model_dir)


LONGROPE = {"short_factor": [1.0] * 16, "long_factor": [2.0] * 16}


def _start_up_lines(model_dir: Path, event: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """`tokenwire serve` on model_dir: its `event` line and its model.loaded line."""
    server = ServerProcess("--model-dir", str(model_dir), "--metrics-port", "0")
    try:
        return server.wait_for(event), server.wait_for("model.loaded")
    finally:
        server.stop()
        server.close()


@pytest.mark.slow
def test_a_capped_context_is_logged_with_what_was_declared_and_what_is_served(
    tmp_path: Path,
) -> None:
    """`tokenwire serve` on an export whose config scales rotary with LongRoPE logs one
    model.context_capped warning (declared 512, served 64) and model.loaded says the context it
    serves."""
    model_dir = _copy_with_config(
        tmp_path,
        rope_scaling={"type": "longrope", **LONGROPE},
        original_max_position_embeddings=64,
    )
    capped, loaded = _start_up_lines(model_dir, "model.context_capped")
    assert (capped["level"], capped["declared"], capped["served"]) == ("warning", 512, 64)
    assert loaded["context_length"] == 64


@pytest.mark.slow
def test_a_width_limit_is_logged_beside_the_context_it_serves() -> None:
    """`tokenwire serve` on a GenAI LongRoPE folder says in model.loaded the width its rows
    share forwards within (64) and serves the declared context (512)."""
    _, loaded = _start_up_lines(
        BUNDLED_MODEL_DIR.parent / "fixtures-genai" / "phi3_longrope-fp32", "model.loaded"
    )
    assert (loaded["width_limit"], loaded["context_length"]) == (64, 512)


@pytest.mark.parametrize(
    "change",
    [
        {"rope_scaling": {"type": "longrope", **LONGROPE}, "original_max_position_embeddings": 64},
        {"rope_scaling": {"type": "su", **LONGROPE}, "original_max_position_embeddings": 64},
        {"rope_parameters": {"rope_type": "longrope", "original_max_position_embeddings": 64}},
        {
            "rope_parameters": {"full_attention": {"rope_type": "longrope"}},
            "original_max_position_embeddings": 64,
        },
    ],
    ids=["rope_scaling", "su", "rope_parameters", "per-layer-type"],
)
def test_an_export_with_longrope_serves_its_original_context(
    tmp_path: Path, change: dict[str, Any]
) -> None:
    """An export whose config scales rotary with LongRoPE (Phi-3 128k, Phi-3.5) is served with
    its original_max_position_embeddings as the context: past it the model switches to its long
    tables, which an exported graph does not."""
    spec = OnnxCausalLM(_copy_with_config(tmp_path, **change), provider="cpu").spec
    assert (spec.declared_context_length, spec.context_length) == (512, 64)
    assert "LongRoPE" in spec.context_cap


def test_rope_scaling_that_switches_nothing_keeps_the_declared_context(tmp_path: Path) -> None:
    """Static rope scaling (linear, llama3, yarn) changes no table mid-context: no cap."""
    model_dir = _copy_with_config(tmp_path, rope_scaling={"rope_type": "linear", "factor": 2.0})
    spec = ModelSpec.from_dir(model_dir)
    assert (spec.context_length, spec.context_cap) == (512, "")


@pytest.mark.slow
def test_a_graph_served_without_batching_says_so_at_start() -> None:
    """`tokenwire serve` on a graph whose rows change each other logs one model.unbatched
    warning, and model.loaded says padding `alone`."""
    unbatched, loaded = _start_up_lines(
        BUNDLED_MODEL_DIR.parent / "fixtures-int8" / "llama-dynamic", "model.unbatched"
    )
    assert unbatched["level"] == "warning"
    assert loaded["padding"] == "alone"


@pytest.mark.slow
def test_the_int4_graph_is_served_batched_with_single_rows_padded_where_one_row_rounds_apart() -> (
    None
):
    """model.loaded on the int4 GenAI graph reports batch rounding 0 and no model.unbatched
    warning on any CPU: where this CPU computes a one-row MatMulNBits otherwise than a
    batched one (the one-row rounding the probe measured, above 0), single rows are padded
    to two and rows share forwards."""
    model_dir = BUNDLED_MODEL_DIR.parent / "fixtures-genai" / "llama-int4"
    measured = OnnxCausalLM(model_dir, provider="cpu").one_row_rounding
    loaded, warning = rounding_at_start("--model-dir", str(model_dir), warning="model.unbatched")
    assert warning is None
    assert loaded["batch_rounding"] == 0.0
    assert loaded["single_rows_padded"] == (measured > 0)
    assert loaded["one_row_rounding"] == measured


@pytest.mark.slow
def test_a_one_slot_server_on_the_int4_graph_says_its_single_rows_are_not_padded() -> None:
    """With --max-batch-size 1 every request runs alone on the one-row kernel: model.loaded
    says single_rows_padded false, whatever the probe found for the graph."""
    model_dir = BUNDLED_MODEL_DIR.parent / "fixtures-genai" / "llama-int4"
    loaded, _ = rounding_at_start("--model-dir", str(model_dir), "--max-batch-size", "1")
    assert loaded["rows"] == 1
    assert loaded["single_rows_padded"] is False


def _onnx_folder_layout(tmp_path: Path) -> Path:
    """The bundled model with its graph moved to onnx/model.onnx, configs at the top."""
    model_dir = tmp_path / "model"
    shutil.copytree(BUNDLED_MODEL_DIR, model_dir)
    (model_dir / "onnx").mkdir()
    (model_dir / "model.onnx").rename(model_dir / "onnx" / "model.onnx")
    return model_dir


def test_a_graph_in_an_onnx_folder_beside_the_configs_is_loaded(tmp_path: Path) -> None:
    """With no model.onnx at the top, onnx/model.onnx is the graph (the layout of exports
    that keep their graphs, and quantised variants, in an onnx/ folder)."""
    model = OnnxCausalLM(_onnx_folder_layout(tmp_path), provider="cpu")
    assert model.padding is Padding.SHIFTABLE


def test_model_file_picks_the_graph_inside_the_folder(tmp_path: Path) -> None:
    """model_file names the graph to load, relative to the folder (a variant beside others)."""
    model_dir = _onnx_folder_layout(tmp_path)
    (model_dir / "onnx" / "model.onnx").rename(model_dir / "onnx" / "model_variant.onnx")
    model = OnnxCausalLM(model_dir, provider="cpu", model_file="onnx/model_variant.onnx")
    assert model.padding is Padding.SHIFTABLE


@pytest.mark.parametrize(
    ("model_file", "message"),
    [
        ("../model/model.onnx", "must be a path inside"),
        ("/etc/model.onnx", "must be a path inside"),
        ("onnx/absent.onnx", "absent.onnx is missing"),
        ("", "neither .*model.onnx nor .*onnx/model.onnx exists"),
    ],
)
def test_a_graph_that_is_not_there_is_refused_naming_what_was_looked_for(
    tmp_path: Path, model_file: str, message: str
) -> None:
    """A model_file outside the folder, or a graph that is not where it is looked for, is
    refused with one line naming the paths."""
    model_dir = _onnx_folder_layout(tmp_path)
    (model_dir / "onnx" / "model.onnx").unlink()
    with pytest.raises(ModelLoadError, match=message):
        OnnxCausalLM(model_dir, provider="cpu", model_file=model_file)


@pytest.mark.slow
def test_a_cache_that_holds_fewer_rows_than_max_batch_size_says_so_at_start() -> None:
    """`tokenwire serve` on a GroupQueryAttention graph (512-token context) with 1200 KV
    tokens decodes two requests together, not max_batch_size: model.loaded says `rows` 2 and a
    model.rows_limited warning names the settings that change it."""
    model_dir = BUNDLED_MODEL_DIR.parent / "fixtures-genai" / "llama-fp32"
    server = ServerProcess(
        "--model-dir", str(model_dir), "--metrics-port", "0", "--max-kv-tokens", "1200"
    )
    try:
        limited = server.wait_for("model.rows_limited")
        loaded = server.wait_for("model.loaded")
    finally:
        server.stop()
        server.close()
    assert loaded["rows"] == limited["rows"] == 2
    assert limited["level"] == "warning"
    assert "max_context_tokens" in limited["reason"]


@pytest.mark.slow
def test_the_limits_in_effect_are_logged_at_start() -> None:
    """server.started names the limits the engine runs with, as set (queue, KV budget,
    prefill chunk, max_tokens cap and default, prompt size, drain grace), so an operator sees
    what a deployment's variables came to."""
    env = {"TOKENWIRE_MAX_QUEUE": "7", "TOKENWIRE_PREFILL_CHUNK_TOKENS": "96"}
    server = ServerProcess("--metrics-port", "0", "--max-kv-tokens", "4096", env=env)
    try:
        started = server.wait_for("server.started")
    finally:
        server.stop()
        server.close()
    assert (started["max_queue"], started["prefill_chunk_tokens"]) == (7, 96)
    assert started["max_kv_tokens"] == 4096
    assert {"max_tokens_limit", "default_max_tokens", "max_prompt_bytes", "drain_grace_s"} <= set(
        started
    )
