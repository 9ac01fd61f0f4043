"""Inference backends behind one small interface (see base.Backend).

The registry holds lazy import strings, resolved only when a backend is chosen, so a box
without TensorRT still starts (uvicorn's loop/protocol registry works the same way).
"""
from __future__ import annotations

import importlib

from engines.backends.base import Backend, BackendError, BackendUnavailable, TensorSpec

BACKENDS: dict[str, str] = {
    "onnxruntime": "engines.backends.onnxrt:OnnxRuntimeBackend",
    "onnxruntime-cpu": "engines.backends.onnxrt:OnnxRuntimeBackend",
    "onnxruntime-cuda": "engines.backends.onnxrt:OnnxRuntimeCudaBackend",
    "tensorrt": "engines.backends.tensorrt:TensorRTBackend",
}


def load_backend_class(name: str) -> type[Backend]:
    """Resolve a backend name to its class; raises BackendError with the reason."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise BackendError(f"unknown backend {name!r}; known: {', '.join(sorted(BACKENDS))}") from None
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except (ImportError, OSError) as exc:  # missing optional dependency, or its shared libraries (libnvinfer)
        raise BackendUnavailable(f"backend {name!r} is not installed here: {exc}") from exc
    return getattr(module, attr)


__all__ = ["BACKENDS", "Backend", "BackendError", "BackendUnavailable", "TensorSpec", "load_backend_class"]
