"""The types every reader returns (Box, Sample, the lazy Dataset), the split rule, and image and mask helpers."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import cv2
import numpy as np

from metrics import box_masks

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

STEEL_CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
MAGNETIC_TILE_CLASSES = ("blowhole", "break", "crack", "fray", "uneven")
KOLEKTORSDD_CLASSES = ("defect",)
SEVERSTAL_CLASSES = ("class_1", "class_2", "class_3", "class_4")

# magnetic_tile folder -> class (None: defect-free)
MAGNETIC_TILE_FOLDERS: dict[str, str | None] = {
    "MT_Blowhole": "blowhole",
    "MT_Break": "break",
    "MT_Crack": "crack",
    "MT_Fray": "fray",
    "MT_Uneven": "uneven",
    "MT_Free": None,
}

PROFILE_CLASSES: dict[str, tuple[str, ...]] = {
    "steel": STEEL_CLASSES,
    "magnetic_tile": MAGNETIC_TILE_CLASSES,
    "kolektorsdd": KOLEKTORSDD_CLASSES,
}
# profile -> folder name under the shared data root
PROFILE_FOLDERS = {"steel": "neu_det", "magnetic_tile": "magnetic_tile", "kolektorsdd": "kolektorsdd"}
SPLITS = ("train", "val", "test", "trainval", "all")

# Split rule on the first byte b of sha1(file stem): test when b < 51 (the shared data's rule,
# 51/256 = 19.9 %), val when 51 <= b < 82 (31 of the remaining 205 byte values = 15.1 % of
# train/validation), train otherwise.
TEST_BELOW = 51
VAL_BELOW = 82


class DatasetError(ValueError):
    """A dataset on disk is missing, malformed or inconsistent; the message names file and problem."""


@dataclass
class Box:
    cls: int
    x0: float
    y0: float
    x1: float  # exclusive
    y1: float  # exclusive

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0


@dataclass
class Sample:
    image: np.ndarray  # uint8 HxW (grey) or HxWx3 (RGB)
    masks: np.ndarray | None  # bool [K,H,W] per class, None when the data has boxes only
    boxes: list[Box]
    labels: np.ndarray  # float32 multi-hot [K], image-level
    classes: tuple[str, ...]
    source: str  # path of the image file
    crop: tuple[int, int, int, int] | None = None  # (y, x, h, w) in the source image, for crops

    @property
    def stem(self) -> str:
        return Path(self.source).stem

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])


# -- the lazy container ------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One image of a dataset before it is read: what a split or a class count needs."""

    stem: str
    image_path: Path
    labels: np.ndarray  # float32 [K]
    load: Callable[[], Sample] = field(repr=False, compare=False)


class Dataset(Sequence[Sample]):
    """A lazy sequence of `Sample`: `ds[i]` reads image i (and its mask) from disk on access."""

    def __init__(self, name: str, classes: Sequence[str], items: Sequence[Item]):
        self.name = name
        self.classes = tuple(classes)
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> "Dataset": ...

    def __getitem__(self, index: int | slice) -> "Sample | Dataset":
        if isinstance(index, slice):
            return Dataset(self.name, self.classes, self.items[index])
        return self.items[index].load()

    def __iter__(self) -> Iterator[Sample]:
        for item in self.items:
            yield item.load()

    def __add__(self, other: "Dataset") -> "Dataset":
        if other.classes != self.classes:
            raise DatasetError(f"cannot join {self.name} {self.classes} and {other.name} {other.classes}")
        return Dataset(self.name, self.classes, self.items + other.items)

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}, {len(self)} images, classes={self.classes})"

    @property
    def stems(self) -> list[str]:
        return [item.stem for item in self.items]

    @property
    def labels(self) -> np.ndarray:
        """Image-level multi-hot truth [N, K], without reading any image."""
        if not self.items:
            return np.zeros((0, len(self.classes)), np.float32)
        return np.stack([item.labels for item in self.items])

    def subset(self, keep: Callable[[Item], bool]) -> "Dataset":
        return Dataset(self.name, self.classes, [item for item in self.items if keep(item)])

    def split(self, split: str) -> "Dataset":
        """Images of one split by `assign_split` on the file stem (see TEST_BELOW/VAL_BELOW)."""
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
        if split == "all":
            return Dataset(self.name, self.classes, self.items)
        if split == "trainval":
            return self.subset(lambda item: split_of(item.stem) == "trainval")
        return self.subset(lambda item: assign_split(item.stem) == split)


# -- splits ------------------------------------------------------------------------------------


def _stem_byte(stem: str) -> int:
    return hashlib.sha1(stem.encode("utf-8")).digest()[0]


def split_of(stem: str) -> str:
    """"test" when the first byte of sha1(stem) is below 51 (about 20 %), else "trainval"."""
    return "test" if _stem_byte(stem) < TEST_BELOW else "trainval"


def assign_split(stem: str) -> str:
    """"test" (byte < 51), "val" (51 <= byte < 82, ~15 % of trainval) or "train" (the rest)."""
    b = _stem_byte(stem)
    if b < TEST_BELOW:
        return "test"
    return "val" if b < VAL_BELOW else "train"


# -- image and mask helpers --------------------------------------------------------------------


def read_image(path: str | Path, grey: bool | None = None) -> np.ndarray:
    """Decode an 8-bit image: 2-D when grey, else HxWx3 RGB.

    grey=None keeps 3-channel files that hold grey content (all channels equal) as 2-D;
    grey=True converts colour to grey; grey=False keeps three channels (grey files are repeated).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: image file not found")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DatasetError(f"{path}: cannot decode image")
    if image.dtype != np.uint8:
        raise DatasetError(f"{path}: expected an 8-bit image, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3:
        if image.shape[2] != 3:
            raise DatasetError(f"{path}: unsupported channel count {image.shape[2]}")
        b, g, r = image[:, :, 0], image[:, :, 1], image[:, :, 2]
        if grey is not False and np.array_equal(b, g) and np.array_equal(b, r):
            return np.ascontiguousarray(b)
        if grey:
            return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if grey is False:
        return np.repeat(image[:, :, None], 3, axis=2)
    return image


def _list_images(folder: Path, recursive: bool = False) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: image folder not found")
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _multi_hot(indices: Iterable[int], k: int) -> np.ndarray:
    labels = np.zeros(k, np.float32)
    for i in indices:
        labels[i] = 1.0
    return labels


def mask_boxes(masks: np.ndarray) -> list[Box]:
    """One box per 8-connected component of each class mask [K,H,W] (x1/y1 exclusive)."""
    boxes: list[Box] = []
    for k in range(masks.shape[0]):
        if not masks[k].any():
            continue
        n, _, stats, _ = cv2.connectedComponentsWithStats(masks[k].astype(np.uint8), connectivity=8)
        for x, y, w, h, _area in stats[1:n]:
            boxes.append(Box(k, float(x), float(y), float(x + w), float(y + h)))
    return boxes


def boxes_to_masks(sample: Sample) -> np.ndarray:
    """Rasterise the boxes of a sample to bool [K,H,W]: pixel (y, x) is set when x0 <= x < x1
    and y0 <= y < y1 (fractional corners: floor of x0/y0, ceil of x1/y1)."""
    return box_masks(sample.shape, len(sample.classes), sample.boxes)


def _fill_polygon(shape: tuple[int, int], points: np.ndarray) -> np.ndarray:
    """Rasterise one polygon given in pixel coordinates (boundary pixels included)."""
    mask = np.zeros(shape, np.uint8)
    fixed = np.round(np.asarray(points, np.float64) * 16).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(mask, [fixed], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def _polygon_sample(
    image_path: Path,
    polygons: list[tuple[int, np.ndarray]],
    classes: tuple[str, ...],
    grey: bool | None,
    normalised: bool = False,
    expect_size: tuple[int, int] | None = None,
    where: str = "",
) -> Sample:
    """Sample from polygons (cls, points [P,2] x/y in px, or in [0, 1] of W/H when normalised)."""
    image = read_image(image_path, grey)
    h, w = image.shape[:2]
    if expect_size is not None and expect_size != (h, w):
        raise DatasetError(f"{where}: says the image is {expect_size[1]}x{expect_size[0]} (WxH), "
                           f"but {image_path.name} is {w}x{h}")
    masks = np.zeros((len(classes), h, w), dtype=bool)
    boxes: list[Box] = []
    for cls, points in polygons:
        if normalised:
            points = points * np.array([w, h], np.float64)
        filled = _fill_polygon((h, w), points)
        masks[cls] |= filled
        ys, xs = np.nonzero(filled)
        if xs.size:
            boxes.append(Box(cls, float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)))
    labels = _multi_hot({cls for cls, _ in polygons}, len(classes))
    return Sample(image, masks, boxes, labels, classes, str(image_path))


def _class_index(name: str, classes: tuple[str, ...], where: str) -> int:
    try:
        return classes.index(name)
    except ValueError:
        raise DatasetError(f"{where}: unknown class {name!r}; known: {', '.join(classes)}") from None


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON: {exc}") from exc
