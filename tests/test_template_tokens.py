"""The special tokens a model folder names travel by name from the server to the client, as
the variables of the chat template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc

from tests.conftest import start_server
from tokenwire.client.messages import model_info_from_pb
from tokenwire.server.config import BUNDLED_MODEL_DIR
from tokenwire.server.engine import OnnxCausalLM
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

LLAMA = BUNDLED_MODEL_DIR.parent / "fixtures" / "llama"


async def test_get_model_info_carries_each_special_token_by_name(tmp_path: Path) -> None:
    """GetModelInfo carries every special token the folder names with its text (unk_token,
    pad_token and a named extra token too, not only bos_token and eos_token), and the client's
    ModelInfo holds them by name."""
    model_dir = tmp_path / "llama"
    shutil.copytree(LLAMA, model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["extra_special_tokens"] = {"image_token": "<image>"}
    config_path.write_text(json.dumps(config))
    model = OnnxCausalLM(model_dir, provider="cpu", intra_op_threads=1)
    running = await start_server(model, Tokenizer.from_dir(model_dir))
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            reply = await stub.GetModelInfo(pb.GetModelInfoRequest())
    finally:
        await running.server.drain()
    assert model_info_from_pb(reply).template_tokens == {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "image_token": "<image>",
    }
