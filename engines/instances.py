"""Instance head outputs -> one instance per defect: centre peaks, boxes, masks (numpy + OpenCV).

The contract (docs/architecture.md, model.json format 3): a seg model with an ``instances`` block
has, beside ``probs``, three outputs at stride ``s``:

- ``heatmap`` float32 [N, K, H/s, W/s]: per-class centre score in 0..1 (sigmoid in the graph);
- ``size``    float32 [N, 2, H/s, W/s]: box (w, h) in input px of the frame as the agent holds it;
- ``offset``  float32 [N, 2, H/s, W/s]: (dx, dy) of the centre inside its cell, in cells, 0..1.

A cell (i, j) is a peak of class k when ``heatmap[k, i, j]`` equals the 3x3 max of heatmap[k]
around it (the frame's border counts as -inf) and is >= the class's instance threshold. No NMS.

Ties. Two neighbouring cells can both equal their 3x3 max only when their values are equal, so
the candidate cells of one class fall into 8-connected plateaus of one value each. A plateau
gives ONE peak, at its cell nearest the plateau's centroid (ties: first in raster order). A
flat-topped blob therefore gives one event, not one per cell of its top. Two plateaus of the same
value that do not touch are two peaks: they are separate maxima.

At most ``max_instances`` peaks per frame are kept, by score, ties by (class, row, column).
A peak at (i, j) with offset (dx, dy) and size (w, h) is the box centred at
((j + dx) * s, (i + dy) * s), w x h px, clipped to the frame. Its mask is the class's ``probs``
inside the box thresholded at the class's pixel threshold; its area is the mask's cells x
probs_stride^2 px, or the box's area when the mask is empty.

Cost (one thread, 6 classes, a 1600x256 frame at stride 4, a 400x64 grid): measured by
`coilsight bench` as the agent's `postprocess` stage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

DEFAULT_INSTANCE_THRESHOLD = 0.3
DEFAULT_MAX_INSTANCES = 50


@dataclass(frozen=True)
class InstanceSpec:
    """model.json's ``instances`` block of a seg model: the names of the three outputs and their stride."""

    heatmap: str = "heatmap"
    size: str = "size"
    offset: str = "offset"
    stride: int = 4

    @property
    def outputs(self) -> tuple[str, str, str]:
        return self.heatmap, self.size, self.offset

    def to_dict(self) -> dict:
        return {"heatmap": self.heatmap, "size": self.size, "offset": self.offset, "stride": self.stride}


@dataclass(frozen=True)
class Instance:
    class_id: int
    score: float  # the peak's heatmap value
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in frame px (float, clipped to the frame)
    bbox_px: tuple[int, int, int, int]  # the box in whole px: x1/y1 exclusive, at least 1 x 1, inside the frame
    area_px: int  # mask px inside the box, or the box's area when the mask is empty
    peak: tuple[int, int]  # (row, column) of the peak cell
    mask_px: int = 0  # mask cells x probs_stride^2 (0: the mask was empty or no probs were given)


def max_pool3(plane: np.ndarray) -> np.ndarray:
    """3x3 max over each cell's neighbourhood; cells outside the map do not count."""
    # cv2.dilate's default border is the identity of max, so the border never wins
    return cv2.dilate(np.ascontiguousarray(plane, np.float32), np.ones((3, 3), np.uint8))


def find_peaks(heatmap: np.ndarray, thresholds: Sequence[float] | np.ndarray,
               max_instances: int = DEFAULT_MAX_INSTANCES) -> list[tuple[int, int, int, float]]:
    """Peaks of a [K, h, w] heatmap as (class, row, column, score), best first (see the module doc)."""
    if heatmap.ndim != 3:
        raise ValueError(f"heatmap must be [K, h, w], got shape {heatmap.shape}")
    k_count = heatmap.shape[0]
    t = np.asarray(thresholds, np.float64).reshape(-1)
    if t.size == 1:
        t = np.full(k_count, t[0])
    if t.size != k_count:
        raise ValueError(f"{t.size} instance thresholds given for {k_count} classes")
    if max_instances < 0:
        raise ValueError(f"max_instances must be >= 0, got {max_instances}")
    found: list[tuple[int, int, int, float]] = []
    for k in range(k_count):
        plane = np.ascontiguousarray(heatmap[k], np.float32)
        above = plane >= t[k]  # NaN is never above
        if not above.any():
            continue
        candidates = above & (plane == max_pool3(plane))
        rows, cols = np.nonzero(candidates)
        if rows.size == 0:
            continue
        n, labels, stats, centroids = cv2.connectedComponentsWithStats(candidates.view(np.uint8), connectivity=8)
        if n - 1 == rows.size:  # no two candidates touch: every candidate is a peak
            found += [(k, int(i), int(j), float(plane[i, j])) for i, j in zip(rows, cols)]
            continue
        lab = labels[rows, cols]
        for c in range(1, n):
            members = np.flatnonzero(lab == c)  # raster order
            cx, cy = centroids[c]
            d2 = (cols[members] - cx) ** 2 + (rows[members] - cy) ** 2
            m = members[int(np.argmin(d2))]  # argmin takes the first of equal distances
            found.append((k, int(rows[m]), int(cols[m]), float(plane[rows[m], cols[m]])))
    if len(found) > 1:
        order = sorted(range(len(found)), key=lambda x: (-found[x][3], found[x][0], found[x][1], found[x][2]))
        found = [found[x] for x in order]
    return found[:max_instances]


def _px_box(box: tuple[float, float, float, float], height: int, width: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    ix0 = min(max(int(math.floor(x0)), 0), width - 1)
    iy0 = min(max(int(math.floor(y0)), 0), height - 1)
    ix1 = min(max(int(math.ceil(x1)), ix0 + 1), width)
    iy1 = min(max(int(math.ceil(y1)), iy0 + 1), height)
    return ix0, iy0, ix1, iy1


def decode_instances(heatmap: np.ndarray, size: np.ndarray, offset: np.ndarray, *, stride: int,
                     thresholds: Sequence[float] | np.ndarray, frame_hw: tuple[int, int],
                     probs: np.ndarray | None = None, pixel_thresholds: Sequence[float] | np.ndarray | None = None,
                     probs_stride: int | None = None,
                     max_instances: int = DEFAULT_MAX_INSTANCES) -> list[Instance]:
    """One frame's instance outputs -> instances, best first.

    heatmap [K, h, w]; size and offset [2, h, w] at ``stride``; frame_hw the frame's (H, W) in px.
    With ``probs`` [K, hp, wp] (at ``probs_stride``, default ``stride``) and ``pixel_thresholds``,
    each instance's area is its mask's; without them, the box's."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if heatmap.ndim != 3 or size.shape != (2, *heatmap.shape[1:]) or offset.shape != size.shape:
        raise ValueError(f"instance outputs disagree: heatmap {heatmap.shape} must be [K, h, w] and size "
                         f"{size.shape} / offset {offset.shape} [2, h, w]")
    height, width = int(frame_hw[0]), int(frame_hw[1])
    if height < 1 or width < 1:
        raise ValueError(f"frame_hw must be positive, got {frame_hw}")
    if probs is not None:
        if pixel_thresholds is None:
            raise ValueError("probs given without pixel_thresholds")
        if probs.ndim != 3 or probs.shape[0] != heatmap.shape[0]:
            raise ValueError(f"probs {probs.shape} must be [K={heatmap.shape[0]}, h, w]")
        pt = np.asarray(pixel_thresholds, np.float64).reshape(-1)
        if pt.size == 1:
            pt = np.full(heatmap.shape[0], pt[0])
        if pt.size != heatmap.shape[0]:
            raise ValueError(f"{pt.size} pixel thresholds given for {heatmap.shape[0]} classes")
    ps = int(probs_stride or stride)
    out: list[Instance] = []
    for k, i, j, score in find_peaks(heatmap, thresholds, max_instances):
        w, h = (float(v) for v in size[:, i, j])
        dx, dy = (float(v) for v in offset[:, i, j])
        w = w if math.isfinite(w) and w > 0 else 0.0  # a broken size makes a point, never a NaN box
        h = h if math.isfinite(h) and h > 0 else 0.0
        dx = dx if math.isfinite(dx) else 0.5
        dy = dy if math.isfinite(dy) else 0.5
        cx, cy = (j + dx) * stride, (i + dy) * stride
        box = (min(max(cx - w / 2, 0.0), width), min(max(cy - h / 2, 0.0), height),
               min(max(cx + w / 2, 0.0), width), min(max(cy + h / 2, 0.0), height))
        px = _px_box(box, height, width)
        mask_px = 0
        if probs is not None:
            r0, c0 = px[1] // ps, px[0] // ps
            r1, c1 = -(-px[3] // ps), -(-px[2] // ps)
            mask_px = int((probs[k, r0:r1, c0:c1] >= pt[k]).sum()) * ps * ps
        area = mask_px or (px[2] - px[0]) * (px[3] - px[1])
        out.append(Instance(k, round(score, 4), tuple(round(v, 2) for v in box), px, int(area), (i, j), mask_px))
    return out
