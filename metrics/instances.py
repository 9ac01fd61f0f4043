"""Events against true defects, box by box (numpy only): IoU, one-to-one matching, split and merged.

Shared by evaluation (training/evaluate.py), the FP16 parity gate (engines/parity.py) and the
bench (agent/tools/bench.py), so "matched" means the same everywhere.

Boxes are ``[x0, y0, x1, y1]`` in px (x1/y1 exclusive), classes are ints. On one image:

- **matched** (one-to-one): pairs taken greedily by IoU, highest first, each box used at most
  once, IoU >= ``min_iou`` (0.5 by default). Matching ignores classes; ``matched_same_class``
  counts the matched pairs whose classes agree, and the confusion matrix holds every pair.
- **split**: a true defect with two or more events *on it*; an event is on a defect when their
  IoU >= min_iou or when at least ``cover`` (0.5) of the event's area lies inside the defect
  (a fragment). Four fragments of one scratch make one split defect.
- **merged**: an event with two or more defects *in it*: IoU >= min_iou or at least ``cover`` of
  the defect's area inside the event.
- **missed** / **false**: true defects / events left without a one-to-one partner.
- **best IoU** of a true defect: its highest IoU with any event of the image (0 when none).
- **recall by size**: true defects and their one-to-one matches by the square root of the true box's
  area, in SIZE_RANGES (COCO's area ranges as evaluation splits mAP: 0-40, 40-70, 70-96, 96+ px).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# sqrt(true box area) in px: [lo, hi); the names evaluation's AREA_RANGES uses
SIZE_RANGES: dict[str, tuple[float, float]] = {"0-40": (0.0, 40.0), "40-70": (40.0, 70.0), "70-96": (70.0, 96.0),
                                               "96+": (96.0, float("inf"))}


def size_bins(boxes) -> np.ndarray:
    """Index into SIZE_RANGES of each box ([N, 4] x0, y0, x1, y1) by sqrt of its area."""
    b = _boxes(boxes)
    side = np.sqrt(np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None))
    edges = np.array([hi for _, hi in list(SIZE_RANGES.values())[:-1]])
    return np.searchsorted(edges, side, side="right")


def _boxes(boxes) -> np.ndarray:
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    if np.any(b[:, 2] < b[:, 0]) or np.any(b[:, 3] < b[:, 1]):
        raise ValueError("boxes must be [x0, y0, x1, y1] with x1 >= x0 and y1 >= y0")
    return b


def box_intersections(a, b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersection areas [N, M] and the areas of a [N] and b [M]."""
    a, b = _boxes(a), _boxes(b)
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return w * h, area_a, area_b


def box_iou(a, b) -> np.ndarray:
    """IoU [N, M] of boxes a [N, 4] and b [M, 4]; 0 where both are empty."""
    inter, area_a, area_b = box_intersections(a, b)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def greedy_match(iou: np.ndarray, min_iou: float, allowed: np.ndarray | None = None) -> list[tuple[int, int]]:
    """One-to-one pairs (row, column), highest IoU first, each at least ``min_iou``; ``allowed``
    (bool, same shape) restricts which pairs may match (e.g. same class). Ties: lowest row, then column."""
    ok = iou >= min_iou
    if allowed is not None:
        ok &= allowed
    rows, cols = np.nonzero(ok)
    order = np.lexsort((cols, rows, -iou[rows, cols]))
    used_r: set[int] = set()
    used_c: set[int] = set()
    pairs = []
    for idx in order:
        r, c = int(rows[idx]), int(cols[idx])
        if r in used_r or c in used_c:
            continue
        used_r.add(r)
        used_c.add(c)
        pairs.append((r, c))
    return pairs


@dataclass
class InstanceCounts:
    """Counts over one or many images; ``add`` accumulates, ``to_dict`` reports."""

    n_classes: int
    true: int = 0
    events: int = 0
    matched: int = 0
    matched_same_class: int = 0
    split: int = 0
    merged: int = 0
    missed: int = 0
    false: int = 0
    matched_ious: list = field(default_factory=list)
    best_ious: list = field(default_factory=list)  # one per true defect
    confusion: np.ndarray = None  # type: ignore[assignment]  # [K+1, K+1]: rows truth, columns events; K = none
    size_true: np.ndarray = None  # type: ignore[assignment]  # [len(SIZE_RANGES)] true defects by size
    size_matched: np.ndarray = None  # type: ignore[assignment]  # ... of them matched one-to-one

    def __post_init__(self) -> None:
        if self.confusion is None:
            self.confusion = np.zeros((self.n_classes + 1, self.n_classes + 1), np.int64)
        if self.size_true is None:
            self.size_true = np.zeros(len(SIZE_RANGES), np.int64)
        if self.size_matched is None:
            self.size_matched = np.zeros(len(SIZE_RANGES), np.int64)

    def add(self, other: "InstanceCounts") -> "InstanceCounts":
        for name in ("true", "events", "matched", "matched_same_class", "split", "merged", "missed", "false"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.matched_ious += other.matched_ious
        self.best_ious += other.best_ious
        self.confusion += other.confusion
        self.size_true += other.size_true
        self.size_matched += other.size_matched
        return self

    def to_dict(self, class_names: list[str] | tuple[str, ...] | None = None) -> dict:
        names = list(class_names) if class_names is not None else [str(k) for k in range(self.n_classes)]
        best = np.asarray(self.best_ious, np.float64)
        matched = np.asarray(self.matched_ious, np.float64)
        return {
            "true_defects": self.true, "events": self.events, "matched": self.matched,
            "matched_same_class": self.matched_same_class, "split": self.split, "merged": self.merged,
            "missed": self.missed, "false_events": self.false,
            "events_per_defect": round(self.events / self.true, 4) if self.true else None,
            "recall": round(self.matched / self.true, 4) if self.true else None,
            "precision": round(self.matched / self.events, 4) if self.events else None,
            "median_best_iou": round(float(np.median(best)), 4) if best.size else None,
            "median_matched_iou": round(float(np.median(matched)), 4) if matched.size else None,
            "recall_by_size": {name: {"true": int(t), "matched": int(m), "recall": round(int(m) / int(t), 4) if t else None}
                               for name, t, m in zip(SIZE_RANGES, self.size_true, self.size_matched)},
            "confusion": {"rows": "truth", "columns": "events", "labels": names + ["(none)"],
                          "matrix": self.confusion.tolist()},
        }


def count_instances(gt_boxes, gt_classes, dt_boxes, dt_classes, n_classes: int, *, min_iou: float = 0.5,
                    cover: float = 0.5) -> InstanceCounts:
    """One image's true defects against its events (see the module doc for each count)."""
    if not 0.0 < min_iou <= 1.0 or not 0.0 < cover <= 1.0:
        raise ValueError(f"min_iou and cover must be in (0, 1], got {min_iou} and {cover}")
    gt, dt = _boxes(gt_boxes), _boxes(dt_boxes)
    gc = np.asarray(gt_classes, np.int64).reshape(-1)
    dc = np.asarray(dt_classes, np.int64).reshape(-1)
    if len(gc) != len(gt) or len(dc) != len(dt):
        raise ValueError(f"{len(gt)} true boxes with {len(gc)} classes, {len(dt)} events with {len(dc)} classes")
    for name, c in (("true", gc), ("event", dc)):
        if c.size and (c.min() < 0 or c.max() >= n_classes):
            raise ValueError(f"{name} classes must be in [0, {n_classes}), got {sorted(set(c.tolist()))}")
    out = InstanceCounts(n_classes, true=len(gt), events=len(dt))
    bins = size_bins(gt)
    np.add.at(out.size_true, bins, 1)
    if len(gt) == 0 or len(dt) == 0:
        out.missed, out.false = len(gt), len(dt)
        out.best_ious = [0.0] * len(gt)
        np.add.at(out.confusion, (gc, np.full(len(gc), n_classes)), 1)
        np.add.at(out.confusion, (np.full(len(dc), n_classes), dc), 1)
        return out
    inter, area_g, area_d = box_intersections(gt, dt)
    iou = box_iou(gt, dt)
    pairs = greedy_match(iou, min_iou)
    out.matched = len(pairs)
    np.add.at(out.size_matched, bins[[g for g, _ in pairs]], 1)
    out.matched_same_class = sum(1 for g, d in pairs if gc[g] == dc[d])
    out.matched_ious = [float(iou[g, d]) for g, d in pairs]
    out.best_ious = iou.max(axis=1).tolist()
    for g, d in pairs:
        out.confusion[gc[g], dc[d]] += 1
    matched_g = {g for g, _ in pairs}
    matched_d = {d for _, d in pairs}
    missed = [g for g in range(len(gt)) if g not in matched_g]
    false = [d for d in range(len(dt)) if d not in matched_d]
    out.missed, out.false = len(missed), len(false)
    np.add.at(out.confusion, (gc[missed], np.full(len(missed), n_classes)), 1)
    np.add.at(out.confusion, (np.full(len(false), n_classes), dc[false]), 1)
    close = iou >= min_iou
    event_on_defect = close | (inter >= cover * np.maximum(area_d[None, :], 1e-9))
    defect_in_event = close | (inter >= cover * np.maximum(area_g[:, None], 1e-9))
    out.split = int((event_on_defect.sum(axis=1) >= 2).sum())
    out.merged = int((defect_in_event.sum(axis=0) >= 2).sum())
    return out


def match_by_score(gt_boxes, gt_classes, dt_boxes, dt_classes, dt_scores, *, min_iou: float = 0.5) -> np.ndarray:
    """COCO's matching: events in falling score order each take the unmatched true defect of their
    class with the highest IoU >= min_iou. Returns a bool [events] flag: matched (a true positive).
    An event's flag never depends on lower-scored events, so thresholding the scores at t keeps
    exactly the flags of the events scoring >= t (what choose_score_threshold relies on)."""
    gt, dt = _boxes(gt_boxes), _boxes(dt_boxes)
    gc = np.asarray(gt_classes, np.int64).reshape(-1)
    dc = np.asarray(dt_classes, np.int64).reshape(-1)
    sc = np.asarray(dt_scores, np.float64).reshape(-1)
    if len(gc) != len(gt) or len(dc) != len(dt) or len(sc) != len(dt):
        raise ValueError("match_by_score: boxes, classes and scores differ in length")
    tp = np.zeros(len(dt), bool)
    if len(gt) == 0 or len(dt) == 0:
        return tp
    iou = box_iou(gt, dt)
    taken = np.zeros(len(gt), bool)
    for d in np.argsort(-sc, kind="stable"):
        ok = (~taken) & (gc == dc[d]) & (iou[:, d] >= min_iou)
        if ok.any():
            g = int(np.argmax(np.where(ok, iou[:, d], -1.0)))
            taken[g] = True
            tp[d] = True
    return tp


def choose_score_threshold(scores, matched, n_true: int, candidates) -> tuple[float, dict]:
    """The candidate threshold with the best F1 of matched events (events scoring >= t; recall over
    ``n_true`` true defects). Ties go to the highest threshold (fewer events for the same F1).
    Returns (threshold, {"f1", "precision", "recall", "events", "matched"} at it)."""
    s = np.asarray(scores, np.float64).reshape(-1)
    m = np.asarray(matched, bool).reshape(-1)
    if s.shape != m.shape:
        raise ValueError(f"{s.size} scores for {m.size} matched flags")
    cands = sorted({float(c) for c in candidates})
    if not cands:
        raise ValueError("no candidate thresholds")
    best: tuple[float, float, dict] | None = None
    for t in cands:
        keep = s >= t
        events, tp = int(keep.sum()), int((keep & m).sum())
        precision = tp / events if events else 0.0
        recall = tp / n_true if n_true else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        if best is None or f1 >= best[0]:
            best = (f1, t, {"f1": round(f1, 6), "precision": round(precision, 6), "recall": round(recall, 6),
                            "events": events, "matched": tp})
    assert best is not None
    return best[1], best[2]


def average_precision(scores, matched, n_true: int) -> float | None:
    """COCO's AP of a pool of events: ``matched`` flags from match_by_score (per image, then pooled),
    ranked by score; precision made monotone from the right and read at the 101 recall points
    0, 0.01, ..., 1 (0 where a recall is never reached). None when there is no true defect."""
    if n_true <= 0:
        return None
    s = np.asarray(scores, np.float64).reshape(-1)
    m = np.asarray(matched, bool).reshape(-1)
    if s.shape != m.shape:
        raise ValueError(f"{s.size} scores for {m.size} matched flags")
    if m.sum() > n_true:
        raise ValueError(f"{int(m.sum())} matched events for {n_true} true defects")
    if not s.size:
        return 0.0
    order = np.argsort(-s, kind="mergesort")  # COCO sorts the same way
    tp = np.cumsum(m[order])
    recall = tp / n_true
    precision = np.maximum.accumulate((tp / np.arange(1, s.size + 1))[::-1])[::-1]  # monotone from the right
    idx = np.searchsorted(recall, np.linspace(0.0, 1.0, 101), side="left")  # first rank reaching each point
    return float(np.where(idx < s.size, precision[np.minimum(idx, s.size - 1)], 0.0).mean())
