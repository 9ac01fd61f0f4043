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
- Every CUDA/TensorRT call runs inside ``_gpu_step``: whatever it raises becomes a
  BackendError naming the step and the cause. pycuda raises its own types
  (``pycuda._driver.Error`` and its ``MemoryError``/``LogicError``/``LaunchError``/
  ``RuntimeError``, all plain ``Exception`` subclasses) from ``mem_alloc``, ``Stream()``,
  ``push()``...; as BackendErrors they make open_backend fall back to ONNX Runtime instead
  of stopping the agent. A failed activate releases what it took before raising.
"""
from __future__ import annotations

import collections
import contextlib
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import structlog
import tensorrt as trt

from engines.backends.base import Backend, BackendError, TensorSpec, describe_cause

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


@contextlib.contextmanager
def _gpu_step(what: str, engine: Path) -> Iterator[None]:
    """Run a block of CUDA/TensorRT calls; anything they raise becomes a BackendError saying what
    was being done, on which engine, and the original type and message (chained as __cause__)."""
    try:
        yield
    except BackendError:
        raise
    except Exception as exc:  # pycuda/TensorRT raise their own types; named in the message
        raise BackendError(f"tensorrt: {what} failed for {engine.name}: {describe_cause(exc)}") from exc


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
        device = int(self.options.get("device", 0))
        with _gpu_step(f"opening CUDA device {device}", self.model_path):
            cuda.init()
            self._cuda_ctx = cuda.Device(device).retain_primary_context()
        pushed = False
        try:
            with _gpu_step("making the CUDA context current (push)", self.model_path):
                self._cuda_ctx.push()
            pushed = True
            self._load()
            with _gpu_step("releasing the CUDA context (pop)", self.model_path):
                self._cuda_ctx.pop()
        except BaseException:
            self._release(pushed)  # what it took; failures are logged, the activate error is raised
            raise
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
        cuda, path = self._cuda, self.model_path
        with _gpu_step("loading TensorRT's plugins", path):
            self._trt_logger = get_logger()
        self._trt_logger.take_errors()
        with _gpu_step("reading the plan", path):
            plan = path.read_bytes()
        with _gpu_step("creating the TensorRT runtime", path):
            self._runtime = trt.Runtime(self._trt_logger)
        with _gpu_step("deserializing the plan", path):
            self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:  # no exception from TensorRT, only logger messages
            errors = self._trt_logger.take_errors() or ["no error was logged"]
            raise BackendError(f"tensorrt: cannot deserialize {path}: " + " | ".join(errors))
        with _gpu_step("creating an execution context", path):
            self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BackendError(f"tensorrt: cannot create an execution context for {path}: "
                               + " | ".join(self._trt_logger.take_errors()))
        with _gpu_step("reading the engine's I/O tensors", path):
            names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
            ins = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            outs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
            if len(ins) != 1:
                raise BackendError(f"tensorrt: {path.name} has inputs {ins}, the model contract wants one")
            in_name = ins[0]
            in_dtype = _np_dtype(self._engine.get_tensor_dtype(in_name))
            shape = tuple(self._engine.get_tensor_shape(in_name))
            pmin, _, pmax = (tuple(s) for s in self._engine.get_tensor_profile_shape(in_name, 0))
        if pmax[0] < self.max_batch:
            raise BackendError(f"tensorrt: {path.name} was built for batches up to {pmax[0]}, "
                               f"max_batch {self.max_batch} asked; rebuild with `coilsight engines build --force`")
        # Batch is checked by Backend against max_batch; other dims are fixed or bounded by the profile.
        self.inputs = [TensorSpec(in_name, in_dtype, (None, *[d if d >= 0 else None for d in shape[1:]]))]
        self._profile_min, self._max_in_shape = pmin, (self.max_batch, *pmax[1:])
        with _gpu_step(f"setting the input shape {self._max_in_shape}", path):
            shape_ok = self._context.set_input_shape(in_name, self._max_in_shape)
        if not shape_ok:
            raise BackendError(f"tensorrt: input shape {self._max_in_shape} rejected by {path.name}")
        with _gpu_step("creating a CUDA stream", path):
            self._stream = cuda.Stream()
        self._host: dict[str, np.ndarray] = {}
        self._device: dict[str, Any] = {}
        self._alloc(in_name, self._max_in_shape, in_dtype)
        self.outputs = []
        for name in outs:
            with _gpu_step(f"reading output {name!r}", path):
                dtype = _np_dtype(self._engine.get_tensor_dtype(name))
                out_shape = tuple(self._context.get_tensor_shape(name))
            if any(d < 0 for d in out_shape):
                raise BackendError(f"tensorrt: output {name!r} shape {out_shape} unresolved at the max input shape")
            self._alloc(name, out_shape, dtype)
            self.outputs.append(TensorSpec(name, np.dtype(np.float32), (None, *out_shape[1:])))
        for name, mem in self._device.items():
            with _gpu_step(f"set_tensor_address({name!r})", path):
                address_ok = self._context.set_tensor_address(name, int(mem))
            if not address_ok:
                raise BackendError(f"tensorrt: set_tensor_address({name!r}) failed")

    def _alloc(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        count = int(np.prod(shape))
        nbytes = max(1, count * dtype.itemsize)
        with _gpu_step(f"allocating {nbytes} bytes of page-locked host memory for {name!r}", self.model_path):
            self._host[name] = self._cuda.pagelocked_empty(count, dtype)  # flat, sliced per batch
        with _gpu_step(f"allocating {nbytes} bytes of device memory for {name!r}", self.model_path):
            self._device[name] = self._cuda.mem_alloc(nbytes)

    def infer_impl(self, image: np.ndarray) -> dict[str, np.ndarray]:
        in_name = self.inputs[0].name
        for axis, (lo, hi, got) in enumerate(zip(self._profile_min[1:], self._max_in_shape[1:], image.shape[1:]), 1):
            if not lo <= got <= hi:
                raise BackendError(f"tensorrt: input {in_name!r} axis {axis} is {got}, the engine takes {lo}..{hi}")
        with self._lock:
            with _gpu_step("making the CUDA context current (push)", self.model_path):
                self._cuda_ctx.push()
            try:
                with _gpu_step(f"inference on a batch of shape {image.shape}", self.model_path):
                    result = self._run(in_name, image)
            except BaseException:
                self._pop_quietly()  # the inference error is the one to report
                raise
            with _gpu_step("releasing the CUDA context (pop)", self.model_path):
                self._cuda_ctx.pop()
            return result

    def _run(self, in_name: str, image: np.ndarray) -> dict[str, np.ndarray]:
        """One batch with the CUDA context current and the lock held."""
        cuda = self._cuda
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

    def _attempt(self, what: str, fn, failures: list[str]) -> bool:
        """Run one release step; a failure is logged and added to ``failures``, never raised, so
        the remaining steps still run and the error being handled (if any) is the one reported."""
        try:
            fn()
            return True
        except Exception as exc:  # a broken CUDA context fails every step: keep going, report each
            failures.append(f"{what}: {describe_cause(exc)}")
            log.error("tensorrt_release_failed", engine=str(self.model_path), what=what, error=describe_cause(exc))
            return False

    def _free(self, failures: list[str]) -> None:
        """Release in reverse order of creation; call with the CUDA context current."""
        for name in reversed(list(getattr(self, "_device", {}))):
            self._attempt(f"device memory {name!r}", self._device.pop(name).free, failures)
        for name in reversed(list(getattr(self, "_host", {}))):
            # the pinned allocation behind the numpy view
            self._attempt(f"host memory {name!r}", self._host.pop(name).base.free, failures)
        for attr in ("_stream", "_context", "_engine", "_runtime"):
            if hasattr(self, attr):
                delattr(self, attr)

    def _release(self, pushed: bool) -> list[str]:
        """Free everything with the context current, pop it, drop the primary context reference
        retained in activate. Every step is tried; returns what failed."""
        failures: list[str] = []
        if not pushed:
            pushed = self._attempt("CUDA context push", self._cuda_ctx.push, failures)
        if pushed:  # without the context nothing can be freed; the process exit reclaims it
            self._free(failures)
            self._attempt("CUDA context pop", self._cuda_ctx.pop, failures)
        self._attempt("primary context detach", self._cuda_ctx.detach, failures)
        return failures

    def _pop_quietly(self) -> None:
        """Pop the context on an error path (logged if it fails; the first error is what the caller gets)."""
        self._attempt("CUDA context pop", self._cuda_ctx.pop, [])

    def deactivate_impl(self) -> None:
        with self._lock:
            failures = self._release(pushed=False)
        if failures:
            raise BackendError(f"tensorrt: releasing {self.model_path.name} failed: " + "; ".join(failures))
        log.info("tensorrt_engine_released", engine=str(self.model_path))

    def describe(self) -> dict:
        return {**super().describe(), "max_shape": list(getattr(self, "_max_in_shape", ())),
                "tensorrt": trt.__version__}
