"""A profile's model pack: the ONNX models plus the metadata saved beside them.

Layout (docs/architecture.md): ``<dir>/model.json`` names the models, their sha256, the
classes, the input contract and each output's meaning; ``<dir>/calibration.json`` holds the
thresholds made for exactly those hashes (calibration/). Nothing an inferencer needs lives
only in code (anomalib's metadata.json does the same for its exported models).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.instances import DEFAULT_INSTANCE_THRESHOLD, InstanceSpec

# Format 2 adds `input_pool` to a model entry. A format-1 reader would feed whole frames to a gate
# made for pooled ones (a fully convolutional graph runs on either, wrongly), so it must refuse them.
# Format 3 adds a seg model's `instances` block (engines/instances.py): a format-2 reader would
# ignore it and publish connected components of a model trained to be read by its instance head.
MODEL_PACK_FORMAT = 3
READABLE_PACK_FORMATS = (1, 2, 3)
CALIBRATION_FORMAT = 1


def pack_format(models: dict[str, dict]) -> int:
    """The lowest model.json format that holds these model entries, so a pack stays readable by the
    oldest agent that can run it: 3 with an ``instances`` block, else 2 (what exporters wrote before)."""
    return 3 if any("instances" in m for m in models.values()) else 2


class ModelPackError(ValueError):
    """The model pack on disk is missing, malformed or inconsistent."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelEntry:
    role: str  # "gate" or "seg"
    path: Path
    sha256: str
    output: str  # output tensor name
    output_stride: int = 1  # seg: input px per output px
    input_pool: int = 1  # the model takes frames area-averaged over input_pool x input_pool px (uint8)
    instances: InstanceSpec | None = None  # seg: the instance head's outputs (format 3), else None
    cam_output: str | None = None  # gate of a classification profile: class activation maps [N, K, h, w]
    cam_stride: int = 1  # input px per CAM cell
    # gate only: "seg" when these scores are the seg model's frame scores (engines.postprocess.frame_scores)
    # on the same weights, so an agent may run the segmenter once per frame and derive them
    scores_from: str | None = None

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]

    def input_hw(self, height: int, width: int) -> tuple[int, int]:
        """The H, W this model is fed for frames of height x width."""
        return height // self.input_pool, width // self.input_pool

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Frames ``[N, C, H, W]`` uint8 as this model takes them: pooled by ``input_pool`` (see
        pool_frames), else unchanged (no copy)."""
        return pool_frames(x, self.input_pool)


def pool_frames(x: np.ndarray, k: int) -> np.ndarray:
    """Area-average ``[N, C, H, W]`` uint8 frames over k x k blocks into uint8 ``[N, C, H/k, W/k]``.

    The gate's first op was a k x k average pool on the Cast-to-float frame; doing it here on uint8
    (OpenCV's INTER_AREA: the exact block mean rounded to a nearest grey level, so within 0.5 of
    the float pool) skips the Cast of the full frame and passes 1/k^2 of the pixels to the runtime, or
    over PCIe to a GPU. k = 1 returns ``x`` itself. Speed (one thread, a 1600x256 frame): k = 2 takes
    OpenCV's fast path, ~0.02 ms for a cached frame and ~0.07 ms for one straight off the socket;
    other k take its general path (k = 4: ~0.26 ms)."""
    if k == 1:
        return x
    if x.ndim != 4 or x.dtype != np.uint8:
        raise ValueError(f"pool_frames: expected uint8 [N, C, H, W], got {x.dtype} {x.shape}")
    n, c, h, w = x.shape
    if h % k or w % k:
        raise ValueError(f"pool_frames: {h}x{w} (HxW) frames do not divide into {k}x{k} blocks")
    import cv2

    out = np.empty((n, c, h // k, w // k), np.uint8)
    for i in range(n):
        for j in range(c):
            out[i, j] = cv2.resize(x[i, j], (w // k, h // k), interpolation=cv2.INTER_AREA)
    return out


MAX_LINK_PX = 1024  # a gap wider than this is not one defect on any line


@dataclass(frozen=True)
class ClassThreshold:
    pixel_threshold: float
    min_area_px: int
    instance_threshold: float = DEFAULT_INSTANCE_THRESHOLD  # heatmap peak threshold (instance packs)
    # component packs: pieces of one class at most this many frame px apart are one defect
    # (engines.components.class_components); 0 = each connected piece is one
    link_px: int = 0


@dataclass(frozen=True)
class Calibration:
    gate_threshold: float
    classes: dict[str, ClassThreshold]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)


@dataclass(frozen=True)
class ModelPack:
    directory: Path
    profile: str
    classes: tuple[str, ...]
    channels: int
    height: int
    width: int
    models: dict[str, ModelEntry]
    meta: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def gate(self) -> ModelEntry | None:
        return self.models.get("gate")

    @property
    def seg(self) -> ModelEntry | None:
        return self.models.get("seg")

    @property
    def pad_multiple(self) -> int:
        """What images of other sizes are padded to (evaluation, calibration): a multiple of the
        models' stride 8, of every model's input_pool and of an instance head's stride."""
        strides = [m.instances.stride for m in self.models.values() if m.instances is not None]
        return int(np.lcm.reduce([8, *(m.input_pool for m in self.models.values()), *strides]))

    def versions(self) -> dict[str, str]:
        """Model role -> short sha256, named in every event and summary."""
        return {role: m.short_hash for role, m in self.models.items()}


def _require(d: dict, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if key not in d:
        raise ModelPackError(f"{where}: missing key {key!r}")
    value = d[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ModelPackError(f"{where}: key {key!r} must be {kind}, got {type(value).__name__}")
    return value


def _instance_spec(block: Any, where: str, fmt: int, role: str, output: str) -> InstanceSpec:
    """A seg model's ``instances`` block -> InstanceSpec, or ModelPackError saying what is wrong."""
    if fmt < 3:
        raise ModelPackError(f"{where}: instances needs model.json format 3, this file says format {fmt}")
    if role != "seg":
        raise ModelPackError(f"{where}: only the seg model may carry instances, not the {role} model")
    if not isinstance(block, dict):
        raise ModelPackError(f"{where}: instances must be an object, got {type(block).__name__}")
    w = f"{where}.instances"
    unknown = sorted(set(block) - {"heatmap", "size", "offset", "stride"})
    if unknown:
        raise ModelPackError(f"{w}: unknown key(s) {unknown}; known: heatmap, size, offset, stride")
    names = [_require(block, key, w, str) for key in ("heatmap", "size", "offset")]
    if not all(names):
        raise ModelPackError(f"{w}: output names must not be empty")
    if len(set(names + [output])) != 4:
        raise ModelPackError(f"{w}: heatmap, size, offset and the model's output {output!r} must be four "
                             f"different outputs, got {names + [output]}")
    stride = _require(block, "stride", w, int)
    if stride < 1 or stride & (stride - 1):
        raise ModelPackError(f"{w}: stride must be a power of two >= 1, got {stride}")
    return InstanceSpec(*names, stride=stride)


def check_instance_outputs(pack: ModelPack, output_names: list[str] | tuple[str, ...]) -> None:
    """Refuse a seg model whose graph lacks an output the instances block names (start-up, one line)."""
    seg = pack.seg
    if seg is None or seg.instances is None:
        return
    missing = [n for n in seg.instances.outputs if n not in output_names]
    if missing:
        raise ModelPackError(f"{pack.directory / 'model.json'}: models.seg.instances names output(s) {missing} "
                             f"that {seg.path.name} does not have (it has {sorted(output_names)})")


def load_model_pack(directory: str | Path, *, verify_hashes: bool = True) -> ModelPack:
    directory = Path(directory)
    meta_path = directory / "model.json"
    if not meta_path.is_file():
        raise ModelPackError(f"no model.json in {directory}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelPackError(f"{meta_path}: not valid JSON: {exc}") from exc
    where = str(meta_path)
    fmt = meta.get("format")
    if fmt not in READABLE_PACK_FORMATS:
        raise ModelPackError(f"{where}: format {fmt!r} is not one this agent reads {READABLE_PACK_FORMATS}")
    classes = tuple(_require(meta, "classes", where, list))
    if not classes or not all(isinstance(c, str) and c for c in classes):
        raise ModelPackError(f"{where}: classes must be a non-empty list of names")
    inp = _require(meta, "input", where, dict)
    height = int(_require(inp, "height", f"{where}: input", int))
    width = int(_require(inp, "width", f"{where}: input", int))
    models: dict[str, ModelEntry] = {}
    for role, entry in _require(meta, "models", where, dict).items():
        w = f"{where}: models.{role}"
        path = directory / _require(entry, "file", w, str)
        if not path.is_file():
            raise ModelPackError(f"{w}: model file not found: {path}")
        sha = _require(entry, "sha256", w, str)
        if verify_hashes:
            actual = sha256_file(path)
            if actual != sha:
                raise ModelPackError(f"{w}: sha256 of {path.name} is {actual[:12]}, model.json says {sha[:12]}")
        pool = 1
        if "input_pool" in entry:
            if fmt < 2:
                raise ModelPackError(f"{w}: input_pool needs model.json format 2, this file says format {fmt}")
            pool = _require(entry, "input_pool", w, int)
            if pool < 1 or height % pool or width % pool:
                raise ModelPackError(f"{w}: input_pool {pool} must be >= 1 and divide the {height}x{width} "
                                     f"(HxW) input")
        output = _require(entry, "output", w, str)
        instances = None
        if "instances" in entry:
            instances = _instance_spec(entry["instances"], w, fmt, role, output)
        scores_from = entry.get("scores_from")
        if scores_from is not None and (role != "gate" or scores_from != "seg"):
            raise ModelPackError(f"{w}: scores_from {scores_from!r}: only a gate may name one, and only \"seg\" "
                                 f"(its scores are the segmenter's frame scores)")
        models[role] = ModelEntry(
            role=role,
            path=path,
            sha256=sha,
            output=output,
            output_stride=int(entry.get("output_stride", 1)),
            input_pool=pool,
            instances=instances,
            cam_output=entry.get("cam_output"),
            cam_stride=int(entry.get("cam_stride", 1)),
            scores_from=scores_from,
        )
    if "gate" not in models:
        raise ModelPackError(f"{where}: a model pack needs a 'gate' model")
    if models["gate"].scores_from and "seg" not in models:
        raise ModelPackError(f"{where}: models.gate: scores_from \"seg\" but the pack has no 'seg' model")
    return ModelPack(
        directory=directory,
        profile=_require(meta, "profile", where, str),
        classes=classes,
        channels=int(_require(inp, "channels", f"{where}: input", int)),
        height=height,
        width=width,
        models=models,
        meta=meta,
    )


def load_calibration(pack: ModelPack, path: str | Path | None = None) -> Calibration:
    """Load the thresholds and refuse them when they were made for other models."""
    path = Path(path) if path else pack.directory / "calibration.json"
    if not path.is_file():
        raise ModelPackError(f"no calibration file at {path}; run `coilsight calibrate thresholds`")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelPackError(f"{path}: not valid JSON: {exc}") from exc
    where = str(path)
    if raw.get("format") != CALIBRATION_FORMAT:
        raise ModelPackError(f"{where}: format {raw.get('format')!r} is not {CALIBRATION_FORMAT}")
    made_for = _require(raw, "models", where, dict)
    for role, entry in pack.models.items():
        if made_for.get(role) != entry.sha256:
            got = str(made_for.get(role))[:12]
            raise ModelPackError(
                f"{where}: calibration was made for {role} model {got}, but the loaded {role} model is "
                f"{entry.short_hash}; recalibrate with `coilsight calibrate thresholds`"
            )
    gate = _require(raw, "gate", where, dict)
    threshold = float(_require(gate, "threshold", f"{where}: gate", (int, float)))
    if not 0.0 <= threshold <= 1.0:
        raise ModelPackError(f"{where}: gate.threshold {threshold} outside [0, 1]")
    classes: dict[str, ClassThreshold] = {}
    per_class = _require(raw, "classes", where, dict)
    for name in pack.classes:
        if name not in per_class:
            raise ModelPackError(f"{where}: no thresholds for class {name!r}")
        c = per_class[name]
        t = float(_require(c, "pixel_threshold", f"{where}: classes.{name}", (int, float)))
        a = int(_require(c, "min_area_px", f"{where}: classes.{name}", int))
        if not 0.0 < t < 1.0 or a < 0:
            raise ModelPackError(f"{where}: classes.{name}: pixel_threshold must be in (0,1), min_area_px >= 0")
        it = DEFAULT_INSTANCE_THRESHOLD
        if "instance_threshold" in c:
            it = float(_require(c, "instance_threshold", f"{where}: classes.{name}", (int, float)))
            if not 0.0 < it < 1.0:
                raise ModelPackError(f"{where}: classes.{name}: instance_threshold must be in (0,1), got {it}")
        link = 0
        if "link_px" in c:
            link = _require(c, "link_px", f"{where}: classes.{name}", int)
            if isinstance(link, bool) or not 0 <= link <= MAX_LINK_PX:
                raise ModelPackError(f"{where}: classes.{name}: link_px must be an integer in [0, {MAX_LINK_PX}], got {link!r}")
        classes[name] = ClassThreshold(t, a, it, int(link))
    return Calibration(gate_threshold=threshold, classes=classes, raw=raw)
