"""Train a profile's gate and segmenter on CPU (torch), the way `coilsight train` runs it.

Data (training.datasets, split rule there; the test split is never read here):
- gate: same-size crops, so the gate cannot learn image size. Positives are
  `defect_crops(train, crop)` (one window per annotated defect, up to `GATE_POSITIVES_PER_IMAGE`)
  and as many fresh windows centred on a random defect pixel,
  negatives `clean_crops(train, **clean_crop_settings())` (windows outside every box grown by the
  margin; NEU has no defect-free image) plus random windows of defect-free images where the data
  has them. Loss: BCE with a per-class pos_weight (negatives / positives, clipped to [1, 20]).
- seg: whole images (cropped or padded to the profile's `seg_crop`, a multiple of 8; defective
  images centred on a defect more often), with NEU's boxes rasterised by `boxes_to_masks`,
  plus clean crops with empty masks. Target at output stride 4 = fraction of mask pixels per
  4x4 cell. Loss: BCE + soft Dice.
- steel: a `synthetic_fraction` of both batches comes from training.synth.StripGenerator (random
  windows of generated 1600x256 frames) so the shipped model also sees the demo's synthetic
  defects. Quality is reported on real NEU data only.
- augmentation like a line camera: gain/offset drift, a brightness ramp across the window, small
  shifts (random window placement), horizontal and vertical flips.

Determinism: one numpy Generator and torch.manual_seed from `seed`; the same seed and data give
the same weights (CPU) as long as the learning-rate schedule is driven by steps. The schedule
(`learning_rate`: warm-up, cosine) follows the larger of steps done and `max_minutes` spent, so
a run the clock cuts short still anneals; such a run depends on the machine's speed. Every epoch writes `last.pt` (weights, optimisers, epoch,
RNG states) and, when the validation loss improved, `best_gate.pt` / `best_seg.pt` (each model
kept by its own val loss); a run started on a folder holding `last.pt` resumes from it.
`max_minutes` stops cleanly after the epoch that crosses it.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import structlog

from training import datasets
from training.datasets import Sample

log = structlog.get_logger(__name__)

GATE_POSITIVES_PER_IMAGE = 3
SYNTHETIC_FRAMES = 160  # generated 1600x256 frames per run (about 4 s), windows drawn from them
STATE_FILE = "last.pt"
META_FILE = "meta.json"


class TrainError(RuntimeError):
    """Training cannot start or resume; the message says why."""


@dataclass(frozen=True)
class ProfileTraining:
    """Per-profile choices: the frame the line sends, crop sizes, what a run costs."""

    height: int  # nominal frame (model.json input)
    width: int
    seg_crop: int  # seg training window (multiple of 8)
    synthetic: bool = False


PROFILE_TRAINING: dict[str, ProfileTraining] = {
    "steel": ProfileTraining(256, 1600, seg_crop=192, synthetic=True),
    "magnetic_tile": ProfileTraining(256, 256, seg_crop=192),
    "kolektorsdd": ProfileTraining(1280, 512, seg_crop=256),
}


@dataclass
class TrainConfig:
    profile: str
    data_root: Path
    out: Path
    epochs: int = 40
    seed: int = 0
    max_minutes: float = 9.0
    synthetic_fraction: float | None = None  # None: 0.25 for steel, 0 elsewhere
    steps_per_epoch: int = 40
    gate_batch: int = 48
    seg_batch: int = 8
    lr: float = 3e-3
    model_size: str = "small"
    threads: int = 2
    limit_images: int | None = None  # tests: use only the first N train/val images
    # train the gate only and take the segmenter (best_seg.pt) from this earlier run of the same
    # profile, data normalisation and segmenter layers: a gate experiment costs the gate's time only
    seg_from: Path | None = None
    command: str = ""
    progress: bool = True
    # The learning rate follows max(share of steps, share of --max-minutes) so a run cut by the clock
    # still anneals; that makes the schedule depend on timing. False: steps only, bit-reproducible.
    clock_schedule: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved_synthetic_fraction(self) -> float:
        if self.synthetic_fraction is not None:
            return self.synthetic_fraction
        return 0.25 if PROFILE_TRAINING[self.profile].synthetic else 0.0


# -- augmentation and windows ------------------------------------------------------------------


def augment(image: np.ndarray, masks: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Line-camera drift on one window: gain, offset, a ramp across it, flips. Masks follow flips."""
    img = image.astype(np.float32)
    gain = rng.uniform(0.8, 1.2)
    offset = rng.uniform(-20.0, 20.0)
    ramp = np.linspace(-1.0, 1.0, img.shape[1], dtype=np.float32) * rng.uniform(-10.0, 10.0)
    mean = float(img.mean())
    img = (img - mean) * gain + mean + offset + ramp[None, :]
    img = np.clip(np.rint(img), 0, 255)
    if rng.random() < 0.5:
        img, masks = img[:, ::-1], masks[:, :, ::-1]
    if rng.random() < 0.5:
        img, masks = img[::-1, :], masks[:, ::-1, :]
    return np.ascontiguousarray(img), np.ascontiguousarray(masks)


def window(image: np.ndarray, masks: np.ndarray, size: int, rng: np.random.Generator | None,
           centre: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A size x size window (edge-padded where the image is smaller): random placement with rng,
    around `centre` (y, x) when given (jittered by up to a quarter window), else the middle."""
    h, w = image.shape
    ph, pw = max(0, size - h), max(0, size - w)
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw)), mode="edge")
        masks = np.pad(masks, ((0, 0), (0, ph), (0, pw)))
        h, w = image.shape
    if centre is not None:
        cy, cx = centre
        if rng is not None:
            cy += rng.uniform(-size / 4, size / 4)
            cx += rng.uniform(-size / 4, size / 4)
        y = int(min(max(0, round(cy - size / 2)), h - size))
        x = int(min(max(0, round(cx - size / 2)), w - size))
    elif rng is not None:
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    else:
        y, x = (h - size) // 2, (w - size) // 2
    return image[y : y + size, x : x + size], masks[:, y : y + size, x : x + size]


def _random_mask_pixel(masks: np.ndarray, rng: np.random.Generator) -> tuple[float, float] | None:
    ys, xs = np.nonzero(masks.any(axis=0))
    if ys.size == 0:
        return None
    i = int(rng.integers(ys.size))
    return float(ys[i]), float(xs[i])


def sample_masks(sample: Sample) -> np.ndarray:
    """bool [K,H,W]: the masks, or the boxes rasterised for box-only data (NEU)."""
    return sample.masks if sample.masks is not None else datasets.boxes_to_masks(sample)


# -- data pools ----------------------------------------------------------------------------------


@dataclass
class Pools:
    """Everything one training run draws from, held in memory (the datasets are small)."""

    classes: tuple[str, ...]
    seg_defective: list[tuple[np.ndarray, np.ndarray]]  # (image, masks) whole images
    seg_clean: list[tuple[np.ndarray, np.ndarray]]  # defect-free whole images or clean crops
    gate_pos: list[tuple[np.ndarray, np.ndarray]]  # (crop, labels)
    gate_neg: list[np.ndarray]  # crops
    synth: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (frame, masks)

    def summary(self) -> dict[str, int]:
        return {"seg_defective": len(self.seg_defective), "seg_clean": len(self.seg_clean),
                "gate_pos": len(self.gate_pos), "gate_neg": len(self.gate_neg), "synth_frames": len(self.synth)}


def build_pools(samples: list[Sample], classes: tuple[str, ...], crop: int, clean: dict[str, int],
                rng: np.random.Generator) -> Pools:
    if not samples:
        raise TrainError("no images to train on")
    for s in samples:
        if s.image.ndim != 2:
            raise TrainError(f"{s.source}: expected a grey image, got shape {s.image.shape}")
    full = [Sample(s.image, sample_masks(s), s.boxes, s.labels, s.classes, s.source) for s in samples]
    defective = [s for s in full if s.labels.any()]
    defect_free = [s for s in full if not s.labels.any()]
    gate_pos = [(c.image, c.labels) for c in datasets.defect_crops(defective, crop, max_per_image=GATE_POSITIVES_PER_IMAGE)
                if c.labels.any()]
    settings = {k: v for k, v in clean.items() if k != "size"}
    negs = datasets.clean_crops(full, clean["size"], **settings)
    gate_neg = [c.image for c in negs if c.shape == (crop, crop)]
    for s in defect_free:  # whole defect-free images: random windows too
        h, w = s.shape
        if h >= crop and w >= crop:
            for _ in range(4):
                y, x = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
                gate_neg.append(s.image[y : y + crop, x : x + crop])
    seg_clean = [(s.image, s.masks) for s in defect_free]
    if not defect_free:  # NEU: the clean crops with empty masks stand in
        seg_clean = [(c.image, np.zeros((len(classes),) + c.shape, bool)) for c in negs]
    if not gate_pos or not gate_neg:
        raise TrainError(f"gate needs positives and negatives: {len(gate_pos)} defect crops, {len(gate_neg)} clean crops")
    return Pools(classes, [(s.image, s.masks) for s in defective], seg_clean, gate_pos, gate_neg)


def synthetic_frames(classes: tuple[str, ...], n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """n generated 1600x256 frames, three in four defective (training.synth)."""
    from training.synth import StripGenerator

    gen = StripGenerator(classes=classes, seed=seed)
    return [gen.frame(i, defective=(i % 4 != 3)) for i in range(n)]


# -- batches -------------------------------------------------------------------------------------


def gate_batch(pools: Pools, n: int, crop: int, synth_fraction: float, rng: np.random.Generator,
               aug: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """n crops, half positive (half of those defect_crops, half fresh windows centred on a random
    defect pixel); a synth_fraction of them cut from synthetic frames."""
    k = len(pools.classes)
    xs = np.empty((n, 1, crop, crop), np.float32)
    ys = np.zeros((n, k), np.float32)
    for i in range(n):
        positive = rng.random() < 0.5
        if pools.synth and rng.random() < synth_fraction:
            frame, masks = pools.synth[int(rng.integers(len(pools.synth)))]
            centre = _random_mask_pixel(masks, rng) if positive else None
            img, m = window(frame, masks, crop, rng, centre)
            label = m.any(axis=(1, 2)).astype(np.float32)
        elif positive and rng.random() < 0.5:
            # a fresh window around a random defect pixel: many more distinct positives than the
            # fixed defect_crops, which a small gate memorises on small data (magnetic tile)
            image, masks = pools.seg_defective[int(rng.integers(len(pools.seg_defective)))]
            img, m = window(image, masks, crop, rng, _random_mask_pixel(masks, rng))
            label = m.any(axis=(1, 2)).astype(np.float32)
            if not label.any():
                img, label = pools.gate_pos[int(rng.integers(len(pools.gate_pos)))]
                m = np.zeros((k,) + img.shape, bool)
        elif positive:
            img, label = pools.gate_pos[int(rng.integers(len(pools.gate_pos)))]
            m = np.zeros((k,) + img.shape, bool)
        else:
            img, label = pools.gate_neg[int(rng.integers(len(pools.gate_neg)))], np.zeros(k, np.float32)
            m = np.zeros((k,) + img.shape, bool)
        if aug:
            img, m = augment(img, m, rng)
        xs[i, 0] = img
        ys[i] = label
    return xs, ys


def seg_batch(pools: Pools, n: int, crop: int, synth_fraction: float, rng: np.random.Generator,
              defective_rate: float = 0.75, aug: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """n windows; defective images drawn `defective_rate` of the time, centred on a defect
    pixel half of those times. Returns images [n,1,crop,crop] and bool masks [n,K,crop,crop]."""
    k = len(pools.classes)
    xs = np.empty((n, 1, crop, crop), np.float32)
    ms = np.zeros((n, k, crop, crop), bool)
    for i in range(n):
        if pools.synth and rng.random() < synth_fraction:
            image, masks = pools.synth[int(rng.integers(len(pools.synth)))]
        elif rng.random() < defective_rate or not pools.seg_clean:
            image, masks = pools.seg_defective[int(rng.integers(len(pools.seg_defective)))]
        else:
            image, masks = pools.seg_clean[int(rng.integers(len(pools.seg_clean)))]
        centre = _random_mask_pixel(masks, rng) if rng.random() < 0.5 else None
        img, m = window(image, masks, crop, rng, centre)
        if aug:
            img, m = augment(img, m, rng)
        xs[i, 0] = img
        ms[i] = m
    return xs, ms


def fixed_val_set(pools: Pools, crop_gate: int, crop_seg: int, seed: int, n_gate: int = 256, n_seg: int = 64):
    """The validation batches, drawn once with a fixed seed and no augmentation (real data only)."""
    rng = np.random.default_rng([seed, 7])
    real = Pools(pools.classes, pools.seg_defective, pools.seg_clean, pools.gate_pos, pools.gate_neg)
    return gate_batch(real, n_gate, crop_gate, 0.0, rng, aug=False), seg_batch(real, n_seg, crop_seg, 0.0, rng, aug=False)


# -- losses ----------------------------------------------------------------------------------------


def seg_target(masks, stride: int = 4):
    """bool [N,K,H,W] -> fraction of mask pixels per stride x stride cell, float [N,K,H/s,W/s]."""
    import torch
    from torch.nn import functional as F

    return F.avg_pool2d(torch.as_tensor(masks, dtype=torch.float32), stride)


def seg_loss(logits, target):
    import torch
    from torch.nn import functional as F

    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(0, 2, 3))
    denom = p.sum(dim=(0, 2, 3)) + target.sum(dim=(0, 2, 3))
    dice = 1.0 - (2.0 * inter + 1.0) / (denom + 1.0)
    return bce + dice.mean()


def learning_rate(peak: float, progress: float, warmup: float = 0.05) -> float:
    """Linear warm-up then cosine decay to 2 % of peak; progress in [0, 1] is the larger of the
    share of steps done and the share of --max-minutes spent, so a run cut by the clock still
    ends on a small learning rate (on a shared CPU the step rate varies)."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return peak * (0.1 + 0.9 * progress / warmup)
    t = (progress - warmup) / (1.0 - warmup)
    return peak * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * t)))


def pos_weight(pools: Pools) -> np.ndarray:
    """Per-class negatives / positives among gate crops, clipped to [1, 20]."""
    labels = np.stack([lab for _, lab in pools.gate_pos])
    pos = labels.sum(axis=0)
    neg = len(pools.gate_neg) + len(pools.gate_pos) - pos
    return np.clip(neg / np.maximum(pos, 1.0), 1.0, 20.0).astype(np.float32)


# -- the run -----------------------------------------------------------------------------------------


def _load(profile: str, root: Path, split: str, limit: int | None) -> list[Sample]:
    ds = datasets.load_profile_dataset(profile, root, split)
    if limit is not None:
        ds = ds[:limit]
    return list(ds)


def _seg_source(cfg: TrainConfig, classes: tuple[str, ...], mean: float, std: float) -> dict[str, Any]:
    """Check that --seg-from's segmenter fits this run; returns what meta.json records of it."""
    from training.nets import CONFIGS, ModelConfig

    src = Path(cfg.seg_from)
    if src.resolve() == Path(cfg.out).resolve():
        raise TrainError(f"--seg-from {src} is this run's own --out; name the earlier run")
    meta_path, weights = src / META_FILE, src / "best_seg.pt"
    if not meta_path.is_file() or not weights.is_file():
        raise TrainError(f"--seg-from {src}: needs {META_FILE} and best_seg.pt written by `coilsight train`")
    m = json.loads(meta_path.read_text())
    theirs = ModelConfig.from_dict(m.get("model_config", {}))
    ours = CONFIGS[cfg.model_size]
    seg_fields = [f for f in ModelConfig.__dataclass_fields__ if f.startswith("seg_")]
    differ = [f for f in seg_fields if getattr(theirs, f) != getattr(ours, f)]
    problems = []
    if m.get("profile") != cfg.profile or tuple(m.get("classes", ())) != tuple(classes):
        problems.append(f"profile/classes {m.get('profile')} {m.get('classes')} vs {cfg.profile} {list(classes)}")
    if differ:
        problems.append(f"segmenter layers differ ({', '.join(differ)}) from size {cfg.model_size!r}")
    if (m.get("mean"), m.get("std")) != (mean, std):
        problems.append(f"normalisation mean/std {m.get('mean')}/{m.get('std')} vs {mean}/{std} (other data?)")
    if "seg" not in m.get("best", {}):
        problems.append("its meta.json records no best segmenter")
    if problems:
        raise TrainError(f"--seg-from {src}: " + "; ".join(problems))
    return {"run": str(src), "command": m.get("command", ""), "model_size": m.get("model_size"),
            "best": m["best"]["seg"], "minutes": m.get("minutes")}


def train(cfg: TrainConfig, *, data_loader: Callable[[str], list[Sample]] | None = None) -> dict[str, Any]:
    """Train both models (the gate alone with `cfg.seg_from`); returns the run summary also written
    to `<out>/meta.json`.

    data_loader(split) -> samples replaces the shared data (tests); split is "train" or "val".
    """
    import torch

    from training.nets import CONFIGS, build_models

    if cfg.profile not in PROFILE_TRAINING:
        raise TrainError(f"unknown profile {cfg.profile!r}; known: {', '.join(PROFILE_TRAINING)}")
    if cfg.model_size not in CONFIGS:
        raise TrainError(f"unknown model size {cfg.model_size!r}; known: {', '.join(CONFIGS)}")
    frac = cfg.resolved_synthetic_fraction()
    if not 0.0 <= frac <= 1.0:
        raise TrainError(f"synthetic fraction must be in [0, 1], got {frac}")
    if cfg.epochs < 1 or cfg.steps_per_epoch < 1 or cfg.max_minutes <= 0:
        raise TrainError(f"epochs {cfg.epochs} and steps per epoch {cfg.steps_per_epoch} must be >= 1, "
                         f"max minutes {cfg.max_minutes} > 0")
    prof = PROFILE_TRAINING[cfg.profile]
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    started = time.monotonic()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    load = data_loader or (lambda split: _load(cfg.profile, Path(cfg.data_root), split, cfg.limit_images))
    train_samples, val_samples = load("train"), load("val")
    if not val_samples:
        raise TrainError(f"profile {cfg.profile}: the val split is empty; cannot pick the best checkpoint")
    classes = train_samples[0].classes if train_samples else datasets.PROFILE_CLASSES[cfg.profile]
    clean = datasets.clean_crop_settings()
    crop = clean["size"]
    pools = build_pools(train_samples, classes, crop, clean, rng)
    val_pools = build_pools(val_samples, classes, crop, clean, np.random.default_rng([cfg.seed, 3]))
    if frac > 0:
        pools.synth = synthetic_frames(classes, SYNTHETIC_FRAMES, seed=cfg.seed)
    pixels = np.concatenate([s.image.ravel()[::97] for s in train_samples]).astype(np.float64)
    mean, std = round(float(pixels.mean() / 255.0), 4), round(max(0.05, float(pixels.std() / 255.0)), 4)
    log.info("training_data_ready", profile=cfg.profile, **pools.summary(), val=val_pools.summary(), mean=mean, std=std)

    gate, seg = build_models(len(classes), 1, mean, std, cfg.model_size)
    seg_source = _seg_source(cfg, classes, mean, std) if cfg.seg_from is not None else None
    if seg_source is not None:
        seg.load_state_dict(torch.load(Path(cfg.seg_from) / "best_seg.pt", map_location="cpu", weights_only=True))
        shutil.copyfile(Path(cfg.seg_from) / "best_seg.pt", out / "best_seg.pt")
    opt_g = torch.optim.AdamW(gate.parameters(), lr=cfg.lr, weight_decay=1e-4)
    opt_s = torch.optim.AdamW(seg.parameters(), lr=cfg.lr, weight_decay=1e-4)
    total_steps = cfg.epochs * cfg.steps_per_epoch
    pw = torch.as_tensor(pos_weight(pools))
    (vg_x, vg_y), (vs_x, vs_m) = fixed_val_set(val_pools, crop, prof.seg_crop, cfg.seed)
    vg_x, vg_y, vs_x = torch.as_tensor(vg_x), torch.as_tensor(vg_y), torch.as_tensor(vs_x)
    vs_t = seg_target(vs_m)

    meta: dict[str, Any] = {
        "profile": cfg.profile, "classes": list(classes), "mean": mean, "std": std,
        "model_size": cfg.model_size, "model_config": CONFIGS[cfg.model_size].to_dict(),
        "seed": cfg.seed, "epochs": cfg.epochs, "steps_per_epoch": cfg.steps_per_epoch,
        "synthetic_fraction": frac, "seg_crop": prof.seg_crop, "gate_crop": crop,
        "clean_crops": clean, "data": str(cfg.data_root), "command": cfg.command,
        "pools": pools.summary(), "history": [], "best": {}, "minutes": 0.0,
    }
    if seg_source is not None:
        meta["seg_from"] = seg_source
        meta["best"]["seg"] = dict(seg_source["best"])
    state_path = out / STATE_FILE
    start_epoch = 0
    best = {"gate": math.inf, "seg": math.inf if seg_source is None else float(seg_source["best"]["val_loss"])}
    spent_before = 0.0
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state.get("profile") != cfg.profile or state.get("model_size") != cfg.model_size:
            raise TrainError(f"{state_path}: checkpoint is for profile {state.get('profile')!r} size "
                             f"{state.get('model_size')!r}, not {cfg.profile!r} {cfg.model_size!r}; use another --out")
        gate.load_state_dict(state["gate"])
        seg.load_state_dict(state["seg"])
        opt_g.load_state_dict(state["opt_gate"])
        opt_s.load_state_dict(state["opt_seg"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        start_epoch = state["epoch"] + 1
        best = state["best"]
        meta["history"] = state.get("history", [])
        spent_before = float(state.get("minutes", 0.0))
        log.info("training_resumed", checkpoint=str(state_path), epoch=start_epoch)

    from tqdm import tqdm

    bce_gate = torch.nn.BCEWithLogitsLoss(pos_weight=pw)
    fixed_val_seg = None  # a gate-only run: the segmenter never changes, so neither does its val loss
    if seg_source is not None:
        seg.eval()
        with torch.no_grad():
            fixed_val_seg = float(seg_loss(seg.logits(vs_x), vs_t))
    stop_reason = "epochs"
    for epoch in range(start_epoch, cfg.epochs):
        gate.train()
        if seg_source is None:
            seg.train()
        run_g = run_s = 0.0
        bar = tqdm(range(cfg.steps_per_epoch), desc=f"{cfg.profile} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not cfg.progress, leave=False)
        for step in bar:
            done = (epoch * cfg.steps_per_epoch + step) / total_steps
            elapsed = (spent_before + (time.monotonic() - started) / 60.0) / cfg.max_minutes if cfg.clock_schedule else 0.0
            rate = learning_rate(cfg.lr, max(done, elapsed))
            for opt in (opt_g, opt_s):
                for group in opt.param_groups:
                    group["lr"] = rate
            gx, gy = gate_batch(pools, cfg.gate_batch, crop, frac, rng)
            loss_g = bce_gate(gate.logits(torch.as_tensor(gx)), torch.as_tensor(gy))
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
            run_g += float(loss_g.detach())
            if seg_source is None:
                sx, sm = seg_batch(pools, cfg.seg_batch, prof.seg_crop, frac, rng)
                loss_s = seg_loss(seg.logits(torch.as_tensor(sx)), seg_target(sm))
                opt_s.zero_grad()
                loss_s.backward()
                opt_s.step()
                run_s += float(loss_s.detach())
            bar.set_postfix(gate=f"{loss_g.item():.3f}", seg=f"{run_s / (step + 1):.3f}")
        gate.eval()
        seg.eval()
        with torch.no_grad():
            val = {"gate": float(bce_gate(gate.logits(vg_x), vg_y)),
                   "seg": fixed_val_seg if seg_source is not None else float(seg_loss(seg.logits(vs_x), vs_t))}
        minutes = spent_before + (time.monotonic() - started) / 60.0
        row = {"epoch": epoch + 1, "train_gate": run_g / cfg.steps_per_epoch, "train_seg": run_s / cfg.steps_per_epoch,
               "val_gate": val["gate"], "val_seg": val["seg"], "minutes": round(minutes, 2)}
        meta["history"].append(row)
        for role, model in (("gate", gate), ("seg", seg)):
            if role == "seg" and seg_source is not None:
                continue  # the segmenter is the source run's, unchanged
            if val[role] < best[role]:
                best[role] = val[role]
                torch.save(model.state_dict(), out / f"best_{role}.pt")
                meta["best"][role] = {"epoch": epoch + 1, "val_loss": val[role]}
        torch.save({"profile": cfg.profile, "model_size": cfg.model_size, "epoch": epoch, "gate": gate.state_dict(),
                    "seg": seg.state_dict(), "opt_gate": opt_g.state_dict(), "opt_seg": opt_s.state_dict(),
                    "rng": rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(), "best": best, "history": meta["history"],
                    "minutes": minutes}, state_path)
        log.info("epoch_done", **row)
        if cfg.progress:
            print(f"epoch {epoch + 1}: train gate {row['train_gate']:.4f} seg {row['train_seg']:.4f} | "
                  f"val gate {val['gate']:.4f} seg {val['seg']:.4f} | {minutes:.1f} min", flush=True)
        meta["minutes"] = round(minutes, 2)
        meta["stopped"] = "running"
        (out / META_FILE).write_text(json.dumps(meta, indent=1))  # a killed run can still be exported
        if minutes >= cfg.max_minutes * 0.98:
            stop_reason = "max_minutes"
            break
    meta["stopped"] = stop_reason
    meta["best"] = {r: {"val_loss": v, **meta["best"].get(r, {})} for r, v in best.items()}
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return meta
