"""Wafer maps at run time: a wafer's patterns and CAM peaks -> its event fields; dies -> the lot's yield.

A wafer pack (profile ``wafer``) is a classification pack: its gate's ``scores`` [N, K] say which
basic patterns a map shows, and its ``cam_output`` [N, K, h, w] (each class's activation map in
[0, 1], ``cam_stride`` dies per cell) says where. model.json's ``die_map`` gives the die codes
(0 outside, 1 good, 2 failing). One event per wafer carries every pattern over its threshold
(docs/protocol.md, "wafer events"); the coil summary's ``lot`` block sums dies and patterns over
the lot (a coil is a lot, a frame a wafer).
"""
from __future__ import annotations

import cv2
import numpy as np

CAM_LEVEL = 0.5  # the peak region: CAM cells >= this share of the class's peak, connected to the peak


def peak_region(cam: np.ndarray, stride: int, frame_hw: tuple[int, int], level: float = CAM_LEVEL
                ) -> tuple[int, int, int, int]:
    """[x0, y0, x1, y1] in die (frame pixel) coordinates, x1/y1 exclusive, of the CAM cells at or over
    ``level`` x peak that are 8-connected to the peak cell."""
    if cam.ndim != 2 or not cam.size:
        raise ValueError(f"peak_region: cam must be a 2-D map, got shape {cam.shape}")
    peak = float(cam.max())
    cy, cx = np.unravel_index(int(np.argmax(cam)), cam.shape)
    on = (cam >= level * peak).astype(np.uint8) if peak > 0 else np.zeros_like(cam, np.uint8)
    on[cy, cx] = 1
    _, labels, stats, _ = cv2.connectedComponentsWithStats(on, connectivity=8)
    x, y, w, h, _ = stats[labels[cy, cx]]
    H, W = frame_hw
    return (int(x * stride), int(y * stride), int(min(W, (x + w) * stride)), int(min(H, (y + h) * stride)))


def die_counts(wafer: np.ndarray, die_map: dict[str, int]) -> dict[str, int]:
    """Dies of one map (any leading singleton axes): total on the wafer, good, failing."""
    good = int(np.count_nonzero(wafer == die_map["good"]))
    fail = int(np.count_nonzero(wafer == die_map["fail"]))
    return {"dies": good + fail, "good": good, "failing": fail}


def patterns(scores: np.ndarray, cams: np.ndarray | None, classes: tuple[str, ...], thresholds: list[float],
             stride: int, frame_hw: tuple[int, int]) -> list[dict]:
    """The wafer's patterns over their thresholds, highest score first: class, class_id, score, the CAM
    peak region in dies (``peak_die``) and the CAM itself as a small grid of ints 0-100 (% of peak)."""
    out = []
    for k in np.argsort(-scores):
        if scores[k] < thresholds[k]:
            continue
        p = {"class": classes[k], "class_id": int(k), "score": round(float(scores[k]), 4)}
        if cams is not None:
            p["peak_die"] = list(peak_region(cams[k], stride, frame_hw))
            p["cam"] = np.rint(np.clip(cams[k], 0.0, 1.0) * 100).astype(int).tolist()
        out.append(p)
    return out


def lot_add(lot: dict, dies: dict[str, int], found: list[dict]) -> None:
    """Add one wafer to a lot's running totals (in place)."""
    lot["wafers"] = lot.get("wafers", 0) + 1
    for k, v in dies.items():
        lot[k] = lot.get(k, 0) + v
    if found:
        lot["wafers_with_patterns"] = lot.get("wafers_with_patterns", 0) + 1
    if len(found) > 1:
        lot["wafers_mixed"] = lot.get("wafers_mixed", 0) + 1
    counts = lot.setdefault("patterns", {})
    for p in found:
        counts[p["class"]] = counts.get(p["class"], 0) + 1


def lot_summary(lot: dict, classes: tuple[str, ...]) -> dict:
    """The summary's ``lot`` block: wafers, dies, good and failing dies, yield (good / dies), wafers with
    patterns, mixed wafers, and wafers per pattern (every class present)."""
    dies = lot.get("dies", 0)
    return {"wafers": lot.get("wafers", 0), "dies": dies, "good_dies": lot.get("good", 0),
            "failing_dies": lot.get("failing", 0),
            "yield": round(lot.get("good", 0) / dies, 6) if dies else None,
            "wafers_with_patterns": lot.get("wafers_with_patterns", 0), "wafers_mixed": lot.get("wafers_mixed", 0),
            "patterns": {c: lot.get("patterns", {}).get(c, 0) for c in classes}}
