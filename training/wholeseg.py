"""A whole-image inspector for part profiles (magnetic tile, KolektorSDD): one stride-2 segmenter
whose binary defect map also makes the frame decision (issue 17, item 4).

Why: the crop-trained gate and the stride-4 segmenter of the shipped packs lose few-pixel
blowholes and cracks, and the gate never sees a whole tile. Here:

- net (`WholeSeg`): stride-8 trunk (3x3 convs, two dilated context convs), top-down fusion with
  1x1 convs to stride 4 and then to stride 2 (the stride-2 stem's features as the last skip), a
  binary defect logit and K type logits per stride-2 cell. ``probs[k] = sigmoid(defect) *
  softmax(type)[k]`` (K = 1: just the defect probability), so per-class thresholds, events and
  Dice work unchanged on the pack's ``probs`` [N, K, H/2, W/2] (model.json ``output_stride`` 2).
- frame decision: ``scores[k] = max over the map of a 3x3 mean of probs[k]`` (`FrameScores`),
  exported as the pack's gate.onnx (same weights), and model.json's gate entry says
  ``scores_from: "seg"``: the agent runs the segmenter once on every frame and computes these scores
  from its maps (engines/postprocess.py ``frame_scores``); a reader that ignores the key runs gate.onnx,
  then the segmenter on the frames that pass (a passing frame twice), with the same decisions.
- data: random windows (edge-padded where the image is smaller) of whole images, every
  defect-free image included, half the windows of defective images placed on a defect pixel;
  flips and a gain/offset jitter. Loss: focal BCE + soft Dice on the binary mask, CE on the type
  at defect cells, and a BCE on the window's top-k mean defect logit (the frame decision).
- selection: every `eval_every` steps the EMA weights are scored on the validation images at
  native size (padded to a multiple of 8): image ROC AUC of the frame score + Dice on defective
  images at threshold 0.5; the best sum is kept.

`training.wholeseg_cv` runs the k-fold cross-validation and the pack export.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from training.nets import Normalise, _cbr

OUTPUT_STRIDE = 2
PAD_MULTIPLE = 8


@dataclass(frozen=True)
class WholeSegConfig:
    widths: tuple[int, int, int] = (16, 32, 48)
    context: tuple[int, ...] = (2, 4)
    fuse4: int = 32
    fuse2: int = 24

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "WholeSegConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class WholeSeg(nn.Module):
    """uint8 image -> probs [N, K, H/2, W/2] (see the module doc)."""

    def __init__(self, num_classes: int, mean: float, std: float, config: WholeSegConfig = WholeSegConfig()):
        super().__init__()
        w1, w2, w3 = config.widths
        self.num_classes = num_classes
        self.norm = Normalise(mean, std)
        self.down1 = _cbr(1, w1, 2)  # stride 2: the last skip
        self.down2 = _cbr(w1, w2, 2)  # stride 4
        self.down3 = _cbr(w2, w3, 2)  # stride 8
        self.context = nn.Sequential(*[_cbr(w3, w3, 1, dilation=d) for d in config.context])
        self.fuse4 = _cbr(w3 + w2, config.fuse4, 1, kernel=1)
        self.fuse2 = _cbr(config.fuse4 + w1, config.fuse2, 1, kernel=1)
        self.head = nn.Conv2d(config.fuse2, 1 + (num_classes if num_classes > 1 else 0), 1)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 1 (+K), H/2, W/2]: the defect logit, then the type logits (K > 1)."""
        s2 = self.down1(self.norm(x))
        s4 = self.down2(s2)
        deep = self.context(self.down3(s4))
        up = F.interpolate(deep, scale_factor=2.0, mode="bilinear", align_corners=False)
        f4 = self.fuse4(torch.cat([up, s4], dim=1))
        up2 = F.interpolate(f4, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.head(self.fuse2(torch.cat([up2, s2], dim=1)))

    def probs_from_raw(self, r: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(r[:, :1])
        if self.num_classes == 1:
            return p
        # softmax over the type channels spelled out: ONNX Runtime's Softmax on axis 1 of NCHW
        # transposes and took ~8 of ~20 ms at 256x256 (one thread); these are elementwise ops
        t = r[:, 1:]
        e = torch.exp(t - t.amax(dim=1, keepdim=True))
        return p * (e / e.sum(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probs_from_raw(self.raw(x))


def frame_scores(probs: torch.Tensor) -> torch.Tensor:
    """[N, K, h, w] -> [N, K]: the max of each class map's 3x3 mean (one hot cell is not a frame)."""
    return torch.amax(F.avg_pool2d(probs, 3, stride=1, padding=1, count_include_pad=False), dim=(2, 3))


class FrameScores(nn.Module):
    """The pack's gate: the segmenter's frame scores [N, K]."""

    def __init__(self, seg: WholeSeg):
        super().__init__()
        self.seg = seg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frame_scores(self.seg(x))


# -- data ---------------------------------------------------------------------------------------


@dataclass
class Image:
    stem: str
    image: np.ndarray  # uint8 HxW
    defect: np.ndarray  # bool HxW
    types: np.ndarray  # int8 HxW: class index at defect pixels, -1 elsewhere
    defective: bool
    classes: np.ndarray  # bool [K]: classes with mask pixels


def to_image(sample) -> Image:
    masks = sample.masks if sample.masks is not None else np.zeros((len(sample.classes), *sample.shape), bool)
    defect = masks.any(axis=0)
    types = np.where(defect, masks.argmax(axis=0), -1).astype(np.int8)
    return Image(sample.stem, np.ascontiguousarray(sample.image), defect, types, bool(defect.any()),
                 masks.reshape(masks.shape[0], -1).any(axis=1))


def _window(img: Image, crop: int, rng: np.random.Generator, on_defect: float):
    h, w = img.image.shape
    ph, pw = max(0, crop - h), max(0, crop - w)
    im, de, ty = img.image, img.defect, img.types
    if ph or pw:
        pads = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
        im = np.pad(im, pads, mode="edge")
        de = np.pad(de, pads)
        ty = np.pad(ty, pads, constant_values=-1)
        h, w = im.shape
    if img.defective and rng.random() < on_defect:
        ys, xs = np.nonzero(de)
        i = rng.integers(len(ys))
        y0 = int(np.clip(ys[i] - rng.integers(crop), 0, h - crop))
        x0 = int(np.clip(xs[i] - rng.integers(crop), 0, w - crop))
    else:
        y0, x0 = int(rng.integers(h - crop + 1)), int(rng.integers(w - crop + 1))
    sl = (slice(y0, y0 + crop), slice(x0, x0 + crop))
    im, de, ty = im[sl], de[sl], ty[sl]
    if rng.random() < 0.5:
        im, de, ty = im[:, ::-1], de[:, ::-1], ty[:, ::-1]
    if rng.random() < 0.5:
        im, de, ty = im[::-1], de[::-1], ty[::-1]
    gain, offset = rng.uniform(0.85, 1.15), rng.uniform(-12, 12)
    im = np.clip(im.astype(np.float32) * gain + offset, 0, 255).astype(np.uint8)
    return im, de, ty


def batch(images: list[Image], n: int, crop: int, rng: np.random.Generator, on_defect: float = 0.5):
    """(x uint8 [n,1,c,c], defect target [n,1,c/2,c/2] (fraction of mask px per cell), type target
    [n,c/2,c/2] long (-1: ignore), defective [n])."""
    xs, ds, ts = [], [], []
    for i in rng.integers(len(images), size=n):
        im, de, ty = _window(images[i], crop, rng, on_defect)
        xs.append(im)
        ds.append(de.reshape(crop // 2, 2, crop // 2, 2).mean(axis=(1, 3)))
        # a cell's type: the largest class index among its 2x2 px (-1: none; one class per image here)
        ts.append(ty.reshape(crop // 2, 2, crop // 2, 2).max(axis=(1, 3)).astype(np.int64))
    x = torch.from_numpy(np.stack(xs)[:, None].copy())
    d = torch.from_numpy(np.stack(ds)[:, None].astype(np.float32))
    return x, d, torch.from_numpy(np.stack(ts)), (d.flatten(1).amax(1) > 0).float()


def loss_fn(model: WholeSeg, r: torch.Tensor, d: torch.Tensor, t: torch.Tensor, defective: torch.Tensor,
            gamma: float = 2.0) -> tuple[torch.Tensor, dict[str, float]]:
    logit = r[:, :1]
    p = torch.sigmoid(logit)
    bce = F.binary_cross_entropy_with_logits(logit, d, reduction="none")
    pt = p * d + (1 - p) * (1 - d)
    focal = ((1 - pt) ** gamma * bce).mean() * 10.0
    inter = (p * d).sum()
    dice = 1 - (2 * inter + 1) / (p.sum() + d.sum() + 1)
    k = max(1, logit[0].numel() // 400)  # top 0.25 % of cells: the frame decision
    top = torch.topk(logit.flatten(1), k, dim=1).values.mean(1)
    frame = F.binary_cross_entropy_with_logits(top, defective)
    total = focal + dice + 0.5 * frame
    parts = {"focal": float(focal.detach()), "dice": float(dice.detach()), "frame": float(frame.detach())}
    if model.num_classes > 1 and (t >= 0).any():
        ce = F.cross_entropy(r[:, 1:], t, ignore_index=-1)
        total = total + 0.5 * ce
        parts["type"] = float(ce.detach())
    return total, parts


# -- evaluation ---------------------------------------------------------------------------------


def pad8(im: np.ndarray) -> np.ndarray:
    h, w = im.shape
    return np.pad(im, ((0, -h % PAD_MULTIPLE), (0, -w % PAD_MULTIPLE)), mode="edge")


@torch.no_grad()
def predict(model: WholeSeg, images: list[Image]) -> list[tuple[np.ndarray, float]]:
    """Per image: (probs [K, H, W] at full size, nearest-upsampled and cropped; frame score)."""
    model.eval()
    out = []
    for img in images:
        h, w = img.image.shape
        probs = model(torch.from_numpy(pad8(img.image))[None, None])
        score = float(frame_scores(probs).amax())
        full = probs[0].numpy().repeat(OUTPUT_STRIDE, 1).repeat(OUTPUT_STRIDE, 2)[:, :h, :w]
        out.append((full, score))
    return out


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
    return float(greater / (len(pos) * len(neg)))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    order = np.argsort(-scores, kind="stable")
    hit = labels[order].astype(float)
    if not hit.sum():
        return float("nan")
    precision = np.cumsum(hit) / np.arange(1, len(hit) + 1)
    return float((precision * hit).sum() / hit.sum())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def metrics(images: list[Image], preds, threshold: float = 0.5, classes: tuple[str, ...] = ()) -> dict[str, Any]:
    """Image ROC AUC / AP of the frame score; Dice on defective images of the binary defect map
    (sum of class probs >= threshold) and, per class, of class maps (cells whose argmax class is k)
    on the images holding k (their mean over classes: `dice_pos_classes`)."""
    scores = np.array([s for _, s in preds])
    labels = np.array([im.defective for im in images])
    pos_bin, per_class = [], {c: [] for c in classes}
    for im, (p, _) in zip(images, preds):
        fg = p.sum(0) >= threshold
        if im.defective:
            pos_bin.append(dice(fg, im.defect))
        if len(classes) > 1:
            arg = p.argmax(0)
            for k, c in enumerate(classes):
                if im.classes[k]:
                    per_class[c].append(dice(fg & (arg == k), im.types == k))
    out = {"images": len(images), "defective": int(labels.sum()), "image_auc": roc_auc(scores, labels),
           "image_ap": average_precision(scores, labels),
           "dice_pos": float(np.mean(pos_bin)) if pos_bin else float("nan")}
    if len(classes) > 1:
        out["dice_pos_by_class"] = {c: (float(np.mean(v)) if v else None) for c, v in per_class.items()}
        vals = [np.mean(v) for v in per_class.values() if v]
        out["dice_pos_classes"] = float(np.mean(vals)) if vals else float("nan")
    return out


def best_threshold(images: list[Image], preds) -> float:
    """The binary pixel threshold with the best Dice on defective images (chosen on val)."""
    grid = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    scored = [(metrics(images, preds, t)["dice_pos"], t) for t in grid]
    return max(scored)[1]


# -- training -----------------------------------------------------------------------------------


@dataclass
class TrainSettings:
    crop: int = 192
    batch: int = 8
    minutes: float = 10.0
    max_steps: int = 100000
    lr: float = 3e-3
    eval_every: int = 100
    ema: float = 0.98
    seed: int = 0


def train(train_images: list[Image], val_images: list[Image], classes: tuple[str, ...], mean: float, std: float,
          s: TrainSettings, out: Path | None = None, config: WholeSegConfig = WholeSegConfig(),
          log=print, init: dict | None = None) -> tuple[WholeSeg, dict[str, Any]]:
    """Train for `s.minutes` (or `s.max_steps`); returns the best EMA model by val AUC + Dice on positives.
    `init`: a state dict to start from (a run continued with a fresh schedule)."""
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    model = WholeSeg(len(classes), mean, std, config)
    if init is not None:
        model.load_state_dict(init)
    ema = WholeSeg(len(classes), mean, std, config)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=1e-4)
    t0, step, best, history = time.monotonic(), 0, None, []
    best_state = None
    while True:
        frac = max(step / s.max_steps, (time.monotonic() - t0) / 60 / s.minutes)
        done = frac >= 1.0
        if step and (step % s.eval_every == 0 or done):
            m = metrics(val_images, predict(ema, val_images))
            score = (0 if math.isnan(m["image_auc"]) else m["image_auc"]) + m["dice_pos"]
            history.append({"step": step, "minutes": round((time.monotonic() - t0) / 60, 2), **m})
            log(f"step {step} val auc {m['image_auc']:.3f} ap {m['image_ap']:.3f} dice_pos {m['dice_pos']:.3f}")
            if best is None or score > best["score"]:
                best = {"score": score, "step": step, **m}
                best_state = {k: v.clone() for k, v in ema.state_dict().items()}
                if out is not None:
                    torch.save(best_state, out / "best.pt")
        if done:
            break
        lr = s.lr * (min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        x, d, t, defective = batch(train_images, s.batch, s.crop, rng)
        loss, _ = loss_fn(model, model.raw(x), d, t, defective)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        with torch.no_grad():
            decay = min(s.ema, (1 + step) / (10 + step))
            for e, p in zip(ema.state_dict().values(), model.state_dict().values()):
                if e.dtype.is_floating_point:
                    e.mul_(decay).add_(p, alpha=1 - decay)
                else:
                    e.copy_(p)
    ema.load_state_dict(best_state)
    ema.eval()
    return ema, {"best": best, "history": history, "steps": step,
                 "minutes": round((time.monotonic() - t0) / 60, 2)}
