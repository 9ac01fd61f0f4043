"""Step (b) of an engine build: the strongly typed TensorRT plan, built in a child process.

``build_serialized`` parses the FP16 ONNX (precision comes from the graph: ``1 << STRONGLY_TYPED``,
no precision flags; the same code serves TensorRT 10.13+ and 11.x), sets one optimisation profile
and the workspace limit, uses a persistent timing cache and writes the plan atomically.
``build_in_child`` runs it in a spawned process, since repeated builds grow the builder's memory
(NVIDIA/TensorRT#2220). ``open_tensorrt_plan`` opens a plan for the build's parity run.
engines/build.py drives these through its GpuSteps; they need TensorRT and a GPU.
"""
from __future__ import annotations

import multiprocessing
import queue
import time
from pathlib import Path
from typing import Any

import structlog

from engines import manifest
from engines.backends.base import Backend
from engines.build import BuildError

log = structlog.get_logger(__name__)


def build_serialized(onnx_path: Path, engine_path: Path, *, shapes: dict[str, dict[str, list[int]]],
                     workspace_bytes: int, timing_cache: Path) -> dict[str, Any]:
    """Strongly typed TensorRT build of ``onnx_path`` into ``engine_path`` (atomic). Needs a GPU."""
    import tensorrt as trt

    from engines.backends.tensorrt import get_logger

    logger = get_logger()
    logger.take_errors()
    started = time.monotonic()
    builder = trt.Builder(logger)
    # Honoured by 10.x, ignored (always on) by 11.x; never EXPLICIT_BATCH (gone in 11.x).
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    log.info("tensorrt_parse_started", onnx=str(onnx_path))
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"{onnx_path}: TensorRT cannot parse the model: " + "; ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name not in shapes:
            raise BuildError(f"{onnx_path}: input {tensor.name!r} has no profile shape (have {sorted(shapes)})")
        s = shapes[tensor.name]
        for axis, dim in enumerate(tensor.shape):
            if dim >= 0 and not s["min"][axis] == s["max"][axis] == dim:
                raise BuildError(f"{onnx_path}: input {tensor.name!r} axis {axis} is fixed at {dim}, "
                                 f"the profile asks {s['min'][axis]}..{s['max'][axis]}")
        profile.set_shape(tensor.name, s["min"], s["opt"], s["max"])
    if config.add_optimization_profile(profile) < 0:
        raise BuildError(f"{onnx_path}: TensorRT rejected the optimisation profile {shapes}")
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing_cache_ignored", path=str(timing_cache), reason="made on another device or version")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    monitor = _ProgressLog(trt)
    config.progress_monitor = monitor
    log.info("tensorrt_build_started", onnx=str(onnx_path), shapes=shapes, workspace_bytes=workspace_bytes)
    plan = builder.build_serialized_network(network, config)
    if plan is None:  # no exception: the reasons went to the logger
        raise BuildError(f"{onnx_path}: TensorRT build failed: " + " | ".join(logger.take_errors() or ["no error logged"]))
    manifest.write_atomic(engine_path, memoryview(plan))
    manifest.write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    seconds = time.monotonic() - started
    log.info("tensorrt_build_finished", engine=str(engine_path), bytes=engine_path.stat().st_size, seconds=round(seconds, 1))
    return {"seconds": seconds, "tensorrt": trt.__version__}


def _ProgressLog(trt):  # noqa: N802 - a class made on demand, tensorrt is imported lazily
    class ProgressLog(trt.IProgressMonitor):
        """Logs the builder's top-level phases (TensorRT calls it from its own threads)."""

        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._started: dict[str, float] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            if not parent_phase:  # top-level phases only
                self._started[phase_name] = time.monotonic()
                log.info("tensorrt_phase_started", phase=phase_name, steps=num_steps)

        def step_complete(self, phase_name, step):
            return True  # never cancel

        def phase_finish(self, phase_name):
            if phase_name in self._started:
                log.info("tensorrt_phase_finished", phase=phase_name,
                         seconds=round(time.monotonic() - self._started.pop(phase_name), 1))

    return ProgressLog()


def _child(kwargs: dict[str, Any], results) -> None:
    try:
        results.put(("ok", build_serialized(**kwargs)))
    except BuildError as exc:
        results.put(("error", str(exc)))
    except Exception as exc:  # anything TensorRT raises must reach the parent as text
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def build_in_child(onnx_path: Path, engine_path: Path, *, shapes, workspace_bytes: int, timing_cache: Path,
                   timeout_s: float = 3600.0) -> dict[str, Any]:
    """Run build_serialized in a fresh (spawned) process; its memory goes when it exits."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    kwargs = {"onnx_path": onnx_path, "engine_path": engine_path, "shapes": shapes,
              "workspace_bytes": workspace_bytes, "timing_cache": timing_cache}
    proc = ctx.Process(target=_child, args=(kwargs, results), name=f"trt-build-{engine_path.stem}")
    proc.start()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            kind, value = results.get(timeout=1.0)
            break
        except queue.Empty:
            if not proc.is_alive():  # died without a word (segfault, OOM kill): one last look
                try:
                    kind, value = results.get(timeout=1.0)
                    break
                except queue.Empty:
                    raise BuildError(f"{engine_path.name}: build process died with exit code {proc.exitcode} "
                                     "and no message (see the log above)") from None
            if time.monotonic() > deadline:
                proc.kill()
                proc.join()
                raise BuildError(f"{engine_path.name}: build took longer than {timeout_s:.0f} s, killed") from None
    proc.join()
    if kind != "ok":
        raise BuildError(value)
    return value


def open_tensorrt_plan(engine_path: Path, *, role: str, max_batch: int, device: int) -> Backend:
    """The TensorRT backend over a plan that has no manifest entry yet (the build's parity run)."""
    from engines.backends.tensorrt import TensorRTBackend

    return TensorRTBackend(engine_path, max_batch=max_batch, verify_manifest=False, device=device, role=role)
