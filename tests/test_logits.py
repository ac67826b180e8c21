"""Logits on the device: their argmax computed there, the whole array brought to the host as
float32 (fp16 widened by ONNX Runtime on the model's provider) only when asked for."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from tokenwire.server.engine.logits import DeviceLogits, HostLogits, LogitsReader, widens

CPU = ["CPUExecutionProvider"]


def _logits(dtype: type[np.floating]) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.standard_normal((4, 1, 1000)) * 10).astype(dtype)


def test_fp16_logits_are_widened_exactly() -> None:
    """Every float16 value, +-inf and the largest finite ones included, comes back as the same
    number in float32, in the logits' shape."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 2, 1000)) * 1000).astype(np.float16)
    logits[0, 0, :4] = [np.inf, -np.inf, np.float16(65504), np.float16(-65504)]
    value = ort.OrtValue.ortvalue_from_numpy(logits)
    widened = LogitsReader(CPU, half=True).to_host(value)
    assert widened.dtype == np.float32
    assert widened.shape == logits.shape
    assert np.array_equal(widened, logits.astype(np.float32))


def test_only_fp16_logits_are_widened() -> None:
    """float32 logits come back as they are; float16 ones are widened."""
    assert widens("tensor(float16)")
    assert not widens("tensor(float)")


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=["fp16", "fp32"])
def test_the_device_argmax_is_the_host_argmax(dtype: type[np.floating]) -> None:
    """Each row's best id from the greedy graph equals numpy's argmax of the widened logits;
    ties go to the lowest id."""
    logits = _logits(dtype)
    logits[1, 0, [17, 42]] = 90  # a tie: the lower id wins
    reader = LogitsReader(CPU, half=dtype is np.float16)
    best = reader.argmax(ort.OrtValue.ortvalue_from_numpy(logits))[:, -1]
    assert best.tolist() == logits[:, 0, :].astype(np.float32).argmax(axis=1).tolist()
    assert best[1] == 17


def test_a_best_id_past_the_limit_is_decided_among_the_ids_below_it() -> None:
    """Rows whose highest score lies at or past the vocabulary limit (padded embedding rows)
    get the best id below the limit; the other rows keep the device's answer."""
    logits = _logits(np.float16)
    logits[0, 0, 900] = 100
    logits[3, 0, 800] = 100
    device = DeviceLogits(ort.OrtValue.ortvalue_from_numpy(logits), LogitsReader(CPU, half=True))
    best = device.argmax(800)
    assert best.tolist() == logits[:, 0, :800].astype(np.float32).argmax(axis=1).tolist()


def test_device_logits_come_to_the_host_once_and_agree_with_the_device_argmax() -> None:
    """host() returns the float32 rows of the last position, the same object on every call;
    the argmax read afterwards from that copy equals the device's."""
    logits = _logits(np.float16)
    device = DeviceLogits(ort.OrtValue.ortvalue_from_numpy(logits), LogitsReader(CPU, half=True))
    before = device.argmax(1000)
    host = device.host()
    assert host.dtype == np.float32
    assert host.shape == (4, 1000)
    assert host is device.host()
    assert device.argmax(1000).tolist() == before.tolist()


def test_host_logits_argmax_respects_the_limit() -> None:
    """Logits already on the host: the argmax ignores ids at and past the limit."""
    logits = _logits(np.float32)[:, 0, :]
    logits[2, 999] = 1e6
    assert HostLogits(logits).argmax(999).tolist() == logits[:, :999].argmax(axis=1).tolist()
