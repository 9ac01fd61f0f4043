"""labelme JSON polygons and rectangles (bsdata_pitting)."""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from training.datasets.core import (
    Dataset,
    DatasetError,
    Item,
    _class_index,
    _load_json,
    _multi_hot,
    _polygon_sample,
)

# -- labelme -----------------------------------------------------------------------------------


def _labelme_shapes(json_path: Path, data: Any) -> tuple[list[tuple[str, np.ndarray]], str, tuple[int, int] | None]:
    if not isinstance(data, dict):
        raise DatasetError(f"{json_path}: top level must be a labelme object")
    image_path = data.get("imagePath")
    if not isinstance(image_path, str) or not image_path:
        raise DatasetError(f"{json_path}: missing 'imagePath'")
    shapes = data.get("shapes")
    if not isinstance(shapes, list):
        raise DatasetError(f"{json_path}: missing list 'shapes'")
    size = None
    if isinstance(data.get("imageHeight"), int) and isinstance(data.get("imageWidth"), int):
        size = (data["imageHeight"], data["imageWidth"])
    out = []
    for i, shape in enumerate(shapes):
        where = f"{json_path}: shape {i}"
        if not isinstance(shape, dict) or not isinstance(shape.get("label"), str):
            raise DatasetError(f"{where}: needs a string 'label'")
        kind = shape.get("shape_type", "polygon")
        try:
            points = np.asarray(shape.get("points"), dtype=np.float64)
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: points must be a list of [x, y] numbers") from None
        if points.ndim != 2 or points.shape[1] != 2:
            raise DatasetError(f"{where}: points must be a list of [x, y] numbers")
        if kind == "polygon":
            if len(points) < 3:
                raise DatasetError(f"{where}: a polygon needs at least 3 points, got {len(points)}")
        elif kind == "rectangle":
            if len(points) != 2:
                raise DatasetError(f"{where}: a rectangle needs 2 points, got {len(points)}")
            (xa, ya), (xb, yb) = points
            points = np.array([[xa, ya], [xb, ya], [xb, yb], [xa, yb]])
        else:
            raise DatasetError(f"{where}: unsupported shape_type {kind!r} (polygon and rectangle are read)")
        out.append((shape["label"], points))
    return out, image_path, size


def read_labelme(
    json_dir: str | Path,
    image_dir: str | Path | None = None,
    classes: Sequence[str] | None = None,
    *,
    grey: bool | None = None,
    name: str = "labelme",
) -> Dataset:
    """labelme JSON (one per image, `*.json` in json_dir): polygons and rectangles in pixels. The
    image is `<image_dir>/<name of imagePath>` (default: json_dir). classes=None: sorted labels
    found. `imageWidth`/`imageHeight` must match the image."""
    json_dir = Path(json_dir)
    image_dir = Path(image_dir) if image_dir is not None else json_dir
    if not json_dir.is_dir():
        raise DatasetError(f"{json_dir}: annotation folder not found")
    parsed = []
    for json_path in sorted(json_dir.glob("*.json")):
        shapes, image_name, size = _labelme_shapes(json_path, _load_json(json_path))
        image_path = image_dir / Path(image_name.replace("\\", "/")).name
        if not image_path.is_file():
            raise DatasetError(f"{json_path}: image {image_path.name!r} (imagePath) not found in {image_dir}")
        parsed.append((json_path, image_path, shapes, size))
    known = tuple(classes) if classes is not None else tuple(sorted({lab for _, _, s, _ in parsed for lab, _ in s}))
    items = []
    for json_path, image_path, shapes, size in parsed:
        polygons = [(_class_index(lab, known, f"{json_path}"), pts) for lab, pts in shapes]

        load = partial(_polygon_sample, image_path, polygons, known, grey, expect_size=size, where=str(json_path))
        items.append(Item(image_path.stem, image_path, _multi_hot((c for c, _ in polygons), len(known)), load))
    return Dataset(name, known, items)
