"""Thresholds tied to model hashes: the gate threshold and per-class pixel thresholds.

The gate decides which frames the segmentation model never sees, so its threshold is chosen
for recall first: the HIGHEST threshold on ``max_k scores`` that still passes at least
``recall_target`` of the defective frames of the calibration data. The price is the pass
rate (the fraction of all frames that go on to segmentation), reported beside it.

Per class, the pixel threshold and the minimum component area are the pair on a grid that
maximises the Severstal Dice of the segmentation model (calibration.metrics.dice_severstal:
mean over images, empty prediction on an empty mask = 1).

``calibrate`` runs a model pack through ONNX Runtime on labelled samples and writes
``calibration.json`` beside the models, atomically, naming the sha256 of each model it was
made for; engines.modelpack.load_calibration refuses it for any other model.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration.metrics import dice_from_counts  # one Dice formula for the project
from calibration.metrics import precision_recall
from engines.modelpack import CALIBRATION_FORMAT, ModelPack

DEFAULT_PIXEL_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(2, 19))  # 0.10 .. 0.90
DEFAULT_MIN_AREAS: tuple[int, ...] = (0, 16, 64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_MIN_POSITIVE_IMAGES = 5
# Kept for a class with too few positive images when --allow-missing-class is given:
# a middle threshold and no area filter, so nothing the model finds is thrown away.
MISSING_CLASS_DEFAULT = {"pixel_threshold": 0.5, "min_area_px": 0}


class CalibrationError(ValueError):
    """The data cannot support the requested calibration; the message says why."""


# --------------------------------------------------------------------------- gate


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
    pr = precision_recall(s, y, threshold)  # calibration.metrics: positive when score >= threshold
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


# --------------------------------------------------------------------------- classes


@dataclass
class ClassChoice:
    name: str
    pixel_threshold: float
    min_area_px: int
    dice: float
    n_images: int
    n_positive_images: int
    calibrated: bool = True
    note: str = ""
    dice_with_gate: float | None = None
    dice_on_positive: float | None = None  # mean Dice over the images holding the class
    image_recall: float | None = None  # share of images holding the class where a kept component touches it

    @property
    def empty_baseline(self) -> float:
        """The Dice a model that never predicts this class would score (empty/empty = 1)."""
        return (self.n_images - self.n_positive_images) / max(self.n_images, 1)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "pixel_threshold": self.pixel_threshold,
            "min_area_px": self.min_area_px,
            "dice": None if math.isnan(self.dice) else round(self.dice, 6),
            "n_images": self.n_images,
            "n_positive_images": self.n_positive_images,
            "calibrated": self.calibrated,
        }
        if self.dice_on_positive is not None:
            out["dice_on_positive_images"] = round(self.dice_on_positive, 6)
        if self.image_recall is not None:
            out["image_recall"] = round(self.image_recall, 6)
        out["dice_if_never_predicted"] = round(self.empty_baseline, 6)
        if self.dice_with_gate is not None:
            out["dice_with_gate"] = round(self.dice_with_gate, 6)
        if self.note:
            out["note"] = self.note
        return out


@dataclass
class ClassSearch:
    """Per-image Dice for every (class, pixel threshold, min area): [N, K, T, A]."""

    classes: tuple[str, ...]
    pixel_thresholds: tuple[float, ...]
    min_areas: tuple[int, ...]
    per_image: np.ndarray
    positives: np.ndarray  # [N, K] bool: image holds the class

    @property
    def grid(self) -> np.ndarray:
        """Mean Dice over images, [K, T, A]."""
        return self.per_image.mean(axis=0)


def _check_grids(pixel_thresholds: Sequence[float], min_areas: Sequence[int]) -> tuple[tuple[float, ...], tuple[int, ...]]:
    ts = tuple(float(t) for t in pixel_thresholds)
    areas = tuple(int(a) for a in min_areas)
    if not ts or any(not 0.0 < t < 1.0 for t in ts):
        raise CalibrationError(f"pixel thresholds must be a non-empty list in (0, 1), got {list(ts)}")
    if not areas or any(a < 0 for a in areas):
        raise CalibrationError(f"min areas must be a non-empty list of integers >= 0, got {list(areas)}")
    if list(ts) != sorted(set(ts)) or list(areas) != sorted(set(areas)):
        raise CalibrationError("pixel thresholds and min areas must be ascending without repeats")
    return ts, areas


def _cell_sums(mask: np.ndarray, stride: int, out_hw: tuple[int, int], where: str) -> np.ndarray:
    """Pixels of mask [H, W] per output cell [h, w]: the mask padded at the bottom/right to the
    cells' extent, as the model saw the padded image, then summed over stride x stride blocks."""
    oh, ow = out_hw
    h, w = mask.shape
    if oh * stride < h or ow * stride < w:
        raise CalibrationError(f"{where}: seg output {oh}x{ow} at stride {stride} does not cover the {h}x{w} image")
    padded = np.zeros((oh * stride, ow * stride), np.float64)
    padded[:h, :w] = mask
    return padded.reshape(oh, stride, ow, stride).sum(axis=(1, 3))


def search_class_thresholds(
    probs: Iterable[np.ndarray],
    gt_masks: Iterable[np.ndarray],
    classes: Sequence[str],
    pixel_thresholds: Sequence[float] = DEFAULT_PIXEL_THRESHOLDS,
    min_areas: Sequence[int] = DEFAULT_MIN_AREAS,
    stride: int = 1,
) -> ClassSearch:
    """Dice of every image, class and grid point.

    ``probs`` yields one ``[K, h, w]`` array per image at output stride ``stride``;
    ``gt_masks`` yields the matching ``[K, H, W]`` bool masks at image size. As in
    engines/components.py (the rule the agent and the evaluation share), a pixel is on when ``prob >= threshold``,
    components are found with cv2.connectedComponentsWithStats (8-connectivity) at output
    resolution and one whose area (cells x stride^2, in image px) is below the min area is
    dropped; the kept mask is upsampled nearest (each cell to stride x stride px, cropped to the
    image: the input may have been padded at the bottom/right) and scored with the Severstal Dice
    of calibration.metrics. The Dice is computed from per-component counts (image pixels and
    truth pixels under each component's cells), which equals scoring the upsampled mask and
    costs one pass per threshold instead of one per grid point
    (tests/calibration/test_thresholds.py checks it against engines.evaluate.components).
    """
    return _search_pairs(zip(probs, gt_masks, strict=True), classes, pixel_thresholds, min_areas, stride)


def _search_pairs(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]],
    classes: Sequence[str],
    pixel_thresholds: Sequence[float],
    min_areas: Sequence[int],
    stride: int,
) -> ClassSearch:
    import cv2

    ts, areas = _check_grids(pixel_thresholds, min_areas)
    if stride < 1:
        raise CalibrationError(f"output stride must be >= 1, got {stride}")
    k_count = len(classes)
    cell_px = stride * stride
    rows: list[np.ndarray] = []
    positives: list[np.ndarray] = []
    for index, (p, gt) in enumerate(pairs):
        p = np.asarray(p)
        gt = np.asarray(gt, dtype=bool)
        if p.ndim != 3 or p.shape[0] != k_count or gt.ndim != 3 or gt.shape[0] != k_count:
            raise CalibrationError(
                f"image {index}: probs {p.shape} and masks {gt.shape} must both be [K={k_count}, H, W]"
            )
        if not np.isfinite(p).all():
            raise CalibrationError(f"image {index}: probabilities hold NaN or infinite values")
        out_hw = p.shape[1:]
        valid = _cell_sums(np.ones(gt.shape[1:], bool), stride, out_hw, f"image {index}")  # image px per cell
        table = np.empty((k_count, len(ts), len(areas)), np.float64)
        for k in range(k_count):
            # Dice from counts: a kept cell adds its image pixels to |pred| and its truth pixels
            # to the intersection, exactly what upsampling it and cropping to the image gives.
            gt_cells = _cell_sums(gt[k], stride, out_hw, f"image {index}")
            g = np.full(len(areas), int(gt[k].sum()), np.int64)
            for ti, t in enumerate(ts):
                low = p[k] >= t
                if not low.any():
                    zero = np.zeros(len(areas), np.int64)
                    table[k, ti, :] = dice_from_counts(zero, zero, g)
                    continue
                n, labels, stats, _ = cv2.connectedComponentsWithStats(low.view(np.uint8), connectivity=8)
                comp_area = stats[:, cv2.CC_STAT_AREA].astype(np.int64) * cell_px
                comp_area[0] = -1  # background is never kept
                comp_px = np.bincount(labels.ravel(), weights=valid.ravel(), minlength=n)
                comp_inter = np.bincount(labels.ravel(), weights=gt_cells.ravel(), minlength=n)
                keep = comp_area[None, :] >= np.asarray(areas)[:, None]  # [A, n]
                pred_px = np.rint(keep @ comp_px).astype(np.int64)
                inter = np.rint(keep @ comp_inter).astype(np.int64)
                table[k, ti, :] = dice_from_counts(inter, pred_px, g)
        rows.append(table)
        positives.append(gt.reshape(k_count, -1).any(axis=1))
    if not rows:
        raise CalibrationError("no images with masks to calibrate the segmentation thresholds on")
    return ClassSearch(tuple(classes), ts, areas, np.stack(rows), np.stack(positives))


def pick_class_thresholds(
    search: ClassSearch,
    min_positive_images: int = DEFAULT_MIN_POSITIVE_IMAGES,
    allow_missing_class: bool = False,
    min_image_recall: float | None = None,
) -> dict[str, ClassChoice]:
    """Per class, the Dice-maximising grid point; ties go to the lower threshold, then the
    smaller min area (the choice that drops fewer pixels: a missed defect is a shipped defect).

    ``min_image_recall``: only grid points where a kept component touches the truth in at least
    this share of the images holding the class are eligible (the Dice optimum may drop small
    defects wholesale to avoid false alarms); when no point reaches it, the points with the
    highest such recall are, and the class gets a note."""
    if min_image_recall is not None and not 0.0 < min_image_recall <= 1.0:
        raise CalibrationError(f"min_image_recall must be in (0, 1], got {min_image_recall!r}")
    grid = search.grid
    n_images = search.per_image.shape[0]
    out: dict[str, ClassChoice] = {}
    short: list[str] = []
    for k, name in enumerate(search.classes):
        n_pos = int(search.positives[:, k].sum())
        if n_pos < min_positive_images:
            if not allow_missing_class:
                short.append(f"{name!r} ({n_pos})")
                continue
            out[name] = ClassChoice(
                name, MISSING_CLASS_DEFAULT["pixel_threshold"], MISSING_CLASS_DEFAULT["min_area_px"],
                float("nan"), n_images, n_pos, calibrated=False,
                note=f"only {n_pos} positive images (< {min_positive_images}); documented default kept, not calibrated",
            )
            continue
        held = search.positives[:, k]
        objective = grid[k]
        recall_note = ""
        if min_image_recall is not None and held.any():
            found = (search.per_image[held, k] > 0).mean(axis=0)  # [T, A]
            floor = min_image_recall if (found >= min_image_recall - 1e-12).any() else found.max()
            if floor < min_image_recall:
                recall_note = (f"no grid point finds the class in {min_image_recall} of its images; "
                               f"best reached {floor:.4f}")
            objective = np.where(found >= floor - 1e-12, grid[k], -np.inf)
        flat = int(np.argmax(objective))  # first maximum in (threshold, area) ascending order
        ti, ai = np.unravel_index(flat, grid[k].shape)
        choice = ClassChoice(
            name, search.pixel_thresholds[ti], search.min_areas[ai], float(grid[k, ti, ai]), n_images, n_pos,
            dice_on_positive=float(search.per_image[held, k, ti, ai].mean()) if held.any() else None,
            # Dice > 0 on an image holding the class <=> some kept pixel overlaps the truth
            image_recall=float((search.per_image[held, k, ti, ai] > 0).mean()) if held.any() else None,
        )
        if n_pos and choice.dice <= choice.empty_baseline + 1e-9:
            # Dice-optimal here means "never predict it", or the recall floor costs that much.
            choice.note = ("WARNING: no better than never predicting this class "
                           f"(Dice {choice.dice:.4f} <= {choice.empty_baseline:.4f})")
        if recall_note:
            choice.note = "; ".join(filter(None, [choice.note, "WARNING: " + recall_note]))
        out[name] = choice
    if short:
        raise CalibrationError(
            f"classes with fewer than {min_positive_images} positive images: {', '.join(short)}; "
            "add data or pass --allow-missing-class to keep the documented default for them"
        )
    return out


def choose_class_thresholds(
    probs: Iterable[np.ndarray],
    gt_masks: Iterable[np.ndarray],
    classes: Sequence[str],
    pixel_thresholds: Sequence[float] = DEFAULT_PIXEL_THRESHOLDS,
    min_areas: Sequence[int] = DEFAULT_MIN_AREAS,
    min_positive_images: int = DEFAULT_MIN_POSITIVE_IMAGES,
    allow_missing_class: bool = False,
    stride: int = 1,
) -> dict[str, ClassChoice]:
    """Per class, the (pixel threshold, min component area) maximising Severstal Dice.

    Refuses (CalibrationError) when a class has fewer than ``min_positive_images`` images
    holding it, unless ``allow_missing_class``: then the class keeps MISSING_CLASS_DEFAULT,
    marked ``calibrated: false`` in the file."""
    search = search_class_thresholds(probs, gt_masks, classes, pixel_thresholds, min_areas, stride)
    return pick_class_thresholds(search, min_positive_images, allow_missing_class)


# --------------------------------------------------------------------------- running a pack


@dataclass
class CalibrationResult:
    path: Path | None
    document: dict[str, Any]
    gate: GateChoice
    classes: dict[str, ClassChoice]
    gate_scores: np.ndarray  # [N] max over classes
    gate_labels: np.ndarray  # [N] bool
    search: ClassSearch | None = field(default=None, repr=False)
    report_path: Path | None = None

    def summary(self) -> str:
        g = self.gate
        d = self.document["data"]
        lines = [
            f"calibration for profile {self.document.get('profile')}: models "
            + ", ".join(f"{role} {sha[:12]}" for role, sha in self.document["models"].items()),
            f"data: {d['what']} split={d['split']} images={d['n_images']} defective={d['n_defective']}",
            f"gate: threshold {g.threshold:.6g}  recall {g.recall:.4f} (target {g.recall_target}, "
            f"95% lower bound {g.recall_lower_95:.4f}, missed {g.n_defective - g.passed_defective}/{g.n_defective})  "
            f"precision {g.precision:.4f}  pass rate {g.pass_rate:.4f} of {g.n} frames",
        ]
        if self.document["gate"].get("note"):
            lines.append(f"gate: {self.document['gate']['note']}")
        sm = self.document["gate"].get("size_matched")
        if sm:
            lines.append(f"gate, size-matched view at this threshold: recall {sm['recall']:.4f} on {sm['n_defect_crops']} "
                         f"defect crops, pass rate {sm['pass_rate_clean_crops']:.4f} on {sm['n_clean_crops']} clean crops "
                         f"(its own threshold {sm['own_threshold']:.6g}; threshold chosen by: "
                         f"{self.document['gate']['chosen_by']})")
            est = sm.get("line_frame_pass_rate_estimate")
            if est:
                lines.append(f"gate, rough pass rate of a clean line frame at this threshold: {est['value']:.4f} "
                             f"({est['how']})")
        for name, c in self.classes.items():
            flag = "" if c.calibrated else "  [NOT CALIBRATED: default kept]"
            if c.calibrated and c.note:
                flag = f"  [{c.note}]"
            details = []
            if c.dice_on_positive is not None:
                details.append(f"on positive images {c.dice_on_positive:.4f}, found in {c.image_recall:.4f} of them")
            if c.dice_with_gate is not None:
                details.append(f"with gate {c.dice_with_gate:.4f}")
            details.append(f"never predicting it scores {c.empty_baseline:.4f}")
            dice = "n/a" if math.isnan(c.dice) else f"{c.dice:.4f}"
            lines.append(
                f"class {name}: pixel_threshold {c.pixel_threshold:.2f}  min_area_px {c.min_area_px}  "
                f"dice {dice} ({'; '.join(details)})  positive images {c.n_positive_images}/{c.n_images}{flag}"
            )
        if self.path is not None:
            lines.append(f"wrote {self.path}")
        if self.report_path is not None:
            lines.append(f"report {self.report_path}")
        return "\n".join(lines)


def _tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("coilsight")
    except PackageNotFoundError:
        return "unknown"


def _sample_masks(sample: Any) -> np.ndarray:
    if sample.masks is not None:
        return np.asarray(sample.masks, dtype=bool)
    from engines.datasets import boxes_to_masks

    return np.asarray(boxes_to_masks(sample), dtype=bool)


def _batches(shapes: Sequence[tuple[int, ...]], batch: int) -> list[list[int]]:
    """Indices grouped by equal image shape, in chunks of at most `batch`, in first-seen order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(i)
    return [idx[j : j + batch] for idx in groups.values() for j in range(0, len(idx), batch)]


def write_json_atomic(path: Path, document: dict[str, Any]) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; the agent's service user must read the file
        with os.fdopen(fd, "w") as f:
            json.dump(document, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def calibrate(
    pack: ModelPack,
    samples: Sequence[Any],
    *,
    negatives: Sequence[Any] = (),
    size_matched_positives: Sequence[Any] = (),
    gate_view: str = "images",
    recall_target: float = 0.99,
    min_gate_positives: int | None = None,
    pixel_thresholds: Sequence[float] = DEFAULT_PIXEL_THRESHOLDS,
    min_areas: Sequence[int] = DEFAULT_MIN_AREAS,
    min_positive_images: int = DEFAULT_MIN_POSITIVE_IMAGES,
    allow_missing_class: bool = False,
    min_image_recall: float | None = None,
    data_info: dict[str, Any] | None = None,
    backend: str = "onnxruntime",
    batch: int = 8,
    threads: int = 0,
    output: str | Path | None = None,
    write: bool = True,
) -> CalibrationResult:
    """Run the pack's gate and seg models over `samples` and choose every threshold.

    `samples` are engines.datasets.Sample-like (image uint8 HxW or HxWxC, masks bool [K,H,W]
    or None with boxes, labels multi-hot [K], source). `negatives` are defect-free frames for
    the gate only (clean crops of data without defect-free images), as engines/evaluate.py uses
    them. `size_matched_positives` (defect crops of the negatives' size) only add a second,
    reported view of the gate at the chosen threshold: a fully convolutional gate taking the max
    over a larger image can score higher for size alone. Images are fed as engines/evaluate.py feeds them: uint8 NCHW, padded at the
    bottom/right to a multiple of PAD_MULTIPLE, equal sizes batched. Writes calibration.json
    (atomically) beside the models unless `output` says elsewhere or `write` is False.
    """
    from engines.backends import load_backend_class
    from engines.evaluate import pad_to_multiple, to_chw

    if pack.seg is None:
        raise CalibrationError(f"{pack.directory}: the pack has no seg model; per-class thresholds need one")
    if gate_view not in ("both", "images"):
        raise CalibrationError(f"gate_view must be 'both' or 'images', got {gate_view!r}")
    if batch < 1:
        raise CalibrationError(f"batch must be >= 1, got {batch}")
    ts, areas = _check_grids(pixel_thresholds, min_areas)
    k_count = len(pack.classes)
    n = len(samples)
    if n == 0:
        raise CalibrationError("no samples to calibrate on")
    # gate input: samples (which also go to segmentation), negatives, size-matched positives
    frames = list(samples) + list(negatives) + list(size_matched_positives)
    n_main = n + len(negatives)
    n_frames = len(frames)

    # Truth first (cheap): refuse before any inference when the data cannot support the result.
    labels = np.zeros((n_frames, k_count), bool)
    shapes: list[tuple[int, ...]] = []
    for i, s in enumerate(frames):
        lab = np.asarray(s.labels).ravel()
        if lab.size != k_count:
            raise CalibrationError(f"{s.source}: {lab.size} labels, the model pack has {k_count} classes")
        if n <= i < n_main and lab.any():
            raise CalibrationError(f"{s.source}: a gate negative must be defect-free, its labels are {lab.tolist()}")
        if i >= n_main and not lab.any():
            raise CalibrationError(f"{s.source}: a size-matched positive must hold a defect")
        labels[i] = lab > 0
        shapes.append(tuple(np.asarray(s.image).shape))
    defective_all = labels.any(axis=1)
    defective = defective_all[:n_main]
    positives = labels[:n].sum(axis=0)
    short = [f"{name!r} ({int(c)})" for name, c in zip(pack.classes, positives) if c < min_positive_images]
    if short and not allow_missing_class:
        raise CalibrationError(
            f"classes with fewer than {min_positive_images} positive images: {', '.join(short)}; "
            "add data or pass --allow-missing-class to keep the documented default for them"
        )
    need = min_positives_for(recall_target) if min_gate_positives is None else min_gate_positives
    if defective.sum() < need or defective.all() or not defective.any():
        # choose_gate_threshold words the exact reason; call it on the truth alone to fail fast
        choose_gate_threshold(np.linspace(0, 1, n_main), defective, recall_target, min_gate_positives)

    cls = load_backend_class(backend)
    gate_scores = np.empty((n_frames, k_count), np.float32)
    stride = pack.seg.output_stride

    def batch_input(idx: list[int]) -> np.ndarray:
        return np.stack([pad_to_multiple(to_chw(frames[i].image, pack.channels, frames[i].source),
                                         pack.pad_multiple) for i in idx])

    with cls(pack.gate.path, max_batch=batch, threads=threads) as gate:
        for idx in _batches(shapes, batch):
            out = gate.infer(pack.gate.prepare(batch_input(idx)))[pack.gate.output]
            if out.shape != (len(idx), k_count):
                raise CalibrationError(f"gate output {pack.gate.output!r} has shape {out.shape}, "
                                       f"expected [{len(idx)}, {k_count}]")
            gate_scores[idx] = out
    all_scores = gate_scores.max(axis=1).astype(np.float64)
    frame_scores = all_scores[:n_main]
    gate_choice = choose_gate_threshold(frame_scores, defective, recall_target, min_gate_positives)
    chosen_by = "images"
    size_doc = None
    if size_matched_positives:
        # Same-size view: defect crops vs the clean crops (the gate is trained on such crops).
        # A crop may cut a large defect, so this view is pessimistic for recall; "both" takes it
        # as a constraint all the same.
        crop_pos = all_scores[n_main:]
        crop_neg = frame_scores[n:]
        view_scores = np.r_[crop_pos, crop_neg]
        view_labels = np.r_[np.ones(crop_pos.size, bool), np.zeros(crop_neg.size, bool)]
        own = choose_gate_threshold(view_scores, view_labels, recall_target, min_gate_positives)
        if gate_view == "both" and own.threshold < gate_choice.threshold:
            gate_choice = gate_at(frame_scores, defective, own.threshold, recall_target)
            chosen_by = "size_matched"
        at = gate_at(view_scores, view_labels, gate_choice.threshold, recall_target)
        size_doc = {
            "what": "defect crops (engines.datasets.defect_crops) of the clean crops' size vs those clean crops",
            "own_threshold": own.threshold,
            "recall": round(at.recall, 6),
            "pass_rate_clean_crops": round(at.passed_clean / max(at.n_clean, 1), 6),
            "n_defect_crops": int(crop_pos.size),
            "n_clean_crops": int(crop_neg.size),
            "recall_lower_95": round(at.recall_lower_95, 6),
        }
        if negatives:
            # What a whole line frame would cost: it holds many windows of the crops' size and
            # passes when any one does. Windows are not independent, so this is a rough guide.
            ch, cw = np.asarray(negatives[0].image).shape[:2]
            windows = max(1, (pack.height // ch) * (pack.width // cw))
            size_doc["line_frame_pass_rate_estimate"] = {
                "value": round(1.0 - (1.0 - at.passed_clean / max(at.n_clean, 1)) ** windows, 6),
                "how": f"1 - (1 - clean-crop pass rate)^{windows}: a {pack.height}x{pack.width} frame holds "
                       f"{windows} windows of {ch}x{cw}; assumes independent windows",
            }
    gate_doc = gate_choice.to_json()
    gate_doc["chosen_by"] = chosen_by
    t = gate_choice.threshold
    gate_doc["threshold_logit"] = round(math.log(t / (1.0 - t)), 6) if 0.0 < t < 1.0 else None
    if t > 0.999:
        # float32 spacing near 1 is 6e-8: fine where the sigmoid runs in FP32, not in FP16 (5e-4)
        gate_doc["note"] = (f"WARNING: gate scores saturate near 1 (threshold {t:.7f}, logit "
                            f"{gate_doc['threshold_logit']}); every backend must keep the final sigmoid in FP32")
    if size_doc is not None:
        gate_doc["size_matched"] = size_doc

    def probs_and_masks():
        with cls(pack.seg.path, max_batch=batch, threads=threads) as seg:
            for idx in _batches(shapes[:n], batch):
                x = batch_input(idx)
                out = seg.infer(pack.seg.prepare(x))[pack.seg.output]
                want = (len(idx), k_count, x.shape[2] // stride, x.shape[3] // stride)
                if out.shape != want:
                    raise CalibrationError(f"seg output {pack.seg.output!r} has shape {out.shape}, expected "
                                           f"{list(want)} for input {list(x.shape)} at stride {stride}")
                for j, i in enumerate(idx):
                    yield i, out[j], _sample_masks(frames[i])

    order: list[int] = []

    def in_batch_order():
        for i, p, m in probs_and_masks():
            order.append(i)
            yield p, m

    search = _search_pairs(in_batch_order(), pack.classes, ts, areas, stride)
    # rows come in batch order; put them back in sample order
    per_image = np.empty_like(search.per_image)
    per_image[order] = search.per_image
    pos = np.empty_like(search.positives)
    pos[order] = search.positives
    search = ClassSearch(search.classes, search.pixel_thresholds, search.min_areas, per_image, pos)
    choices = pick_class_thresholds(search, min_positive_images, allow_missing_class, min_image_recall)

    # Dice of the whole pipeline: frames the gate stops get no prediction at all.
    stopped = frame_scores[:n] < gate_choice.threshold
    for k, name in enumerate(pack.classes):
        c = choices[name]
        if not c.calibrated:
            continue
        ti, ai = ts.index(c.pixel_threshold), areas.index(c.min_area_px)
        d = search.per_image[:, k, ti, ai].copy()
        d[stopped] = np.where(search.positives[stopped, k], 0.0, 1.0)
        c.dice_with_gate = float(d.mean())

    info = dict(data_info or {})
    info.setdefault("what", "samples")
    info.setdefault("split", "unknown")
    info["n_images"] = n
    info["n_defective"] = int(defective[:n].sum())
    info["n_gate_negatives"] = len(negatives)
    info["n_size_matched_positives"] = len(size_matched_positives)
    info["n_positive_images"] = {name: int(c) for name, c in zip(pack.classes, positives)}
    document: dict[str, Any] = {
        "format": CALIBRATION_FORMAT,
        "profile": pack.profile,
        "models": {role: m.sha256 for role, m in pack.models.items()},
        "gate": gate_doc,
        "classes": {name: choices[name].to_json() for name in pack.classes},
        "search": {
            "pixel_thresholds": list(ts),
            "min_areas_px": list(areas),
            "objective": "Severstal Dice (calibration.metrics.dice_severstal), mean over images; "
                         "components below min_area_px (output cells x stride^2, as agent/postprocess.py "
                         "counts them) removed, masks upsampled nearest to image size",
            "tie_break": "lowest pixel_threshold, then smallest min_area_px",
            "min_positive_images": min_positive_images,
            "min_image_recall": min_image_recall,
            "min_gate_positives": min_positives_for(recall_target) if min_gate_positives is None else min_gate_positives,
            "missing_class_default": MISSING_CLASS_DEFAULT,
        },
        "data": info,
        "backend": cls.name,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "tool": {"name": "coilsight calibrate thresholds", "version": _tool_version()},
    }
    path = Path(output) if output else pack.directory / "calibration.json"
    if write:
        write_json_atomic(path, document)
    return CalibrationResult(
        path=path if write else None,
        document=document,
        gate=gate_choice,
        classes=choices,
        gate_scores=frame_scores,
        gate_labels=defective,
        search=search,
    )


# --------------------------------------------------------------------------- data sources

def default_models_dir(profile: str) -> Path:
    import engines

    return Path(engines.__file__).resolve().parent / "models" / profile


def severstal_folder(data: Path) -> tuple[Path, Path]:
    """(csv, image folder) of a folder in Severstal layout."""
    for csv_name, images in (("ground_truth.csv", "frames"), ("train.csv", "train_images"), ("train.csv", "images")):
        if (data / csv_name).is_file() and (data / images).is_dir():
            return data / csv_name, data / images
    raise CalibrationError(
        f"{data}: not a Severstal-layout folder; expected ground_truth.csv + frames/ (camera simulator) "
        "or train.csv + train_images/"
    )


def load_calibration_samples(
    pack: ModelPack,
    *,
    data: Path | None = None,
    dataset_root: Path | None = None,
    split: str = "val",
) -> tuple[list[Any], list[Any], list[Any], dict[str, Any]]:
    """(samples, gate-only negatives, size-matched gate positives, the `data` block).

    Data without defect-free images (NEU) gets gate negatives from engines.datasets.clean_crops
    of the same split, with the settings training used (model.json "training.clean_crops",
    else engines.datasets.CLEAN_CROPS_DEFAULT), and defect crops of that size for the size-matched
    gate view, exactly as engines/evaluate.py does."""
    from engines import datasets

    grey = pack.channels == 1
    if (data is None) == (dataset_root is None):
        raise CalibrationError("give exactly one of --data DIR or --dataset-root ROOT")
    if data is not None:
        csv_path, images = severstal_folder(Path(data))
        ds = datasets.read_severstal(csv_path, images, pack.classes, grey=grey, name=Path(data).name)
        return list(ds), [], [], {"what": f"Severstal-layout folder {data}", "split": "all", "source": str(csv_path)}
    if split == "test":
        raise CalibrationError("the test split is kept for evaluation; calibrate on --split val")
    ds = datasets.load_profile_dataset(pack.profile, dataset_root, split, grey=grey)
    if tuple(ds.classes) != tuple(pack.classes):
        raise CalibrationError(
            f"dataset {ds.name} classes {list(ds.classes)} differ from the model pack's {list(pack.classes)}"
        )
    if len(ds) == 0:
        raise CalibrationError(f"split {split!r} of {ds.name} under {dataset_root} holds no images")
    samples = list(ds)
    info: dict[str, Any] = {"what": f"{ds.name} under {dataset_root}", "split": split,
                            "split_rule": "engines.datasets.assign_split: first byte of sha1(file stem) "
                                          "< 51 test, < 82 val, else train"}
    negatives: list[Any] = []
    size_matched: list[Any] = []
    if ds.labels.any(axis=1).all():
        settings = datasets.clean_crop_settings(pack.meta.get("training"))
        negatives = datasets.clean_crops(
            samples, settings["size"], stride=settings["stride"], margin=settings["margin"],
            max_per_image=settings["max_per_image"],
        )
        size_matched = datasets.defect_crops(samples, settings["size"], max_per_image=1)
        info["gate_negatives"] = {"from": "engines.datasets.clean_crops of the same split (it has no "
                                          "defect-free image); gate only", **settings, "n": len(negatives)}
    return samples, negatives, size_matched, info


def run_threshold_calibration(
    *,
    profile: str,
    models: Path | None = None,
    data: Path | None = None,
    dataset_root: Path | None = None,
    split: str = "val",
    recall_target: float = 0.99,
    min_gate_positives: int | None = None,
    min_positive_images: int = DEFAULT_MIN_POSITIVE_IMAGES,
    allow_missing_class: bool = False,
    min_image_recall: float | None = None,
    pixel_thresholds: Sequence[float] | None = None,
    min_areas: Sequence[int] | None = None,
    gate_view: str = "images",
    batch: int = 8,
    threads: int = 0,
    output: Path | None = None,
    report: Path | None = None,
) -> CalibrationResult:
    """What `coilsight calibrate thresholds` does: load, calibrate, write, report."""
    from engines.modelpack import load_model_pack

    pack = load_model_pack(models or default_models_dir(profile))
    if pack.profile != profile:
        raise CalibrationError(f"{pack.directory}/model.json is for profile {pack.profile!r}, not {profile!r}")
    samples, negatives, size_matched, info = load_calibration_samples(
        pack, data=data, dataset_root=dataset_root, split=split
    )
    result = calibrate(
        pack, samples,
        negatives=negatives,
        size_matched_positives=size_matched,
        gate_view=gate_view,
        recall_target=recall_target,
        min_gate_positives=min_gate_positives,
        pixel_thresholds=pixel_thresholds or DEFAULT_PIXEL_THRESHOLDS,
        min_areas=min_areas or DEFAULT_MIN_AREAS,
        min_positive_images=min_positive_images,
        allow_missing_class=allow_missing_class,
        min_image_recall=min_image_recall,
        data_info=info,
        batch=batch,
        threads=threads,
        output=output,
    )
    if report is not None:
        from calibration.reports import write_report

        result.report_path = write_report(result, report)
    return result
