"""The one way to feed a model pack offline: open its models, shape frames, run, check outputs.

Evaluation, calibration, the model card's speed table, the bench's bare-model pass and the FP16
parity check all feed packs outside the agent. They share this runner so that every one of them
feeds a model exactly as the agent's workers do:

- images (uint8 ``HxW`` or ``HxWxC``) become ``[C, H, W]`` with the pack's channel count
  (``to_chw``), padded at the bottom and right with edge values to the pack's ``pad_multiple``
  (``pad_to_multiple``) and stacked by equal size;
- each model gets them pooled by its ``input_pool`` (``ModelEntry.prepare``);
- each output is checked against the contract: present, the expected shape, finite.

A broken contract raises ``RunnerError`` naming the image and what is wrong.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from engines.backends import Backend, load_backend_class
from engines.modelpack import ModelEntry, ModelPack, check_instance_outputs


class RunnerError(ValueError):
    """A frame or a model broke the model contract; the message names which and how."""


def to_chw(image: np.ndarray, channels: int, source: str = "image") -> np.ndarray:
    """uint8 HxW / HxWxC -> uint8 [C, H, W] with the pack's channel count."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise RunnerError(f"{source}: image dtype {img.dtype}; the model contract needs uint8")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3:
        raise RunnerError(f"{source}: image shape {img.shape} is neither HxW nor HxWxC")
    if channels == 1 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[:, :, None]
    elif channels == 3 and img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    if img.shape[2] != channels:
        raise RunnerError(f"{source}: image has {img.shape[2]} channels, the model pack wants {channels}")
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def pad_to_multiple(chw: np.ndarray, multiple: int) -> np.ndarray:
    """Pad [C, H, W] at the bottom and right with edge values so H and W are multiples."""
    h, w = chw.shape[1:]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return chw
    return np.pad(chw, ((0, 0), (0, ph), (0, pw)), mode="edge")


def stack_images(pack: ModelPack, images: Sequence[np.ndarray], sources: Sequence[str] | None = None) -> np.ndarray:
    """Images of one size -> uint8 [N, C, H, W], each prepared by to_chw and pad_to_multiple."""
    names = list(sources) if sources is not None else [f"image {i}" for i in range(len(images))]
    chw = [pad_to_multiple(to_chw(img, pack.channels, src), pack.pad_multiple) for img, src in zip(images, names)]
    shapes = {c.shape for c in chw}
    if len(shapes) != 1:
        raise RunnerError(f"{names[0]}: one batch holds images of different sizes {sorted(shapes)}")
    return np.stack(chw)


class ModelRunner:
    """One model of a pack on one backend: pools its input and checks its output."""

    def __init__(self, entry: ModelEntry, backend: Backend, classes: int):
        self.entry = entry
        self.backend = backend
        self.classes = classes

    def expected_shape(self, x: np.ndarray) -> tuple[int, ...]:
        n, _, h, w = x.shape
        if self.entry.role == "gate":
            return (n, self.classes)
        s = self.entry.output_stride
        if h % s or w % s:
            raise RunnerError(f"output stride {s} does not divide the padded input {h}x{w}")
        return (n, self.classes, h // s, w // s)

    def raw(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the model for frames x (uint8 [N, C, H, W], not yet pooled), unchecked."""
        return self.backend.infer(self.entry.prepare(x))

    def __call__(self, x: np.ndarray, source: str = "batch") -> np.ndarray:
        prepared = self.entry.prepare(x)
        return self._checked(x, prepared, source)[self.entry.output]

    def outputs(self, x: np.ndarray, source: str = "batch") -> dict[str, np.ndarray]:
        """The model's output and, for a seg model with an instance head, ``heatmap``, ``size`` and
        ``offset`` too (under the names model.json gives them), each checked against the contract."""
        return self._checked(x, self.entry.prepare(x), source)

    def _checked(self, x: np.ndarray, prepared: np.ndarray, source: str) -> dict[str, np.ndarray]:
        role = self.entry.role
        spec = self.backend.inputs[0]
        for axis in (2, 3):
            if spec.shape[axis] is not None and spec.shape[axis] != prepared.shape[axis]:
                raise RunnerError(
                    f"{source}: the {role} model takes a fixed {spec.shape[2]}x{spec.shape[3]} (HxW) input, this "
                    f"batch is {prepared.shape[2]}x{prepared.shape[3]}; offline runs feed native image sizes to "
                    "fully convolutional models"
                )
        expected = {self.entry.output: self.expected_shape(x)}
        inst = self.entry.instances
        if inst is not None:
            n, _, h, w = x.shape
            if h % inst.stride or w % inst.stride:
                raise RunnerError(f"instance stride {inst.stride} does not divide the padded input {h}x{w}")
            hw = (h // inst.stride, w // inst.stride)
            expected.update({inst.heatmap: (n, self.classes, *hw), inst.size: (n, 2, *hw), inst.offset: (n, 2, *hw)})
        out = self.backend.infer(prepared)
        for name, shape in expected.items():
            if name not in out:
                raise RunnerError(f"{role} model has no output {name!r} (has {sorted(out)})")
            value = out[name]
            if value.shape != shape:
                raise RunnerError(f"{role} output {name!r} has shape {value.shape}, expected {shape}")
            if not np.all(np.isfinite(value)):
                raise RunnerError(f"{role} output {name!r} holds NaN or infinite values ({source})")
        return {name: out[name] for name in expected}


class PackRunner:
    """A model pack's models opened on one backend. Use as a context manager.

    ``runner.gate(x)`` -> scores ``[N, K]``; ``runner.seg(x)`` -> probs ``[N, K, H/s, W/s]``;
    ``runner.seg_outputs(x)`` -> probs plus, for an instance pack, its heatmap, size and offset; for
    uint8 ``[N, C, H, W]`` frames (``stack_images`` makes them from images)."""

    def __init__(self, pack: ModelPack, *, backend: str = "onnxruntime", threads: int = 0, max_batch: int = 8,
                 roles: Sequence[str] | None = None, options: dict[str, Any] | None = None):
        if max_batch < 1:
            raise RunnerError(f"max_batch must be >= 1, got {max_batch}")
        self.pack = pack
        self.backend_class = load_backend_class(backend)
        self.backend_name = self.backend_class.name
        wanted = tuple(pack.models) if roles is None else tuple(roles)
        missing = [r for r in wanted if r not in pack.models]
        if missing:
            raise RunnerError(f"{pack.directory}: the pack has no {', '.join(missing)} model")
        self._stack = contextlib.ExitStack()
        self.models: dict[str, ModelRunner] = {}
        try:
            for role in wanted:
                entry = pack.models[role]
                be = self.backend_class(entry.path, max_batch=max_batch, threads=threads, **(options or {}))
                self._stack.enter_context(be)
                if role == "seg":
                    check_instance_outputs(pack, [o.name for o in be.outputs])
                self.models[role] = ModelRunner(entry, be, len(pack.classes))
        except BaseException:
            self._stack.close()
            raise

    def gate(self, x: np.ndarray, source: str = "batch") -> np.ndarray:
        return self.models["gate"](x, source)

    def seg(self, x: np.ndarray, source: str = "batch") -> np.ndarray:
        return self.models["seg"](x, source)

    def seg_outputs(self, x: np.ndarray, source: str = "batch") -> dict[str, np.ndarray]:
        """``probs`` and, for an instance pack, the instance head's outputs (ModelRunner.outputs)."""
        return self.models["seg"].outputs(x, source)

    def has(self, role: str) -> bool:
        return role in self.models

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> PackRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
