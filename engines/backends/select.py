"""Open the first backend of a fallback chain that loads (tensorrt -> onnxruntime-cuda -> onnxruntime).

Every backend that did not load is reported with its reason (returned and logged), so a box
that silently runs on the CPU is visible in the logs and health messages. A stale, truncated
or corrupt TensorRT engine is never used. ``strict`` (config models.strict): the first backend
of the chain must load, whatever stops it (a stale engine included), or start-up fails;
otherwise the chain falls back and says why.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog

from engines.backends import Backend, BackendError, load_backend_class
from engines.manifest import StaleEngineError
from engines.modelpack import ModelEntry

log = structlog.get_logger(__name__)


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
                    raise BackendError("no engine directory (no GPU facts or engines not built)")
                path = Path(engine_dir) / f"{model.role}.engine"
                options = {"onnx_path": model.path, "role": model.role, "device": device,
                           "profile_shapes": profile_shapes}
            backend = cls(path, max_batch=max_batch, threads=threads, **options).activate()
        except BackendError as exc:
            stale = isinstance(exc, StaleEngineError)
            if strict:
                log.error("backend_refused_strict", model=model.role, backend=name, reason=str(exc), stale_engine=stale)
                hint = "; run `coilsight engines build`" if stale else ""
                raise BackendError(f"{model.role}: strict mode and {name} cannot load: {exc}{hint}") from exc
            log.warning("backend_not_loaded", model=model.role, backend=name, reason=str(exc),
                        stale_engine=stale)
            skipped.append({"backend": name, "reason": str(exc)})
            continue
        log.info("backend_selected", model=model.role, backend=name, path=str(path),
                 fell_back_from=[s["backend"] for s in skipped])
        return backend, skipped
    raise BackendError(f"{model.role}: no backend could load the model: "
                       + "; ".join(f"{s['backend']}: {s['reason']}" for s in skipped))
