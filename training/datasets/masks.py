"""A mask PNG beside each image, the class given by its folder (magnetic_tile)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from training.datasets.core import (
    Dataset,
    DatasetError,
    Item,
    Sample,
    _class_index,
    _multi_hot,
    mask_boxes,
    read_image,
)

# -- mask images -------------------------------------------------------------------------------


def _mask_sample(image_path: Path, mask_path: Path, cls: int | None, classes, grey, threshold: int) -> Sample:
    image = read_image(image_path, grey)
    if not mask_path.is_file():
        raise DatasetError(f"{image_path}: mask file not found: {mask_path}")
    mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise DatasetError(f"{mask_path}: cannot decode mask image")
    if mask.shape != image.shape[:2]:
        raise DatasetError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH), "
                           f"image {image_path.name} is {image.shape[1]}x{image.shape[0]}")
    masks = np.zeros((len(classes), *image.shape[:2]), dtype=bool)
    fg = mask >= threshold
    if cls is None:
        if fg.any():
            raise DatasetError(f"{mask_path}: image is in a defect-free folder but its mask has {int(fg.sum())} defect pixels")
    else:
        masks[cls] = fg
    labels = _multi_hot([] if cls is None else [cls], len(classes))
    return Sample(image, masks, mask_boxes(masks), labels, classes, str(image_path))


def read_mask_folders(
    root: str | Path,
    folders: Mapping[str, str | None],
    classes: Sequence[str],
    *,
    image_glob: str = "Imgs/*.jpg",
    mask_suffix: str = ".png",
    threshold: int = 128,
    grey: bool | None = None,
    name: str = "masks",
) -> Dataset:
    """Mask images: `<root>/<folder>/<image_glob>` with `<stem><mask_suffix>` beside each image;
    the folder names the class (None: defect-free, its masks must be empty). A mask pixel is a
    defect when its value >= threshold (magnetic_tile masks have soft edges)."""
    root = Path(root)
    classes = tuple(classes)
    items = []
    for folder, cls_name in folders.items():
        path = root / folder
        if not path.is_dir():
            raise DatasetError(f"{path}: class folder not found (expected for class {cls_name or 'defect-free'})")
        cls = None if cls_name is None else _class_index(cls_name, classes, f"{path}")
        images = sorted(p for p in path.glob(image_glob) if p.suffix.lower() != mask_suffix.lower())
        if not images:
            raise DatasetError(f"{path}: no images match {image_glob!r}")
        for image_path in images:
            mask_path = image_path.with_suffix(mask_suffix)
            if not mask_path.is_file():
                raise DatasetError(f"{image_path}: mask file not found: {mask_path}")

            load = partial(_mask_sample, image_path, mask_path, cls, classes, grey, threshold)
            items.append(Item(image_path.stem, image_path, _multi_hot([] if cls is None else [cls], len(classes)), load))
    return Dataset(name, classes, items)
