"""Array aliases shared by the engine's modules."""

from __future__ import annotations

from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

IntArray: TypeAlias = npt.NDArray[np.int64]
FloatArray: TypeAlias = npt.NDArray[np.float32]
AnyArray: TypeAlias = npt.NDArray[Any]
CacheTensor: TypeAlias = FloatArray | ort.OrtValue
"""One cache tensor of a copying step: a host array, or an OrtValue where the model left it
(its device), until something needs it on the host."""


def on_host(tensor: CacheTensor) -> FloatArray:
    """The tensor as a host array (one copy down if it is an OrtValue)."""
    if isinstance(tensor, ort.OrtValue):
        host: FloatArray = tensor.numpy()
        return host
    return tensor
