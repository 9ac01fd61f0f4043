"""Chip dies (224x224, 6 channels): train, export, calibrate and evaluate on generated dies (training/gen_chip.py).

The pack: ``seg.onnx`` (bump/dent/dot probabilities at output stride 2) and ``gate.onnx`` (the same
graph's per-class maximum). Events are the segmenter's connected components (engines/postprocess.py;
the instance head of the open instance issue had not landed). Figures: defect-level F1 at box IoU
>= 0.3 on the test seed's dies (the anchor: Mask R-CNN, F1 0.94 on the real dies).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from training import line_seg
from training.gen_chip import CHIP_CLASSES, SEEDS, SIZE, ChipGenerator
from training.lines import LineError, fmt

PROFILE = "chip"
_GENERATORS: dict[int, ChipGenerator] = {}


def view(split: str, i: int) -> tuple[np.ndarray, np.ndarray, list]:
    seed = SEEDS[split]
    gen = _GENERATORS.setdefault(seed, ChipGenerator(seed))
    s = gen.sample(i)
    return s.image, s.masks, [(k, (x0, y0, x1, y1)) for k, x0, y0, x1, y1 in s.boxes]


LINE = line_seg.SegLine(
    profile=PROFILE, classes=CHIP_CLASSES, channels=6, height=SIZE, width=SIZE, input_pool=1, seeds=SEEDS,
    view=view, frame=lambda img: img,
    data="generated chip dies (training/gen_chip.py: 224x224, channels height, 2D, pattern, variance, pads, drill "
         "hole; bump/dent/dot, 16 % without defects); no real die was available",
    crop=112, width_net=16, iou=0.3)


def train(out: Path, *, seed: int = 0, minutes: float = 12.0, threads: int = 2, steps: int = 1500,
          command: str = "") -> dict[str, Any]:
    return line_seg.train(LINE, out, seed=seed, minutes=minutes, threads=threads, steps=steps, command=command,
                          pool=300, val=48, batch=12)


def export(run: Path, out: Path) -> dict[str, Any]:
    return line_seg.export(LINE, run, out)


# Dots are a few pixels: at output stride 2 their probability blob is wider than the dot, and the box of
# the component over a middling threshold overlaps the dot's own box at IoU < 0.3. Only the high levels of
# a saturated map (0.99 and over) give dot-sized components, so the grid reaches up there.
PIXEL_GRID = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.997, 0.998, 0.999)
AREA_GRID = (0, 4, 8, 16)


def calibrate(pack_dir: Path, *, n: int = 400, threads: int = 2) -> dict[str, Any]:
    return line_seg.calibrate(LINE, pack_dir, n=n, threads=threads, pixel_grid=PIXEL_GRID, area_grid=AREA_GRID,
                              gate_below_classes=True)


def evaluate(pack_dir: Path, *, split: str = "test", n: int = 300, threads: int = 2, **_: Any) -> dict[str, Any]:
    if split not in ("val", "test"):
        raise LineError(f"chip dies are generated: evaluate --split val or test, not {split!r}")
    t0 = time.monotonic()
    views = [view(split, i) for i in range(n)]
    fig = line_seg.defect_figures(LINE, pack_dir, [v[0] for v in views], [v[2] for v in views], threads)
    fig.pop("detections")
    sizes = [max(b[2] - b[0], b[3] - b[1]) for v in views for _, b in v[2]]
    return {"profile": PROFILE, "split": split, **fig, "backend": "onnxruntime",
            "data": {"generator": "training.gen_chip", "seed": SEEDS[split], "dies": n,
                     "true_defects": len(sizes), "defects_le_20px": round(float(np.mean(np.array(sizes) <= 20)), 3),
                     "dies_without_defects": int(sum(not v[2] for v in views)),
                     "note": "generated dies; no real die was available here"},
            "match": "a predicted component matches a true defect of its class at box IoU >= 0.3, one to one",
            "targets": {"defect_f1": 0.94}, "timing": {"seconds": round(time.monotonic() - t0, 1), "items": n}}


def render(r: dict[str, Any]) -> str:
    d = r["data"]
    lines = [f"# Chip evaluation: {r['split']} dies ({d['dies']} generated, seed {d['seed']})", "",
             f"Models {r['models']}; {d['note']}. {d['true_defects']} true defects ({d['defects_le_20px']:.0%} at most "
             f"20 px across), {d['dies_without_defects']} dies without any.", "",
             f"- Defect-level F1 ({r['match']}): **{fmt(r['defect_f1'], 4)}** (target >= 0.94; anchor Mask R-CNN 0.94 "
             "on the real dies)",
             f"- Precision {fmt(r['precision'])}, recall {fmt(r['recall'])} (TP {r['tp']}, FP {r['fp']}, FN {r['fn']})",
             f"- Gate at its calibrated threshold: recall {fmt(r['gate']['recall'])}, pass rate "
             f"{fmt(r['gate']['pass_rate'])}", "",
             "| class | F1 | precision | recall | TP | FP | FN |", "|---|---|---|---|---|---|---|"]
    for c, v in r["per_class"].items():
        lines.append(f"| {c} | {fmt(v['f1'])} | {fmt(v['precision'])} | {fmt(v['recall'])} | {v['tp']} | {v['fp']} | "
                     f"{v['fn']} |")
    lines += ["", f"Took {r['timing']['seconds']} s for {r['timing']['items']} dies."]
    return "\n".join(lines) + "\n"
