"""What the engine needs to know about a model that the graph cannot say, from its JSON files.

Two layouts are read: a Hugging Face / Optimum directory (config.json, generation_config.json,
tokenizer_config.json) and an ONNX Runtime GenAI folder (genai_config.json, as its model
builder writes it). Families spell the same facts differently (`num_attention_heads` /
`n_head` / `num_heads`,
`max_position_embeddings` / `n_positions` / `max_seq_len`, ...). Each fact is looked up under
the aliases the common families use; the first key present wins. Shapes of the KV cache are
not taken from here: the graph is their source of truth (see graph.py), and this file's values
only cross-check it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from tokenwire.server.engine.forcing import forcing, genai_forcing
from tokenwire.server.tokenizer.tokenizer import template_tokens


class ModelLoadError(RuntimeError):
    """The model directory is missing a file or has a layout the engine cannot drive."""


def first_line(exc: BaseException) -> str:
    """An error's first line (ONNX Runtime's run several), or its type where it says nothing."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# First key present wins; the order follows how common each spelling is.
ALIASES: dict[str, tuple[str, ...]] = {
    "vocab_size": ("vocab_size", "n_vocab", "padded_vocab_size"),
    # An encoder-decoder's config (BART's, served as its decoder alone) names the decoder's
    # depth apart; its num_hidden_layers is the encoder's.
    "num_layers": ("decoder_layers", "num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "num_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "num_kv_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num"),
    "head_dim": ("head_dim",),
    "context_length": (
        "max_position_embeddings",
        "n_positions",
        "max_seq_len",
        "max_sequence_length",
        "seq_length",
        "n_ctx",
    ),
}
GENAI_CONFIG = "genai_config.json"
# Keys a config dict carries about itself: its file, and (GenAI) each fact's key there.
_FILE, _KEYS = "_file", "_keys"
# A tokenizer_config.json model_max_length at or above this is transformers' "no limit" marker.
_NO_LIMIT = 10**9


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSpec:
    """Vocabulary, context, stop ids and declared shapes of a model, read from its directory."""

    name: str
    vocab_size: int
    context_length: int
    eos_token_ids: frozenset[int]
    chat_template: str = ""
    bos_token: str = ""
    eos_token: str = ""
    template_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Each special token's text by name (bos_token, eos_token, unk_token, pad_token, ...,
    image_token, ...): the variables transformers gives the chat template."""
    num_layers: int | None = None
    num_kv_heads: int | None = None
    """Only when config.json states it (or says multi_query): the graph is checked against it."""
    head_dim: int | None = None
    graph_file: str = "model.onnx"
    """The decoder graph's file in the folder (a GenAI folder may name its own)."""
    declared_context_length: int = 0
    """The context the config states; context_length is below it where context_cap says why."""
    context_cap: str = ""
    config_file: str = "config.json"
    """The file the facts above come from (config.json, or a GenAI folder's genai_config.json)."""

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelSpec:
        _check_readable(model_dir)
        tokenizer_config = read_json(model_dir / "tokenizer_config.json", required=False)
        # The special tokens' text, as transformers reads it from the two files (the chat
        # template sees each by its name).
        specials = template_tokens(
            tokenizer_config, read_json(model_dir / "special_tokens_map.json", required=False)
        )
        graph_file = "model.onnx"
        if (model_dir / GENAI_CONFIG).exists():
            # A GenAI folder: its runtime reads genai_config.json, and so does the engine. A
            # config.json beside it (many such folders carry one) may only agree with it.
            genai = read_json(model_dir / GENAI_CONFIG)
            _refuse(genai_forcing(genai, model_dir / GENAI_CONFIG))
            config = genai_as_config(genai)
            config[_FILE] = str(model_dir / GENAI_CONFIG)
            graph_file = config["_graph_file"]
            if (model_dir / "config.json").exists():
                other = text_config(read_json(model_dir / "config.json"))
                _check_agree(model_dir, config, {**other, _FILE: str(model_dir / "config.json")})
                config["_name_or_path"] = other.get("_name_or_path")
            generation: dict[str, Any] = {}
            source = GENAI_CONFIG
        else:
            outer = read_json(model_dir / "config.json")
            config = text_config(outer)
            config[_FILE] = str(model_dir / "config.json")
            if outer.get("eos_token_id") is not None:
                # As transformers' generation config takes it: the outer config's stop ids,
                # the nested text_config's only where the outer has none.
                config["eos_token_id"] = outer["eos_token_id"]
            generation = read_json(model_dir / "generation_config.json", required=False)
            source = "config.json"
            # transformers' generate takes generation_config.json where there is one, else
            # the config's own settings (the outer config's, text_config's where it has none).
            if generation:
                _refuse(forcing(generation, model_dir / "generation_config.json"))
            else:
                _refuse(forcing({**config, **outer}, model_dir / "config.json"))
        vocab = lookup(config, "vocab_size")
        if vocab is None or vocab < 1:
            raise ModelLoadError(_missing(model_dir / source, "vocab_size"))
        if "eos_token_id" in generation:
            eos = _as_ids(generation["eos_token_id"], model_dir / "generation_config.json", vocab)
        else:
            eos = _as_ids(config.get("eos_token_id"), model_dir / source, vocab)
        declared = _context_length(model_dir / source, config, tokenizer_config)
        original = None if source == GENAI_CONFIG else _longrope_original(config)
        context, cap = declared, ""
        if original is not None and original < declared:
            # Such exports trace one branch of LongRoPE's switch (the short tables, at the
            # short sequences tracing uses); beyond the original context they would decode
            # unlike the model they came from.
            context = original
            cap = (
                "its rope scaling is LongRoPE, whose long tables an export does not switch to "
                "past original_max_position_embeddings"
            )
        return cls(
            name=str(config.get("_name_or_path") or model_dir.name),
            vocab_size=vocab,
            context_length=context,
            declared_context_length=declared,
            context_cap=cap,
            eos_token_ids=frozenset(eos),
            chat_template=_chat_template(model_dir, tokenizer_config),
            bos_token=specials.get("bos_token", ""),
            eos_token=specials.get("eos_token", ""),
            template_tokens=specials,
            num_layers=lookup(config, "num_layers"),
            num_kv_heads=_declared_kv_heads(config),
            head_dim=_key_head_dim(config),
            graph_file=graph_file,
            config_file=source,
        )


def graph_path(model_dir: Path, spec: ModelSpec, model_file: str = "") -> Path:
    """The graph to load: `model_file`, a path inside the folder, where one is given; else the
    file the layout names (`model.onnx`, or a GenAI folder's own), or `onnx/model.onnx` (the
    layout of exports whose graphs sit in an onnx/ folder beside the configs)."""
    if model_file:
        relative = Path(model_file)
        if relative.is_absolute() or ".." in relative.parts:
            raise ModelLoadError(f"model_file {model_file!r} must be a path inside {model_dir}")
        candidates = [model_dir / relative]
    else:
        candidates = [model_dir / spec.graph_file, model_dir / "onnx" / spec.graph_file]
    for path in candidates:
        try:
            if path.is_file():
                return path
        except OSError as exc:  # a name too long, a loop of links...
            raise ModelLoadError(f"{path} cannot be read: {exc.strerror}") from exc
    return _missing_graph(candidates)


def _missing_graph(candidates: list[Path]) -> NoReturn:
    present = [p for p in candidates if p.exists()]
    if len(candidates) == 1 or present:
        # Something stands where the graph should (a folder, say): that, not a missing file.
        path = (present or candidates)[0]
        raise ModelLoadError(f"{path} {'is not a file' if present else 'is missing'}")
    raise ModelLoadError(
        f"no graph to load: neither {' nor '.join(str(p) for p in candidates)} exists"
    )


BUILT_FOR = frozenset({"cuda"})
"""Execution providers a GenAI folder may be built for (besides the CPU, which names none in
provider_options): their graphs follow ONNX Runtime's own operator contracts, on either
provider tokenwire runs."""


def _check_built_for(decoder: dict[str, Any]) -> None:
    """Refuse a folder built for another execution provider (`builder -e dml|webgpu|...`): its
    graph may rely on what that provider's kernels do beyond the operator's contract (DML and
    WebGPU LongRoPE builds join the short and long rotary tables into one, whose row offset the
    provider applies), and served here it would decode other tokens without an error."""
    options = decoder.get("session_options")
    providers = options.get("provider_options") if isinstance(options, dict) else None
    if not isinstance(providers, list):
        return
    names = sorted({str(name) for entry in providers if isinstance(entry, dict) for name in entry})
    foreign = [name for name in names if name.lower() not in BUILT_FOR]
    if foreign:
        raise ModelLoadError(
            f"{GENAI_CONFIG} model.decoder.session_options.provider_options names "
            f"{', '.join(foreign)}: the folder was built for that execution provider, whose "
            "graphs may count on its own kernels' conventions; tokenwire runs ONNX Runtime's "
            "CPU and CUDA providers: rebuild it with python -m onnxruntime_genai.models.builder "
            "... -e cpu (or -e cuda)"
        )


def genai_as_config(genai: dict[str, Any]) -> dict[str, Any]:
    """genai_config.json's model section under config.json's key names (and `_graph_file`,
    the decoder's file). Refused: what GenAI's runtime does around the graph that the engine
    does not (a window-sized cache it slides, a pipeline of several graphs)."""
    model = genai.get("model")
    decoder = model.get("decoder") if isinstance(model, dict) else None
    if not isinstance(model, dict) or not isinstance(decoder, dict):
        raise ModelLoadError(f"{GENAI_CONFIG} has no model.decoder section")
    _check_built_for(decoder)
    window = decoder.get("sliding_window")
    if window is not None:
        layers = window.get("layers") if isinstance(window, dict) else None
        # The builder lists no layers when every layer has the window.
        which = f"layers {layers}" if layers else "its layers"
        raise ModelLoadError(
            f"{GENAI_CONFIG} model.decoder.sliding_window: {which} keep a window-sized "
            "cache that ONNX Runtime GenAI slides, which tokenwire does not drive; rebuild the "
            "folder with full-length caches (the window still applies): python -m "
            "onnxruntime_genai.models.builder ... --extra_options windowed_kv_cache=false"
        )
    if "pipeline" in decoder:
        raise ModelLoadError(
            f"{GENAI_CONFIG} model.decoder.pipeline: the decoder is split over several graphs; "
            "tokenwire serves one decoder graph with its KV cache"
        )
    filename = decoder.get("filename", "model.onnx")
    if not isinstance(filename, str) or not filename or Path(filename).name != filename:
        raise ModelLoadError(
            f"{GENAI_CONFIG} model.decoder.filename must name a file in the folder, "
            f"got {filename!r}"
        )
    return {
        # No Hugging Face id here (model.type is the architecture, "llama"): the folder's name
        # serves, unless a config.json beside it names the model.
        "_graph_file": filename,
        "vocab_size": model.get("vocab_size"),
        "max_position_embeddings": model.get("context_length"),
        "eos_token_id": model.get("eos_token_id"),
        "num_hidden_layers": decoder.get("num_hidden_layers"),
        "num_attention_heads": decoder.get("num_attention_heads"),
        "num_key_value_heads": decoder.get("num_key_value_heads"),
        "head_dim": decoder.get("head_size"),
        _KEYS: {
            "vocab_size": "model.vocab_size",
            "max_position_embeddings": "model.context_length",
            "num_hidden_layers": "model.decoder.num_hidden_layers",
            "num_attention_heads": "model.decoder.num_attention_heads",
            "num_key_value_heads": "model.decoder.num_key_value_heads",
            "head_dim": "model.decoder.head_size",
        },
    }


def _check_agree(model_dir: Path, genai: dict[str, Any], config: dict[str, Any]) -> None:
    """Where config.json and genai_config.json both state a fact of the graph's shape, they
    must state the same value: two descriptions of one folder that disagree describe two
    models, and either could be the wrong one."""
    stated = {
        "vocab_size": (lookup(genai, "vocab_size"), lookup(config, "vocab_size")),
        "num_layers": (lookup(genai, "num_layers"), lookup(config, "num_layers")),
        "num_heads": (lookup(genai, "num_heads"), lookup(config, "num_heads")),
        "num_kv_heads": (_declared_kv_heads(genai), _declared_kv_heads(config)),
        "head_dim": (_key_head_dim(genai), _key_head_dim(config)),
    }
    for fact, (theirs, ours) in stated.items():
        if theirs is not None and ours is not None and theirs != ours:
            raise ModelLoadError(
                f"{model_dir / GENAI_CONFIG} says {fact.replace('_', ' ')} {theirs} but "
                f"{model_dir / 'config.json'} says {ours}: the folder describes two models"
            )


def _chat_template(model_dir: Path, tokenizer_config: dict[str, Any]) -> str:
    """The chat template as transformers finds it: chat_template.jinja where it exists, else
    tokenizer_config.json's chat_template, a string or (older files) a list of named
    templates, of which the one named "default" serves."""
    path = model_dir / "chat_template.jinja"
    if path.exists():
        return read_text(path)
    template = tokenizer_config.get("chat_template")
    where = f"{model_dir / 'tokenizer_config.json'} chat_template"
    if template is None or isinstance(template, str):
        return template or ""
    if isinstance(template, list):
        if not all(
            isinstance(t, dict)
            and isinstance(t.get("name"), str)
            and isinstance(t.get("template"), str)
            for t in template
        ):
            raise ModelLoadError(f"{where} must be a list of {{name, template}} strings")
        named = {t["name"]: t["template"] for t in template}
        if len(named) != len(template):
            raise ModelLoadError(f"{where} names a template twice")
        if "default" not in named:
            raise ModelLoadError(
                f'{where} names templates {sorted(map(str, named))} but none "default", the '
                "one chat requests use; put the one to serve in chat_template.jinja"
            )
        return str(named["default"])
    raise ModelLoadError(f"{where} must be a string, got {type(template).__name__}")


def _check_readable(model_dir: Path) -> None:
    """A ModelLoadError unless model_dir is a folder this process may list and read."""
    try:
        is_dir = model_dir.is_dir()
    except OSError as exc:  # a name too long, a loop of links...
        raise ModelLoadError(f"model dir {model_dir} cannot be read: {exc.strerror}") from exc
    if not is_dir:
        raise ModelLoadError(f"model dir {model_dir} is not a directory")
    if not os.access(model_dir, os.R_OK | os.X_OK):
        raise ModelLoadError(f"model dir {model_dir} cannot be read by this process")


def read_text(path: Path) -> str:
    """A UTF-8 text file of the folder, or a ModelLoadError naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{path} is not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise ModelLoadError(f"{path} cannot be read: {exc.strerror or exc}") from exc


def read_json(path: Path, *, required: bool = True) -> dict[str, Any]:
    try:
        present = path.exists()
    except OSError as exc:  # a folder this process may not search
        raise ModelLoadError(f"{path} cannot be read: {exc.strerror or exc}") from exc
    if not present:
        if required:
            raise ModelLoadError(f"{path} is missing")
        return {}
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return data


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a config (multimodal configs nest it as text_config)."""
    nested = config.get("text_config")
    return {**config, **nested} if isinstance(nested, dict) else config


def lookup(config: dict[str, Any], fact: str) -> int | None:
    """The fact's value under the first alias present (and not null), as an int; None if no
    alias is. A value of another type is refused, naming its file and key: skipping it would
    take the next spelling, or a default, in its place."""
    for key in ALIASES[fact]:
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            where = config.get(_FILE, "the model's config")
            name = config.get(_KEYS, {}).get(key, key)
            raise ModelLoadError(f"{where} {name} must be an integer, got {value!r}")
        return value
    return None


def _declared_kv_heads(config: dict[str, Any]) -> int | None:
    # Falcon's and StarCoder's multi-query flag: one KV head shared by every query head. It
    # wins over Falcon's num_kv_heads, which only counts with new_decoder_architecture.
    if config.get("multi_query") is True and not config.get("new_decoder_architecture"):
        return 1
    return lookup(config, "num_kv_heads")


def _context_length(
    config_path: Path, config: dict[str, Any], tokenizer_config: dict[str, Any]
) -> int:
    found = lookup(config, "context_length")
    if found is None:
        limit = tokenizer_config.get("model_max_length")
        if isinstance(limit, int) and 0 < limit < _NO_LIMIT:
            found = limit
    if found is None or found < 2:
        raise ModelLoadError(_missing(config_path, "context_length"))
    return found


def _key_head_dim(config: dict[str, Any]) -> int | None:
    """The keys' head dim: `head_dim`, or, for multi-head latent attention (DeepSeek V2/V3),
    whose `head_dim` is the rotary part only, qk_nope_head_dim + qk_rope_head_dim."""
    nope, rope = config.get("qk_nope_head_dim"), config.get("qk_rope_head_dim")
    if isinstance(nope, int) and isinstance(rope, int):
        return nope + rope
    return lookup(config, "head_dim")


def _longrope_original(config: dict[str, Any]) -> int | None:
    """original_max_position_embeddings where the config's rope scaling is LongRoPE ("su" in
    early Phi-3 configs), under rope_scaling or rope_parameters (nested per layer type too)."""
    for key in ("rope_scaling", "rope_parameters"):
        rope = config.get(key)
        if not isinstance(rope, dict):
            continue
        for part in [rope, *(v for v in rope.values() if isinstance(v, dict))]:
            if part.get("rope_type", part.get("type")) in ("longrope", "su"):
                original = part.get(
                    "original_max_position_embeddings",
                    config.get("original_max_position_embeddings"),
                )
                if isinstance(original, int) and not isinstance(original, bool):
                    return original
    return None


def _missing(config_path: Path, fact: str) -> str:
    keys = ", ".join(ALIASES[fact])
    return (
        f"{config_path} states no {fact.replace('_', ' ')} as a positive integer "
        f"(looked for {keys})"
    )


def _refuse(reason: str | None) -> None:
    if reason is not None:
        raise ModelLoadError(reason)


def _as_ids(value: object, path: Path, vocab: int) -> list[int]:
    """eos_token_id: an id or a list of ids, each in the vocabulary (a stop id the model can
    never produce would let every answer run to its token limit)."""
    if value is None:
        return []
    ids = value if isinstance(value, list) else [value]
    for token_id in ids:
        if not isinstance(token_id, int) or isinstance(token_id, bool):
            raise ModelLoadError(
                f"{path} eos_token_id must be a token id or a list of them, got {value!r}"
            )
        if not 0 <= token_id < vocab:
            raise ModelLoadError(
                f"{path} eos_token_id {token_id} is outside the vocabulary (0..{vocab - 1})"
            )
    return list(ids)
