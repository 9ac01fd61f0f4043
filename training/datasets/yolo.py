"""YOLO segmentation polygons, normalised coordinates (kolektorsdd)."""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np

from training.datasets.core import (
    Dataset,
    DatasetError,
    Item,
    _list_images,
    _multi_hot,
    _polygon_sample,
)

# -- YOLO segmentation -------------------------------------------------------------------------


def _yolo_polygons(txt_path: Path, n_classes: int) -> list[tuple[int, np.ndarray]]:
    polygons = []
    for lineno, line in enumerate(txt_path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{txt_path}:{lineno}"
        try:
            cls = int(parts[0])
            values = [float(v) for v in parts[1:]]
        except ValueError:
            raise DatasetError(f"{where}: expected 'class x1 y1 x2 y2 ...' with numbers, got {line[:60]!r}") from None
        if not 0 <= cls < n_classes:
            raise DatasetError(f"{where}: class id {cls} outside 0..{n_classes - 1}")
        if len(values) % 2:
            raise DatasetError(f"{where}: odd number of coordinates ({len(values)})")
        if len(values) < 6:
            raise DatasetError(f"{where}: a polygon needs at least 3 points, got {len(values) // 2}")
        points = np.asarray(values, np.float64).reshape(-1, 2)
        if points.min() < -1e-6 or points.max() > 1 + 1e-6:
            raise DatasetError(f"{where}: coordinates must be normalised to [0, 1], got {points.min():.3g}..{points.max():.3g}")
        polygons.append((cls, points))
    return polygons


def read_yolo_seg(
    images_dir: str | Path,
    labels_dir: str | Path,
    classes: Sequence[str],
    *,
    grey: bool | None = None,
    name: str = "yolo",
) -> Dataset:
    """YOLO segmentation: for `<images_dir>/<rel>/<stem>.<ext>` the labels are in
    `<labels_dir>/<rel>/<stem>.txt`, one polygon a line: `cls x1 y1 ... xn yn` normalised by the
    image width/height. An empty or missing .txt is a defect-free image (YOLO's convention)."""
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    classes = tuple(classes)
    if not labels_dir.is_dir():
        raise DatasetError(f"{labels_dir}: label folder not found")
    items = []
    for image_path in _list_images(images_dir, recursive=True):
        txt_path = labels_dir / image_path.relative_to(images_dir).with_suffix(".txt")
        polygons = _yolo_polygons(txt_path, len(classes)) if txt_path.is_file() else []
        labels = _multi_hot((c for c, _ in polygons), len(classes))

        # x*W, y*H: the points are pixel indices again (KolektorSDD's came from findContours).
        load = partial(_polygon_sample, image_path, polygons, classes, grey, normalised=True)
        items.append(Item(image_path.stem, image_path, labels, load))
    return Dataset(name, classes, items)
