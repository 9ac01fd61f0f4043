"""One small interface for every inference backend (after Polygraphy's BaseRunner).

Public methods check state and validate inputs against the model's own metadata with
exact messages; a backend implements only the ``*_impl`` methods.

Model I/O contract (docs/architecture.md, "Model contract"): every model takes one input
``image`` of dtype uint8, layout NCHW, dynamic batch (and, for fully convolutional models,
dynamic H and W); normalisation and the final sigmoid live inside the graph, so every
backend returns the same numbers and stays thin.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class BackendError(RuntimeError):
    """A backend could not load or run a model; the message says why."""


class BackendUnavailable(BackendError):
    """This machine lacks the backend (its library, provider or engines): an expected skip on a box
    without a GPU, logged at debug; the model's ``backend_selected`` line names it and why."""


def describe_cause(exc: BaseException) -> str:
    """``pycuda._driver.MemoryError: cuMemAlloc failed: out of memory``: the full type name says
    which library raised it (builtins are named bare)."""
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return f"{name}: {exc}" if str(exc) else name


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]  # None = dynamic

    def check(self, array: np.ndarray, max_batch: int) -> None:
        if array.dtype != self.dtype:
            raise BackendError(f"input {self.name!r}: expected dtype {self.dtype}, got {array.dtype}")
        if array.ndim != len(self.shape):
            raise BackendError(
                f"input {self.name!r}: expected {len(self.shape)} dims {self.shape}, got shape {array.shape}"
            )
        for axis, (want, got) in enumerate(zip(self.shape, array.shape)):
            if want is not None and want != got:
                raise BackendError(
                    f"input {self.name!r}: axis {axis} must be {want}, got {got} (shape {array.shape})"
                )
        if array.shape[0] < 1 or array.shape[0] > max_batch:
            raise BackendError(f"input {self.name!r}: batch {array.shape[0]} outside 1..{max_batch}")


class Backend(abc.ABC):
    """Runs one model. Use as a context manager, or call activate()/deactivate()."""

    name = "abstract"
    on_cpu = False  # runs on the host CPU: batching buys no speed there (docs/performance.md)

    def __init__(self, model_path: str | Path, *, max_batch: int = 8, threads: int = 0, **options: Any):
        self.model_path = Path(model_path)
        self.max_batch = int(max_batch)
        self.threads = int(threads)
        self.options = options
        self.is_active = False
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []

    # -- public API -------------------------------------------------------------
    def activate(self) -> "Backend":
        if self.is_active:
            raise BackendError(f"{self.name}: {self.model_path.name} is already active")
        if not self.model_path.is_file():
            raise BackendError(f"{self.name}: model file not found: {self.model_path}")
        self.activate_impl()
        self.is_active = True
        return self

    def infer(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch; returns output name -> array (float32 on the host)."""
        if not self.is_active:
            raise BackendError(f"{self.name}: infer() called before activate() for {self.model_path.name}")
        if len(self.inputs) != 1:
            raise BackendError(f"{self.name}: models must have exactly one input, got {len(self.inputs)}")
        self.inputs[0].check(image, self.max_batch)
        if not image.flags.c_contiguous:
            image = np.ascontiguousarray(image)
        return self.infer_impl(image)

    def deactivate(self) -> None:
        if not self.is_active:
            return
        try:
            self.deactivate_impl()
        finally:
            self.is_active = False

    def describe(self) -> dict[str, Any]:
        """What health messages and logs say about this backend."""
        return {"backend": self.name, "model": self.model_path.name}

    def __enter__(self) -> "Backend":
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    # -- implementation hooks -----------------------------------------------------
    @abc.abstractmethod
    def activate_impl(self) -> None:
        """Load the model, fill self.inputs/self.outputs."""

    @abc.abstractmethod
    def infer_impl(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Run one validated, C-contiguous batch."""

    @abc.abstractmethod
    def deactivate_impl(self) -> None:
        """Free everything activate_impl took."""
