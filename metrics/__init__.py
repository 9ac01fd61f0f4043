"""Quality metrics shared by calibration, evaluation and parity (numpy only, no torch, no sklearn).

The lowest layer: it imports no other Coilsight package, and ``engines``, ``calibration`` and
``training`` may all import it. (The agent's Prometheus counters are agent/metrics.py, another idea.)

- `dice_severstal`: Dice as the Severstal steel defect competition scored it: one Dice per
  (image, class) pair, 1.0 when prediction and truth are both empty, averaged over all pairs.
- `dice_pairs`: the [N, K] table behind it (calibration sweeps thresholds over it).
- `iou`: per-class intersection over union, pooled over the whole set.
- `roc_auc`: rank-based (Mann-Whitney U) area under the ROC curve, ties get average ranks.
- `precision_recall`: at one score threshold (positive when score >= threshold).
- `box_masks`: boxes rasterised to per-class masks.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
import math
from typing import Any, NamedTuple

import numpy as np


class DiceResult(NamedTuple):
    mean: float  # mean over all (image, class) pairs
    per_class: np.ndarray  # float64 [K], mean over images of each class


def _as_bool(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != bool:
        raise ValueError(f"{name} must be a bool array, got dtype {array.dtype}")
    return array


def _pair_stats(pred: np.ndarray, gt: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersection, |pred| and |gt| per leading index, over the last two axes."""
    pred, gt = _as_bool(pred, f"{where} pred"), _as_bool(gt, f"{where} gt")
    if pred.shape != gt.shape:
        raise ValueError(f"{where}: pred shape {pred.shape} differs from gt shape {gt.shape}")
    if pred.ndim < 3:
        raise ValueError(f"{where}: expected masks [..., K, H, W], got shape {pred.shape}")
    inter = np.logical_and(pred, gt).sum(axis=(-2, -1), dtype=np.int64)
    return inter, pred.sum(axis=(-2, -1), dtype=np.int64), gt.sum(axis=(-2, -1), dtype=np.int64)


def dice_from_counts(inter: np.ndarray, p: np.ndarray, g: np.ndarray) -> np.ndarray:
    denom = p + g
    return np.where(denom == 0, 1.0, 2.0 * inter / np.maximum(denom, 1))


def _walk(pred, gt) -> Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per-image (inter, |pred|, |gt|) [K] from [N,K,H,W] arrays or iterables of [K,H,W]."""
    if isinstance(pred, np.ndarray) and isinstance(gt, np.ndarray):
        if pred.ndim != 4 or gt.ndim != 4:
            raise ValueError(f"expected [N, K, H, W] masks, got pred {pred.shape} and gt {gt.shape}")
        inter, p, g = _pair_stats(pred, gt, "masks")
        yield from zip(inter, p, g)
        return
    pred_iter, gt_iter = iter(pred), iter(gt)
    index = 0
    sentinel = object()
    while True:
        a, b = next(pred_iter, sentinel), next(gt_iter, sentinel)
        if a is sentinel and b is sentinel:
            return
        if a is sentinel or b is sentinel:
            longer = "gt" if a is sentinel else "pred"
            raise ValueError(f"pred and gt differ in length: {longer} has more than {index} images")
        if np.ndim(a) != 3:
            raise ValueError(f"image {index}: expected masks [K, H, W], got shape {np.shape(a)}")
        yield _pair_stats(a, b, f"image {index}")
        index += 1


def dice_pairs(pred, gt) -> np.ndarray:
    """Dice of every (image, class) pair, float64 [N, K]; 1.0 where both masks are empty."""
    rows = [dice_from_counts(i, p, g) for i, p, g in _walk(pred, gt)]
    if not rows:
        raise ValueError("dice needs at least one image")
    return np.stack(rows)


def dice_severstal(pred, gt) -> DiceResult:
    """Severstal Dice: mean over (image, class) pairs; a pair with empty prediction and empty
    truth scores 1, an empty prediction on a non-empty truth (or the reverse) scores 0.

    pred, gt: bool [N, K, H, W] arrays, or equal-length iterables of bool [K, H, W] (images may
    then differ in size). Returns (mean, per_class [K])."""
    table = dice_pairs(pred, gt)
    return DiceResult(float(table.mean()), table.mean(axis=0))


def iou(pred, gt) -> np.ndarray:
    """Per-class IoU pooled over the set: sum of intersections / sum of unions, float64 [K].
    NaN for a class that is empty in both prediction and truth on every image."""
    inter_sum = union_sum = None
    for inter, p, g in _walk(pred, gt):
        union = p + g - inter
        inter_sum = inter if inter_sum is None else inter_sum + inter
        union_sum = union if union_sum is None else union_sum + union
    if inter_sum is None:
        raise ValueError("iou needs at least one image")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union_sum == 0, np.nan, inter_sum / np.maximum(union_sum, 1))


def _binary_labels(labels, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels shape {labels.shape} does not match scores shape ({n},)")
    uniq = np.unique(labels)
    if not np.all(np.isin(uniq, [0, 1])):
        raise ValueError(f"labels must be 0/1 (or bool), got values {uniq[:5].tolist()}")
    return labels.astype(bool)


def _scores(scores) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores hold NaN or infinite values")
    return scores


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    # start index of each run of equal values
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], len(values)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(values), np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative, ties counting one half (Mann-Whitney U with average ranks)."""
    scores = _scores(scores)
    labels = _binary_labels(labels, len(scores))
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        only = "negatives" if n_pos == 0 else "positives"
        raise ValueError(f"roc_auc needs positive and negative labels; got only {only} ({len(labels)} samples)")
    ranks = _average_ranks(scores)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


@dataclass(frozen=True)
class PrecisionRecall:
    threshold: float
    precision: float  # tp / (tp + fp); NaN when nothing is predicted positive
    recall: float  # tp / (tp + fn); NaN when there are no positives
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def positive_rate(self) -> float:
        """Share of samples predicted positive (the gate's pass rate)."""
        return (self.tp + self.fp) / max(1, self.tp + self.fp + self.fn + self.tn)


def precision_recall(scores, labels, threshold: float) -> PrecisionRecall:
    """Precision and recall when a sample is called positive at score >= threshold."""
    scores = _scores(scores)
    labels = _binary_labels(labels, len(scores))
    called = scores >= threshold
    tp = int(np.sum(called & labels))
    fp = int(np.sum(called & ~labels))
    fn = int(np.sum(~called & labels))
    tn = int(np.sum(~called & ~labels))
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    return PrecisionRecall(float(threshold), precision, recall, tp, fp, fn, tn)


def box_masks(shape: tuple[int, int], classes: int, boxes: Iterable[Any]) -> np.ndarray:
    """Rasterise boxes (``cls``, ``x0``, ``y0``, ``x1``, ``y1`` in px, x1/y1 exclusive) to bool
    ``[classes, H, W]``: pixel (y, x) is set when x0 <= x < x1 and y0 <= y < y1 (fractional corners:
    floor of x0/y0, ceil of x1/y1)."""
    h, w = shape
    masks = np.zeros((classes, h, w), dtype=bool)
    for box in boxes:
        x0, y0 = max(0, math.floor(box.x0)), max(0, math.floor(box.y0))
        x1, y1 = min(w, math.ceil(box.x1)), min(h, math.ceil(box.y1))
        if x1 > x0 and y1 > y0:
            masks[box.cls, y0:y1, x0:x1] = True
    return masks
