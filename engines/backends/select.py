"""Open the first backend of a fallback chain that loads (tensorrt -> onnxruntime-cuda -> onnxruntime).

Every backend that did not load is reported with its reason (returned and logged), so a box
that silently runs on the CPU is visible in the logs and health messages. A stale, truncated
or corrupt TensorRT engine is never used. ``strict`` (config models.strict): the first backend
of the chain must load, whatever stops it (a stale engine included), or start-up fails;
otherwise the chain falls back and says why.

A backend reports failures as BackendError (the TensorRT backend turns whatever pycuda or
TensorRT raise into one). Anything else a backend raises while it loads (a vendor library's own
exception type that slipped through) is treated the same way, with its type named and its
traceback in the log line, so a broken GPU never keeps the agent from starting on the next backend.
Each skipped backend is logged once here (``backend_not_loaded``) and returned for the caller
to count (the agent's ``backend_fallbacks`` metric).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog

from engines.backends import Backend, BackendError, BackendUnavailable, load_backend_class
from engines.backends.base import describe_cause
from engines.manifest import StaleEngineError
from engines.modelpack import ModelEntry

log = structlog.get_logger(__name__)


class UnexpectedLoadError(BackendError):
    """A backend raised something other than BackendError while loading; logged with its traceback."""


def open_backend(chain: list[str], model: ModelEntry, *, max_batch: int, threads: int, strict: bool,
                 engine_dir: str | Path | None, profile_shapes: dict | None = None,
                 device: int = 0) -> tuple[Backend, list[dict[str, str]]]:
    """Activate the first backend in ``chain`` that loads ``model``.

    TensorRT loads ``<engine_dir>/<role>.engine`` (after checking its manifest against the
    source ONNX ``model.path``); the ONNX Runtime backends load ``model.path``. Returns the
    active backend and ``[{"backend", "reason"}]`` for each one tried before it. Raises
    BackendError when none loads, or when ``strict`` and the first one does not.
    """
    if not chain:
        raise BackendError(f"{model.role}: the backend chain is empty")
    skipped: list[dict[str, str]] = []
    for name in chain:
        try:
            cls = load_backend_class(name)
            path: Path = model.path
            options: dict[str, Any] = {}
            if cls.name == "tensorrt":
                if engine_dir is None:
                    raise BackendUnavailable("no engine directory (no GPU facts or engines not built)")
                path = Path(engine_dir) / f"{model.role}.engine"
                options = {"onnx_path": model.path, "role": model.role, "device": device,
                           "profile_shapes": profile_shapes}
            backend = _activate(cls, path, max_batch=max_batch, threads=threads, options=options)
        except BackendError as exc:
            stale = isinstance(exc, StaleEngineError)
            if strict:
                log.error("backend_refused_strict", model=model.role, backend=name, reason=str(exc), stale_engine=stale)
                hint = "; run `coilsight engines build`" if stale else ""
                raise BackendError(f"{model.role}: strict mode and {name} cannot load: {exc}{hint}") from exc
            # Absent here (no TensorRT, no CUDA on a CPU box) is expected: debug, and named in the
            # model's one backend_selected line; anything else (a stale engine, a failed load) warns.
            level = log.debug if isinstance(exc, BackendUnavailable) else log.warning
            level("backend_not_loaded", model=model.role, backend=name, reason=str(exc),
                  stale_engine=stale, exc_info=isinstance(exc, UnexpectedLoadError))
            skipped.append({"backend": name, "reason": str(exc)})
            continue
        why = {"fell_back_from": ", ".join(s["backend"] for s in skipped),
               "skipped_because": "; ".join(s["reason"] if s["reason"].startswith(s["backend"])
                                            else f"{s['backend']}: {s['reason']}" for s in skipped)} if skipped else {}
        log.info("backend_selected", model=model.role, backend=name, path=str(path), **why)
        return backend, skipped
    raise BackendError(f"{model.role}: no backend could load the model: "
                       + "; ".join(f"{s['backend']}: {s['reason']}" for s in skipped))


def _activate(cls: type[Backend], path: Path, *, max_batch: int, threads: int, options: dict[str, Any]) -> Backend:
    """Construct and activate one backend; any exception becomes a BackendError naming its type."""
    try:
        return cls(path, max_batch=max_batch, threads=threads, **options).activate()
    except BackendError:
        raise
    except Exception as exc:  # a vendor library's own error type: fall back on it too, with its traceback logged
        raise UnexpectedLoadError(f"{cls.name}: unexpected error loading {path.name}: {describe_cause(exc)}") from exc


def close_backends(backends) -> list[str]:
    """Deactivate each backend (None skipped), even when an earlier one fails: a GPU that broke
    mid-run fails its frees, and that must neither keep the others from closing nor end the
    thread that closes them (shutdown, a hot swap retiring old models, a failed start-up).
    Failures are logged (``backend_release_failed``) and returned."""
    failures = []
    for backend in backends:
        if backend is None:
            continue
        try:
            backend.deactivate()
        except BackendError as exc:
            failures.append(str(exc))
            log.error("backend_release_failed", backend=backend.name, model=backend.model_path.name, error=str(exc))
    return failures
