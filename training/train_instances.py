"""Train the instance model (training.nets.InstanceSegmenter) of a profile on CPU, resumable.

What one step sees (whole images, never a crop through a box):
- strip-shaped mosaics: a `canvas` (default 256 x 512) whose background is a clean window of a
  realistic strip (training.strip), with whole NEU images pasted left to right, each scale-jittered
  (0.8-1.25), flipped and drift-augmented; their boxes follow the scale and flips;
- realistic strips (`synthetic_fraction` of the canvases): windows of generated defective or clean
  frames whose left edge is chosen so that no defect box is cut (the whole frame when none fits);
- augmentation on the whole canvas: horizontal and vertical flips, gain, offset, a ramp across it.
- whole-image steps (`whole_fraction` of the steps): `whole_batch` whole dataset images resized to
  one side from `whole_sides`, no canvas: most pixels of such a step are labelled (the command-line
  default recipe, the one the shipped steel pack was trained with: 0.6 of the steps, 16 images);
- `synth_frames` plain synthetic strip frames (training.synth, what camera-sim paints) join the pools.

Targets at output stride 4 (contract in docs/architecture.md, model.json format 3): per-class
Gaussian centre heatmaps (elliptical, sigma = box side / 6 in cells, peak 1 at the centre cell),
size (w, h) in input px and offset (dx, dy) in cells at each centre cell. Loss: CenterNet's
penalty-reduced focal loss on the heatmap (normalised by the number of boxes) + L1 on log(size) +
L1 on the offset + the old seg loss (BCE + soft Dice, training.train.seg_loss) on `probs` with the
boxes rasterised as masks.

AdamW, warm-up + cosine (training.train.learning_rate, following the larger of steps done and
--max-minutes spent), an EMA of the weights (decay 0.999, warmed up) which is what is evaluated and
shipped. After every epoch: val mAP@0.5 (pycocotools, training.evaluate.coco_map) of the EMA model
on the whole val images, peaks decoded by engines.instances (the contract's 3x3 max-pool peaks, no NMS);
`best.pt` keeps the EMA weights of the best val mAP@0.5; `last.pt` holds everything to resume.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import structlog

from training import datasets
from training.datasets import Box, Sample
from training.strip import RealisticStripGenerator

log = structlog.get_logger(__name__)

STRIDE = 4
STATE_FILE = "last.pt"
BEST_FILE = "best.pt"
META_FILE = "meta.json"
STRIP_FRAMES = 48  # generated 1600x256 frames per run, half clean, half defective
DEFAULT_INSTANCE_THRESHOLD = 0.3
VAL_DECODE_THRESHOLD = 0.05  # low: mAP wants the whole score range
MAX_INSTANCES = 100


class InstanceTrainError(RuntimeError):
    """Instance training cannot start or resume; the message says why."""


@dataclass
class InstanceTrainConfig:
    profile: str
    data_root: Path
    out: Path
    model_size: str = "edge"
    epochs: int = 200
    steps_per_epoch: int = 40
    batch: int = 4
    canvas: tuple[int, int] = (256, 512)  # (height, width), multiples of 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    ema_decay: float = 0.999
    synthetic_fraction: float = 0.15
    scale_jitter: tuple[float, float] = (0.8, 1.25)
    # share of steps whose batch is `whole_batch` whole dataset images resized to one side drawn
    # from `whole_sides` (no canvas, no background): most of each step's pixels hold a labelled image
    whole_fraction: float = 0.0
    whole_batch: int = 16
    whole_sides: tuple[int, ...] = (176, 192, 208, 224, 240)
    gaussian_alpha: float = 1.0  # heatmap sigma = alpha * box side / 6 (cells); TTFNet uses 0.54
    seg_weight: float = 1.0
    max_minutes: float = 100.0
    seed: int = 0
    threads: int = 2
    limit_images: int | None = None
    strip_frames: int = STRIP_FRAMES
    # frames of the plain synthetic strip (training.synth, what camera-sim paints; seeds 5000 + seed,
    # never the bench's or the demo's) added to the strip pools, half defective
    synth_frames: int = 0
    # start from these weights with a fresh optimiser, EMA and schedule (a shipped pack's folder with
    # seg.onnx, or a run folder with best.pt); a folder that already holds last.pt resumes instead
    init: Path | None = None
    # a `lite0` trunk (model size line_lite0) starts from ImageNet weights (training/lite0.py): this
    # .pth file, else the one the `train` extra installs; ignored with --init or when resuming
    pretrained: Path | None = None
    command: str = ""
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


# -- decoding: engines.instances (the runtime's own decode), boxes as training.datasets.Box ------------


def decode(heatmap: np.ndarray, size: np.ndarray, offset: np.ndarray, threshold: float | Sequence[float],
           max_instances: int, stride: int, frame_hw: tuple[int, int]) -> list[tuple[Box, float]]:
    """One frame's outputs ([K,h,w], [2,h,w], [2,h,w]) -> [(Box, score)], best first, decoded by
    engines.instances.decode_instances (3x3 max-pool peaks >= threshold, no NMS), so val mAP here is
    the mAP of the events the agent would publish."""
    from engines.instances import decode_instances

    found = decode_instances(heatmap, size, offset, stride=stride, thresholds=threshold, frame_hw=frame_hw,
                             max_instances=max_instances)
    return [(Box(d.class_id, *d.box), d.score) for d in found]


# -- targets --------------------------------------------------------------------------------------


def instance_targets(boxes: Sequence[Box], height: int, width: int, k: int, stride: int = STRIDE,
                     alpha: float = 1.0) -> dict[str, np.ndarray]:
    """Targets of one image: heatmap [K,h,w] (max of elliptical Gaussians of sigma alpha * side / 6
    cells, at least 0.5, 1 at each centre cell), size [2,h,w] (w, h px), offset [2,h,w] (dx, dy
    cells), weight [h,w] (1 at centre cells)."""
    h, w = height // stride, width // stride
    heat = np.zeros((k, h, w), np.float32)
    size = np.zeros((2, h, w), np.float32)
    offset = np.zeros((2, h, w), np.float32)
    weight = np.zeros((h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # larger boxes first, so a small box's centre wins a shared cell
    for b in sorted(boxes, key=lambda b: -(b.x1 - b.x0) * (b.y1 - b.y0)):
        bw, bh = b.x1 - b.x0, b.y1 - b.y0
        if bw <= 0 or bh <= 0:
            continue
        cx, cy = (b.x0 + b.x1) / 2 / stride, (b.y0 + b.y1) / 2 / stride
        j, i = min(int(cx), w - 1), min(int(cy), h - 1)
        sx, sy = max(0.5, alpha * bw / stride / 6.0), max(0.5, alpha * bh / stride / 6.0)
        g = np.exp(-0.5 * (((xx - j) / sx) ** 2 + ((yy - i) / sy) ** 2))
        np.maximum(heat[b.cls], g, out=heat[b.cls])
        heat[b.cls, i, j] = 1.0
        size[:, i, j] = (bw, bh)
        offset[:, i, j] = (min(cx - j, 0.999), min(cy - i, 0.999))
        weight[i, j] = 1.0
    return {"heatmap": heat, "size": size, "offset": offset, "weight": weight}


def focal_loss(logits, target):
    """CenterNet's penalty-reduced pixel focal loss (alpha 2, beta 4), summed / number of centres."""
    import torch
    from torch.nn import functional as F

    pos = target.eq(1.0).float()
    neg = 1.0 - pos
    logp = F.logsigmoid(logits)
    log1mp = F.logsigmoid(-logits)
    p = torch.sigmoid(logits)
    pos_loss = (logp * (1 - p) ** 2 * pos).sum()
    neg_loss = (log1mp * p ** 2 * (1 - target) ** 4 * neg).sum()
    return -(pos_loss + neg_loss) / pos.sum().clamp(min=1.0)


def instance_loss(raw: dict, targets: dict, seg_weight: float = 1.0) -> dict:
    """Loss terms from the model's raw outputs and batched targets (torch tensors); the total is
    heatmap + size + offset + seg_weight * seg."""
    import torch

    from training.nets import SIZE_LOG_CLAMP, SIZE_SCALE
    from training.train import seg_loss

    w = targets["weight"].unsqueeze(1)  # [N,1,h,w]
    n = w.sum().clamp(min=1.0)
    heat = focal_loss(raw["heatmap"], targets["heatmap"])
    log_size = torch.log(targets["size"].clamp(min=1.0) / SIZE_SCALE).clamp(*SIZE_LOG_CLAMP)
    size = (torch.abs(raw["size"] - log_size) * w).sum() / n
    offset = (torch.abs(torch.sigmoid(raw["offset"]) - targets["offset"]) * w).sum() / n
    seg = seg_loss(raw["probs"], targets["probs"])
    total = heat + size + offset + seg_weight * seg
    return {"total": total, "heatmap": heat, "size": size, "offset": offset, "seg": seg}


# -- data -----------------------------------------------------------------------------------------


def _augment_image(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gain, offset and a ramp across (float32 out)."""
    x = img.astype(np.float32)
    gain = rng.uniform(0.8, 1.2)
    ramp = np.linspace(-1, 1, x.shape[1], dtype=np.float32)[None, :] * rng.uniform(-12, 12)
    return x * gain + rng.uniform(-15, 15) + ramp


def _flip(img: np.ndarray, boxes: list[Box], horizontal: bool, vertical: bool) -> tuple[np.ndarray, list[Box]]:
    h, w = img.shape
    if horizontal:
        img = img[:, ::-1]
        boxes = [Box(b.cls, w - b.x1, b.y0, w - b.x0, b.y1) for b in boxes]
    if vertical:
        img = img[::-1, :]
        boxes = [Box(b.cls, b.x0, h - b.y1, b.x1, h - b.y0) for b in boxes]
    return img, boxes


SYNTH_SEED = 5000


@dataclass
class _StripFrame:
    image: np.ndarray
    boxes: list[Box]


class CanvasSource:
    """Draws training canvases: NEU mosaics on strip background, and realistic strip windows."""

    def __init__(self, samples: Sequence[Sample], classes: Sequence[str], canvas: tuple[int, int],
                 synthetic_fraction: float, scale_jitter: tuple[float, float], strip_frames: int, seed: int,
                 synth_frames: int = 0):
        self.samples = [s for s in samples if s.boxes]
        self.classes = tuple(classes)
        self.canvas = canvas
        self.synthetic_fraction = synthetic_fraction
        self.scale_jitter = scale_jitter
        gen = RealisticStripGenerator(width=max(1600, canvas[1]), height=canvas[0], classes=self.classes, seed=seed + 1000) \
            if set(self.classes) <= set(datasets.STEEL_CLASSES) else None
        self.clean, self.defective = [], []
        if gen is not None and strip_frames > 0:
            for i in range(strip_frames):
                f = gen.frame(i, defective=i % 2 == 1)
                (self.defective if f.boxes else self.clean).append(f)
        if gen is not None and synth_frames > 0:
            from training.synth import StripGenerator

            plain = StripGenerator(width=max(1600, canvas[1]), height=canvas[0], classes=self.classes, seed=SYNTH_SEED + seed)
            for i in range(synth_frames):
                img, _, painted = plain.frame_with_instances(i, defective=i % 2 == 1)
                f = _StripFrame(img, [Box(c, float(x0), float(y0), float(x1), float(y1)) for c, x0, y0, x1, y1 in painted])
                (self.defective if f.boxes else self.clean).append(f)

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, list[Box]]:
        if self.defective and (rng.random() < self.synthetic_fraction or not self.samples):
            img, boxes = self._strip_window(rng)
        else:
            img, boxes = self._mosaic(rng)
        img, boxes = _flip(img, boxes, rng.random() < 0.5, rng.random() < 0.5)
        img = np.clip(_augment_image(img, rng), 0, 255)
        return np.ascontiguousarray(img, dtype=np.float32), boxes

    def whole(self, rng: np.random.Generator, n: int, side: int) -> list[tuple[np.ndarray, list[Box]]]:
        """`n` whole dataset images, each resized to side x side (its boxes scaled with it),
        flipped and drift-augmented: nothing cut, no background."""
        items = []
        for _ in range(n):
            s = self.samples[int(rng.integers(len(self.samples)))]
            sh, sw = s.image.shape[:2]
            img = cv2.resize(s.image, (side, side), interpolation=cv2.INTER_AREA if side < sw else cv2.INTER_LINEAR)
            fx, fy = side / sw, side / sh
            bx = [Box(b.cls, b.x0 * fx, b.y0 * fy, b.x1 * fx, b.y1 * fy) for b in s.boxes]
            img, bx = _flip(img, bx, rng.random() < 0.5, rng.random() < 0.5)
            img = np.clip(_augment_image(img, rng), 0, 255)
            items.append((np.ascontiguousarray(img, dtype=np.float32), bx))
        return items

    def _background(self, rng: np.random.Generator, level: float) -> np.ndarray:
        ch, cw = self.canvas
        if self.clean:
            f = self.clean[int(rng.integers(len(self.clean)))].image
            x0 = int(rng.integers(0, f.shape[1] - cw + 1))
            bg = f[:ch, x0:x0 + cw].astype(np.float32)
            return bg + (level - float(bg.mean()))
        return np.full((ch, cw), level, np.float32) + rng.normal(0, 4, (ch, cw)).astype(np.float32)

    def _mosaic(self, rng: np.random.Generator) -> tuple[np.ndarray, list[Box]]:
        ch, cw = self.canvas
        picks = []
        x = int(rng.integers(0, 24))
        while True:
            s = self.samples[int(rng.integers(len(self.samples)))]
            f = rng.uniform(*self.scale_jitter)
            sh, sw = s.image.shape[:2]
            nh, nw = min(ch, int(round(sh * f))), int(round(sw * f))
            if x + nw > cw:
                break
            picks.append((s, nh, nw, x))
            x += nw + int(rng.integers(0, 40))
        if not picks:  # a canvas narrower than one image: one image, shrunk to fit
            s = self.samples[int(rng.integers(len(self.samples)))]
            sh, sw = s.image.shape[:2]
            f = min(ch / sh, cw / sw)
            picks.append((s, int(sh * f), int(sw * f), 0))
        level = float(np.mean([p[0].image.mean() for p in picks]))
        canvas = self._background(rng, level)
        boxes: list[Box] = []
        for s, nh, nw, x0 in picks:
            sh, sw = s.image.shape[:2]
            img = cv2.resize(s.image, (nw, nh), interpolation=cv2.INTER_AREA if nw < sw else cv2.INTER_LINEAR)
            fx, fy = nw / sw, nh / sh
            bx = [Box(b.cls, b.x0 * fx, b.y0 * fy, b.x1 * fx, b.y1 * fy) for b in s.boxes]
            img, bx = _flip(img, bx, rng.random() < 0.5, rng.random() < 0.5)
            y0 = int(rng.integers(0, ch - nh + 1))
            canvas[y0:y0 + nh, x0:x0 + nw] = img
            boxes += [Box(b.cls, b.x0 + x0, b.y0 + y0, b.x1 + x0, b.y1 + y0) for b in bx]
        return canvas, boxes

    def _strip_window(self, rng: np.random.Generator) -> tuple[np.ndarray, list[Box]]:
        ch, cw = self.canvas
        f = self.defective[int(rng.integers(len(self.defective)))]
        fw = f.image.shape[1]
        starts = rng.permutation(np.arange(0, fw - cw + 1, 16))
        for x0 in starts[:64]:
            x1 = x0 + cw
            if all(b.x1 <= x0 or b.x0 >= x1 or (b.x0 >= x0 and b.x1 <= x1) for b in f.boxes):
                inside = [Box(b.cls, b.x0 - x0, b.y0, b.x1 - x0, b.y1) for b in f.boxes if b.x0 >= x0 and b.x1 <= x1]
                return f.image[:ch, x0:x1].astype(np.float32), inside
        # no window of this frame avoids cutting a box: draw a mosaic instead (never a cut box)
        return self._mosaic(rng)


def batch_targets(items: list[tuple[np.ndarray, list[Box]]], k: int,
                  alpha: float = 1.0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    from metrics import box_masks

    xs = np.stack([img for img, _ in items])[:, None]
    tg = [instance_targets(bx, img.shape[0], img.shape[1], k, alpha=alpha) for img, bx in items]
    probs = []
    for img, bx in items:
        m = box_masks(img.shape, k, bx).astype(np.float32)
        h, w = img.shape
        probs.append(m.reshape(k, h // STRIDE, STRIDE, w // STRIDE, STRIDE).mean(axis=(2, 4)))
    out = {key: np.stack([t[key] for t in tg]) for key in ("heatmap", "size", "offset", "weight")}
    out["probs"] = np.stack(probs)
    return xs.astype(np.float32), out


# -- validation -----------------------------------------------------------------------------------


def predict(model, images: Sequence[np.ndarray], threshold: float | Sequence[float] = VAL_DECODE_THRESHOLD,
            max_instances: int = MAX_INSTANCES) -> list[list[tuple[Box, float]]]:
    """Run the model (eval mode, torch) on whole grey images (padded at bottom/right to a multiple
    of 16 with edge values) and decode each."""
    import torch

    out = []
    model.eval()
    with torch.no_grad():
        for img in images:
            h, w = img.shape[:2]
            ph, pw = (-h) % 16, (-w) % 16
            x = np.pad(img, ((0, ph), (0, pw)), mode="edge") if ph or pw else img
            _, heat, size, off = model(torch.from_numpy(np.ascontiguousarray(x))[None, None])
            out.append(decode(heat[0].numpy(), size[0].numpy(), off[0].numpy(), threshold, max_instances,
                              STRIDE, (h, w)))
    return out


def val_map(model, samples: Sequence[Sample], n_classes: int) -> dict[str, Any]:
    from training.evaluate import coco_map

    dets = predict(model, [s.image for s in samples])
    return coco_map([s.boxes for s in samples], dets, [s.image.shape[:2] for s in samples], n_classes)


# -- the run --------------------------------------------------------------------------------------


class Ema:
    """Exponential moving average of a model's parameters and buffers (decay warmed up)."""

    def __init__(self, model, decay: float):
        import copy

        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def update(self, model) -> None:
        import torch

        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            src = model.state_dict()
            for name, v in self.model.state_dict().items():
                if v.dtype.is_floating_point:
                    v.mul_(d).add_(src[name].detach(), alpha=1 - d)
                else:
                    v.copy_(src[name])


def init_normalisation(init: Path) -> tuple[float, float]:
    """The input mean and std the `--init` weights were trained with (the graph's first op): the model
    that takes them must normalise the same way, whatever this run's data would give."""
    init = Path(init)
    for name, keys in (("model.json", ("input",)), ("meta.json", ())):
        if (init / name).is_file():
            doc = json.loads((init / name).read_text())
            for key in keys:
                doc = doc.get(key, {})
            try:
                return float(doc["mean"]), float(doc["std"])
            except (KeyError, TypeError, ValueError) as exc:
                raise InstanceTrainError(f"{init / name}: no input mean and std ({exc})") from exc
    raise InstanceTrainError(f"--init {init}: neither a pack folder (model.json) nor a run folder (meta.json, {BEST_FILE})")


def _same_net(recorded: Any, config) -> bool:
    """Whether a pack's recorded model_config is the net ``config`` (an InstanceConfig): keys a pack
    written before a field existed take that field's default (packs before ``trunk`` are "own")."""
    from training.nets import InstanceConfig

    try:
        return InstanceConfig.from_dict(dict(recorded)) == config
    except (TypeError, ValueError):
        return False


def load_init(model, init: Path, classes: Sequence[str], sample: np.ndarray) -> dict[str, Any]:
    """Put `init`'s weights into `model` (in place): a pack folder (model.json + seg.onnx with instance
    outputs; the folded weights are taken back by training.onnx_weights) or a run folder (best.pt).
    Returns what was loaded, for meta.json; InstanceTrainError when it does not fit."""
    import torch

    init = Path(init)
    if (init / "model.json").is_file():
        from training.onnx_weights import WeightRecoveryError, load_from_onnx

        spec = json.loads((init / "model.json").read_text())
        seg = spec.get("models", {}).get("seg", {})
        if list(spec.get("classes", [])) != list(classes):
            raise InstanceTrainError(f"{init}: classes {spec.get('classes')} are not the data's {list(classes)}")
        if "instances" not in seg:
            raise InstanceTrainError(f"{init}: its seg model has no instance outputs to start from")
        config = spec.get("training", {}).get("model_config")
        if config is not None and not _same_net(config, model.config):
            raise InstanceTrainError(f"{init}: its seg model is {config}, not this run's {model.config.to_dict()}")
        try:
            diff = load_from_onnx(model, init / seg["file"], sample, model, prefix="")
        except WeightRecoveryError as exc:
            raise InstanceTrainError(f"{init}: {exc}") from exc
        if not diff < 1e-3:
            raise InstanceTrainError(f"{init}: weights taken back from {seg['file']} differ from the graph by {diff:.3g}")
        return {"from": str(init), "kind": "pack", "sha256": seg.get("sha256"), "max_abs_diff": diff}
    path = init / BEST_FILE
    if not path.is_file():
        raise InstanceTrainError(f"--init {init}: neither a pack folder (model.json) nor a run folder ({BEST_FILE})")
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except RuntimeError as exc:
        raise InstanceTrainError(f"{path}: does not fit this model size: {exc}") from exc
    return {"from": str(init), "kind": "run"}


def _load_split(cfg: InstanceTrainConfig, split: str) -> list[Sample]:
    ds = datasets.load_profile_dataset(cfg.profile, Path(cfg.data_root), split)
    if cfg.limit_images is not None:
        ds = ds[:cfg.limit_images]
    return [s for s in ds]


def train_instances(cfg: InstanceTrainConfig, *, data_loader: Callable[[str], list[Sample]] | None = None) -> dict[str, Any]:
    """Train (or resume) the instance model; returns the run summary also written to meta.json."""
    import torch

    from training.nets import INSTANCE_CONFIGS, build_instance_model
    from training.train import learning_rate

    if cfg.model_size not in INSTANCE_CONFIGS:
        raise InstanceTrainError(f"unknown instance model size {cfg.model_size!r}; known: {', '.join(INSTANCE_CONFIGS)}")
    if cfg.epochs < 1 or cfg.steps_per_epoch < 1 or cfg.batch < 1 or cfg.max_minutes <= 0:
        raise InstanceTrainError(f"epochs {cfg.epochs}, steps per epoch {cfg.steps_per_epoch} and batch {cfg.batch} "
                                 f"must be >= 1 and max minutes {cfg.max_minutes} > 0")
    if cfg.canvas[0] % 16 or cfg.canvas[1] % 16:
        raise InstanceTrainError(f"canvas {cfg.canvas} must be multiples of 16")
    if not 0.0 <= cfg.whole_fraction <= 1.0 or cfg.whole_batch < 1 or cfg.gaussian_alpha <= 0 or cfg.seg_weight < 0:
        raise InstanceTrainError(f"whole fraction {cfg.whole_fraction} must be in [0, 1], whole batch {cfg.whole_batch} "
                                 f">= 1, gaussian alpha {cfg.gaussian_alpha} > 0 and seg weight {cfg.seg_weight} >= 0")
    if any(side % 16 or side < 16 for side in cfg.whole_sides):
        raise InstanceTrainError(f"whole sides {cfg.whole_sides} must be multiples of 16")
    if not 0.0 <= cfg.synthetic_fraction <= 1.0:
        raise InstanceTrainError(f"synthetic fraction must be in [0, 1], got {cfg.synthetic_fraction}")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    started = time.monotonic()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    load = data_loader or (lambda split: _load_split(cfg, split))
    train_samples, val_samples = load("train"), load("val")
    if not train_samples or not val_samples:
        raise InstanceTrainError(f"profile {cfg.profile}: train ({len(train_samples)}) and val ({len(val_samples)}) "
                                 "splits must both hold images")
    if any(s.image.ndim != 2 for s in train_samples[:1]):
        raise InstanceTrainError("instance training reads grey images (H x W)")
    classes = train_samples[0].classes
    pixels = np.concatenate([s.image.ravel()[::97] for s in train_samples]).astype(np.float64)
    mean, std = round(float(pixels.mean() / 255.0), 4), round(max(0.05, float(pixels.std() / 255.0)), 4)
    source = CanvasSource(train_samples, classes, cfg.canvas, cfg.synthetic_fraction, cfg.scale_jitter,
                          cfg.strip_frames, cfg.seed, cfg.synth_frames)
    starting = cfg.init is not None and not (out / STATE_FILE).is_file()
    if starting:
        mean, std = init_normalisation(cfg.init)
    model = build_instance_model(len(classes), 1, mean, std, cfg.model_size)
    init_meta = None
    if starting:
        sample = np.stack([np.asarray(s.image[:192, :192], np.uint8) for s in val_samples[:8]])[:, None]
        init_meta = load_init(model, cfg.init, classes, sample)
        log.info("instance_training_init", **init_meta)
    pretrained = None
    if model.config.trunk == "lite0" and not starting and not (out / STATE_FILE).is_file():
        from training.lite0 import Lite0Error, load_imagenet

        try:
            pretrained = load_imagenet(model.encoder, cfg.pretrained)
        except Lite0Error as exc:
            raise InstanceTrainError(str(exc)) from None
        log.info("instance_training_imagenet_trunk", **pretrained)
    ema = Ema(model, cfg.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * cfg.steps_per_epoch
    meta: dict[str, Any] = {
        "kind": "instances", "profile": cfg.profile, "classes": list(classes), "mean": mean, "std": std,
        "model_size": cfg.model_size, "model_config": INSTANCE_CONFIGS[cfg.model_size].to_dict(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "command": cfg.command, "data": str(cfg.data_root), "seed": cfg.seed,
        "train_images": len(train_samples), "val_images": len(val_samples),
        "strip_frames": {"clean": len(source.clean), "defective": len(source.defective)},
        "history": [], "best": {}, "minutes": 0.0, "init": init_meta, "pretrained": pretrained,
    }
    state_path = out / STATE_FILE
    start_epoch, best_map, spent_before = 0, -1.0, 0.0
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state.get("profile") != cfg.profile or state.get("model_size") != cfg.model_size:
            raise InstanceTrainError(f"{state_path}: checkpoint is for profile {state.get('profile')!r} size "
                                     f"{state.get('model_size')!r}, not {cfg.profile!r} {cfg.model_size!r}; use another --out")
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        ema.updates = state["ema_updates"]
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best_map = state["epoch"] + 1, state["best_map"]
        meta["history"], meta["best"] = state["history"], state.get("best_meta", {})
        meta["pretrained"] = state.get("pretrained")
        spent_before = float(state["minutes"])
        log.info("instance_training_resumed", checkpoint=str(state_path), epoch=start_epoch)
    stop_reason = "epochs"
    k = len(classes)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        sums: dict[str, float] = {}
        for step in range(cfg.steps_per_epoch):
            done = (epoch * cfg.steps_per_epoch + step) / total_steps
            elapsed = (spent_before + (time.monotonic() - started) / 60.0) / cfg.max_minutes
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg.lr, max(done, elapsed))
            if rng.random() < cfg.whole_fraction:
                side = int(cfg.whole_sides[int(rng.integers(len(cfg.whole_sides)))])
                items = source.whole(rng, cfg.whole_batch, side)
            else:
                items = [source.draw(rng) for _ in range(cfg.batch)]
            xs, tg = batch_targets(items, k, cfg.gaussian_alpha)
            raw = model.raw(torch.from_numpy(xs))
            losses = instance_loss(raw, {key: torch.from_numpy(v) for key, v in tg.items()}, cfg.seg_weight)
            opt.zero_grad()
            losses["total"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            ema.update(model)
            for key, v in losses.items():
                sums[key] = sums.get(key, 0.0) + float(v.detach())
        val = val_map(ema.model, val_samples, k)
        minutes = spent_before + (time.monotonic() - started) / 60.0
        row = {"epoch": epoch + 1, **{f"train_{key}": round(v / cfg.steps_per_epoch, 4) for key, v in sums.items()},
               "val_map50": val["map50"], "val_map50_95": val["map50_95"], "val_ap50_per_class": val["ap50_per_class"],
               "minutes": round(minutes, 2)}
        meta["history"].append(row)
        score = val["map50"] if val["map50"] is not None else -1.0
        if score > best_map:
            best_map = score
            torch.save(ema.model.state_dict(), out / BEST_FILE)
            meta["best"] = {"epoch": epoch + 1, "val_map50": val["map50"], "val_map50_95": val["map50_95"],
                            "val_ap50_per_class": val["ap50_per_class"]}
        torch.save({"profile": cfg.profile, "model_size": cfg.model_size, "epoch": epoch, "model": model.state_dict(),
                    "ema": ema.model.state_dict(), "ema_updates": ema.updates, "opt": opt.state_dict(),
                    "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "best_map": best_map,
                    "best_meta": meta["best"], "history": meta["history"], "minutes": minutes,
                    "pretrained": meta["pretrained"]}, state_path)
        log.info("instance_epoch_done", epoch=epoch + 1, loss=row.get("train_total"), val_map50=val["map50"],
                 minutes=row["minutes"])
        if cfg.progress:
            print(f"epoch {epoch + 1}: loss {row.get('train_total')} (heat {row.get('train_heatmap')} size "
                  f"{row.get('train_size')} off {row.get('train_offset')} seg {row.get('train_seg')}) | val mAP@0.5 "
                  f"{val['map50']} @0.5:0.95 {val['map50_95']} | {minutes:.1f} min", flush=True)
        meta["minutes"] = round(minutes, 2)
        meta["stopped"] = "running"
        (out / META_FILE).write_text(json.dumps(meta, indent=1))
        if minutes >= cfg.max_minutes * 0.98:
            stop_reason = "max_minutes"
            break
    meta["stopped"] = stop_reason
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.train_instances", description=__doc__.split("\n")[0])
    p.add_argument("--profile", default="steel")
    p.add_argument("--data-root", type=Path, default=Path("/work/shared/data"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model-size", default="edge")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--steps-per-epoch", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--synthetic-fraction", type=float, default=0.6)
    p.add_argument("--max-minutes", type=float, default=100.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-images", type=int, default=None)
    p.add_argument("--whole-fraction", type=float, default=0.6)
    p.add_argument("--whole-batch", type=int, default=16)
    p.add_argument("--gaussian-alpha", type=float, default=0.54)
    p.add_argument("--seg-weight", type=float, default=0.5)
    p.add_argument("--synth-frames", type=int, default=160)
    p.add_argument("--init", type=Path, default=None)
    p.add_argument("--pretrained", type=Path, default=None)
    a = p.parse_args(argv)
    import sys

    cfg = InstanceTrainConfig(profile=a.profile, data_root=a.data_root, out=a.out, model_size=a.model_size,
                              epochs=a.epochs, steps_per_epoch=a.steps_per_epoch, batch=a.batch, lr=a.lr,
                              synthetic_fraction=a.synthetic_fraction, max_minutes=a.max_minutes,
                              threads=a.threads, seed=a.seed, limit_images=a.limit_images,
                              whole_fraction=a.whole_fraction, whole_batch=a.whole_batch,
                              gaussian_alpha=a.gaussian_alpha, seg_weight=a.seg_weight, synth_frames=a.synth_frames,
                              init=a.init, pretrained=a.pretrained,
                              command=" ".join(["python -m training.train_instances", *sys.argv[1:]]))
    meta = train_instances(cfg)
    print(json.dumps({"best": meta["best"], "stopped": meta["stopped"], "minutes": meta["minutes"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
