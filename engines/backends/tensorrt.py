"""TensorRT backend: a strongly typed FP16 engine built by engines/build.py, run with pycuda.

Written against the TensorRT Python API common to 10.13+ and 11.x (docs/engines.md and the
fact sheet it cites): name-based I/O tensors, ``set_input_shape`` per batch,
``execute_async_v3`` on a non-default stream. NOT run here (no GPU on the development box):
tests/engines/test_tensorrt_gpu.py exercises it on a GPU box.

- The manifest is checked *before* the plan is deserialized (engines.manifest.check_engine):
  a stale, truncated or corrupt engine is refused with every reason (StaleEngineError).
- ``deserialize_cuda_engine`` returns None on failure (no exception); the errors TensorRT
  logged while it tried are in the BackendError message.
- CUDA: the device's primary context (what TensorRT's runtime uses) is retained once and
  pushed/popped around every block of CUDA calls, so any worker thread may call infer().
  One execution context + stream + buffers per backend; a lock keeps calls on it serial.
- Buffers: page-locked host and device buffers sized once for the profile's max shape;
  output dtype from ``engine.get_tensor_dtype``; results returned as float32 copies.
- Freed explicitly in reverse order (buffers, stream, context, engine, runtime), with the
  CUDA context current, then the primary context released.
"""
from __future__ import annotations

import collections
import threading
from typing import Any

import numpy as np
import structlog
import tensorrt as trt

from engines.backends.base import Backend, BackendError, TensorSpec

log = structlog.get_logger(__name__)


class TrtLogger(trt.ILogger):
    """Routes TensorRT's messages into structlog; keeps the last errors for error messages.

    TensorRT may call log() from its own threads, and one logger serves every engine of the
    process (the runtime and builder share it), so the error buffer is guarded by a lock.
    """

    _LEVELS = {
        trt.ILogger.Severity.INTERNAL_ERROR: "critical",
        trt.ILogger.Severity.ERROR: "error",
        trt.ILogger.Severity.WARNING: "warning",
        trt.ILogger.Severity.INFO: "info",
        trt.ILogger.Severity.VERBOSE: "debug",
    }

    def __init__(self, min_severity: "trt.ILogger.Severity" = trt.ILogger.Severity.WARNING):
        trt.ILogger.__init__(self)
        self.min_severity = min_severity
        self._lock = threading.Lock()
        self._errors: collections.deque[str] = collections.deque(maxlen=32)
        self._log = structlog.get_logger("tensorrt")

    def log(self, severity: "trt.ILogger.Severity", msg: str) -> None:  # called by TensorRT
        level = int(severity)  # INTERNAL_ERROR=0 ... VERBOSE=4
        if level <= int(trt.ILogger.Severity.ERROR):
            with self._lock:
                self._errors.append(str(msg))
        if level <= int(self.min_severity):
            getattr(self._log, self._LEVELS.get(severity, "info"))("tensorrt_message", message=str(msg))

    def take_errors(self) -> list[str]:
        """The errors logged since the last call (and forget them)."""
        with self._lock:
            errors = list(self._errors)
            self._errors.clear()
        return errors


_LOGGER: TrtLogger | None = None
_LOGGER_LOCK = threading.Lock()


def get_logger() -> TrtLogger:
    """One logger per process (TensorRT keeps a pointer to it in every runtime/builder)."""
    global _LOGGER
    with _LOGGER_LOCK:
        if _LOGGER is None:
            _LOGGER = TrtLogger()
            trt.init_libnvinfer_plugins(_LOGGER, "")  # DeformConv etc. come as plugins
        return _LOGGER


def _np_dtype(dtype: "trt.DataType") -> np.dtype:
    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError as exc:  # bf16/fp8/int4 have no numpy type
        raise BackendError(f"tensorrt: tensor dtype {dtype} has no numpy equivalent") from exc


class TensorRTBackend(Backend):
    """``model_path`` is the .engine file. Options: ``onnx_path`` (the FP32 source ONNX, for the
    manifest check), ``role`` (gate/seg, default the engine's stem), ``device`` (CUDA ordinal,
    default 0), ``verify_manifest`` (default True; the build turns it off for its own parity run
    before the manifest exists), ``profile_shapes`` (expected min/opt/max, checked when given)."""

    name = "tensorrt"

    def activate_impl(self) -> None:
        try:
            import pycuda.driver as cuda
        except ImportError as exc:
            raise BackendError(f"tensorrt: pycuda is not installed ({exc}); pip install the 'gpu' extra") from exc
        self._cuda = cuda
        self._lock = threading.Lock()
        role = self.options.get("role") or self.model_path.stem
        if self.options.get("verify_manifest", True):
            self._refuse_stale(role)
        try:
            cuda.init()
            self._cuda_ctx = cuda.Device(int(self.options.get("device", 0))).retain_primary_context()
        except cuda.Error as exc:
            raise BackendError(f"tensorrt: cannot open CUDA device {self.options.get('device', 0)}: {exc}") from exc
        self._cuda_ctx.push()
        try:
            self._load()
        except BaseException:
            self._free()
            self._cuda_ctx.pop()
            self._cuda_ctx.detach()
            raise
        self._cuda_ctx.pop()
        log.info("tensorrt_engine_loaded", engine=str(self.model_path), input=self.inputs[0].name,
                 max_shape=self._max_in_shape, outputs=[o.name for o in self.outputs])

    def _refuse_stale(self, role: str) -> None:
        from engines.manifest import ManifestError, StaleEngineError, check_engine, machine_facts

        onnx_path = self.options.get("onnx_path")
        if onnx_path is None:
            raise BackendError("tensorrt: option onnx_path (the source ONNX) is needed to check the engine manifest")
        try:
            facts = machine_facts(int(self.options.get("device", 0)))
        except ManifestError as exc:
            raise BackendError(f"tensorrt: {exc}") from exc
        reasons = check_engine(self.model_path.parent, onnx_path, facts, role=role,
                               profile_shapes=self.options.get("profile_shapes"))
        if reasons:
            raise StaleEngineError(str(self.model_path), reasons)

    def _load(self) -> None:
        cuda = self._cuda
        self._trt_logger = get_logger()
        self._trt_logger.take_errors()
        self._runtime = trt.Runtime(self._trt_logger)
        plan = self.model_path.read_bytes()
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:  # no exception from TensorRT, only logger messages
            errors = self._trt_logger.take_errors() or ["no error was logged"]
            raise BackendError(f"tensorrt: cannot deserialize {self.model_path}: " + " | ".join(errors))
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BackendError(f"tensorrt: cannot create an execution context for {self.model_path}: "
                               + " | ".join(self._trt_logger.take_errors()))
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        ins = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(ins) != 1:
            raise BackendError(f"tensorrt: {self.model_path.name} has inputs {ins}, the model contract wants one")
        in_name = ins[0]
        in_dtype = _np_dtype(self._engine.get_tensor_dtype(in_name))
        shape = tuple(self._engine.get_tensor_shape(in_name))
        pmin, _, pmax = (tuple(s) for s in self._engine.get_tensor_profile_shape(in_name, 0))
        if pmax[0] < self.max_batch:
            raise BackendError(f"tensorrt: {self.model_path.name} was built for batches up to {pmax[0]}, "
                               f"max_batch {self.max_batch} asked; rebuild with `coilsight engines build --force`")
        # Batch is checked by Backend against max_batch; other dims are fixed or bounded by the profile.
        self.inputs = [TensorSpec(in_name, in_dtype, (None, *[d if d >= 0 else None for d in shape[1:]]))]
        self._profile_min, self._max_in_shape = pmin, (self.max_batch, *pmax[1:])
        if not self._context.set_input_shape(in_name, self._max_in_shape):
            raise BackendError(f"tensorrt: input shape {self._max_in_shape} rejected by {self.model_path.name}")
        self._stream = cuda.Stream()
        self._host: dict[str, np.ndarray] = {}
        self._device: dict[str, Any] = {}
        self._alloc(in_name, self._max_in_shape, in_dtype)
        self.outputs = []
        for name in outs:
            dtype = _np_dtype(self._engine.get_tensor_dtype(name))
            out_shape = tuple(self._context.get_tensor_shape(name))
            if any(d < 0 for d in out_shape):
                raise BackendError(f"tensorrt: output {name!r} shape {out_shape} unresolved at the max input shape")
            self._alloc(name, out_shape, dtype)
            self.outputs.append(TensorSpec(name, np.dtype(np.float32), (None, *out_shape[1:])))
        for name, mem in self._device.items():
            if not self._context.set_tensor_address(name, int(mem)):
                raise BackendError(f"tensorrt: set_tensor_address({name!r}) failed")

    def _alloc(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        count = int(np.prod(shape))
        self._host[name] = self._cuda.pagelocked_empty(count, dtype)  # flat, sliced per batch
        self._device[name] = self._cuda.mem_alloc(max(1, count * dtype.itemsize))

    def infer_impl(self, image: np.ndarray) -> dict[str, np.ndarray]:
        in_name = self.inputs[0].name
        for axis, (lo, hi, got) in enumerate(zip(self._profile_min[1:], self._max_in_shape[1:], image.shape[1:]), 1):
            if not lo <= got <= hi:
                raise BackendError(f"tensorrt: input {in_name!r} axis {axis} is {got}, the engine takes {lo}..{hi}")
        cuda = self._cuda
        with self._lock:
            self._cuda_ctx.push()
            try:
                if not self._context.set_input_shape(in_name, image.shape):
                    raise BackendError(f"tensorrt: input shape {image.shape} rejected by {self.model_path.name}")
                h_in = self._host[in_name][: image.size]
                np.copyto(h_in, image.reshape(-1))
                cuda.memcpy_htod_async(self._device[in_name], h_in, self._stream)
                if not self._context.execute_async_v3(stream_handle=self._stream.handle):
                    self._stream.synchronize()
                    raise BackendError(f"tensorrt: execute_async_v3 failed for {self.model_path.name}: "
                                       + " | ".join(self._trt_logger.take_errors()))
                views = {}
                for spec in self.outputs:
                    shape = tuple(self._context.get_tensor_shape(spec.name))
                    view = self._host[spec.name][: int(np.prod(shape))]
                    cuda.memcpy_dtoh_async(view, self._device[spec.name], self._stream)
                    views[spec.name] = view.reshape(shape)
                self._stream.synchronize()
                # Copy out while holding the lock: the next call reuses these pinned buffers.
                return {name: view.astype(np.float32, copy=True) for name, view in views.items()}
            finally:
                self._cuda_ctx.pop()

    def _free(self) -> None:
        """Release in reverse order of creation; call with the CUDA context current."""
        for name in reversed(list(getattr(self, "_device", {}))):
            self._device.pop(name).free()
        for name in reversed(list(getattr(self, "_host", {}))):
            self._host.pop(name).base.free()  # the pinned allocation behind the numpy view
        for attr in ("_stream", "_context", "_engine", "_runtime"):
            if hasattr(self, attr):
                delattr(self, attr)

    def deactivate_impl(self) -> None:
        with self._lock:
            self._cuda_ctx.push()
            try:
                self._free()
            finally:
                self._cuda_ctx.pop()
                self._cuda_ctx.detach()  # drop the primary context reference retained in activate
        log.info("tensorrt_engine_released", engine=str(self.model_path))

    def describe(self) -> dict:
        return {**super().describe(), "max_shape": list(getattr(self, "_max_in_shape", ())),
                "tensorrt": trt.__version__}
