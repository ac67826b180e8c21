"""The decode engine: ONNX Runtime model, KV cache, sampling, continuous batching."""

from service.engine.engine import Engine, EngineConfig, GenerationHandle
from service.engine.mailbox import EngineStopped
from service.engine.model import CausalLM, OnnxCausalLM
from service.engine.observer import EngineObserver, NullObserver, RequestRecord, StepRecord
from service.engine.padding import Padding
from service.engine.spec import ModelLoadError, ModelSpec

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
