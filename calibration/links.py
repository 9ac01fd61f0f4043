"""Per-class linking distance for component packs (no instance head): one defect, one event.

A component pack's events are the connected pieces of each class's mask (engines.components). A
crack whose middle is faint comes out as three pieces, three events, none framing the crack
(magnetic tile: 2.2 events per true defect on val before this). ``link_px`` joins pieces of one
class whose gap is at most that many frame pixels into one event.

Objective, per class on the calibration images: AP@0.5 (metrics.instances.average_precision, COCO's
101-point interpolation) of the class's events at its chosen pixel threshold and minimum area, matched
to its true boxes at IoU >= 0.5 in falling score order; the candidate with the highest AP wins, ties
to the smaller distance (the grid starts at 0: no link, today's rule). A class without a true box or
without calibrated thresholds keeps 0 and says so.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from calibration.instances import MATCH_IOU
from engines.components import class_components
from metrics.instances import average_precision, match_by_score

LINK_GRID: tuple[int, ...] = (0, 8, 16, 32, 64, 128)
OBJECTIVE = ("AP@0.5 of the class's events (components at its pixel threshold and minimum area, pieces at most "
             "link_px apart joined), matched to its true boxes at IoU >= 0.5 in falling score order; ties to the "
             "smaller link_px")


def choose_links(classes: Sequence[str], settings: Mapping[str, tuple[float, int] | None],
                 images: Iterable[tuple[np.ndarray, Sequence[Any], tuple[int, int]]], stride: int,
                 grid: Sequence[int] = LINK_GRID) -> dict[str, dict[str, Any]]:
    """``settings``: class name -> (pixel_threshold, min_area_px), or None where the class keeps its
    defaults uncalibrated. ``images``: per image, its seg probs [K, h, w] at ``stride``, its true boxes
    (objects with cls, x0, y0, x1, y1) and its (H, W). Returns class name -> {"link_px", ...}."""
    grid = sorted({int(g) for g in grid})
    if not grid or grid[0] < 0:
        raise ValueError(f"link grid {grid} must be non-empty and >= 0")
    k_count = len(classes)
    scores = [[[] for _ in grid] for _ in range(k_count)]
    matched = [[[] for _ in grid] for _ in range(k_count)]
    n_true = np.zeros(k_count, np.int64)
    for probs, truth, hw in images:
        for b in truth:
            n_true[b.cls] += 1
        for k, name in enumerate(classes):
            s = settings.get(name)
            if s is None:
                continue
            gt = [(b.x0, b.y0, b.x1, b.y1) for b in truth if b.cls == k]
            for li, link in enumerate(grid):
                _, comps = class_components(probs[k], s[0], s[1], stride, hw, link)
                tp = match_by_score(gt, [0] * len(gt), [c.bbox_px for c in comps], [0] * len(comps),
                                    [c.peak for c in comps], min_iou=MATCH_IOU)
                scores[k][li] += [c.peak for c in comps]
                matched[k][li] += tp.tolist()
    out: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(classes):
        if settings.get(name) is None or n_true[k] == 0:
            why = "no calibrated thresholds" if settings.get(name) is None else "no true box of this class"
            out[name] = {"link_px": 0, "link_note": f"{why} in the calibration data: pieces are not joined"}
            continue
        aps = [average_precision(scores[k][li], matched[k][li], int(n_true[k])) for li in range(len(grid))]
        best = max(range(len(grid)), key=lambda li: (round(aps[li], 9), -li))
        out[name] = {"link_px": grid[best], "link_ap50": round(aps[best], 6),
                     "link_ap50_by_px": {str(g): round(a, 6) for g, a in zip(grid, aps)},
                     "link_events": len(scores[k][best]), "link_true_boxes": int(n_true[k])}
    return out
