"""An ONNX Runtime causal LM in the Hugging Face Optimum "with past" layout.

  inputs  input_ids [b, s], attention_mask [b, p+s], position_ids [b, s] (optional),
          past_key_values.{i}.key|value (shapes read from the graph, see graph.py)
  outputs logits [b, s, vocab], present.{i}.key|value (past grown by s on the sequence axis)

config.json supplies what the graph cannot say (vocabulary, context length, stop ids, see
spec.py); how the graph takes padding is measured once at load (see padding.py).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort
import structlog

from tokenwire.server.engine.graph import CacheLayout, check_io, read_layout
from tokenwire.server.engine.graph_ops import op_types_among
from tokenwire.server.engine.kv_cache import BatchKvCache
from tokenwire.server.engine.logits import DeviceLogits, HostLogits, Logits, LogitsReader, widens
from tokenwire.server.engine.padding import (
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    Padding,
    pairs_agree,
    probe,
    probe_width_limit,
)
from tokenwire.server.engine.slot_buffer import (
    BoundTensor,
    ByteCopier,
    DeviceSlotBuffer,
    PastTensors,
)
from tokenwire.server.engine.slot_cache import SlotKvCache
from tokenwire.server.engine.spec import ModelLoadError, ModelSpec, first_line, graph_path
from tokenwire.server.engine.static_decode import (
    CUDA,
    StaticDecode,
    captures_graphs,
    capturing,
    uncaptured_run,
)
from tokenwire.server.engine.types import CacheTensor, FloatArray, IntArray

CPU = "CPUExecutionProvider"
_DRIVEN_INPUTS = {"input_ids", "attention_mask", "position_ids"}
# Where IOBinding puts a provider's tensors (ONNX Runtime's device names).
_DEVICES = {CPU: "cpu", CUDA: "cuda"}
log = structlog.get_logger("tokenwire.engine")


def cuda_device_present() -> bool:
    """True when an NVIDIA driver exposes a device; avoids noisy CUDA probes on CPU hosts."""
    return Path("/proc/driver/nvidia").exists() or Path("/dev/nvidia0").exists()


def choose_providers(preference: str) -> list[str]:
    """Execution providers to ask for: CUDA first where usable, CPU always as the fallback."""
    wants_cuda = preference == "cuda" or (preference == "auto" and cuda_device_present())
    if wants_cuda and CUDA in ort.get_available_providers():
        return [CUDA, CPU]
    return [CPU]


class CausalLM(Protocol):
    """What the scheduler needs from a model: its shape, an empty cache, and one step."""

    spec: ModelSpec
    provider: str
    padding: Padding
    width_limit: int | None
    """The widest attention mask that rows sharing a forward do not notice (None: any)."""
    decodes_rows_alone: bool
    """Each decode row runs in a forward of its own, in the preallocated cache, and no prompt
    shares a prefill: a row's rounding beside others could cross a quantisation step."""
    pads_single_rows: bool
    """A forward of one position of one row runs as two rows, the second a scratch row in a
    neighbouring slot of the preallocated cache: the CPU computes a one-row product otherwise
    than a batched one, and batches of two or more alike (see OnnxCausalLM)."""

    @property
    def steps_continuations(self) -> bool:
        """A continuation's ids go in one per forward, as its stream computed them."""
        ...

    def new_cache(self, rows: int, columns: int = 0, *, left_aligned: bool = False) -> BatchKvCache:
        """A cache of `rows` rows holding `columns` masked (padding) columns."""
        ...

    def new_slot_cache(self, slots: int, capacity: int) -> SlotKvCache | None:
        """A preallocated cache the graph updates in place, or None where it cannot."""
        ...

    def forward(
        self,
        input_ids: IntArray,
        attention_mask: IntArray,
        position_ids: IntArray,
        past: PastTensors,
        last: IntArray | None = None,
        *,
        in_place: bool = False,
        decode: bool = False,
        before_run: Callable[[], None] | None = None,
    ) -> tuple[Logits, Sequence[CacheTensor]]:
        """One step: logits [rows, vocab] at each row's `last` new position (default: the
        final one) and the present cache tensors (host arrays, or OrtValues on the model's
        device). With in_place, `past` (tensors bound by address, on the model's device) is
        bound as the present outputs too and the graph writes into it; the present list is
        then empty. `decode`: one new token per row, over the live rows of the model's slot
        cache (a step that may be replayed as a CUDA graph). `before_run` is called right
        before ONNX Runtime starts (which releases the GIL)."""
        ...


class OnnxCausalLM:
    """One ONNX Runtime session over a decoder with a KV cache. Not thread-safe: one caller."""

    decodes_rows_alone = False
    """Every decode row runs in a forward of its own in the preallocated cache, and every
    prompt prefills alone: the graph quantises each row's activations (ROW_QUANTIZERS) and
    the probe found a row rounding otherwise beside others than alone (see _probe)."""
    pads_single_rows = False
    """A forward that would compute one position of one row computes two, the second a
    scratch row in a neighbouring slot of the preallocated cache, so that no product has one
    row: the graph quantises each row's activations (ROW_QUANTIZERS), the CPU computes a
    one-row MatMulNBits otherwise than a batched one, and the probe found a row's logits the
    same in every batch of two or more (padding.pairs_agree). Rows then share forwards."""

    def __init__(
        self,
        model_dir: Path,
        *,
        provider: str = "auto",
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
        spinning: bool = True,
        device_cache: bool | None = None,
        preallocated: bool = True,
        cuda_graph: bool = True,
        static_decode: bool | None = None,
        profile_prefix: str | None = None,
        max_kv_tokens: int | None = None,
        model_file: str = "",
        pad_single_rows: bool | None = None,
    ) -> None:
        """device_cache: keep the cache in OrtValues on the session's device: a preallocated
        one where the graph writes in place (GroupQueryAttention), and otherwise each step's
        present tensors, which the next step reads where they are (the default on CUDA; on
        the CPU provider numpy arrays serve, and True tests that path). False on CUDA falls
        back to host arrays fed and fetched every step, for comparison only.
        preallocated: False gives GroupQueryAttention graphs too a cache that grows every
        step, as other graphs have it (for comparison only).
        cuda_graph: on CUDA, replay decode steps of the preallocated cache as CUDA graphs, one
        per batch size (static_decode.py); where ONNX Runtime cannot capture the graph, steps
        run uncaptured (logged). static_decode: run decode steps on fixed bindings (default:
        where CUDA graphs are captured; True on the CPU provider tests that path).
        profile_prefix: record ONNX Runtime's profile (session.end_profiling() writes it).
        max_kv_tokens: the most tokens one request may hold on the server (its KV budget, or
        its max_context_tokens where lower): the graph is checked up to it (or the context):
        a graph padded on the right is probed for mask widths up to it, and its context capped
        where it reads the width; a token at its last position must decode.
        model_file: the graph to load, relative to model_dir (spec.graph_path).
        pad_single_rows: compute every one-position forward of one row as two rows (default:
        where the probe finds it needed and exact; True on any graph with a preallocated cache
        tests that path)."""
        self.spec = ModelSpec.from_dir(model_dir)
        onnx_path = graph_path(model_dir, self.spec, model_file)
        options = _options((intra_op_threads, inter_op_threads), spinning, profile_prefix)
        self.session = _session(onnx_path, options, provider, cuda_graph)
        self.captures_graphs = captures_graphs(self.session)
        self._plain_run = uncaptured_run() if self.captures_graphs else None
        self.provider: str = self.session.get_providers()[0]
        if provider == "cuda" and self.provider != CUDA:
            # onnxruntime-gpu lists CUDA even where its libraries are missing and then runs on
            # the CPU: asked for CUDA explicitly, that must not pass unnoticed.
            raise ModelLoadError(
                f"provider cuda was asked for, but ONNX Runtime {ort.__version__} could not use "
                "CUDAExecutionProvider here (no GPU, or its CUDA 13 / cuDNN 9 libraries are not "
                "found); use provider auto or cpu to run on the CPU"
            )
        self.device = _DEVICES.get(self.provider, "cpu")
        self._device_cache = self.provider != CPU if device_cache is None else device_cache
        self._preallocated = preallocated
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        graph = onnx_path.relative_to(model_dir).as_posix()
        self.layout: CacheLayout = read_layout(inputs, outputs, self.spec, graph)
        check_io(inputs, outputs, self.spec, graph)
        names = {i.name for i in inputs}
        unknown = names - _DRIVEN_INPUTS - set(self.layout.past_names)
        if unknown or not {"input_ids", "attention_mask"} <= names:
            raise ModelLoadError(
                f"{onnx_path} takes inputs {sorted(names)}: the engine feeds input_ids, "
                "attention_mask, position_ids (optional) and past_key_values.N.* only"
            )
        self._has_position_ids = "position_ids" in names
        self.output_names = ["logits", *self.layout.present_names]
        self._axes = tuple(t.seq_axis for t in self.layout.tensors)
        self._shapes = [t.shape for t in self.layout.tensors]
        self._binding = self.session.io_binding()
        self._copying_binding = self.session.io_binding()
        self.cache_uploads = 0
        """Copying steps on the device cache whose past came up from host arrays."""
        logits_type = next(o.type for o in outputs if o.name == "logits")
        self._half = widens(logits_type)
        self._reader = LogitsReader(
            self.session.get_providers(), half=self._half, capture=self.captures_graphs
        )
        self._bound_regions: tuple[object, ...] = ()
        self._decode_logits: dict[int, FloatArray] = {}
        self._logits_bound: FloatArray | None = None
        """The host array the logits output is bound to now (None: bound to a device)."""
        tolerance = FP16_TOLERANCE if self.layout.dtype is np.float16 else FP32_TOLERANCE
        self._static: StaticDecode | None = None
        self.padding = Padding.ALONE
        self.batch_rounding = 0.0
        """How far a row's logits beside other rows land from the same row's alone, relative
        to their scale (0: never). Above 0 where masked padding in front of a row changes the
        order its attention sums in (left-padded graphs), or where ONNX Runtime computes a
        one-row product with another kernel than a batched one, as MatMulNBits (int4) does on
        some CPUs: a request's tokens then round differently served alone and in a batch."""
        self.one_row_rounding = 0.0
        """Where single rows are padded (pads_single_rows): how far a row computed alone
        landed from the same row in a batch, relative to the logit scale (the rounding that
        padding keeps from the served rows)."""
        self.width_limit: int | None = None
        """The widest attention mask rows do not notice, where some wider one changes them (a
        graph that picks its rotary tables by the mask's width): rows past it decode alone in
        the preallocated cache, or, without one, the context is capped here."""
        self.quantizing_ops = op_types_among(onnx_path, ACTIVATION_QUANTIZERS | ROW_QUANTIZERS)
        """The graph's operators that quantise activations (ACTIVATION_QUANTIZERS,
        ROW_QUANTIZERS)."""
        self._measure(graph, tolerance, max_kv_tokens)
        self._choose_decode(static_decode, pad_single_rows)

    def _choose_decode(self, static_decode: bool | None, pad_single_rows: bool | None) -> None:
        """How decode steps run, after the probe: on fixed bindings where asked (or where CUDA
        graphs are captured), and single rows padded where asked (tests)."""
        if pad_single_rows is not None and self._slot_cache_kind():
            self.pads_single_rows = pad_single_rows
        wants_static = self.captures_graphs if static_decode is None else static_decode
        # Fixed bindings hold the live rows from slot 0; rows past a width limit, and rows
        # that decode alone, run alone.
        if wants_static and self.padding is Padding.RIGHT and not self._runs_rows_alone:
            logits_dtype = np.float16 if self._half else np.float32
            self._static = StaticDecode(
                self.session, self.layout, self.device, logits_dtype, self.spec.vocab_size
            )

    def _measure(self, graph: str, tolerance: float, max_kv_tokens: int | None) -> None:
        """Probe the graph (_probe). These are its first forwards: a config that does not
        describe it (a head size, or a context its tables lack) fails them, and says so."""
        try:
            self._probe(graph, tolerance, max_kv_tokens)
            if not self._has_position_ids and self.padding is not Padding.RIGHT:
                # A graph that counts its own positions, unless the probe decoded every width
                # already (graphs padded on the right); after the probe's short forwards, which
                # a config that does not describe the graph fails first (and says so).
                self._check_last_position(graph, self._widths(max_kv_tokens) - 1)
        except ModelLoadError:
            raise
        except Exception as exc:
            first = first_line(exc)
            if from_onnxruntime(exc):
                raise ModelLoadError(
                    f"{graph} fails a test forward at load, so {self.spec.config_file} may not "
                    f"describe it, or ONNX Runtime's {self.provider} cannot run it"
                    f"{' (an fp16 graph on the CPU provider, say)' if self.provider == CPU else ''}"
                    f": {first}"
                ) from exc
            if isinstance(exc, (IndexError, ValueError, TypeError)):
                # Outputs the engine cannot read (shapes no engine path expects): refused as
                # a graph it cannot drive, in one line, not a traceback.
                raise ModelLoadError(
                    f"{graph} gives outputs tokenwire cannot read in a test forward at load "
                    f"({type(exc).__name__}: {first})"
                ) from exc
            raise

    def _probe(self, graph: str, tolerance: float, max_kv_tokens: int | None) -> None:
        """How the graph takes padding and batches (padding.py): its padding class, batch
        rounding and, for a graph padded on the right, the mask width it notices, every width
        the server can serve (the context, or the KV budget) decoded once."""
        widths = self._widths(max_kv_tokens)
        if self._has_position_ids:
            self._check_last_position(graph, widths - 1)
        if self.quantizes_activations:
            self.padding = Padding.ALONE  # whatever a sample of rows shows
            return
        self.padding, self.batch_rounding = probe(self, tolerance)
        if self.padding is Padding.RIGHT:
            self.width_limit = probe_width_limit(self, widths, tolerance)
            if self.width_limit is not None and not self._slot_cache_kind():
                self.spec = dataclasses.replace(
                    self.spec,
                    context_length=self.width_limit,
                    context_cap="the graph reads the attention mask's width past this many "
                    "entries (as LongRoPE's tables do in ONNX Runtime GenAI's builder), and "
                    "without the preallocated cache rows past it cannot decode alone",
                )
        if self.batch_rounding and self.provider == CPU and self.quantizing_ops & ROW_QUANTIZERS:
            # A row rounds otherwise beside others (MLAS's one-row MatMulNBits kernel), and the
            # graph quantises each row's activations to int8: 1e-7 can cross a quantisation
            # step and become 1e-2 of the logit scale, and other tokens, a few dozen steps on.
            if not self._slot_cache_kind():
                self.padding = Padding.ALONE
            elif self.width_limit is None and pairs_agree(self):
                # MLAS computes one row otherwise than several, and any batch of two or more
                # alike: no forward computes one row (a scratch row pads it), rows share the
                # rest, and a row's tokens do not depend on its neighbours.
                self.pads_single_rows = True
                self.one_row_rounding, self.batch_rounding = self.batch_rounding, 0.0
            else:
                self.decodes_rows_alone = True

    def _widths(self, max_kv_tokens: int | None) -> int:
        """The most tokens one request may hold: the context, or max_kv_tokens where lower."""
        return min(self.spec.context_length, max_kv_tokens or self.spec.context_length)

    def _check_last_position(self, graph: str, last: int) -> None:
        """A token at the last position the server may serve must decode: a graph whose
        position table is shorter than the context its config states (a learned table, a
        rotary cache, an ALiBi bias made for a shorter context) fails here, not on the first
        long request. A graph that takes position_ids is given that position; one that
        counts positions itself (from its past's length) is given a past that long, one row
        of the cache the KV budget holds anyway."""
        past = 0 if self._has_position_ids else last
        try:
            self.forward(
                np.zeros((1, 1), dtype=np.int64),
                np.ones((1, past + 1), dtype=np.int64),
                np.full((1, 1), last, dtype=np.int64),
                self.new_cache(1, past).tensors,
            )
        except Exception as exc:
            if not from_onnxruntime(exc):
                raise
            raise ModelLoadError(
                f"{graph} fails at position {last}, within the context of "
                f"{self.spec.context_length} tokens that {self.spec.config_file} states "
                f"(max_context_tokens below it serves less): "
                f"{first_line(exc)}"
            ) from exc

    @property
    def _runs_rows_alone(self) -> bool:
        """Whether some decode rows run in forwards of their own (past a width limit, or all
        of them where rows decode alone)."""
        return self.width_limit is not None or self.decodes_rows_alone

    @property
    def decode_graphs(self) -> int:
        """Batch sizes decoded on fixed bindings so far (on CUDA, each one captured graph)."""
        return 0 if self._static is None else self._static.graphs

    @property
    def host_logits_rows(self) -> list[int]:
        """Row counts whose decode steps write their logits into a kept host array."""
        return sorted(self._decode_logits)

    def new_cache(self, rows: int, columns: int = 0, *, left_aligned: bool = False) -> BatchKvCache:
        return BatchKvCache.zeros(
            self._shapes, self._axes, self.layout.dtype, rows, columns, left_aligned=left_aligned
        )

    def _slot_cache_kind(self) -> str:
        """Where a preallocated cache would live ("host", "device"), or "" where there is none:
        in-place writes are GroupQueryAttention's contract (RIGHT padding)."""
        if (
            not self._preallocated
            or self.padding is not Padding.RIGHT
            or self.provider not in _DEVICES
        ):
            return ""
        if self._device_cache:
            return "device"
        # Host arrays only where the provider computes in host memory.
        return "host" if self.provider == CPU else ""

    def new_slot_cache(self, slots: int, capacity: int) -> SlotKvCache | None:
        kind = self._slot_cache_kind()
        if not kind:
            return None
        if kind == "host":
            return SlotKvCache(self._shapes, self._axes, self.layout.dtype, slots, capacity)
        copier = ByteCopier(self.session.get_providers())
        buffer = functools.partial(DeviceSlotBuffer, device=self.device, copier=copier)
        return SlotKvCache(
            self._shapes, self._axes, self.layout.dtype, slots, capacity, buffer=buffer
        )

    def forward(
        self,
        input_ids: IntArray,
        attention_mask: IntArray,
        position_ids: IntArray,
        past: PastTensors,
        last: IntArray | None = None,
        *,
        in_place: bool = False,
        decode: bool = False,
        before_run: Callable[[], None] | None = None,
    ) -> tuple[Logits, Sequence[CacheTensor]]:
        """Run one step; return each row's logits at `last` (default: the final position)."""
        feed: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._has_position_ids:
            feed["position_ids"] = position_ids
        present: Sequence[CacheTensor] = []
        if in_place and decode and self._static is not None:
            logits = self._static_step(feed, [_bound(view) for view in past], before_run)
            if logits is not None:
                if self.device == "cpu":  # numpy reads host memory faster than a session run
                    return HostLogits(self._reader.to_host(logits)[:, -1, :]), present
                return DeviceLogits(logits, self._reader), present
        if in_place:
            scores = self._run_in_place(feed, past, before_run, decode=decode)
        elif self._device_cache:
            scores, present = self._run_on_device(feed, past, before_run)
        else:
            feed.update(zip(self.layout.past_names, past, strict=True))
            if before_run is not None:
                before_run()
            outputs = self.session.run(self.output_names, feed, self._plain_run)
            scores, present = outputs[0], list(outputs[1:])
        picked = scores[:, -1, :] if last is None else scores[np.arange(len(scores)), last, :]
        return HostLogits(np.asarray(picked, dtype=np.float32)), present

    def _static_step(
        self,
        feed: dict[str, Any],
        regions: list[BoundTensor],
        before_run: Callable[[], None] | None,
    ) -> ort.OrtValue | None:
        """The decode step on fixed bindings (a CUDA graph replayed, on CUDA); None, from now
        on, where ONNX Runtime refuses it (a graph it cannot capture): steps then run on
        bindings made per step, as without CUDA graphs (the step writes the same cache entries
        again, so nothing is left half-done)."""
        assert self._static is not None
        try:
            return self._static.run(feed, regions, before_run)
        except Exception as exc:
            if not from_onnxruntime(exc):
                raise
            log.warning(
                "model.static_decode_failed",
                error=first_line(exc),
                reason="decode steps run on bindings made per step from now on",
            )
            self._static = None
            return None

    def _run_on_device(
        self, feed: dict[str, Any], past: PastTensors, before_run: Callable[[], None] | None
    ) -> tuple[FloatArray, list[ort.OrtValue]]:
        """A copying step (present = past grown by the new entries) that leaves its present
        tensors on the session's device, where the next step reads them: a cache that came
        out of the previous step is bound where it is, and only host arrays (a new cache, or
        rows just joined or dropped, arranged on the host) go up. The logits come down."""
        binding = self._copying_binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        uploads = 0
        for name, tensor in zip(self.layout.past_names, past, strict=True):
            if isinstance(tensor, ort.OrtValue):
                binding.bind_ortvalue_input(name, tensor)
            elif isinstance(tensor, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(tensor))
                uploads += int(tensor.size > 0)
            else:
                raise TypeError("a copying step takes arrays or OrtValues, not bound regions")
        self.cache_uploads += uploads > 0
        for name in self.output_names:
            binding.bind_output(name, self.device)
        if before_run is not None:
            before_run()
        self.session.run_with_iobinding(binding, self._plain_run)
        outputs = binding.get_outputs()
        return self._reader.to_host(outputs[0]), list(outputs[1:])

    def _run_in_place(
        self,
        feed: dict[str, Any],
        past: PastTensors,
        before_run: Callable[[], None] | None,
        *,
        decode: bool,
    ) -> Any:
        """Bind each cache region as its past input and its present output: one buffer. The
        step's small inputs go up from the host and its logits come back; the cache stays.
        A decode step's fp32 logits land in a host array kept per row count, which the step's
        caller reads before the next forward."""
        binding = self._binding
        regions = tuple(past)
        # The cache's regions change only when rows join or leave: bind them then, not per step.
        # The cache hands out the same region objects while its rows stay, so identity
        # settles most steps before the fields are compared.
        bound = self._bound_regions
        same = len(regions) == len(bound) and all(
            a is b for a, b in zip(regions, bound, strict=True)
        )
        if not same and regions == bound:
            # Equal regions from other objects (a prefill bound its slots' views): keep the
            # binding, and the objects, so that the next steps settle on identity alone.
            self._bound_regions = regions
        elif not same:
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            # Outputs come back in binding order: the logits stay first.
            binding.bind_output("logits", self._logits_device)
            self._logits_bound = None
            dtype = self.layout.dtype
            for tensor, view in zip(self.layout.tensors, map(_bound, regions), strict=True):
                shape = list(view.shape)
                binding.bind_input(tensor.name, view.device, 0, dtype, shape, view.pointer)
                binding.bind_output(tensor.present, view.device, 0, dtype, shape, view.pointer)
            self._bound_regions = regions
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        rows = len(feed["input_ids"])
        host = self._decode_logits.get(rows) if decode else None
        if host is None:
            binding.bind_output("logits", self._logits_device)
        elif host is not self._logits_bound:
            binding.bind_output("logits", "cpu", 0, np.float32, list(host.shape), host.ctypes.data)
        self._logits_bound = host
        if before_run is not None:
            before_run()
        self.session.run_with_iobinding(binding, self._plain_run)
        if host is not None:
            return host
        # Reading the outputs wraps every cache output too: done once per row count only.
        scores = self._reader.to_host(binding.get_outputs()[0])
        if decode and not self._half:
            self._decode_logits[rows] = np.empty_like(scores)
        return scores

    @property
    def quantizes_activations(self) -> list[str]:
        """The graph's operators that quantise activations across rows, or with fixed scales:
        with them every row decodes alone (see ACTIVATION_QUANTIZERS)."""
        return sorted(self.quantizing_ops & ACTIVATION_QUANTIZERS)

    @property
    def steps_continuations(self) -> bool:
        """Whether a continuation's ids go in one per forward, as the stream it continues
        computed them (see ROW_QUANTIZERS)."""
        return bool(self.quantizing_ops & ROW_QUANTIZERS)

    @property
    def _logits_device(self) -> str:
        """fp16 logits stay where they were computed until they are widened."""
        return self.device if self._half else "cpu"


ACTIVATION_QUANTIZERS = frozenset(
    {
        "QuantizeLinear",
        "DynamicQuantizeLinear",
        # What ONNX Runtime fuses them into, in a graph saved after its optimisations.
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "QAttention",
        "QGemm",
    }
)
"""Operators that quantise activations. With scales over the whole batch (dynamic int8) rows
change each other; with fixed scales (static int8, QDQ or QOperator) the rounding that masked
padding in front of a row brings (1e-7 of the logit scale) can cross a quantisation step,
which moves the row's logits by 1e-2 of their scale and its tokens with them. Load probes
sample too few rows and paddings to catch the second, so the graph's operators decide: such
a graph decodes every row in a forward of its own."""

ROW_QUANTIZERS = frozenset({"MatMulNBits"})
"""Operators that may quantise each row's activations to int8 (int4 weights with
`accuracy_level` 4, as ONNX Runtime GenAI's builder writes them for the CPU). Rows do not
change each other's scales, but one position computed in a prefill rounds about 1e-7 of the
logit scale unlike the same position computed in a decode step, which a quantisation step can
turn into 1e-2 and another token: a continuation, whose stream computed its ids in decode
steps, feeds them one per forward too, in decode steps (a resume then costs a decode step per
delivered token, shared with the running rows). Where the CPU's kernels also compute a row
alone otherwise than beside others (the probe's batch rounding above 0: MLAS's one-row path
on CPUs without AVX-512), the same crossing makes a request's tokens depend on its
neighbours, a few dozen steps on: there no forward computes one row (pads_single_rows), or,
where batches of two or more do not agree either, every decode row runs in a forward of its
own (decodes_rows_alone)."""


def from_onnxruntime(exc: Exception) -> bool:
    """An error ONNX Runtime raised running the graph (its own types, or RuntimeError)."""
    return type(exc).__module__.startswith("onnxruntime") or type(exc) is RuntimeError


def _bound(view: object) -> BoundTensor:
    if not isinstance(view, BoundTensor):
        raise TypeError("an in-place step takes tensors bound by address")
    return view


def _options(
    threads: tuple[int, int], spinning: bool, profile_prefix: str | None
) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if spinning:
        # Workers spin between the kernels of a step (waking a sleeping one costs more than a
        # small kernel) and stop when the run ends: between steps the cores belong to the
        # threads that send the step's tokens, which spinning workers would only slow down.
        options.add_session_config_entry("session.force_spinning_stop", "1")
    else:
        # Idle ORT workers sleep instead of spinning: gives the CPU back to the event loop
        # (and to co-located processes) within steps too, at a wake-up cost per kernel.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def _session(
    path: Path, options: ort.SessionOptions, provider: str, cuda_graph: bool
) -> ort.InferenceSession:
    providers = choose_providers(provider)
    if cuda_graph and CUDA in providers:
        try:
            return ort.InferenceSession(os.fspath(path), options, providers=capturing(providers))
        except Exception as exc:  # e.g. nodes the CUDA provider does not run: no graph capture
            log.warning("engine.cuda_graph_unavailable", error=first_line(exc))
    try:
        return ort.InferenceSession(os.fspath(path), options, providers=providers)
    except Exception as exc:  # ORT raises its own unrelated exception types for bad files
        raise ModelLoadError(f"{path} cannot be loaded by ONNX Runtime: {exc}") from exc
