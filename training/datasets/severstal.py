"""Severstal train.csv run-length masks, and the RLE codec (column-major, 1-based)."""
from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path

import numpy as np

from training.datasets.core import (
    SEVERSTAL_CLASSES,
    Dataset,
    DatasetError,
    Item,
    Sample,
    _list_images,
    _multi_hot,
    mask_boxes,
    read_image,
)

# -- Severstal run-length ----------------------------------------------------------------------


def rle_encode(mask: np.ndarray) -> str:
    """Severstal run-length: column-major pixel order, 1-based starts, 'start length ...'.
    An empty mask encodes to ''."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise DatasetError(f"rle_encode: mask must be 2-D, got shape {mask.shape}")
    pixels = np.concatenate([[False], mask.flatten(order="F"), [False]])
    runs = np.flatnonzero(pixels[1:] != pixels[:-1]) + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(int(v)) for v in runs)


def _rle_pairs(rle: str) -> np.ndarray:
    tokens = rle.split()
    if not all(re.fullmatch(r"\d+", t) for t in tokens):
        bad = next(t for t in tokens if not re.fullmatch(r"\d+", t))
        raise DatasetError(f"run-length {bad!r} is not a non-negative integer")
    if len(tokens) % 2:
        raise DatasetError(f"run-length has an odd number of values ({len(tokens)}); expected start/length pairs")
    pairs = np.asarray(tokens, dtype=np.int64).reshape(-1, 2)
    if pairs.size:
        if pairs[:, 0].min() < 1:
            raise DatasetError("run-length starts are 1-based; got a start of 0")
        if pairs[:, 1].min() < 1:
            raise DatasetError("run-length has a run of length 0")
        ends = pairs[:, 0] + pairs[:, 1]
        if np.any(pairs[1:, 0] < ends[:-1]):
            i = int(np.flatnonzero(pairs[1:, 0] < ends[:-1])[0]) + 1
            raise DatasetError(f"run {i} (start {pairs[i, 0]}) overlaps or precedes the run before it")
    return pairs


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of rle_encode: bool mask of shape (H, W) from a Severstal run-length string."""
    h, w = shape
    pairs = _rle_pairs(rle)
    flat = np.zeros(h * w, dtype=bool)
    if pairs.size:
        last = int(pairs[-1, 0] + pairs[-1, 1] - 1)
        if last > h * w:
            raise DatasetError(f"run-length reaches pixel {last}, beyond the {w}x{h} image ({h * w} pixels)")
        for start, length in pairs:
            flat[start - 1 : start - 1 + length] = True
    return flat.reshape((h, w), order="F")


def _severstal_sample(image_path: Path, rles: dict[int, str], classes, grey, where: str) -> Sample:
    image = read_image(image_path, grey)
    h, w = image.shape[:2]
    masks = np.zeros((len(classes), h, w), dtype=bool)
    for cls, rle in rles.items():
        try:
            masks[cls] = rle_decode(rle, (h, w))
        except DatasetError as exc:
            raise DatasetError(f"{where}: {image_path.name} ClassId {cls + 1}: {exc}") from None
    labels = _multi_hot((c for c in range(len(classes)) if masks[c].any()), len(classes))
    return Sample(image, masks, mask_boxes(masks), labels, classes, str(image_path))


def read_severstal(
    csv_path: str | Path,
    image_dir: str | Path,
    classes: Sequence[str] = SEVERSTAL_CLASSES,
    *,
    grey: bool | None = None,
    name: str = "severstal",
) -> Dataset:
    """Severstal `train.csv` (header `ImageId,ClassId,EncodedPixels`; ClassId 1-based; one row per
    defective image and class). Every image in image_dir is read; one without rows is defect-free.
    A row naming an image that is not in image_dir, a repeated (ImageId, ClassId) or a malformed
    run-length is an error naming the CSV line."""
    csv_path, image_dir = Path(csv_path), Path(image_dir)
    classes = tuple(classes)
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: annotation file not found")
    images = {p.name: p for p in _list_images(image_dir)}
    rles: dict[str, dict[int, str]] = {}
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [c.strip() for c in header] != ["ImageId", "ClassId", "EncodedPixels"]:
            raise DatasetError(f"{csv_path}: header must be ImageId,ClassId,EncodedPixels, got {header}")
        for row in reader:
            where = f"{csv_path}:{reader.line_num}"
            if not row:
                continue
            if len(row) != 3:
                raise DatasetError(f"{where}: expected 3 columns, got {len(row)}")
            image_id, class_id, rle = (c.strip() for c in row)
            try:
                cls = int(class_id) - 1
            except ValueError:
                raise DatasetError(f"{where}: ClassId {class_id!r} is not an integer") from None
            if not 0 <= cls < len(classes):
                raise DatasetError(f"{where}: ClassId {class_id} outside 1..{len(classes)}")
            if image_id not in images:
                raise DatasetError(f"{where}: image {image_id!r} not found in {image_dir}")
            try:
                _rle_pairs(rle)
            except DatasetError as exc:
                raise DatasetError(f"{where}: {exc}") from None
            per_image = rles.setdefault(image_id, {})
            if cls in per_image:
                raise DatasetError(f"{where}: second row for {image_id} ClassId {class_id}")
            if rle:
                per_image[cls] = rle
    items = []
    for file_name, image_path in sorted(images.items()):
        image_rles = rles.get(file_name, {})

        load = partial(_severstal_sample, image_path, image_rles, classes, grey, str(csv_path))
        items.append(Item(image_path.stem, image_path, _multi_hot(image_rles, len(classes)), load))
    return Dataset(name, classes, items)


def write_severstal_csv(path: str | Path, samples: Iterable[Sample]) -> None:
    """Write samples' masks as a Severstal train.csv (one row per image and non-empty class)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "ClassId", "EncodedPixels"])
        for sample in samples:
            if sample.masks is None:
                raise DatasetError(f"{sample.source}: has no masks to encode")
            for k in range(sample.masks.shape[0]):
                if sample.masks[k].any():
                    writer.writerow([Path(sample.source).name, k + 1, rle_encode(sample.masks[k])])
