"""Painted parts (RGB, red and white, scratches): train, export, calibrate and evaluate on generated
parts (training/gen_parts.py), and evaluate on the 6 real photos of karpovaknn_scratches.

The pack takes the camera's full 4608x3072 frame; both models have ``input_pool`` 2 (the agent
area-averages 2x2 blocks, so the model sees 2304x1536, the scale the generator draws at) and the
segmenter's output stride is 4 frame pixels. Events are boxes of connected components of the
scratch map (engines/postprocess.py). Figures: COCO mAP@0.5 with the anchor's area ranges (0-40²,
40-70², 70-96², 96²+ frame px; the anchor, Cascade R-CNN, reports mAP@0.5 0.671), on the test
seed's generated windows and on the real photos, which are never trained or calibrated on.
"""
from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from training import line_seg
from training.gen_parts import FULL_H, FULL_W, PARTS_CLASSES, SCALE, SEEDS, PartsGenerator
from training.lines import LineError, fmt

PROFILE = "parts"
WINDOW = 384  # half-resolution training window (768 frame px)
EVAL_WINDOW = 512  # generated evaluation scenes: 512 half-res px = 1024x1024 camera frames
AREA_RANGES = {"all": (0, 1e10), "0-40²": (0, 40 ** 2), "40-70²": (40 ** 2, 70 ** 2), "70-96²": (70 ** 2, 96 ** 2),
               "96²+": (96 ** 2, 1e10)}
REAL = "karpovaknn_scratches/dataset/test"


def view(split: str, i: int, window: int = WINDOW) -> tuple[np.ndarray, np.ndarray, list]:
    s = PartsGenerator(SEEDS[split]).sample(i, window=window)
    return s.image, s.mask[None], [(0, b) for b in s.boxes]


def _frame(img: np.ndarray) -> np.ndarray:
    import cv2

    h, w = img.shape[:2]
    return cv2.resize(img, (w * SCALE, h * SCALE), interpolation=cv2.INTER_LINEAR)


LINE = line_seg.SegLine(
    profile=PROFILE, classes=PARTS_CLASSES, channels=3, height=FULL_H, width=FULL_W, input_pool=SCALE, seeds=SEEDS,
    view=view, frame=_frame,
    data="generated photos of red and white painted parts (training/gen_parts.py: scratches, sticks and clips, "
         "moulded edges, reflections, dust); the 6 real karpovaknn_scratches photos are a test set only",
    crop=192, width_net=16, iou=0.5)


def train(out: Path, *, seed: int = 0, minutes: float = 12.0, threads: int = 2, steps: int = 1500,
          command: str = "") -> dict[str, Any]:
    return line_seg.train(LINE, out, seed=seed, minutes=minutes, threads=threads, steps=steps, command=command,
                          pool=240, val=32, batch=8)


def export(run: Path, out: Path) -> dict[str, Any]:
    return line_seg.export(LINE, run, out)


def calibrate(pack_dir: Path, *, n: int = 80, threads: int = 2) -> dict[str, Any]:
    return line_seg.calibrate(LINE, pack_dir, n=n, threads=threads)


def real_images(data_root: Path | None) -> tuple[list[np.ndarray], list[list], list[str]]:
    """The real photos present under data_root and their COCO boxes (frame px, [x0, y0, x1, y1))."""
    import cv2

    from training.datasets import default_data_root

    root = Path(data_root) if data_root else default_data_root()
    folder = root / REAL if root else None
    if folder is None or not (folder / "coco.json").is_file():
        return [], [], []
    coco = json.loads((folder / "coco.json").read_text())
    images, truth, names = [], [], []
    for im in coco["images"]:
        path = folder / Path(im["file_name"]).name
        if not path.is_file():
            continue  # coco.json lists the whole split; only 6 photos are here
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise LineError(f"{path}: OpenCV cannot read this image")
        images.append(np.ascontiguousarray(bgr[:, :, ::-1]))
        truth.append([(0, (int(round(a["bbox"][0])), int(round(a["bbox"][1])), int(round(a["bbox"][0] + a["bbox"][2])),
                           int(round(a["bbox"][1] + a["bbox"][3])))) for a in coco["annotations"]
                      if a["image_id"] == im["id"]])
        names.append(path.name)
    return images, truth, names


def map50_by_area(truth: list[list], dets: list[list], sizes: list[tuple[int, int]]) -> dict[str, Any]:
    """COCO AP@0.5 (pycocotools, bbox, maxDets 100) in each of AREA_RANGES; None where a range has no box."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, res = [], [], []
    for i, ((h, w), gts, dts) in enumerate(zip(sizes, truth, dets), 1):
        images.append({"id": i, "width": int(w), "height": int(h)})
        for _, (x0, y0, x1, y1) in gts:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
        for _, (x0, y0, x1, y1), score in dts:
            res.append({"image_id": i, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
    counts = {name: sum(lo <= a["area"] < hi for a in anns) for name, (lo, hi) in AREA_RANGES.items()}
    out: dict[str, Any] = {"gt_boxes": len(anns), "predicted_boxes": len(res), "gt_per_area": counts}
    if not anns:
        return {**out, "map50": None, "ap50_by_area": {k: None for k in AREA_RANGES}}
    if not res:
        return {**out, "map50": 0.0, "ap50_by_area": {k: (0.0 if counts[k] else None) for k in AREA_RANGES}}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "scratch"}]}
        gt.createIndex()
        dt = gt.loadRes(res)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.areaRng = [list(v) for v in AREA_RANGES.values()]
        ev.params.areaRngLbl = list(AREA_RANGES)
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"]  # [T, R, K, A, M]
    by_area = {}
    for a, name in enumerate(AREA_RANGES):
        p = prec[0, :, 0, a, -1]
        by_area[name] = float(p[p > -1].mean()) if counts[name] and (p > -1).any() else None
    return {**out, "map50": by_area["all"], "ap50_by_area": by_area}


def evaluate(pack_dir: Path, *, split: str = "test", n: int = 120, threads: int = 2, data_root: Path | None = None,
             **_: Any) -> dict[str, Any]:
    if split not in ("val", "test"):
        raise LineError(f"parts are generated: evaluate --split val or test, not {split!r}")
    t0 = time.monotonic()
    views = [view(split, i, EVAL_WINDOW) for i in range(n)]
    frames = [_frame(v[0]) for v in views]
    gen = line_seg.defect_figures(LINE, pack_dir, frames, [v[2] for v in views], threads)
    gen_map = map50_by_area([v[2] for v in views], gen.pop("detections"), [f.shape[:2] for f in frames])
    report: dict[str, Any] = {
        "profile": PROFILE, "split": split, "models": gen.pop("models"), "backend": "onnxruntime",
        "generated": {**gen, **gen_map, "data": {"generator": "training.gen_parts", "seed": SEEDS[split], "scenes": n,
                                                  "scene": f"{EVAL_WINDOW * SCALE}x{EVAL_WINDOW * SCALE} frame px"}},
        "anchor": {"model": "Cascade R-CNN", "map50": 0.671},
        "match": "boxes at IoU >= 0.5 (mAP) / one-to-one at IoU >= 0.5 (F1)",
    }
    images, truth, names = real_images(data_root)
    if images:
        real = line_seg.defect_figures(LINE, pack_dir, images, truth, threads)
        dets = real.pop("detections")
        real.pop("models")
        report["real"] = {**real, **map50_by_area(truth, dets, [im.shape[:2] for im in images]),
                          "images": names, "per_image": [{"image": nm, "true": len(t), "found": len(d)}
                                                         for nm, t, d in zip(names, truth, dets)],
                          "data": f"{REAL} (6 of the 178 test photos; never trained or calibrated on)"}
    else:
        report["real"] = None
    report["timing"] = {"seconds": round(time.monotonic() - t0, 1), "items": n + len(images)}
    return report


def render(r: dict[str, Any]) -> str:
    g = r["generated"]
    lines = [f"# Parts evaluation: {r['split']} (generated seed {g['data']['seed']}, and the real photos)", "",
             f"Models {r['models']}. mAP@0.5 by COCOeval (bbox) with the anchor's area ranges in frame px; the "
             f"anchor ({r['anchor']['model']}) reports mAP@0.5 {r['anchor']['map50']} on the real test split.", "",
             "| data | images | true boxes | found | mAP@0.5 | " + " | ".join(f"AP@0.5 {k}" for k in AREA_RANGES
                                                                              if k != "all")
             + " | F1 (IoU 0.5) | precision | recall |",
             "|---|---|---|---|---|" + "---|" * (len(AREA_RANGES) - 1) + "---|---|---|"]

    def row(name, d, n):
        return (f"| {name} | {n} | {d['gt_boxes']} | {d['predicted_boxes']} | **{fmt(d['map50'])}** | "
                + " | ".join(f"{fmt(d['ap50_by_area'][k])} ({d['gt_per_area'][k]})" for k in AREA_RANGES if k != "all")
                + f" | {fmt(d['defect_f1'])} | {fmt(d['precision'])} | {fmt(d['recall'])} |")

    lines.append(row(f"generated ({g['data']['scene']} scenes)", g, g["data"]["scenes"]))
    if r.get("real"):
        lines.append(row("real karpovaknn_scratches", r["real"], len(r["real"]["images"])))
        lines += ["", "Real photos, boxes true / found: " + ", ".join(f"{p['image']} {p['true']}/{p['found']}"
                                                                      for p in r["real"]["per_image"]) + "."]
    else:
        lines += ["", "The real photos (karpovaknn_scratches) were not found under the data root: not evaluated."]
    lines += ["", "AP cells: value (true boxes in the range); '-' where a range holds no true box.",
              f"Took {r['timing']['seconds']} s."]
    return "\n".join(lines) + "\n"
