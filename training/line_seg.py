"""Chip dies and painted parts: one segmenter per line trained on generated samples, its gate the same
graph's per-class maximum, thresholds chosen on the val seed for defect-level F1.

A line (``SegLine``) says how to draw a sample in the model's view (image HWC uint8, masks [K, h,
w]), the frame the camera sends (``frame``; parts: the view upsampled by ``input_pool``), the net's
width and the crop it trains on. Training: a fixed pool of generated train samples, random crops
(centred on a defect half of the time), flips; loss BCE + soft Dice on the masks max-pooled to the
output stride 2. The checkpoint kept is the one with the lowest loss on fixed val crops.

Defect-level matching (``match``): a predicted defect (a connected component over its class's
pixel threshold and min area, engines/postprocess.py, exactly as the agent makes events) matches a
true defect of its class when their boxes overlap at IoU >= ``iou``, one to one, best IoU first.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import structlog

from engines.modelpack import MODEL_PACK_FORMAT, load_calibration, load_model_pack
from engines.portable import portable_tree
from training.lines import (LineError, cached, gate_figures, gate_threshold_for_recall, learning_rate, model_entry,
                            now_iso, write_json)

log = structlog.get_logger(__name__)

NET_STRIDE = 2
RECALL_TARGET = 0.99


@dataclass(frozen=True)
class SegLine:
    profile: str
    classes: tuple[str, ...]
    channels: int
    height: int  # nominal camera frame
    width: int
    input_pool: int
    seeds: dict[str, int]
    view: Callable[[str, int], tuple[np.ndarray, np.ndarray, list]]  # (split, i) -> image HWC, masks [K,h,w], boxes
    frame: Callable[[np.ndarray], np.ndarray]  # model view -> camera frame
    data: str  # what the card says the data is
    crop: int = 128
    width_net: int = 16
    iou: float = 0.3
    extra: dict = field(default_factory=dict)


def _targets(masks: np.ndarray) -> np.ndarray:
    """[N, K, h, w] bool -> float targets at the net's output stride: any defect pixel in the cell."""
    n, k, h, w = masks.shape
    return masks.reshape(n, k, h // NET_STRIDE, NET_STRIDE, w // NET_STRIDE, NET_STRIDE).any(axis=(3, 5)).astype(
        np.float32)


def _crop(img: np.ndarray, masks: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    if masks.any() and rng.random() < 0.5:
        # centred on a class drawn evenly among those present, so small defects (dots) are seen as often as large
        present = np.flatnonzero(masks.reshape(len(masks), -1).any(axis=1))
        ys, xs = np.nonzero(masks[int(rng.choice(present))])
        j = int(rng.integers(len(ys)))
        y0 = int(np.clip(ys[j] - rng.integers(16, size - 16), 0, h - size))
        x0 = int(np.clip(xs[j] - rng.integers(16, size - 16), 0, w - size))
    else:
        y0, x0 = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    ci, cm = img[y0:y0 + size, x0:x0 + size], masks[:, y0:y0 + size, x0:x0 + size]
    if rng.random() < 0.5:
        ci, cm = ci[:, ::-1], cm[:, :, ::-1]
    if rng.random() < 0.5:
        ci, cm = ci[::-1], cm[:, ::-1]
    return ci, cm


def stats(line: SegLine, images: list[np.ndarray]) -> tuple[list[float], list[float]]:
    x = np.stack(images).astype(np.float32) / 255.0
    axes = tuple(range(x.ndim - 1))
    return [round(float(v), 4) for v in x.mean(axis=axes)], [round(max(float(v), 0.02), 4) for v in x.std(axis=axes)]


def train(line: SegLine, out: Path, *, seed: int = 0, minutes: float = 12.0, threads: int = 2, steps: int = 2000,
          command: str = "", pool: int = 400, val: int = 48, batch: int = 12, init_from: Path | None = None,
          lr: float = 3e-3) -> dict[str, Any]:
    import torch

    from training.nets_lines import DefectSegNet

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t0 = time.monotonic()
    pool, val = min(pool, steps * batch), min(val, max(8, steps))  # never draw more than the run can use
    def draw():
        views = [line.view("train", i)[:2] for i in range(pool)]
        return [np.stack([v[0] for v in views]), np.stack([v[1] for v in views])]

    images, masks = cached(out / f"pool_{pool}.npz", draw)
    train_set = list(zip(images, masks))
    val_rng = np.random.default_rng(12345)
    val_set = [_crop(*line.view("val", i)[:2], line.crop, val_rng) for i in range(val)]
    mean, std = stats(line, [s[0] for s in train_set[:64]])
    log.info("line_samples_generated", profile=line.profile, train=pool, val=val, seconds=round(time.monotonic() - t0, 1))
    net = DefectSegNet(line.channels, len(line.classes), width=line.width_net,
                       mean=mean, std=std)
    if init_from is not None:  # continue an earlier run's best weights (same line, width, normalisation)
        prev = json.loads((Path(init_from) / "meta.json").read_text())
        mean, std = prev["mean"], prev["std"]
        net = DefectSegNet(line.channels, len(line.classes), width=line.width_net, mean=mean, std=std)
        net.load_state_dict(torch.load(Path(init_from) / "best.pt", map_location="cpu", weights_only=True))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    vx = torch.from_numpy(np.stack([np.ascontiguousarray(c[0].transpose(2, 0, 1)) for c in val_set]))
    vy = torch.from_numpy(_targets(np.stack([c[1] for c in val_set])))
    best = {"val_loss": float("inf"), "step": 0}
    history = []
    t_train = time.monotonic()
    step = 0
    for step in range(1, steps + 1):
        crops = [_crop(*train_set[int(rng.integers(pool))], line.crop, rng) for _ in range(batch)]
        x = torch.from_numpy(np.stack([np.ascontiguousarray(c[0].transpose(2, 0, 1)) for c in crops]))
        y = torch.from_numpy(_targets(np.stack([np.ascontiguousarray(c[1]) for c in crops])))
        for g in opt.param_groups:
            g["lr"] = learning_rate(lr, step - 1, steps, (time.monotonic() - t_train) / 60.0, minutes)
        net.train()
        loss = _loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        over = (time.monotonic() - t_train) / 60.0 >= minutes
        if step % 100 == 0 or step == steps or over:
            net.eval()
            with torch.no_grad():
                vl = float(sum(_loss(net(vx[i:i + 16]), vy[i:i + 16]) * len(vx[i:i + 16]) for i in range(0, len(vx), 16))
                           / len(vx))
            history.append({"step": step, "loss": round(float(loss.detach()), 5), "val_loss": round(vl, 5)})
            log.info("line_val", profile=line.profile, step=step, loss=round(float(loss.detach()), 4), val_loss=round(vl, 4))
            if vl < best["val_loss"]:
                best = {"val_loss": round(vl, 5), "step": step}
                torch.save(net.state_dict(), out / "best.pt")
        if over:
            break
    meta = {"profile": line.profile, "classes": list(line.classes), "mean": mean, "std": std, "seed": seed,
            "seeds": line.seeds, "train_samples": pool, "val_crops": val, "crop": line.crop, "steps": step,
            "batch": batch, "width": line.width_net, "minutes": round((time.monotonic() - t0) / 60.0, 2),
            "best": best, "history": history, "command": command, "threads": threads,
            "init_from": str(init_from) if init_from else None, "lr": lr}
    write_json(out / "meta.json", meta)
    return meta


def _loss(logits, y):
    import torch
    from torch.nn import functional as F

    bce = F.binary_cross_entropy_with_logits(logits, y, pos_weight=torch.tensor(4.0), reduction="none")
    # per class, the mean over its positive and its negative cells apart: a class of a few pixels (dots)
    # weighs as much as one of many
    pos = y > 0.5
    per = (bce * pos).sum(dim=(0, 2, 3)) / pos.sum(dim=(0, 2, 3)).clamp(min=1) \
        + (bce * ~pos).sum(dim=(0, 2, 3)) / (~pos).sum(dim=(0, 2, 3)).clamp(min=1)
    bce = per.mean()
    p = torch.sigmoid(logits)
    inter = (p * y).sum(dim=(0, 2, 3))
    dice = 1 - (2 * inter + 1) / (p.sum(dim=(0, 2, 3)) + y.sum(dim=(0, 2, 3)) + 1)
    return bce + dice.mean()


def export(line: SegLine, run: Path, out: Path) -> dict[str, Any]:
    import warnings

    import onnxruntime as ort
    import torch

    from training.nets_lines import ONNX_OPSET, DefectSegNet, GateFromSeg, SegProbs

    run, out = Path(run), Path(out)
    if not (run / "meta.json").is_file() or not (run / "best.pt").is_file():
        raise LineError(f"{run}: no meta.json / best.pt; is this the --out folder of `coilsight train --profile "
                        f"{line.profile}`?")
    meta = json.loads((run / "meta.json").read_text())
    if meta.get("profile") != line.profile:
        raise LineError(f"{run}: a {meta.get('profile')!r} run, not a {line.profile} run")
    net = DefectSegNet(line.channels, len(line.classes), width=meta["width"],
                       mean=meta["mean"], std=meta["std"])
    net.load_state_dict(torch.load(run / "best.pt", map_location="cpu", weights_only=True))
    net.eval()
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    diffs = {}
    entries = {}
    for role, model, output in (("gate", GateFromSeg(net), "scores"), ("seg", SegProbs(net), "probs")):
        model.eval()
        path = out / f"{role}.onnx"
        dummy = torch.from_numpy(rng.integers(0, 256, (2, line.channels, 64, 96), dtype=np.uint8))
        axes = {"image": {0: "N", 2: "H", 3: "W"}, output: {0: "N"}}
        if output == "probs":
            axes[output].update({2: "H_out", 3: "W_out"})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (dummy,), str(path), input_names=["image"], output_names=[output],
                              opset_version=ONNX_OPSET, dynamic_axes=axes, do_constant_folding=True, dynamo=False)
        model.eval()
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        worst = 0.0
        for shape in ((2, line.channels, 64, 96), (1, line.channels, 128, 160)):
            x = rng.integers(0, 256, shape, dtype=np.uint8)
            with torch.no_grad():
                ref = model(torch.from_numpy(x)).numpy()
            worst = max(worst, float(np.abs(sess.run([output], {"image": x})[0] - ref).max()))
        if not worst < 1e-4:
            raise LineError(f"{path.name}: ONNX Runtime differs from torch by {worst:.3g} (limit 1e-4)")
        diffs[role] = worst
        extra: dict[str, Any] = {"input_pool": line.input_pool} if line.input_pool > 1 else {}
        if role == "seg":
            extra["output_stride"] = NET_STRIDE * line.input_pool
        entries[role] = model_entry(path, output, **extra)
    doc = {
        "format": MODEL_PACK_FORMAT, "profile": line.profile, "classes": list(line.classes),
        "input": {"channels": line.channels, "height": line.height, "width": line.width, "dtype": "uint8",
                  "layout": "NCHW", "mean": float(np.mean(meta["mean"])), "std": float(np.mean(meta["std"])),
                  "mean_per_channel": meta["mean"], "std_per_channel": meta["std"]},
        "models": entries,
        "training": {
            "data": line.data,
            "split": f"generator seeds: train {line.seeds['train']} ({meta['train_samples']} samples, random "
                     f"{meta['crop']} px crops), val {line.seeds['val']} (best checkpoint, thresholds), test "
                     f"{line.seeds['test']} (reported figures only)",
            "seeds": line.seeds, "command": meta.get("command", ""), "seed": meta["seed"], "minutes": meta["minutes"],
            "epochs_run": f"{meta['steps']} steps of {meta['batch']}", "best": meta["best"],
            "model_size": f"DefectSegNet width {meta['width']}; gate = the same graph's per-class max",
            "model_config": {"width": meta["width"], "net_stride": NET_STRIDE, "onnx_opset": ONNX_OPSET},
        },
        "max_abs_diff": diffs,
    }
    doc["training"] = portable_tree(doc["training"])  # no paths of this machine in a shipped file
    write_json(out / "model.json", doc)
    load_model_pack(out)
    return doc


# -- running a pack on generated samples --------------------------------------------------------

def run_pack(pack_dir: Path, frames: list[np.ndarray], threads: int = 2, calibration=None
             ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Gate scores [N, K] and seg probs (one [K, h, w] per frame) for camera frames, as the agent feeds them."""
    from engines.runner import PackRunner, stack_images

    pack = load_model_pack(pack_dir)
    scores, probs = [], []
    with PackRunner(pack, threads=threads, max_batch=4) as runner:
        for i in range(0, len(frames), 4):
            x = stack_images(pack, frames[i:i + 4])
            scores.append(runner.gate(x))
            probs.extend(runner.seg(x))
    return np.concatenate(scores), probs


def detections(probs: np.ndarray, classes, thresholds, stride: int, frame_hw) -> list[tuple[int, tuple, float]]:
    from engines.postprocess import extract_defects

    return [(d.class_id, d.bbox_px, d.confidence)
            for d in extract_defects(probs, tuple(classes), thresholds, stride, frame_hw, max_defects=100)]


def iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match(truth: list[tuple[int, tuple]], pred: list[tuple[int, tuple, float]], k: int, min_iou: float
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class TP, FP, FN of one frame, one-to-one matching at IoU >= min_iou, best pairs first."""
    tp, fp, fn = np.zeros(k, int), np.zeros(k, int), np.zeros(k, int)
    for c in range(k):
        t = [b for cls, b in truth if cls == c]
        p = [b for cls, b, _ in pred if cls == c]
        pairs = sorted(((iou(a, b), i, j) for i, a in enumerate(t) for j, b in enumerate(p)), reverse=True)
        used_t, used_p = set(), set()
        for v, i, j in pairs:
            if v < min_iou:
                break
            if i not in used_t and j not in used_p:
                used_t.add(i)
                used_p.add(j)
        tp[c] += len(used_t)
        fn[c] += len(t) - len(used_t)
        fp[c] += len(p) - len(used_p)
    return tp, fp, fn


def _f1(tp, fp, fn):
    return np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 1.0)


def calibrate(line: SegLine, pack_dir: Path, *, n: int = 120, threads: int = 2,
              pixel_grid=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8), area_grid=(0, 8, 16, 32, 64),
              gate_below_classes: bool = False) -> dict[str, Any]:
    """Gate threshold for frame recall RECALL_TARGET, per class the (pixel threshold, min area) with the best
    defect-level F1 on the val seed's frames.

    ``gate_below_classes``: the class thresholds are chosen without the gate, and the gate threshold is
    then the lower of the recall threshold and the lowest class pixel threshold, so the gate never hides
    a defect the segmenter reports (the gate is the segmenter's per-class maximum, so a frame with a
    component over its class's threshold always passes)."""
    from engines.modelpack import ClassThreshold

    pack = load_model_pack(pack_dir)
    views = [line.view("val", i) for i in range(n)]
    frames = [line.frame(v[0]) for v in views]
    truth = [v[2] for v in views]
    scores, probs = run_pack(pack_dir, frames, threads)
    stride = pack.seg.output_stride
    defective = np.array([bool(t) for t in truth])
    gate_recall_t = gate_threshold_for_recall(defective, scores.max(axis=1), RECALL_TARGET)
    gate_t = 0.0 if gate_below_classes else gate_recall_t
    k = len(pack.classes)
    classes = {}
    for c, name in enumerate(pack.classes):
        best = None
        for t in pixel_grid:
            for a in area_grid:
                th = {nm: ClassThreshold(t, a) for nm in pack.classes}
                tp = fp = fn = 0
                for j, f in enumerate(frames):
                    if scores[j].max() < gate_t:
                        pred = []
                    else:
                        pred = detections(probs[j], pack.classes, th, stride, f.shape[:2])
                    r = match(truth[j], pred, k, line.iou)
                    tp, fp, fn = tp + r[0][c], fp + r[1][c], fn + r[2][c]
                f1 = float(_f1(np.array(tp), np.array(fp), np.array(fn)))
                if best is None or f1 > best[0] + 1e-9:
                    best = (f1, t, a, int(tp), int(fp), int(fn))
        f1, t, a, tp, fp, fn = best
        classes[name] = {"pixel_threshold": t, "min_area_px": a, "defect_f1": round(f1, 6), "tp": tp, "fp": fp,
                         "fn": fn, "n_positive_images": int(sum(any(cl == c for cl, _ in tr) for tr in truth)),
                         "n_images": n, "calibrated": True}
    chosen_by = "frames"
    if gate_below_classes:
        gate_t = min(gate_recall_t, min(c["pixel_threshold"] for c in classes.values()))
        chosen_by = (f"frames, capped at the lowest class pixel threshold (recall threshold {gate_recall_t:.6g}), so "
                     "the gate never hides a reported defect")
    doc = {"format": 1, "profile": line.profile, "models": {r: m.sha256 for r, m in pack.models.items()},
           "gate": {"threshold": gate_t, "recall_target": RECALL_TARGET,
                    **gate_figures(defective, scores.max(axis=1), gate_t),
                    "score": "max over classes of the gate's scores; a frame passes when score >= threshold",
                    "chosen_by": chosen_by},
           "classes": classes,
           "data": {"generator": line.data, "split": "val", "seed": line.seeds["val"], "frames": n,
                    "match": f"defect boxes at IoU >= {line.iou}"},
           "created": now_iso()}
    write_json(Path(pack_dir) / "calibration.json", doc)
    load_calibration(load_model_pack(pack_dir))
    return doc


def defect_figures(line: SegLine, pack_dir: Path, frames: list[np.ndarray], truth: list[list], threads: int = 2
                   ) -> dict[str, Any]:
    """Defect-level precision, recall, F1 (overall and per class) of the pack with its calibration, gate
    included, over camera frames with true boxes; and the detections, for mAP."""
    pack = load_model_pack(pack_dir)
    cal = load_calibration(pack)
    scores, probs = run_pack(pack_dir, frames, threads)
    k = len(pack.classes)
    tp, fp, fn = np.zeros(k, int), np.zeros(k, int), np.zeros(k, int)
    dets = []
    for j, f in enumerate(frames):
        pred = [] if scores[j].max() < cal.gate_threshold else detections(
            probs[j], pack.classes, cal.classes, pack.seg.output_stride, f.shape[:2])
        dets.append(pred)
        r = match(truth[j], pred, k, line.iou)
        tp, fp, fn = tp + r[0], fp + r[1], fn + r[2]
    T, P, N = tp.sum(), fp.sum(), fn.sum()
    defective = np.array([bool(t) for t in truth])
    return {
        "defect_f1": round(float(_f1(T, P, N)), 4),
        "precision": round(float(T / max(T + P, 1)), 4), "recall": round(float(T / max(T + N, 1)), 4),
        "tp": int(T), "fp": int(P), "fn": int(N),
        "per_class": {c: {"f1": round(float(_f1(tp[i], fp[i], fn[i])), 4),
                          "precision": round(float(tp[i] / max(tp[i] + fp[i], 1)), 4),
                          "recall": round(float(tp[i] / max(tp[i] + fn[i], 1)), 4),
                          "tp": int(tp[i]), "fp": int(fp[i]), "fn": int(fn[i])} for i, c in enumerate(pack.classes)},
        "gate": gate_figures(defective, scores.max(axis=1), cal.gate_threshold),
        "detections": dets, "models": pack.versions(),
    }
