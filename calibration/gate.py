"""The gate threshold: chosen for recall first.

The gate decides which frames the segmentation model never sees, so its threshold is the
HIGHEST threshold on ``max_k scores`` that still passes at least ``recall_target`` of the
defective frames of the calibration data. The price is the pass rate (the fraction of all
frames that go on to segmentation), reported beside it, with a Wilson lower bound on recall.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from calibration import CalibrationError
from metrics import precision_recall

# calibration.json gate.chosen_by of a threshold chosen on whole line frames (training/gate_strip.py):
# `coilsight calibrate thresholds` keeps such a gate section (calibration.run.line_frame_gate)
LINE_FRAMES_CHOSEN_BY = "textured line frames"


def min_positives_for(recall_target: float) -> int:
    """Fewest defective frames for which a recall target means something.

    With n defective frames recall moves in steps of 1/n. Unless one missed frame can take
    recall below the target (n >= 1 / (1 - target)), "recall >= target" only means "missed
    none" and says nothing about how close the threshold is to missing the target.
    """
    return math.ceil(1.0 / (1.0 - recall_target) - 1e-9)


def wilson_lower(successes: int, n: int, z: float = 1.6449) -> float:
    """One-sided 95 % Wilson lower bound of a binomial proportion."""
    if n == 0:
        return 0.0
    p = successes / n
    denom = 1 + z * z / n
    centre = p + z * z / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - margin) / denom)


@dataclass(frozen=True)
class GateChoice:
    threshold: float
    recall_target: float
    recall: float
    precision: float
    pass_rate: float
    n: int
    n_defective: int
    n_clean: int
    passed_defective: int
    passed_clean: int
    recall_lower_95: float

    def to_json(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "recall_target": self.recall_target,
            "recall": round(self.recall, 6),
            "precision": round(self.precision, 6),
            "pass_rate": round(self.pass_rate, 6),
            "n": self.n,
            "n_defective": self.n_defective,
            "n_clean": self.n_clean,
            "missed_defective": self.n_defective - self.passed_defective,
            "passed_clean": self.passed_clean,
            "recall_lower_95": round(self.recall_lower_95, 6),
            "score": "max over classes of the gate's scores; a frame passes when score >= threshold",
        }


def choose_gate_threshold(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[bool] | np.ndarray,
    recall_target: float = 0.99,
    min_positives: int | None = None,
) -> GateChoice:
    """The highest threshold whose frame-level recall of defective frames is >= recall_target.

    ``scores``: one score per frame (the agent uses max over classes), in [0, 1];
    ``labels``: True for a defective frame. A frame passes when ``score >= threshold``.
    ``min_positives`` defaults to :func:`min_positives_for` (100 for 0.99).
    """
    if not (isinstance(recall_target, (int, float)) and 0.0 < recall_target < 1.0):
        raise CalibrationError(f"recall_target must be in (0, 1), got {recall_target!r}")
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise CalibrationError(f"gate: {s.size} scores but {y.size} labels")
    if s.size == 0:
        raise CalibrationError("gate: no frames to calibrate on")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise CalibrationError("gate: labels must be booleans or 0/1")
        y = y.astype(bool)
    if not np.isfinite(s).all():
        raise CalibrationError(f"gate: {int((~np.isfinite(s)).sum())} scores are NaN or infinite")
    if s.min() < 0.0 or s.max() > 1.0:
        raise CalibrationError(f"gate: scores must lie in [0, 1] (sigmoid outputs), got {s.min():.4g}..{s.max():.4g}")
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0:
        raise CalibrationError("gate: no defective frames in the calibration data; recall cannot be measured")
    if n_neg == 0:
        raise CalibrationError(
            "gate: no clean frames in the calibration data; the pass rate (speed cost) cannot be measured"
        )
    need = min_positives_for(recall_target) if min_positives is None else int(min_positives)
    if n_pos < need:
        raise CalibrationError(
            f"gate: {n_pos} defective frames are too few for recall target {recall_target} "
            f"(need >= {need} so that one missed frame can show as recall below target); "
            "add data or lower --recall-target"
        )
    if s.min() == s.max():
        raise CalibrationError(f"gate: all {s.size} scores are equal ({s.min():.6g}); the gate separates nothing")
    pos = np.sort(s[y])[::-1]  # descending
    k = math.ceil(recall_target * n_pos - 1e-9)  # defective frames that must pass
    return gate_at(s, y, float(pos[k - 1]), recall_target)


def gate_at(scores: np.ndarray, labels: np.ndarray, threshold: float, recall_target: float) -> GateChoice:
    """The gate's figures on (scores, labels) at a given threshold."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    pr = precision_recall(s, y, threshold)  # metrics: positive when score >= threshold
    return GateChoice(
        threshold=threshold,
        recall_target=float(recall_target),
        recall=pr.recall,
        precision=pr.precision,
        pass_rate=pr.positive_rate,
        n=int(s.size),
        n_defective=n_pos,
        n_clean=n_neg,
        passed_defective=pr.tp,
        passed_clean=pr.fp,
        recall_lower_95=wilson_lower(pr.tp, n_pos),
    )


def gate_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, recall, pass_rate) at every distinct score, thresholds descending."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    last_of_tie = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    tp = np.cumsum(y_sorted)[last_of_tie]
    passed = np.arange(1, s.size + 1)[last_of_tie]
    return s_sorted[last_of_tie], tp / max(int(y.sum()), 1), passed / s.size


