"""The steel gate on line-size textured strip: train, calibrate and measure it on whole 1600x256 frames.

The shipped steel gate was calibrated on NEU windows, and on a textured coil it passed 396 of 400
clean frames (issue 17): its score is the maximum over ~100 windows of a frame, and texture, roll
lines, drift and stains light up some window in nearly every frame. Here the gate meets what it
will see on the line:

- negatives: whole defect-free frames of training.strip.RealisticStripGenerator (multi-scale
  texture, roll lines, illumination drift, vignetting, sensor noise), with more stains (oil, water
  marks) than the generator's default, so the hard negatives are in every batch;
- positives: the same kind of clean frames with 1-2 real NEU-DET defects composited in
  (``composite``: the defect's box, its level taken off, feathered at the edge, at a random place,
  scale and contrast); the NEU split (engines.datasets rule) of the defect follows the frame's split.

Splits are generator seeds (coils) and NEU splits: train coils ``SEEDS['train'] + c``, val coils
``SEEDS['val'] + c``, test coils ``SEEDS['test'] + c``; NEU train / val / test images respectively.
Training fine-tunes the shipped gate's weights (taken back from its gate.onnx, training.onnx_weights)
on frames pooled as the agent pools them (engines.modelpack.pool_frames, ``input_pool``), with the
per-class frame loss the gate is read by (max over the logit map, BCE). The threshold is chosen on
val frames for frame recall ``RECALL_TARGET`` over the composited positives; the figures beside it:
the pass rate of clean textured val/test frames, and the recall on the generator's own defective
frames (small and low-contrast defects included), for the record.

Also in the mix, by option: plain strip frames (``plain``: training.synth, what camera-sim, the demo
and the bench paint on) and real NEU-DET images with their defect-free crops (``neu``). The recall the
threshold is chosen for counts the composited frames whose defect the pack's segmenter reports
(``reported_by_segmenter``), and ``neu_figures`` holds a candidate to the real NEU val images.
"""
from __future__ import annotations

import dataclasses

import json
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog

from training.strip import RealisticStripGenerator

log = structlog.get_logger(__name__)

WIDTH, HEIGHT = 1600, 256
SEEDS = {"train": 17_000, "val": 27_000, "test": 37_000}  # first coil seed of each split
FRAMES_PER_COIL = 50
STAINS_PER_FRAME = 2.0  # the generator's default is 1.2: more hard negatives
PLAIN_SEED_OFFSET = 500  # plain strip (training.synth) of a split: seed SEEDS[split] + 500, never the bench's or demo's
PLAIN_VAL_START = 1000  # training's plain val frames; gate_strip_ship.measure reads plain val frames 0..
RECALL_TARGET = 0.99


class GateStripError(RuntimeError):
    """Training or calibrating the textured-strip gate cannot go on; the message says why."""


def clean_frame(split: str, i: int) -> np.ndarray:
    """Defect-free textured frame i of a split (uint8 [256, 1600]); coil i // FRAMES_PER_COIL."""
    coil, index = divmod(int(i), FRAMES_PER_COIL)
    gen = _generator(SEEDS[split] + coil)
    return gen.frame(index, False).image


def plain_frame(split: str, i: int) -> np.ndarray:
    """Defect-free plain strip frame i of a split: training.synth, what camera-sim, the demo and the
    bench paint on (uint8 [256, 1600]). A gate trained on textured strip alone passed half of these."""
    return _plain_generator(split).frame(int(i), False)[0]


def _plain_generator(split: str):
    """The split's plain strip generator (training.synth, seed SEEDS[split] + PLAIN_SEED_OFFSET), one per split."""
    from training.synth import StripGenerator

    seed = SEEDS[split] + PLAIN_SEED_OFFSET
    if seed not in _PLAIN:
        _PLAIN[seed] = StripGenerator(WIDTH, HEIGHT, seed=seed)
    return _PLAIN[seed]


_PLAIN: dict[int, Any] = {}  # one plain generator per split


def generated_defective_frame(split: str, i: int):
    """The generator's own defective frame i (its defects: NEU-like drawers, small and faint ones)."""
    coil, index = divmod(int(i), FRAMES_PER_COIL)
    return _generator(SEEDS[split] + coil).frame(index, True)


_GENS: dict[int, RealisticStripGenerator] = {}

OWN_MEASURE_START = 2000  # gate_strip_ship.measure's own-defect frames; training's val reads 0..


def own_defective(split: str, n: int, start: int = 0) -> tuple[np.ndarray, list[list[tuple]]]:
    """n defective frames with the generators' own defects (not NEU's): even frames from the textured
    generator (generated_defective_frame: NEU-like drawers, small and faint ones), odd frames from the
    plain strip (training.synth, what camera-sim, the demo and the bench paint on), indices start.. of
    the split. uint8 [n, 256, 1600] and each frame's boxes (class, x0, y0, x1, y1). A gate chosen on
    pasted NEU defects alone stopped 5 % of these that the segmenter reports."""
    imgs, boxes = [], []
    for j in range(int(n)):
        i = int(start) + j
        if j % 2 == 0:
            f = generated_defective_frame(split, i)
            imgs.append(f.image)
            boxes.append(f.instances())
        else:
            img, _, inst = _plain_generator(split).frame_with_instances(i, True)
            imgs.append(img)
            boxes.append([tuple(int(v) for v in b) for b in inst])
    return np.stack(imgs), boxes


def box_labels(boxes: list[list[tuple]], k: int) -> np.ndarray:
    """float32 [N, k]: 1 where a frame holds a box of that class."""
    out = np.zeros((len(boxes), k), np.float32)
    for n, frame_boxes in enumerate(boxes):
        for b in frame_boxes:
            out[n, int(b[0])] = 1.0
    return out


def joint_threshold(positives: dict[str, np.ndarray], clean: np.ndarray, target: float = RECALL_TARGET,
                    targets: dict[str, float] | None = None) -> dict[str, Any]:
    """The highest threshold with recall >= target over each set of positive scores (the lowest of
    their own thresholds; ``targets`` gives a set another recall, e.g. the NEU floor for real NEU
    images), the recall of each set and the clean pass rate at it."""
    sets = {k: v for k, v in positives.items() if len(v)}
    if not sets:
        raise GateStripError("need positive frames")
    targets = targets or {}
    t = min(threshold_and_pass_rate(v, clean, targets.get(k, target))["threshold"] for k, v in sets.items())
    return {"threshold": t, "recalls": {k: round(float((v >= t).mean()), 6) for k, v in sets.items()},
            "pass_rate_clean": round(float((clean >= t).mean()), 6)}


def _generator(seed: int) -> RealisticStripGenerator:
    if seed not in _GENS:
        if len(_GENS) > 64:
            _GENS.clear()
        _GENS[seed] = RealisticStripGenerator(WIDTH, HEIGHT, seed=seed, stains_per_frame=STAINS_PER_FRAME)
    return _GENS[seed]


def defect_patches(samples) -> list[tuple[int, np.ndarray]]:
    """(class, float32 delta patch) per NEU box: the box's pixels minus the image's defect-free level
    (the median outside every box, else the image median), with a few pixels of margin."""
    out = []
    for s in samples:
        img = s.image.astype(np.float32)
        h, w = img.shape[:2]
        inside = np.zeros((h, w), bool)
        for b in s.boxes:
            inside[int(b.y0):int(np.ceil(b.y1)), int(b.x0):int(np.ceil(b.x1))] = True
        level = float(np.median(img[~inside])) if (~inside).sum() > 0.1 * h * w else float(np.median(img))
        for b in s.boxes:
            x0, y0 = max(0, int(b.x0) - 3), max(0, int(b.y0) - 3)
            x1, y1 = min(w, int(np.ceil(b.x1)) + 3), min(h, int(np.ceil(b.y1)) + 3)
            if x1 - x0 >= 6 and y1 - y0 >= 6:
                out.append((int(b.cls), img[y0:y1, x0:x1] - level))
    if not out:
        raise GateStripError("no NEU defect boxes to composite")
    return out


def composite(frame: np.ndarray, patches: list[tuple[int, np.ndarray]], rng: np.random.Generator, k: int,
              n: int | None = None) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int, int, int]]]:
    """Paste 1-2 NEU defects into a clean frame: each patch scaled by 0.6-1.2, its contrast by
    0.7-1.2, feathered over its outer 4 px, added at a random place. Returns the frame, the frame's
    class labels (float32 [k]) and the pasted boxes (class, x0, y0, x1, y1)."""
    img = frame.astype(np.float32)
    h, w = img.shape
    labels = np.zeros(k, np.float32)
    boxes = []
    for _ in range(n or int(rng.choice([1, 1, 2]))):
        cls, patch = patches[int(rng.integers(len(patches)))]
        s = rng.uniform(0.6, 1.2)
        ph, pw = max(6, int(round(patch.shape[0] * s))), max(6, int(round(patch.shape[1] * s)))
        ph, pw = min(ph, h - 2), min(pw, w - 2)
        p = cv2.resize(patch, (pw, ph), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
        if rng.random() < 0.5:
            p = p[:, ::-1]
        if rng.random() < 0.5:
            p = p[::-1]
        fy = np.minimum(np.arange(ph), np.arange(ph)[::-1]).astype(np.float32)
        fx = np.minimum(np.arange(pw), np.arange(pw)[::-1]).astype(np.float32)
        feather = np.clip(np.minimum(fy[:, None], fx[None, :]) / 4.0, 0.0, 1.0)
        y0, x0 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        img[y0:y0 + ph, x0:x0 + pw] += p * feather * rng.uniform(0.7, 1.2)
        labels[cls] = 1.0
        boxes.append((cls, x0, y0, x0 + pw, y0 + ph))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), labels, boxes


def visibility(clean: np.ndarray, pasted: np.ndarray, boxes) -> float:
    """How visible the most visible pasted defect of a frame is: over each box, the 95th percentile of
    the change the paste made, over the std of the clean frame's fine texture there (the frame minus
    its Gaussian blur, sigma 4 px). Under ~1 the defect hides in the texture; 0 for a clean frame."""
    if not boxes:
        return 0.0
    c = clean.astype(np.float32)
    fine = c - cv2.GaussianBlur(c, (0, 0), 4.0)
    delta = np.abs(pasted.astype(np.float32) - c)
    return float(max(np.percentile(delta[y0:y1, x0:x1], 95) / max(float(fine[y0:y1, x0:x1].std()), 0.5)
                     for _, x0, y0, x1, y1 in boxes))


def frames(split: str, n_clean: int, n_pos: int, patches, k: int, seed: int = 0, start: int = 0,
           with_boxes: bool = False, with_visibility: bool = False, background: str = "textured"):
    """n_clean clean frames then n_pos composited ones (frame indices start.. of the split): uint8
    [N, 256, 1600] and labels [N, k] (and, with_boxes, each frame's pasted boxes; with_visibility,
    each frame's ``visibility``). The positives use other frame indices than the negatives.
    ``background``: "textured" (clean_frame) or "plain" (plain_frame)."""
    if background not in ("textured", "plain"):
        raise GateStripError(f"background {background!r}: expected 'textured' or 'plain'")
    clean_frame_of = clean_frame if background == "textured" else plain_frame
    rng = np.random.default_rng([seed, SEEDS[split]] + ([PLAIN_SEED_OFFSET] if background == "plain" else []))
    imgs, labels, boxes, vis = [], [], [], []
    for i in range(n_clean):
        imgs.append(clean_frame_of(split, start + i))
        labels.append(np.zeros(k, np.float32))
        boxes.append([])
        vis.append(0.0)
    for i in range(n_pos):
        clean = clean_frame_of(split, start + n_clean + i)
        img, lab, b = composite(clean, patches, rng, k)
        imgs.append(img)
        labels.append(lab)
        boxes.append(b)
        vis.append(visibility(clean, img, b) if with_visibility else 0.0)
    out = [np.stack(imgs), np.stack(labels)]
    if with_boxes:
        out.append(boxes)
    if with_visibility:
        out.append(np.array(vis, np.float32))
    return tuple(out)


def cell_targets(boxes: list[list[tuple]], shape: tuple[int, int], cell: int) -> np.ndarray:
    """Dense targets of the gate's logit map (cells of ``cell`` frame px): 1 where a pasted defect
    covers at least a quarter of the cell, 255 (ignored) where it touches the cell less, else 0.
    uint8 [N, h, w]."""
    h, w = shape
    out = np.zeros((len(boxes), h, w), np.uint8)
    for n, frame_boxes in enumerate(boxes):
        for _, x0, y0, x1, y1 in frame_boxes:
            for r in range(max(0, y0 // cell), min(h, -(-y1 // cell))):
                for c in range(max(0, x0 // cell), min(w, -(-x1 // cell))):
                    ov = (min(y1, (r + 1) * cell) - max(y0, r * cell)) * (min(x1, (c + 1) * cell) - max(x0, c * cell))
                    if ov >= 0.25 * cell * cell:
                        out[n, r, c] = 1
                    elif out[n, r, c] == 0:
                        out[n, r, c] = 255
    return out


def pooled(x: np.ndarray, pool: int) -> np.ndarray:
    from engines.modelpack import pool_frames

    return pool_frames(x[:, None], pool)


def onnx_frame_scores(path: Path, x_pooled: np.ndarray, threads: int = 1) -> np.ndarray:
    """A gate.onnx's frame scores (max over classes) of pooled uint8 frames [N, 1, h, w], 8 a call."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"image": x_pooled[i:i + 8]})[0]
                           for i in range(0, len(x_pooled), 8)]).max(axis=1)


REPORTED_IOU = 0.1  # an event "reports" a pasted defect when their boxes overlap at least this much (IoU)


def reported_by_segmenter(pack_dir: Path, x: np.ndarray, boxes: list[list[tuple]], threads: int = 1) -> np.ndarray:
    """Per frame (uint8 [N, H, W], its defect boxes (class, x0, y0, x1, y1)): does the pack's
    segmenter alone, ungated, at its calibrated thresholds, make an event (engines.postprocess, as
    the agent does) whose box overlaps one of the frame's defects with IoU >= REPORTED_IOU? A
    frame without a defect is False. What the gate must not hide is what the pipeline would report."""
    from engines.modelpack import load_calibration, load_model_pack
    from engines.postprocess import extract_defects, extract_instances
    from engines.runner import PackRunner
    from metrics.instances import box_iou

    pack = load_model_pack(Path(pack_dir))
    cal = load_calibration(pack)
    out = np.zeros(len(x), bool)
    with PackRunner(pack, threads=threads, max_batch=1, roles=("seg",)) as models:
        for i in range(len(x)):
            if not boxes[i]:
                continue
            one = {k: v[0] for k, v in models.seg_outputs(np.ascontiguousarray(x[i][None, None]), "gate_strip").items()}
            if pack.seg.instances is not None:
                events = extract_instances(one, pack.seg.instances, pack.seg.output, pack.seg.output_stride,
                                           pack.classes, cal.classes, x[i].shape)
            else:
                events = extract_defects(one[pack.seg.output], pack.classes, cal.classes, pack.seg.output_stride,
                                         x[i].shape)
            if events:
                iou = box_iou([b[1:] for b in boxes[i]], [e.bbox_px for e in events])
                out[i] = bool(iou.max() >= REPORTED_IOU)
    return out


NEU_RECALL_FLOOR = 0.98  # a line-frame gate must still pass this share of real NEU val images at its threshold


def image_scores(gate_onnx: Path, images: list, pool: int, threads: int = 1) -> np.ndarray:
    """The gate's frame scores of images of any sizes (each size batched apart, pooled as the gate takes them)."""
    by_shape: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        by_shape.setdefault(np.shape(im), []).append(i)
    out = np.zeros(len(images), np.float64)
    for idx in by_shape.values():
        x = np.stack([np.asarray(images[i], np.uint8) for i in idx])
        out[idx] = onnx_frame_scores(gate_onnx, pooled(x, pool), threads)
    return out


def neu_figures(gate_onnx: Path, pack_dir: Path, data_root: Path, threshold: float, pool: int, split: str = "val",
                threads: int = 1) -> dict[str, Any]:
    """The gate on real steel at ``threshold``: its recall over the NEU-DET images of ``split`` (every
    one holds a defect) and the pass rate of their defect-free crops (training.datasets.clean_crops with
    the pack's settings, as ``coilsight evaluate`` takes them), frames pooled as the gate takes them.
    Textured strip is made here; NEU's backgrounds are real steel: a gate tuned on the one must not
    lose the other."""
    samples, crops = _neu_split(pack_dir, data_root, split)
    pos = image_scores(gate_onnx, [s.image for s in samples], pool, threads)
    neg = image_scores(gate_onnx, [c.image for c in crops], pool, threads)
    return {"split": split, "threshold": threshold, "recall": round(float((pos >= threshold).mean()), 6),
            "pass_rate_clean_crops": round(float((neg >= threshold).mean()), 6), "n_images": len(pos),
            "n_clean_crops": len(neg),
            "what": "NEU-DET images (each holds a defect) and their defect-free crops, real steel backgrounds"}


# -- the gate's net ------------------------------------------------------------------------------

def _neu_split(pack_dir: Path, data_root: Path, split: str) -> tuple[list, list]:
    """The NEU-DET images of a split and their defect-free crops, cut with the pack's clean-crop
    settings (training.datasets.clean_crops), as ``coilsight evaluate`` and the calibration take them."""
    from training.datasets import clean_crop_settings, clean_crops
    from training.datasets.profiles import load_profile_dataset

    settings = clean_crop_settings(json.loads((Path(pack_dir) / "model.json").read_text()).get("training"))
    ds = load_profile_dataset("steel", data_root, split)
    samples = [ds[i] for i in range(len(ds))]
    return samples, clean_crops(samples, settings["size"], stride=settings["stride"], margin=settings["margin"],
                                max_per_image=settings["max_per_image"])


def _neu_arrays(pack_dir: Path, data_root: Path, pool: int) -> dict[str, np.ndarray]:
    """NEU-DET train images with their labels and train clean crops (the pack's clean-crop settings),
    and the val images and crops, pooled as the gate takes them (uint8 [N, 1, h, w]); images of
    another size than the first are left out (NEU's are all 200x200)."""
    out = {}
    for split, key in (("train", ""), ("val", "val_")):
        samples, crops = _neu_split(pack_dir, data_root, split)
        shape = np.shape(samples[0].image)
        same = [s for s in samples if np.shape(s.image) == shape]
        if not crops:
            raise GateStripError(f"no defect-free crops in the NEU {split} images")
        out[f"{key}x"] = pooled(np.stack([np.asarray(s.image, np.uint8) for s in same]), pool)
        out[f"{key}y"] = np.stack([np.asarray(s.labels, np.float32) for s in same])
        out[f"{key}crops"] = pooled(np.stack([np.asarray(c.image, np.uint8) for c in crops]), pool)
    return out


def pack_gate_pool(pack_dir: Path) -> int:
    """The pool the pack's gate takes (model.json ``input_pool``), read through the pack loader, which
    checks the pack (files, sha256, format) and says what is wrong with it."""
    from engines.modelpack import ModelPackError, load_model_pack

    try:
        gate = load_model_pack(Path(pack_dir)).models.get("gate")
    except ModelPackError as exc:
        raise GateStripError(str(exc)) from None
    if gate is None:
        raise GateStripError(f"{pack_dir}: the pack has no gate")
    return gate.input_pool


def load_gate(pack_dir: Path, sample_pooled: np.ndarray):
    """The pack's gate as a training.nets.Gate with the weights of its gate.onnx (a PrePooledGate
    graph: the pack pools the frames before it, model.json ``input_pool``); its largest difference
    from ONNX Runtime on the sample."""
    from training.nets import CONFIGS, Gate, ModelConfig, PrePooledGate
    from training.onnx_weights import load_from_onnx

    doc = json.loads((Path(pack_dir) / "model.json").read_text())
    entry = doc["models"]["gate"]
    pool = pack_gate_pool(pack_dir)
    # an instance pack that kept its earlier gate (export --gate-from) records that gate's config apart
    mc = doc["training"].get("gate_model_config", doc["training"].get("model_config"))
    if isinstance(mc, dict):  # an instance pack's model_config also holds its segmenter's keys: the gate's only
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        config = ModelConfig.from_dict({k: v for k, v in mc.items() if k.startswith("gate_") and k in known})
    else:
        config = CONFIGS[doc["training"]["model_size"]]
    if pool < 2 or config.gate_pool != pool:
        raise GateStripError(f"{pack_dir}: expected a gate exported without its {config.gate_pool}x pool "
                             f"(input_pool {pool})")
    gate = Gate(len(doc["classes"]), 1, doc["input"]["mean"], doc["input"]["std"], config)
    diff = load_from_onnx(gate, Path(pack_dir) / entry["file"], sample_pooled, PrePooledGate(gate), prefix="gate.")
    return gate, pool, diff


def with_pool(gate, pool: int):
    """The same gate (same weights) taking frames pooled ``pool`` x ``pool``: a new Gate whose config
    differs in gate_pool only; the gate itself when it already takes that pool."""
    from training.nets import Gate

    if gate.config.gate_pool == pool:
        return gate
    out = Gate(gate.head.out_channels, 1, gate.norm.mean, gate.norm.std,  # the steel gate reads grey frames
               dataclasses.replace(gate.config, gate_pool=pool))
    out.load_state_dict(gate.state_dict())
    return out.train(gate.training)


def grow(gate, name: str):
    """The pack's gate grown into the net ``CONFIGS[name]`` (training.nets), e.g. ``ctxgate``: the same
    stem, blocks and head with the gate's weights, plus the layers the config adds (context blocks
    that start as the identity). The grown gate computes what the pack's gate computes until
    training moves it. A config whose shared layers differ in shape cannot grow from it."""
    from training.nets import CONFIGS, Gate

    if name not in CONFIGS:
        raise GateStripError(f"gate config {name!r}: not one of {', '.join(sorted(CONFIGS))}")
    config = dataclasses.replace(CONFIGS[name], gate_pool=gate.config.gate_pool)
    out = Gate(gate.head.out_channels, 1, gate.norm.mean, gate.norm.std, config)
    have, want = gate.state_dict(), out.state_dict()
    wrong = [k for k in have if k not in want or want[k].shape != have[k].shape]
    if wrong:
        raise GateStripError(f"gate config {name!r} does not grow from the pack's gate: its layers {wrong[:3]} "
                             "differ (widths, block or tail)")
    out.load_state_dict(have, strict=False)
    return out.train(gate.training)


def _scores(gate, x: np.ndarray, batch: int = 16) -> np.ndarray:
    """Frame scores (max over classes and the map, sigmoid) of pooled frames [N, 1, h, w]."""
    import torch

    gate.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            logits = gate.pooled_logit_map(torch.from_numpy(x[i:i + batch])).amax(dim=(2, 3))
            out.append(torch.sigmoid(logits).numpy())
    return np.concatenate(out)


def threshold_and_pass_rate(pos_scores: np.ndarray, clean_scores: np.ndarray, target: float = RECALL_TARGET
                            ) -> dict[str, Any]:
    """The highest threshold with frame recall >= target over the positives, and the pass rate of the
    clean frames at it (a frame passes when its score >= threshold)."""
    pos = np.sort(pos_scores)
    if not len(pos) or not len(clean_scores):
        raise GateStripError("need positive and clean frames")
    t = float(pos[int(np.floor((1.0 - target) * len(pos)))])
    return {"threshold": t, "recall": round(float((pos_scores >= t).mean()), 6),
            "pass_rate_clean": round(float((clean_scores >= t).mean()), 6),
            "n_positive": int(len(pos_scores)), "n_clean": int(len(clean_scores))}


STRIP_PASS_GOAL = 0.1  # the line tier's target; a checkpoint under it on both strips is judged on real steel next


def checkpoint_key(v: dict[str, Any]) -> tuple:
    """What best.pt minimises over a run's val figures: NEU val recall under NEU_RECALL_FLOOR first;
    then the clean pass rate, the worse of textured and plain strip, where it is above
    STRIP_PASS_GOAL; then, among checkpoints under it, the pass rate of NEU's defect-free crops (real
    steel: a gate that passes fewer of them is the one that could gate a real strip); then the strip
    pass rate itself and the higher threshold. Figures a run does not measure count as 0 (NEU recall 1)."""
    strip = max(v["pass_rate_clean"], v.get("pass_rate_clean_plain", 0.0))
    return (int(v.get("neu_recall", 1.0) < NEU_RECALL_FLOOR), strip if strip > STRIP_PASS_GOAL else 0.0,
            v.get("neu_pass_rate_clean_crops", 0.0), strip, -v["threshold"])


def train(out: Path, pack_dir: Path, data_root: Path, *, minutes: float = 20.0, steps: int = 4000,
          threads: int = 1, n_clean: int = 600, n_pos: int = 600, n_val: int = 200, batch: int = 8,
          lr: float = 1e-3, seed: int = 0, dense: float = 1.0, hard: float = 0.0, init_run: Path | None = None,
          input_pool: int | None = None, plain: float = 0.0, neu: float = 0.0, own: float = 0.0,
          config: str | None = None, reported_only: bool = False, neu_in_threshold: bool = False,
          neu_target: float = NEU_RECALL_FLOOR, command: str = "") -> dict[str, Any]:
    """Fine-tune the pack's gate on whole textured frames (see the module doc); keeps best.pt, the
    weights whose val figures at the recall-target threshold have the lowest checkpoint_key. ``input_pool``: the
    pool the trained gate takes (default: the pack's); the same weights see a finer frame at 1 (thin
    streaks keep their contrast) for 4x the gate's arithmetic. ``plain``: add plain strip
    (plain_frame) frames, this share of n_clean clean and of n_pos composited, to the training set;
    val then also measures plain clean frames at the threshold, and checkpoint_key reads the
    worse of the two clean pass rates (a gate must gate on both kinds of strip). ``neu``: the share of
    steps that also train on real NEU-DET train images (positives) and their defect-free crops
    (negatives), and val then reads the NEU val images' recall at the threshold: a checkpoint below
    NEU_RECALL_FLOOR there is chosen only when none reaches it. Val recall counts the composited
    frames the pack's segmenter reports (reported_by_segmenter), as gate_strip_ship.measure does.
    ``own``: add the generators' own defective frames (own_defective: textured and plain strip, their
    own defect drawers), this share of n_pos, as positives; val then chooses the threshold for recall
    on the reported frames of both kinds (joint_threshold) and reports ``recall_own``. ``config``: grow
    the pack's gate into that training.nets config first (``grow``: e.g. ``ctxgate``, two context
    blocks that widen its view), so the run starts at the pack's gate with room to learn more.
    ``reported_only``: train on the defective frames whose defect the pack's segmenter reports
    (reported_by_segmenter, as val counts recall) and leave out the rest; a pasted or drawn defect
    too faint for the segmenter, labelled a positive, teaches the gate to fire on bare texture.
    ``neu_in_threshold`` (with ``own`` and ``neu``): val's threshold also keeps NEU_RECALL_FLOOR of the
    real NEU val images (``neu_target``, e.g. what the shipped gate passes), as ``measure`` chooses it, so
    checkpoints are compared at the threshold they would ship with."""
    import torch
    from torch.nn import functional as F

    from training.datasets.profiles import load_profile_dataset
    from training.lines import cached, learning_rate, write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t0 = time.monotonic()
    doc = json.loads((Path(pack_dir) / "model.json").read_text())
    k = len(doc["classes"])
    pack_pool = pack_gate_pool(pack_dir)
    pool = pack_pool if input_pool is None else int(input_pool)
    if pool not in (1, 2, 4):
        raise GateStripError(f"input pool {pool}: expected 1, 2 or 4")

    if not 0.0 <= plain <= 4.0:
        raise GateStripError(f"plain {plain}: expected a share in 0..4")
    if not 0.0 <= neu <= 1.0:
        raise GateStripError(f"neu {neu}: expected a share of steps in 0..1")
    if not 0.0 <= own <= 4.0:
        raise GateStripError(f"own {own}: expected a share in 0..4")

    from engines.modelpack import load_model_pack

    seg_tag = load_model_pack(Path(pack_dir)).seg.sha256[:12]
    rep_tag = f"_reported_{seg_tag}" if reported_only else ""

    def draw(split, nc, npos, background="textured", start=0, report=False):
        ds = load_profile_dataset("steel", data_root, split)
        patches = defect_patches([ds[i] for i in range(len(ds))])
        x, y, b = frames(split, nc, npos, patches, k, seed=seed, with_boxes=True, background=background, start=start)
        out = [pooled(x, pool), y, cell_targets(b, (HEIGHT // cell, WIDTH // cell), cell)]
        return out + [reported_by_segmenter(pack_dir, x, b, threads)] if report else out

    def kept(arrays):  # reported_only: the clean frames and the defective ones the segmenter reports
        if not reported_only:
            return arrays
        *data, rep = arrays
        keep = (data[1].max(axis=1) == 0) | rep.astype(bool)
        return [a[keep] for a in data]

    probe, _, _ = load_gate(pack_dir, pooled(clean_frame("val", 0)[None], pack_pool))
    probe = with_pool(probe, pool)
    with torch.no_grad():
        cell = HEIGHT // int(probe.pooled_logit_map(torch.zeros(1, 1, HEIGHT // pool, WIDTH // pool)).shape[2])
    xs, ys, cs = kept(cached(out / f"train_{n_clean}_{n_pos}_cells{rep_tag}.npz",
                             lambda: draw("train", n_clean, n_pos, report=reported_only)))
    vx, vy, _ = cached(out / f"val_{n_val}_cells.npz", lambda: draw("val", n_val, n_val))
    n_plain_clean, n_plain_pos = int(round(plain * n_clean)), int(round(plain * n_pos))
    plain_vx = None
    if n_plain_clean or n_plain_pos:
        px, py, pc = kept(cached(out / f"train_plain_{n_plain_clean}_{n_plain_pos}_cells{rep_tag}.npz",
                                 lambda: draw("train", n_plain_clean, n_plain_pos, "plain", report=reported_only)))
        xs, ys, cs = np.concatenate([xs, px]), np.concatenate([ys, py]), np.concatenate([cs, pc])
        plain_vx, = cached(out / f"val_plain_{n_val}.npz",
                           lambda: draw("val", n_val, 0, "plain", PLAIN_VAL_START)[:1])
    n_own = int(round(own * n_pos))
    if n_own:
        def draw_own():
            x, b = own_defective("train", n_own)
            arrays = [pooled(x, pool), box_labels(b, k), cell_targets(b, (HEIGHT // cell, WIDTH // cell), cell)]
            return arrays + [reported_by_segmenter(pack_dir, x, b, threads)] if reported_only else arrays

        ox, oy, oc = kept(cached(out / f"train_own_{n_own}_cells{rep_tag}.npz", draw_own))
        xs, ys, cs = np.concatenate([xs, ox]), np.concatenate([ys, oy]), np.concatenate([cs, oc])
    log.info("gate_strip_frames", train=len(xs), val=len(vx), cell=cell, seconds=round(time.monotonic() - t0, 1))
    gate, _, diff = load_gate(pack_dir, pooled(np.stack([clean_frame("val", i) for i in range(4)]), pack_pool))
    gate = with_pool(gate, pool)
    if config is not None:
        gate = grow(gate, config)
    if init_run is not None:  # go on from an earlier run's best weights (same pack, same net)
        gate.load_state_dict(torch.load(Path(init_run) / "best.pt", map_location="cpu", weights_only=True))
    log.info("gate_strip_weights_from_pack", max_abs_diff=diff)
    vpos = vy.max(axis=1) > 0

    def draw_val_reported():  # the same val frames, full size, with their boxes, through the pack's segmenter
        ds = load_profile_dataset("steel", data_root, "val")
        x, _, b = frames("val", n_val, n_val, defect_patches([ds[i] for i in range(len(ds))]), k, seed=seed,
                         with_boxes=True)
        return [reported_by_segmenter(pack_dir, x, b, threads)]

    vrep, = cached(out / f"val_{n_val}_reported_{seg_tag}.npz", draw_val_reported)
    vpos_rep = vpos & vrep.astype(bool)
    if not vpos_rep.any():
        raise GateStripError("the pack's segmenter reports none of the composited val frames' defects")
    neu_data = _neu_arrays(pack_dir, data_root, pool) if neu > 0 else None
    own_vx = None
    if n_own:
        def draw_own_val():  # the generators' own defects, val frames 0.., with what the segmenter reports
            x, b = own_defective("val", n_val)
            return [pooled(x, pool), reported_by_segmenter(pack_dir, x, b, threads)]

        own_vx, own_rep = cached(out / f"val_own_{n_val}_reported_{seg_tag}.npz", draw_own_val)
        own_rep = own_rep.astype(bool)
        if not own_rep.any():
            raise GateStripError("the pack's segmenter reports none of the generators' own val defects")

    def val_figures():
        s = _scores(gate, vx).max(axis=1)
        neu_s = _scores(gate, neu_data["val_x"]).max(axis=1) if neu_data is not None else None
        v = threshold_and_pass_rate(s[vpos_rep], s[~vpos])
        if own_vx is not None:  # the threshold must keep both kinds of defect the segmenter reports
            sets = {"composited": s[vpos_rep], "own": _scores(gate, own_vx).max(axis=1)[own_rep]}
            if neu_s is not None and neu_in_threshold:  # and real NEU val images at neu_target
                sets["neu"] = neu_s
            jt = joint_threshold(sets, s[~vpos], targets={"neu": neu_target})
            v.update(threshold=jt["threshold"], recall=jt["recalls"]["composited"], recall_own=jt["recalls"]["own"],
                     pass_rate_clean=jt["pass_rate_clean"], n_own=int(own_rep.sum()))
        v["recall_all"] = round(float((s[vpos] >= v["threshold"]).mean()), 6)
        if plain_vx is not None:
            v["pass_rate_clean_plain"] = round(float((_scores(gate, plain_vx).max(axis=1) >= v["threshold"]).mean()), 6)
        if neu_data is not None:
            v["neu_recall"] = round(float((neu_s >= v["threshold"]).mean()), 6)
            v["neu_pass_rate_clean_crops"] = round(float(
                (_scores(gate, neu_data["val_crops"]).max(axis=1) >= v["threshold"]).mean()), 6)
        return v

    def write_meta(step: int, best: dict[str, Any], finished: bool) -> dict[str, Any]:
        """meta.json beside best.pt: the run's settings, best and history so far. Written at every new
        best with ``finished`` False, so that measure and ship can read a run stopped from outside."""
        meta = {"what": "steel gate fine-tuned on textured strip frames (training/gate_strip.py)",
                "pack": str(pack_dir), "finished": finished,
                "config": dataclasses.asdict(gate.config), "classes": doc["classes"], "input_pool": pool,
                "mean": doc["input"]["mean"], "std": doc["input"]["std"], "seeds": SEEDS,
                "frames_per_coil": FRAMES_PER_COIL, "stains_per_frame": STAINS_PER_FRAME,
                "train_frames": {"clean": n_clean, "composited": n_pos, "plain_clean": n_plain_clean,
                                 "plain_composited": n_plain_pos},
                "val_frames": {"clean": n_val, "composited": n_val, "plain_clean": n_val if plain_vx is not None else 0},
                "plain_seed_offset": PLAIN_SEED_OFFSET, "neu": neu, "own_frames": n_own,
                "reported_only": reported_only, "train_frames_kept": len(xs), "neu_in_threshold": neu_in_threshold,
                "neu_target": neu_target,
                "val_recall_of": f"composited val frames the pack's segmenter reports (IoU >= {REPORTED_IOU})",
                "steps": step, "batch": batch, "lr": lr, "seed": seed, "threads": threads, "dense": dense,
                "hard": hard, "init_run": "RUN of the earlier stage" if init_run else None,
                "minutes": round((time.monotonic() - t0) / 60.0, 2), "start": start, "best": best,
                "history": history, "command": command}
        write_json(out / "meta.json", meta)
        return meta

    start = val_figures()
    log.info("gate_strip_val", step=0, **start)
    best = {**start, "step": 0}
    torch.save(gate.state_dict(), out / "best.pt")
    history = [best]
    write_meta(0, best, finished=False)
    opt = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=1e-4)
    pos_idx, neg_idx = np.flatnonzero(ys.max(axis=1) > 0), np.flatnonzero(ys.max(axis=1) == 0)
    t_train = time.monotonic()
    step = 0
    for step in range(1, steps + 1):
        if hard > 0 and (step - 1) % 200 == 0:  # hard examples: the lowest-scored positives, highest-scored clean
            ts = _scores(gate, xs).max(axis=1)
            hard_pos = pos_idx[np.argsort(ts[pos_idx])[:max(1, len(pos_idx) // 5)]]
            hard_neg = neg_idx[np.argsort(-ts[neg_idx])[:max(1, len(neg_idx) // 5)]]
        if hard > 0 and rng.random() < hard:
            idx = np.concatenate([rng.choice(hard_pos, batch // 2), rng.choice(hard_neg, batch - batch // 2)])
        else:
            idx = np.concatenate([rng.choice(pos_idx, batch // 2), rng.choice(neg_idx, batch - batch // 2)])
        xb, cb = xs[idx], cs[idx]
        if rng.random() < 0.5:
            xb, cb = xb[..., ::-1], cb[..., ::-1]
        if rng.random() < 0.5:
            xb, cb = xb[..., ::-1, :], cb[..., ::-1, :]
        for g in opt.param_groups:
            g["lr"] = learning_rate(lr, step - 1, steps, (time.monotonic() - t_train) / 60.0, minutes)
        gate.train()
        lmap = gate.pooled_logit_map(torch.from_numpy(np.ascontiguousarray(xb)))  # [B, K, h, w]
        logits = lmap.amax(dim=(2, 3))
        yb = torch.from_numpy(ys[idx])
        loss = F.binary_cross_entropy_with_logits(logits, yb) + F.binary_cross_entropy_with_logits(
            logits.amax(dim=1), yb.amax(dim=1))  # per class, and the frame's score the gate is read by
        # dense: every cell of the any-defect map, positives and negatives weighed apart (a gradient for
        # every cell, not only the frame's maximum)
        if dense > 0:
            t = torch.from_numpy(np.ascontiguousarray(cb))
            cell_bce = F.binary_cross_entropy_with_logits(lmap.amax(dim=1), (t == 1).float(), reduction="none")
            pos_c, neg_c = t == 1, t == 0
            loss = loss + dense * ((cell_bce * pos_c).sum() / pos_c.sum().clamp(min=1)
                                   + (cell_bce * neg_c).sum() / neg_c.sum().clamp(min=1))
        if neu_data is not None and rng.random() < neu:  # real steel: NEU images (defects) and clean crops
            i1 = rng.integers(len(neu_data["x"]), size=max(1, batch // 2))
            i2 = rng.integers(len(neu_data["crops"]), size=max(1, batch - batch // 2))
            li = gate.pooled_logit_map(torch.from_numpy(neu_data["x"][i1])).amax(dim=(2, 3))
            lc = gate.pooled_logit_map(torch.from_numpy(neu_data["crops"][i2])).amax(dim=(2, 3))
            yi = torch.from_numpy(neu_data["y"][i1])
            zero = torch.zeros_like(lc)
            loss = loss + (F.binary_cross_entropy_with_logits(li, yi)
                           + F.binary_cross_entropy_with_logits(li.amax(dim=1), yi.amax(dim=1))
                           + F.binary_cross_entropy_with_logits(lc, zero)
                           + F.binary_cross_entropy_with_logits(lc.amax(dim=1), zero.amax(dim=1)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        over = (time.monotonic() - t_train) / 60.0 >= minutes
        if step % 100 == 0 or step == steps or over:
            v = val_figures()
            history.append({**v, "step": step, "loss": round(float(loss.detach()), 5)})
            log.info("gate_strip_val", step=step, loss=round(float(loss.detach()), 4), **v)
            if checkpoint_key(v) < checkpoint_key(best):
                best = {**v, "step": step}
                torch.save(gate.state_dict(), out / "best.pt")
                write_meta(step, best, finished=False)
        if over:
            break
    return write_meta(step, best, finished=True)


if __name__ == "__main__":
    from training.gate_strip_ship import main

    raise SystemExit(main())
