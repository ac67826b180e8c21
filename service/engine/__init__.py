"""The decode engine: ONNX Runtime model, KV cache, sampling, continuous batching."""

from tokenwire.server.engine.engine import Engine, EngineConfig, GenerationHandle
from tokenwire.server.engine.mailbox import EngineStopped
from tokenwire.server.engine.model import CausalLM, OnnxCausalLM
from tokenwire.server.engine.observer import EngineObserver, NullObserver, RequestRecord, StepRecord
from tokenwire.server.engine.padding import Padding
from tokenwire.server.engine.spec import ModelLoadError, ModelSpec

__all__ = [
    "CausalLM",
    "Engine",
    "EngineConfig",
    "EngineObserver",
    "EngineStopped",
    "GenerationHandle",
    "ModelLoadError",
    "ModelSpec",
    "NullObserver",
    "OnnxCausalLM",
    "Padding",
    "RequestRecord",
    "StepRecord",
]
