"""Per-class pixel thresholds and minimum component areas.

Per class, the pixel threshold and the minimum component area are the pair on a grid that
maximises the Severstal Dice of the segmentation model (metrics.dice_severstal: mean over
images, empty prediction on an empty mask = 1), optionally only among pairs that find the class
in a share of its images.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from calibration import CalibrationError
from metrics import dice_from_counts  # one Dice formula for the project

DEFAULT_PIXEL_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(2, 19))  # 0.10 .. 0.90
DEFAULT_MIN_AREAS: tuple[int, ...] = (0, 16, 64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_MIN_POSITIVE_IMAGES = 5
# Kept for a class with too few positive images when --allow-missing-class is given:
# a middle threshold and no area filter, so nothing the model finds is thrown away.
MISSING_CLASS_DEFAULT = {"pixel_threshold": 0.5, "min_area_px": 0}

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
    of metrics. The Dice is computed from per-component counts (image pixels and
    truth pixels under each component's cells), which equals scoring the upsampled mask and
    costs one pass per threshold instead of one per grid point
    (tests/calibration/test_thresholds.py checks it against training.evaluate.components).
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


