"""Gate negatives for data without defect-free images: clean crops, and defect crops of their size."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from training.datasets.core import Box, DatasetError, Sample, _multi_hot

# -- negatives for data without defect-free images ---------------------------------------------


def clean_crops(
    samples: Iterable[Sample],
    size: int | tuple[int, int],
    *,
    stride: int | tuple[int, int] | None = None,
    margin: int = 0,
    max_per_image: int | None = None,
) -> list[Sample]:
    """Defect-free crops cut from annotated images (NEU has no defect-free image).

    The definition (training and evaluation share it): windows of `size` (h, w) on a grid that
    starts at the image's top-left corner and steps by `stride` (default: `size`, so windows do
    not overlap) and stays inside the image. A window is kept when it overlaps no box of the
    sample grown by `margin` px on every side (and, when the sample has masks, holds no mask
    pixel). Kept windows are taken in raster order (rows, then columns), at most `max_per_image`
    per image. Each crop is a Sample with no boxes, all-zero labels (and all-zero masks when the
    source has masks), `source` = the image path and `crop` = (y, x, h, w).
    """
    ch, cw = (size, size) if isinstance(size, int) else size
    sy, sx = (ch, cw) if stride is None else ((stride, stride) if isinstance(stride, int) else stride)
    if ch < 1 or cw < 1 or sy < 1 or sx < 1 or margin < 0:
        raise DatasetError(f"clean_crops: size {size} and stride {stride} must be >= 1, margin {margin} >= 0")
    crops: list[Sample] = []
    for sample in samples:
        h, w = sample.shape
        k = len(sample.classes)
        taken = 0
        for y in range(0, h - ch + 1, sy):
            for x in range(0, w - cw + 1, sx):
                if max_per_image is not None and taken >= max_per_image:
                    break
                hit = any(
                    b.x0 - margin < x + cw and b.x1 + margin > x and b.y0 - margin < y + ch and b.y1 + margin > y
                    for b in sample.boxes
                )
                if hit or (sample.masks is not None and sample.masks[:, y : y + ch, x : x + cw].any()):
                    continue
                masks = None if sample.masks is None else np.zeros((k, ch, cw), dtype=bool)
                crops.append(Sample(
                    image=np.ascontiguousarray(sample.image[y : y + ch, x : x + cw]),
                    masks=masks,
                    boxes=[],
                    labels=np.zeros(k, np.float32),
                    classes=sample.classes,
                    source=sample.source,
                    crop=(y, x, ch, cw),
                ))
                taken += 1
    return crops


def defect_crops(samples: Iterable[Sample], size: int | tuple[int, int], *, max_per_image: int = 1) -> list[Sample]:
    """Crops of `size` (h, w) around annotated defects: the positive twins of clean_crops.

    For each box in annotation order (at most `max_per_image` per image), the window centred on
    the box centre, shifted to lie inside the image (images smaller than `size` give none). The
    crop keeps the boxes that overlap it (clipped, in crop coordinates), its masks cut the same
    way, and labels from what it keeps. With clean_crops of the same size it gives a gate view
    where positives and negatives have one size, so a model's response to image size cannot
    pass for skill.
    """
    ch, cw = (size, size) if isinstance(size, int) else size
    if ch < 1 or cw < 1 or max_per_image < 1:
        raise DatasetError(f"defect_crops: size {size} and max_per_image {max_per_image} must be >= 1")
    crops: list[Sample] = []
    for sample in samples:
        h, w = sample.shape
        if h < ch or w < cw:
            continue
        k = len(sample.classes)
        for box in sample.boxes[:max_per_image]:
            cy, cx = (box.y0 + box.y1) / 2, (box.x0 + box.x1) / 2
            y = int(min(max(0, round(cy - ch / 2)), h - ch))
            x = int(min(max(0, round(cx - cw / 2)), w - cw))
            kept = [
                Box(b.cls, max(0.0, b.x0 - x), max(0.0, b.y0 - y), min(float(cw), b.x1 - x), min(float(ch), b.y1 - y))
                for b in sample.boxes
                if b.x0 < x + cw and b.x1 > x and b.y0 < y + ch and b.y1 > y
            ]
            masks = None if sample.masks is None else np.ascontiguousarray(sample.masks[:, y : y + ch, x : x + cw])
            present = {b.cls for b in kept} if masks is None else set(np.flatnonzero(masks.any(axis=(1, 2))).tolist())
            crops.append(Sample(
                image=np.ascontiguousarray(sample.image[y : y + ch, x : x + cw]),
                masks=masks,
                boxes=kept,
                labels=_multi_hot(present, k),
                classes=sample.classes,
                source=sample.source,
                crop=(y, x, ch, cw),
            ))
    return crops


# Gate negatives for data without defect-free images (NEU): the settings clean_crops runs with
# unless a pack's model.json names its own under "training": {"clean_crops": {...}}. Training,
# calibration and evaluation read them through clean_crop_settings so all three cut the same crops.
CLEAN_CROPS_DEFAULT: dict[str, int] = {"size": 64, "stride": 64, "margin": 4, "max_per_image": 4}


def clean_crop_settings(training: Mapping[str, Any] | None = None) -> dict[str, int]:
    """CLEAN_CROPS_DEFAULT overridden by the integer keys of training["clean_crops"], if any."""
    chosen = dict(CLEAN_CROPS_DEFAULT)
    if isinstance(training, Mapping) and isinstance(training.get("clean_crops"), Mapping):
        for key, value in training["clean_crops"].items():
            if key not in chosen:
                raise DatasetError(f"training.clean_crops: unknown key {key!r}; known: {', '.join(chosen)}")
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "margin" else 1):
                raise DatasetError(f"training.clean_crops.{key}: must be an integer >= {0 if key == 'margin' else 1}, got {value!r}")
            chosen[key] = value
    return chosen
