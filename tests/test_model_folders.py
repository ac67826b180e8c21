"""Model folders that are wrong in their JSON, tokenizer or graph: each is refused at load with
one line naming the file and what is wrong, or served as transformers would read it; none is
served as some other model, and none fails with a traceback."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import ScriptedModel
from tokenwire.server.config import BUNDLED_MODEL_DIR, Settings
from tokenwire.server.engine import Engine, ModelLoadError, ModelSpec, OnnxCausalLM
from tokenwire.server.engine.types import IntArray
from tokenwire.server.main import load_engine
from tokenwire.server.tokenizer import Tokenizer, TokenizerLoadError

FIXTURES = BUNDLED_MODEL_DIR.parent / "fixtures"
GENAI_LLAMA = BUNDLED_MODEL_DIR.parent / "fixtures-genai" / "llama-fp32"
LLAMA = FIXTURES / "llama"


def _copy(source: Path, tmp_path: Path) -> Path:
    model_dir = tmp_path / source.name
    shutil.copytree(source, model_dir)
    return model_dir


def _edit(path: Path, **changes: Any) -> None:
    """Set top-level keys of a JSON file (None removes one)."""
    data = json.loads(path.read_text()) if path.exists() else {}
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def _genai(tmp_path: Path, model: dict[str, Any] | None = None, **decoder: Any) -> Path:
    """The GenAI llama fixture with genai_config.json's model and model.decoder keys set."""
    model_dir = _copy(GENAI_LLAMA, tmp_path)
    path = model_dir / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"].update(model or {})
    config["model"]["decoder"].update(decoder)
    path.write_text(json.dumps(config))
    return model_dir


def _matching_config_json(model_dir: Path) -> dict[str, Any]:
    """A config.json that states what the folder's genai_config.json states."""
    genai = json.loads((model_dir / "genai_config.json").read_text())["model"]
    decoder = genai["decoder"]
    return {
        "vocab_size": genai["vocab_size"],
        "num_hidden_layers": decoder["num_hidden_layers"],
        "num_attention_heads": decoder["num_attention_heads"],
        "num_key_value_heads": decoder["num_key_value_heads"],
        "head_dim": decoder["head_size"],
        "max_position_embeddings": genai["context_length"],
        "eos_token_id": 1,
    }


def test_genai_config_rules_a_folder_that_also_has_a_config_json(tmp_path: Path) -> None:
    """A GenAI folder with a config.json beside it (as published ones often have) is still read
    from genai_config.json: its stop ids are the ones served."""
    model_dir = _genai(tmp_path, model={"eos_token_id": [1, 5]})
    (model_dir / "config.json").write_text(json.dumps(_matching_config_json(model_dir)))
    assert ModelSpec.from_dir(model_dir).eos_token_ids == {1, 5}


def test_a_genai_folder_is_named_by_its_folder_not_its_architecture(tmp_path: Path) -> None:
    """A GenAI folder's model name is the folder's (genai_config.json's model.type is the
    architecture, "llama", which many models share), or the name a config.json beside it
    gives."""
    model_dir = _genai(tmp_path)
    assert ModelSpec.from_dir(model_dir).name == model_dir.name
    config = {**_matching_config_json(model_dir), "_name_or_path": "org/tiny-llama"}
    (model_dir / "config.json").write_text(json.dumps(config))
    assert ModelSpec.from_dir(model_dir).name == "org/tiny-llama"


def test_a_config_json_beside_genai_config_does_not_lift_its_refusals(tmp_path: Path) -> None:
    """What genai_config.json says the engine cannot drive (a window-sized cache) is refused
    with a config.json beside it too."""
    window = {"window_size": 8, "slide_key_value_cache": False, "layers": [0], "cache_slack": 0}
    model_dir = _genai(tmp_path, sliding_window=window)
    (model_dir / "config.json").write_text(json.dumps(_matching_config_json(model_dir)))
    with pytest.raises(ModelLoadError, match="sliding_window"):
        ModelSpec.from_dir(model_dir)


def test_a_config_json_that_contradicts_genai_config_is_refused(tmp_path: Path) -> None:
    """config.json and genai_config.json stating different shapes describe two models: the
    load fails naming both files and both values."""
    model_dir = _genai(tmp_path)
    config = {**_matching_config_json(model_dir), "num_key_value_heads": 4}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelLoadError, match=r"genai_config.json says num kv heads 2 but .*config.json says 4"
    ):
        ModelSpec.from_dir(model_dir)


@pytest.mark.parametrize(
    ("outer", "nested", "stops"),
    [([1, 5], 1, {1, 5}), (None, [1, 5], {1, 5}), (1, None, {1})],
)
def test_the_outer_configs_stop_ids_win_over_its_text_configs(
    tmp_path: Path, outer: object, nested: object, stops: set[int]
) -> None:
    """In a multimodal config.json (no generation_config.json), the stop ids are the outer
    config's eos_token_id, as transformers' generation config takes them; text_config's fill
    in only where the outer config has none."""
    model_dir = _copy(FIXTURES / "gemma3", tmp_path)
    (model_dir / "generation_config.json").unlink()
    config = json.loads((model_dir / "config.json").read_text())
    config["eos_token_id"] = outer
    config["text_config"] = {**config.get("text_config", {}), "eos_token_id": nested}
    (model_dir / "config.json").write_text(json.dumps(config))
    assert ModelSpec.from_dir(model_dir).eos_token_ids == stops


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("suppress_tokens", [7, 9]),
        ("bad_words_ids", [[7, 9]]),
        ("forced_eos_token_id", 2),
        ("no_repeat_ngram_size", 3),
        ("min_new_tokens", 4),
    ],
)
def test_a_generation_config_that_forces_or_bans_tokens_is_refused(
    tmp_path: Path, key: str, value: object
) -> None:
    """generation_config.json setting what transformers' generate applies to every answer's
    tokens (bans, forced ids, repeat bans, a minimum length) is refused naming the file and
    the key: served without it, the model would decode other tokens than its reference."""
    model_dir = _copy(LLAMA, tmp_path)
    _edit(model_dir / "generation_config.json", **{key: value})
    with pytest.raises(ModelLoadError, match=rf"generation_config.json sets {key} = "):
        ModelSpec.from_dir(model_dir)


def test_without_a_generation_config_the_configs_own_forcing_is_refused(tmp_path: Path) -> None:
    """Without generation_config.json, config.json's own forced_eos_token_id (which
    transformers' generate then takes) is refused naming config.json."""
    model_dir = _copy(FIXTURES / "bart", tmp_path)
    (model_dir / "generation_config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config.json sets forced_eos_token_id = 2"):
        ModelSpec.from_dir(model_dir)


def test_default_valued_forcing_keys_load(tmp_path: Path) -> None:
    """The keys at their defaults (empty lists, 0, null), as exports often write them, load."""
    model_dir = _copy(LLAMA, tmp_path)
    _edit(
        model_dir / "generation_config.json",
        suppress_tokens=[],
        no_repeat_ngram_size=0,
        min_length=0,
        begin_suppress_tokens=[],
    )
    assert ModelSpec.from_dir(model_dir).eos_token_ids


@pytest.mark.parametrize("key", ["min_length", "no_repeat_ngram_size"])
def test_a_genai_search_section_that_forces_tokens_is_refused(tmp_path: Path, key: str) -> None:
    """genai_config.json's search.min_length or search.no_repeat_ngram_size above 0 (which the
    Generator applies to every request) is refused naming the file and the key."""
    model_dir = _genai(tmp_path)
    path = model_dir / "genai_config.json"
    config = json.loads(path.read_text())
    config["search"][key] = 3
    path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=rf"genai_config.json search.{key} = 3"):
        ModelSpec.from_dir(model_dir)


@pytest.mark.parametrize("eos", [320, -1, [1, 999]])
def test_a_stop_id_outside_the_vocabulary_is_refused(tmp_path: Path, eos: object) -> None:
    """An eos_token_id the model can never produce is refused: every answer would run to its
    token limit."""
    model_dir = _copy(LLAMA, tmp_path)
    _edit(model_dir / "generation_config.json", eos_token_id=eos)
    with pytest.raises(
        ModelLoadError, match=r"generation_config.json eos_token_id -?\d+ is outside the vocab"
    ):
        ModelSpec.from_dir(model_dir)


@pytest.mark.parametrize("eos", ["abc", "2", 2.7, True, [2, None], [2.0], {"id": 2}])
def test_a_stop_id_that_is_not_an_integer_is_refused(tmp_path: Path, eos: object) -> None:
    """eos_token_id of another type than an id or a list of ids is refused naming the file,
    not truncated, converted or raised as a Python error."""
    model_dir = _copy(LLAMA, tmp_path)
    _edit(model_dir / "generation_config.json", eos_token_id=eos)
    with pytest.raises(
        ModelLoadError, match=r"generation_config.json eos_token_id must be a token id"
    ):
        ModelSpec.from_dir(model_dir)


def test_a_config_value_of_another_type_is_refused_naming_its_key(tmp_path: Path) -> None:
    """A context length written as a string is refused naming file and key (skipping it would
    serve the tokenizer's model_max_length in its place)."""
    model_dir = _copy(LLAMA, tmp_path)
    _edit(model_dir / "config.json", max_position_embeddings="256")
    with pytest.raises(ModelLoadError, match=r"config.json max_position_embeddings must be an"):
        ModelSpec.from_dir(model_dir)


def test_a_genai_value_of_another_type_is_refused_naming_its_genai_key(tmp_path: Path) -> None:
    """In genai_config.json the refusal names the key as that file spells it."""
    model_dir = _genai(tmp_path, head_size="16")
    with pytest.raises(ModelLoadError, match=r"model\.decoder\.head_size must be an integer"):
        ModelSpec.from_dir(model_dir)


def test_a_genai_head_size_the_graph_lacks_is_refused_at_load(tmp_path: Path) -> None:
    """A head size the GroupQueryAttention graph does not have (the graph leaves that axis
    symbolic, so the config is all that states it) fails the load's first forward, which
    says that the config may not describe the graph."""
    model_dir = _genai(tmp_path, head_size=8)
    with pytest.raises(ModelLoadError, match=re.escape("genai_config.json may not describe it")):
        OnnxCausalLM(model_dir, provider="cpu")


def test_a_context_longer_than_the_graphs_rotary_tables_is_refused(tmp_path: Path) -> None:
    """A GenAI context_length past the graph's rotary tables fails at load, not on the first
    long request."""
    model_dir = _genai(tmp_path, model={"context_length": 4096})
    with pytest.raises(ModelLoadError, match="fails a test forward at load"):
        OnnxCausalLM(model_dir, provider="cpu", max_kv_tokens=4096)


def test_a_context_longer_than_a_learned_position_table_is_refused(tmp_path: Path) -> None:
    """GPT-2's n_positions raised past its position table fails at load, naming the position
    that does not decode."""
    model_dir = _copy(FIXTURES / "gpt2", tmp_path)
    _edit(model_dir / "config.json", n_positions=1024)
    with pytest.raises(
        ModelLoadError,
        match=re.escape(
            "fails at position 1023, within the context of 1024 tokens that config.json"
        ),
    ):
        OnnxCausalLM(model_dir, provider="cpu")


def test_errors_name_the_graph_file_that_was_loaded(tmp_path: Path) -> None:
    """A contradiction found in a graph picked with model_file names that file."""
    model_dir = _copy(LLAMA, tmp_path)
    (model_dir / "onnx").mkdir()
    (model_dir / "model.onnx").rename(model_dir / "onnx" / "model_q.onnx")
    _edit(model_dir / "config.json", num_hidden_layers=3)
    with pytest.raises(ModelLoadError, match=re.escape("but onnx/model_q.onnx has cache inputs")):
        OnnxCausalLM(model_dir, provider="cpu", model_file="onnx/model_q.onnx")


def test_a_model_dir_that_is_not_a_directory_says_so(tmp_path: Path) -> None:
    """A model dir that does not exist is refused as such (not as a missing config.json)."""
    with pytest.raises(ModelLoadError, match="is not a directory"):
        ModelSpec.from_dir(tmp_path / "absent")


def test_a_model_file_that_is_a_directory_says_so(tmp_path: Path) -> None:
    """--model-file naming a folder is refused as not a file (not as missing)."""
    model_dir = _copy(LLAMA, tmp_path)
    (model_dir / "onnx").mkdir()
    with pytest.raises(ModelLoadError, match="onnx is not a file"):
        OnnxCausalLM(model_dir, provider="cpu", model_file="onnx")


@pytest.mark.parametrize("name", ["chat_template.jinja", "generation_config.json"])
def test_a_side_file_that_cannot_be_read_is_refused_naming_it(tmp_path: Path, name: str) -> None:
    """A side file that is a directory is refused naming it (not an OSError traceback)."""
    model_dir = _copy(LLAMA, tmp_path)
    (model_dir / name).unlink(missing_ok=True)
    (model_dir / name).mkdir()
    with pytest.raises(ModelLoadError, match=f"{name} cannot be read"):
        ModelSpec.from_dir(model_dir)


def test_a_chat_template_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    """chat_template.jinja in another encoding is refused naming it."""
    model_dir = _copy(LLAMA, tmp_path)
    (model_dir / "chat_template.jinja").write_bytes(b"\xff{{ messages }}")
    with pytest.raises(ModelLoadError, match=re.escape("chat_template.jinja is not UTF-8")):
        ModelSpec.from_dir(model_dir)


def test_named_chat_templates_serve_the_default_one(tmp_path: Path) -> None:
    """tokenizer_config.json's older list of named templates serves the one named default,
    as transformers does."""
    model_dir = _copy(LLAMA, tmp_path)
    templates = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    _edit(model_dir / "tokenizer_config.json", chat_template=templates)
    assert ModelSpec.from_dir(model_dir).chat_template == "D"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ([{"name": "tool_use", "template": "T"}], 'none "default"'),
        ([{"name": "default"}], "must be a list of"),
        (5, "must be a string, got int"),
    ],
)
def test_a_chat_template_that_cannot_serve_chat_is_refused(
    tmp_path: Path, template: object, message: str
) -> None:
    """A chat template the edge could not use (no default among named ones, another type) is
    refused: served without it, chat requests would get a generic template silently."""
    model_dir = _copy(LLAMA, tmp_path)
    _edit(model_dir / "tokenizer_config.json", chat_template=template)
    with pytest.raises(ModelLoadError, match=message):
        ModelSpec.from_dir(model_dir)


def test_chat_template_jinja_wins_over_tokenizer_config(tmp_path: Path) -> None:
    """chat_template.jinja takes priority over tokenizer_config.json's template, as in
    transformers."""
    model_dir = _copy(LLAMA, tmp_path)
    _edit(model_dir / "tokenizer_config.json", chat_template="from config")
    (model_dir / "chat_template.jinja").write_text("from file")
    assert ModelSpec.from_dir(model_dir).chat_template == "from file"


def _llama_class(tmp_path: Path, **flags: Any) -> Path:
    """The llama fixture with tokenizer_config.json naming LlamaTokenizerFast and flags set."""
    model_dir = _copy(LLAMA, tmp_path)
    _edit(model_dir / "tokenizer_config.json", tokenizer_class="LlamaTokenizerFast", **flags)
    return model_dir


def test_add_bos_token_false_is_honoured_for_llama_tokenizers(tmp_path: Path) -> None:
    """LlamaTokenizerFast with add_bos_token false encodes without BOS, as transformers does,
    though tokenizer.json's own post-processor adds it."""
    plain = Tokenizer.from_dir(LLAMA).encode("hello world", add_special_tokens=True)
    tokenizer = Tokenizer.from_dir(_llama_class(tmp_path, add_bos_token=False))
    bos = tokenizer.token_id("<s>")
    assert plain[0] == bos
    assert tokenizer.encode("hello world", add_special_tokens=True) == plain[1:]


def test_add_eos_token_true_is_honoured_for_llama_tokenizers(tmp_path: Path) -> None:
    """LlamaTokenizerFast with add_eos_token true appends EOS after BOS and the text."""
    plain = Tokenizer.from_dir(LLAMA).encode("hello world", add_special_tokens=True)
    tokenizer = Tokenizer.from_dir(_llama_class(tmp_path, add_eos_token=True))
    assert tokenizer.encode("hello world", add_special_tokens=True) == [
        *plain,
        tokenizer.token_id("</s>"),
    ]


def test_flags_of_tokenizers_that_ignore_them_change_nothing(tmp_path: Path) -> None:
    """PreTrainedTokenizerFast does not read add_bos_token: tokenizer.json decides."""
    model_dir = _copy(LLAMA, tmp_path)
    _edit(model_dir / "tokenizer_config.json", add_bos_token=False)
    plain = Tokenizer.from_dir(LLAMA).encode("hello world", add_special_tokens=True)
    assert Tokenizer.from_dir(model_dir).encode("hello world", add_special_tokens=True) == plain


def test_add_bos_token_without_a_bos_token_is_refused(tmp_path: Path) -> None:
    """add_bos_token with a bos_token the vocabulary lacks is refused naming it."""
    model_dir = _llama_class(tmp_path, bos_token="<absent>")
    (model_dir / "special_tokens_map.json").unlink()
    with pytest.raises(TokenizerLoadError, match="'<absent>' is not a token"):
        Tokenizer.from_dir(model_dir)


def test_special_tokens_map_names_the_bos_that_add_bos_token_adds(tmp_path: Path) -> None:
    """Where tokenizer_config.json has no added_tokens_decoder, special_tokens_map.json's
    bos_token overrides tokenizer_config.json's, as in transformers: it is the BOS a Llama
    tokenizer adds."""
    model_dir = _llama_class(tmp_path, bos_token="<absent>", added_tokens_decoder=None)
    _edit(model_dir / "special_tokens_map.json", bos_token="</s>")
    tokenizer = Tokenizer.from_dir(model_dir)
    assert tokenizer.encode("hi", add_special_tokens=True)[0] == tokenizer.token_id("</s>")


def test_the_chat_templates_bos_is_special_tokens_maps(tmp_path: Path) -> None:
    """Where tokenizer_config.json has no added_tokens_decoder, the bos_token a chat template
    sees comes from special_tokens_map.json where it names one (over tokenizer_config.json's),
    as transformers renders it."""
    model_dir = _copy(LLAMA, tmp_path)
    _edit(model_dir / "tokenizer_config.json", bos_token="<pad>", added_tokens_decoder=None)
    _edit(model_dir / "special_tokens_map.json", bos_token={"content": "<s>", "lstrip": False})
    assert ModelSpec.from_dir(model_dir).bos_token == "<s>"


def test_beside_added_tokens_decoder_the_bos_added_is_tokenizer_configs(tmp_path: Path) -> None:
    """Where tokenizer_config.json has an added_tokens_decoder, transformers does not read
    special_tokens_map.json: the BOS a Llama tokenizer adds is tokenizer_config.json's, though
    special_tokens_map.json names another."""
    model_dir = _llama_class(tmp_path, bos_token="</s>")
    _edit(model_dir / "special_tokens_map.json", bos_token="<s>")
    tokenizer = Tokenizer.from_dir(model_dir)
    assert tokenizer.encode("hi", add_special_tokens=True)[0] == tokenizer.token_id("</s>")


def test_a_bos_only_special_tokens_map_names_is_the_one_added(tmp_path: Path) -> None:
    """Beside an added_tokens_decoder, a bos_token that tokenizer_config.json does not name is
    special_tokens_map.json's (transformers takes the Llama class's default, `<s>`, which that
    file states): the folder loads and its tokenizer adds that BOS, instead of being refused
    for a BOS that names no token."""
    model_dir = _llama_class(tmp_path)
    _edit(model_dir / "tokenizer_config.json", bos_token=None)
    _edit(model_dir / "special_tokens_map.json", bos_token="<s>")
    tokenizer = Tokenizer.from_dir(model_dir)
    assert tokenizer.encode("hi", add_special_tokens=True)[0] == tokenizer.token_id("<s>")


def test_beside_added_tokens_decoder_the_chat_templates_bos_is_tokenizer_configs(
    tmp_path: Path,
) -> None:
    """Where tokenizer_config.json has an added_tokens_decoder, the bos_token a chat template
    sees is tokenizer_config.json's, though special_tokens_map.json names another (transformers
    does not read that file then)."""
    model_dir = _copy(LLAMA, tmp_path)
    _edit(model_dir / "tokenizer_config.json", bos_token="<pad>")
    _edit(model_dir / "special_tokens_map.json", bos_token="<s>")
    assert ModelSpec.from_dir(model_dir).bos_token == "<pad>"


def test_the_chat_template_is_given_every_named_special_token(tmp_path: Path) -> None:
    """The template tokens are every special token tokenizer_config.json names with its text
    (unk_token, pad_token and mask_token too, not only bos_token and eos_token), as
    transformers' special_tokens_map holds them; a null one is left out."""
    model_dir = _copy(LLAMA, tmp_path)
    _edit(
        model_dir / "tokenizer_config.json",
        mask_token={"__type": "AddedToken", "content": "<mask>"},
    )
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["sep_token"] = None
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    assert ModelSpec.from_dir(model_dir).template_tokens == {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "mask_token": "<mask>",
    }


def test_named_extra_special_tokens_are_template_tokens(tmp_path: Path) -> None:
    """The named tokens of tokenizer_config.json's extra_special_tokens object
    ({"image_token": "<image>"}) are template tokens by their names."""
    model_dir = _copy(LLAMA, tmp_path)
    _edit(model_dir / "tokenizer_config.json", extra_special_tokens={"image_token": "<image>"})
    assert ModelSpec.from_dir(model_dir).template_tokens["image_token"] == "<image>"


def test_another_token_entry_of_tokenizer_config_is_a_template_token(tmp_path: Path) -> None:
    """A `*_token` entry of tokenizer_config.json besides the named ones (Gemma 3's
    boi_token) is a template token by its name."""
    model_dir = _copy(LLAMA, tmp_path)
    _edit(model_dir / "tokenizer_config.json", boi_token="<start_of_image>")
    assert ModelSpec.from_dir(model_dir).template_tokens["boi_token"] == "<start_of_image>"


def test_a_list_of_extra_special_tokens_adds_no_template_token(tmp_path: Path) -> None:
    """Extra special tokens given as a list (additional_special_tokens) have no names: the
    template tokens are the named ones alone, as in transformers."""
    model_dir = _copy(LLAMA, tmp_path)
    _edit(model_dir / "tokenizer_config.json", additional_special_tokens=["<a>"])
    _edit(model_dir / "special_tokens_map.json", additional_special_tokens=["<a>"])
    assert set(ModelSpec.from_dir(model_dir).template_tokens) == {
        "bos_token",
        "eos_token",
        "unk_token",
        "pad_token",
    }


def test_tokenizer_configs_own_named_token_stays_over_special_tokens_maps(
    tmp_path: Path,
) -> None:
    """Where special_tokens_map.json is read (no added_tokens_decoder), a token named outside
    bos/eos/unk/sep/pad/cls/mask keeps tokenizer_config.json's text over that file's, as in
    transformers, while that file's own named extra tokens are added."""
    model_dir = _copy(LLAMA, tmp_path)
    _edit(model_dir / "tokenizer_config.json", image_token="<cfg>", added_tokens_decoder=None)
    _edit(
        model_dir / "special_tokens_map.json",
        image_token="<map>",
        extra_special_tokens={"video_token": "<video>"},
    )
    tokens = ModelSpec.from_dir(model_dir).template_tokens
    assert (tokens["image_token"], tokens["video_token"]) == ("<cfg>", "<video>")


def _declare(model_dir: Path, token_id: int, content: str, **flags: bool) -> None:
    """Add an entry to tokenizer_config.json's added_tokens_decoder."""
    path = model_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    entry = {"content": content, "special": True, "lstrip": False, "rstrip": False, **flags}
    config.setdefault("added_tokens_decoder", {})[str(token_id)] = entry
    path.write_text(json.dumps(config))


def test_a_token_declared_only_in_tokenizer_config_encodes_to_its_id(tmp_path: Path) -> None:
    """A special token tokenizer_config.json declares at the next id, which tokenizer.json
    lacks, is registered as transformers registers it: its text encodes to that one id."""
    model_dir = _copy(LLAMA, tmp_path)
    _declare(model_dir, 320, "<|im_start|>")
    tokenizer = Tokenizer.from_dir(model_dir)
    assert tokenizer.encode("a<|im_start|>b")[1:2] == [320]


def test_a_vocabulary_token_declared_special_is_special(tmp_path: Path) -> None:
    """A token tokenizer.json has in its vocabulary but tokenizer_config.json declares special
    keeps its id and becomes special, as in transformers: decoding skips it."""
    model_dir = _copy(LLAMA, tmp_path)
    plain = Tokenizer.from_dir(model_dir)
    token_id = plain.encode("hello")[-1]
    assert plain.decode([token_id]) != ""
    _declare(model_dir, token_id, str(plain.inner.id_to_token(token_id)))
    declared = Tokenizer.from_dir(model_dir)
    assert (
        declared.token_id(str(plain.inner.id_to_token(token_id))),
        declared.decode([token_id]),
    ) == (
        token_id,
        "",
    )


def test_a_token_the_two_files_place_apart_is_refused(tmp_path: Path) -> None:
    """A token tokenizer_config.json declares at another id than tokenizer.json's is refused
    naming both ids (one of the files belongs to another model)."""
    model_dir = _copy(LLAMA, tmp_path)
    _declare(model_dir, 7, "</s>")
    with pytest.raises(
        TokenizerLoadError, match=re.escape("as id 7 but tokenizer.json has it as id 2")
    ):
        Tokenizer.from_dir(model_dir)


def test_a_token_declared_where_tokenizer_json_has_no_place_asks_if_the_files_match(
    tmp_path: Path,
) -> None:
    """A token tokenizer_config.json declares at an id tokenizer.json cannot give it (another
    model's tokenizer.json dropped beside this config) is refused asking whether the two files
    come from the same model."""
    model_dir = _copy(LLAMA, tmp_path)
    _declare(model_dir, 400, "<extra>")
    with pytest.raises(TokenizerLoadError) as caught:
        Tokenizer.from_dir(model_dir)
    assert "which tokenizer.json has no place for" in str(caught.value)
    assert "from the same model?" in str(caught.value)


@pytest.mark.parametrize(("content", "message"), [(None, "is missing"), ("{", "cannot be loaded")])
def test_a_missing_or_broken_tokenizer_is_refused_naming_it(
    tmp_path: Path, content: str | None, message: str
) -> None:
    """tokenizer.json that is absent or not a tokenizer is refused naming the file."""
    model_dir = _copy(LLAMA, tmp_path)
    path = model_dir / "tokenizer.json"
    path.unlink()
    if content is not None:
        path.write_text(content)
    with pytest.raises(TokenizerLoadError, match=f"tokenizer.json {message}"):
        Tokenizer.from_dir(model_dir)


def test_the_server_refuses_a_broken_tokenizer_as_a_model_it_cannot_load(tmp_path: Path) -> None:
    """load_engine turns a tokenizer refusal into the model refusal `serve` reports (one log
    line, exit status 2), not a traceback."""
    model_dir = _copy(LLAMA, tmp_path)
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=re.escape("tokenizer.json is missing")):
        load_engine(Settings(model_dir=model_dir, provider="cpu", intra_op_threads=1))


@pytest.mark.parametrize("provider", ["dml", "webgpu", "NvTensorRtRtx"])
def test_a_genai_folder_built_for_another_execution_provider_is_refused(
    tmp_path: Path, provider: str
) -> None:
    """A folder whose genai_config.json names an execution provider other than the CPU or
    CUDA (built with `-e dml`, say, whose LongRoPE graphs leave the rotary table's offset to
    that provider) is refused, naming the key and the provider, not served with other
    tokens."""
    options = {"log_id": "onnxruntime-genai", "provider_options": [{provider: {}}]}
    model_dir = _genai(tmp_path, session_options=options)
    with pytest.raises(
        ModelLoadError, match=rf"session_options\.provider_options names {provider}: "
    ):
        ModelSpec.from_dir(model_dir)


def test_a_genai_folder_built_for_cuda_is_read(tmp_path: Path) -> None:
    """A folder built with `-e cuda` (provider_options names cuda) is read as any other."""
    options = {"log_id": "onnxruntime-genai", "provider_options": [{"cuda": {}}]}
    model_dir = _genai(tmp_path, session_options=options)
    assert ModelSpec.from_dir(model_dir).vocab_size > 0


def test_a_window_on_every_layer_is_refused_in_words(tmp_path: Path) -> None:
    """A sliding window the builder lists with no layers (every layer has it) is refused
    saying the folder's layers keep a window-sized cache, not "layers []"."""
    window = {"window_size": 8, "slide_key_value_cache": False, "layers": [], "cache_slack": 0}
    with pytest.raises(ModelLoadError, match="sliding_window: its layers keep a window-sized"):
        ModelSpec.from_dir(_genai(tmp_path, sliding_window=window))


class _UnreadableOutputs(OnnxCausalLM):
    """The GenAI llama fixture, its batched forwards failing as unreadable logits would."""

    def forward(self, ids: Any, *args: Any, **kwargs: Any) -> Any:
        if len(ids) > 1:
            raise IndexError("index 5 is out of bounds for axis 1 with size 1")
        return super().forward(ids, *args, **kwargs)


def test_a_graph_whose_outputs_cannot_be_read_is_refused_in_one_line() -> None:
    """A test forward at load that fails outside ONNX Runtime (outputs of a shape the engine
    cannot read) is refused as a ModelLoadError naming the graph and the error, so the
    server says so in one line instead of a traceback."""
    with pytest.raises(ModelLoadError, match=r"model\.onnx gives outputs tokenwire cannot read"):
        _UnreadableOutputs(GENAI_LLAMA, provider="cpu")


@pytest.mark.parametrize(
    ("family", "key"), [("bart", "max_position_embeddings"), ("mpt", "max_seq_len")]
)
def test_a_context_longer_than_a_graph_that_counts_its_own_positions_is_refused(
    tmp_path: Path, family: str, key: str
) -> None:
    """A graph that takes no position_ids (it counts positions from its past: BART's learned
    table, MPT's ALiBi bias) whose config states a context past what it holds fails at load,
    at the last position, not in the middle of the first long request."""
    model_dir = _copy(FIXTURES / family, tmp_path)
    _edit(model_dir / "config.json", **{key: 1024})
    with pytest.raises(ModelLoadError, match=re.escape("fails at position 1023")):
        OnnxCausalLM(model_dir, provider="cpu")


def test_a_graph_that_counts_its_positions_serves_under_a_max_context_tokens_cap(
    tmp_path: Path,
) -> None:
    """A config that states more context than the graph's position table holds is served
    where max_context_tokens keeps every request within the table: the load checks the
    last position requests may reach, not the config's."""
    model_dir = _copy(FIXTURES / "bart", tmp_path)
    _edit(model_dir / "config.json", max_position_embeddings=1024)
    settings = Settings(
        model_dir=model_dir, provider="cpu", intra_op_threads=1, max_context_tokens=256
    )
    engine = load_engine(settings)
    assert engine.limits.context_length == 256


def test_a_model_dir_whose_name_cannot_be_looked_up_is_refused(tmp_path: Path) -> None:
    """A model dir the system cannot even look up (a name longer than the file system takes)
    is refused naming it, not a traceback."""
    with pytest.raises(ModelLoadError, match="cannot be read: File name too long"):
        ModelSpec.from_dir(tmp_path / ("m" * 300))


def test_a_model_file_whose_name_cannot_be_looked_up_is_refused(tmp_path: Path) -> None:
    """A model_file the system cannot look up (a name longer than the file system takes) is
    refused naming it, not a traceback."""
    model_dir = _copy(LLAMA, tmp_path)
    with pytest.raises(ModelLoadError, match="cannot be read: File name too long"):
        OnnxCausalLM(model_dir, provider="cpu", model_file="m" * 300 + ".onnx")


def test_a_chat_template_list_whose_entry_names_are_not_strings_is_refused(
    tmp_path: Path,
) -> None:
    """A chat_template list whose entry has a list for its name is refused naming the key."""
    model_dir = _copy(LLAMA, tmp_path)
    _edit(
        model_dir / "tokenizer_config.json", chat_template=[{"name": ["default"], "template": "x"}]
    )
    with pytest.raises(ModelLoadError, match="chat_template must be a list of"):
        ModelSpec.from_dir(model_dir)


class _Positions(ScriptedModel):
    """A scripted model that remembers the highest position any forward computes, and can
    fail as ONNX Runtime does."""

    highest = -1
    fails = False

    def forward(  # type: ignore[override]
        self, input_ids: IntArray, attention_mask: IntArray, *args: Any, **kwargs: Any
    ) -> Any:
        if self.fails:
            raise RuntimeError("Gather: indices element out of data bounds")
        self.highest = max(self.highest, attention_mask.shape[1] - 1)
        return super().forward(input_ids, attention_mask, *args, **kwargs)


def test_the_warm_up_stays_within_the_context() -> None:
    """With a context of 8 tokens, the warm-up (a short prompt, then a few tokens) computes
    no position past 7: a graph whose tables end at its context warms up."""
    spec = dataclasses.replace(ModelSpec.from_dir(BUNDLED_MODEL_DIR), context_length=8)
    model = _Positions(spec, {})
    Engine(model, Tokenizer.from_dir(BUNDLED_MODEL_DIR)).warm_up()
    assert 0 <= model.highest < 8


def test_a_graph_that_fails_the_warm_up_is_refused() -> None:
    """A forward that ONNX Runtime fails during the warm-up is a ModelLoadError naming the
    warm-up and ONNX Runtime's words (the server refuses the folder, exit status 2), not a
    traceback."""
    model = _Positions(ModelSpec.from_dir(BUNDLED_MODEL_DIR), {})
    model.fails = True
    with pytest.raises(ModelLoadError, match=r"fails the warm-up forwards .*: Gather"):
        Engine(model, Tokenizer.from_dir(BUNDLED_MODEL_DIR)).warm_up()


def test_a_folder_where_the_graph_should_be_is_named_as_not_a_file(tmp_path: Path) -> None:
    """A model.onnx that is a folder is refused as not a file, not as a graph that is missing."""
    model_dir = _copy(LLAMA, tmp_path)
    (model_dir / "model.onnx").unlink()
    (model_dir / "model.onnx").mkdir()
    with pytest.raises(ModelLoadError, match=re.escape("model.onnx is not a file")):
        OnnxCausalLM(model_dir, provider="cpu")
