"""Per-class instance thresholds for packs with an instance head (model.json format 3).

Objective: the best F1 of matched instances, per class, on the calibration split. An instance
matches a true box of its class at IoU >= 0.5, COCO's way (metrics.instances.match_by_score:
instances in falling score order take the best free box), so raising the threshold drops exactly
the instances below it and their matches. Recall is over the class's true boxes. Ties go to the
higher threshold (fewer events for the same F1). A class with no true box keeps the default
(engines.instances.DEFAULT_INSTANCE_THRESHOLD) and says so.

The instances are decoded once, at the lowest candidate threshold, by engines.instances (the
agent's own decoder), each image at its own size, at most 100 per image (COCO's maxDets).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import cv2
import numpy as np

from engines.instances import DEFAULT_INSTANCE_THRESHOLD, Instance
from metrics.instances import choose_score_threshold, match_by_score

INSTANCE_THRESHOLD_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95
MATCH_IOU = 0.5
OBJECTIVE = ("best F1 of matched instances per class: an instance matches a true box of its class at IoU >= 0.5, "
             "in falling score order (COCO); recall over the class's true boxes; ties to the higher threshold")


def choose_instance_thresholds(classes: Sequence[str], images: Iterable[tuple[list[Instance], Sequence[Any]]],
                               grid: Sequence[float] = INSTANCE_THRESHOLD_GRID) -> dict[str, dict[str, Any]]:
    """``images``: per image, its instances (decoded at <= min(grid)) and its true boxes (objects with
    cls, x0, y0, x1, y1). Returns class name -> {"instance_threshold", "instance_f1", ...}."""
    k_count = len(classes)
    scores: list[list[float]] = [[] for _ in range(k_count)]
    matched: list[list[bool]] = [[] for _ in range(k_count)]
    n_true = np.zeros(k_count, np.int64)
    for instances, truth in images:
        gt_boxes = [(b.x0, b.y0, b.x1, b.y1) for b in truth]
        gt_cls = [b.cls for b in truth]
        np.add.at(n_true, np.asarray(gt_cls, np.int64), 1)
        tp = match_by_score(gt_boxes, gt_cls, [i.box for i in instances], [i.class_id for i in instances],
                            [i.score for i in instances], min_iou=MATCH_IOU)
        for inst, hit in zip(instances, tp):
            scores[inst.class_id].append(inst.score)
            matched[inst.class_id].append(bool(hit))
    out: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(classes):
        if n_true[k] == 0:
            out[name] = {"instance_threshold": DEFAULT_INSTANCE_THRESHOLD, "instance_calibrated": False,
                         "instance_note": "no true box of this class in the calibration data: the default"}
            continue
        t, at = choose_score_threshold(scores[k], matched[k], int(n_true[k]), grid)
        out[name] = {"instance_threshold": t, "instance_calibrated": True, "instance_f1": at["f1"],
                     "instance_precision": at["precision"], "instance_recall": at["recall"],
                     "instance_events": at["events"], "instance_matched": at["matched"],
                     "instance_true_boxes": int(n_true[k])}
    return out


class _Box:
    __slots__ = ("cls", "x0", "y0", "x1", "y1")

    def __init__(self, cls: int, x0: float, y0: float, x1: float, y1: float):
        self.cls, self.x0, self.y0, self.x1, self.y1 = cls, x0, y0, x1, y1


def true_boxes(sample: Any) -> list:
    """A sample's true boxes: its ``boxes`` when it has any, else one per 8-connected component of
    each class's mask (masks without boxes: simulator folders, hand-made samples)."""
    boxes = list(getattr(sample, "boxes", None) or [])
    masks = getattr(sample, "masks", None)
    if boxes or masks is None:
        return boxes
    for k, m in enumerate(np.asarray(masks, bool)):
        if not m.any():
            continue
        n, _, stats, _ = cv2.connectedComponentsWithStats(m.view(np.uint8), connectivity=8)
        for x, y, w, h, _area in stats[1:n]:
            boxes.append(_Box(k, float(x), float(y), float(x + w), float(y + h)))
    return boxes
