"""Readers for the labelled data our users bring, each into one in-memory `Sample`.

Formats (one reader each; every reader returns a lazy `Dataset`, a sequence of `Sample`):

| reader                | format                                       | example in /work/shared/data |
|-----------------------|----------------------------------------------|------------------------------|
| `read_voc`            | Pascal VOC XML boxes, one XML per image      | neu_det                      |
| `read_mask_folders`   | mask PNG beside each image, class = folder   | magnetic_tile                |
| `read_yolo_seg`       | YOLO segmentation polygons (normalised)      | kolektorsdd                  |
| `read_coco`           | COCO detection JSON boxes                    | karpovaknn_scratches         |
| `read_labelme`        | labelme JSON polygons / rectangles           | bsdata_pitting               |
| `read_severstal`      | Severstal train.csv run-length masks         | (Severstal steel, not here)  |

Conventions every reader keeps:
- `Box` coordinates are pixels, `x0, y0` inclusive and `x1, y1` exclusive (VOC's 1-based
  inclusive corners become `x0 = xmin - 1`, `x1 = xmax`), clipped to the image.
- Images are uint8; content that is grey (one channel, or three equal channels as NEU's JPEGs
  decode) stays 2-D `HxW` unless `grey=False`; colour images are `HxWx3` RGB.
- `labels` is the image-level multi-hot truth. For mask folders it comes from the folder (the
  annotator's class), even where the mask is empty (four MT_Uneven masks are).
- `boxes` are the annotated boxes for box formats, one box per polygon for polygon formats
  (the tight box of its rasterised pixels), and one box per 8-connected component of each class
  mask for mask and run-length formats (which carry no instances).
- Annotations that are cheap to parse (XML, txt, JSON, CSV) are parsed and validated when the
  reader runs; image decoding, mask reading and rasterising happen on access, so a 1,800-image
  dataset costs a file listing until a sample is used.
- A malformed annotation raises `DatasetError` naming the file and the problem.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import xml.etree.ElementTree as ET
from functools import partial
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import cv2
import numpy as np

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
    h, w = sample.shape
    masks = np.zeros((len(sample.classes), h, w), dtype=bool)
    for box in sample.boxes:
        x0, y0 = max(0, math.floor(box.x0)), max(0, math.floor(box.y0))
        x1, y1 = min(w, math.ceil(box.x1)), min(h, math.ceil(box.y1))
        if x1 > x0 and y1 > y0:
            masks[box.cls, y0:y1, x0:x1] = True
    return masks


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


# -- Pascal VOC --------------------------------------------------------------------------------


def _voc_boxes(xml_path: Path, classes: tuple[str, ...] | None) -> tuple[list[tuple[str, list[float]]], tuple[int, int] | None]:
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise DatasetError(f"{xml_path}: not valid XML: {exc}") from exc
    if root.tag != "annotation":
        raise DatasetError(f"{xml_path}: root element is <{root.tag}>, expected <annotation>")
    size = None
    size_el = root.find("size")
    if size_el is not None:
        try:
            size = (int(size_el.findtext("height", "")), int(size_el.findtext("width", "")))
        except ValueError:
            raise DatasetError(f"{xml_path}: <size> needs integer <width> and <height>") from None
    objects: list[tuple[str, list[float]]] = []
    for i, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DatasetError(f"{xml_path}: object {i} has no <name>")
        if classes is not None:
            _class_index(name, classes, f"{xml_path}: object {i}")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise DatasetError(f"{xml_path}: object {i} ({name}) has no <bndbox>")
        coords = []
        for key in ("xmin", "ymin", "xmax", "ymax"):
            text = bnd.findtext(key)
            if text is None:
                raise DatasetError(f"{xml_path}: object {i} ({name}): <bndbox> has no <{key}>")
            try:
                coords.append(float(text))
            except ValueError:
                raise DatasetError(f"{xml_path}: object {i} ({name}): <{key}> is not a number: {text!r}") from None
        xmin, ymin, xmax, ymax = coords
        if xmax < xmin or ymax < ymin:
            raise DatasetError(f"{xml_path}: object {i} ({name}): empty box xmin={xmin} xmax={xmax} ymin={ymin} ymax={ymax}")
        objects.append((name, coords))
    return objects, size


def _voc_sample(image_path: Path, xml_path: Path, objects, classes, grey) -> Sample:
    image = read_image(image_path, grey)
    h, w = image.shape[:2]
    boxes = []
    for name, (xmin, ymin, xmax, ymax) in objects:
        # VOC corners are 1-based and inclusive: pixel columns xmin..xmax -> [xmin-1, xmax).
        boxes.append(Box(classes.index(name), max(0.0, xmin - 1), max(0.0, ymin - 1), min(float(w), xmax), min(float(h), ymax)))
    labels = _multi_hot((b.cls for b in boxes), len(classes))
    return Sample(image, None, boxes, labels, classes, str(image_path))


def read_voc(
    image_dir: str | Path,
    annotation_dir: str | Path,
    classes: Sequence[str] | None = None,
    *,
    grey: bool | None = None,
    name: str = "voc",
) -> Dataset:
    """Pascal VOC: `<annotation_dir>/<stem>.xml` per `<image_dir>/<stem>.<ext>`, paired by stem
    (NEU's `<filename>` field is unreliable). An image without XML is an error (write an XML with
    no `<object>` for a defect-free image). classes=None: the sorted names found in the XMLs."""
    image_dir, annotation_dir = Path(image_dir), Path(annotation_dir)
    images = _list_images(image_dir)
    if not annotation_dir.is_dir():
        raise DatasetError(f"{annotation_dir}: annotation folder not found")
    known = tuple(classes) if classes is not None else None
    parsed = []
    for image_path in images:
        xml_path = annotation_dir / f"{image_path.stem}.xml"
        if not xml_path.is_file():
            raise DatasetError(f"{image_path}: no annotation {xml_path.name} in {annotation_dir}")
        objects, _ = _voc_boxes(xml_path, known)
        parsed.append((image_path, xml_path, objects))
    if known is None:
        known = tuple(sorted({n for _, _, objs in parsed for n, _ in objs}))
    items = []
    for image_path, xml_path, objects in parsed:
        labels = _multi_hot((known.index(n) for n, _ in objects), len(known))

        load = partial(_voc_sample, image_path, xml_path, objects, known, grey)
        items.append(Item(image_path.stem, image_path, labels, load))
    return Dataset(name, known, items)


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


# -- COCO --------------------------------------------------------------------------------------


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON: {exc}") from exc


def _box_sample(image_path: Path, boxes: list[Box], classes, grey) -> Sample:
    image = read_image(image_path, grey)
    h, w = image.shape[:2]
    clipped = [Box(b.cls, max(0.0, b.x0), max(0.0, b.y0), min(float(w), b.x1), min(float(h), b.y1)) for b in boxes]
    return Sample(image, None, clipped, _multi_hot((b.cls for b in boxes), len(classes)), classes, str(image_path))


def read_coco(
    json_path: str | Path,
    image_dir: str | Path | None = None,
    classes: Sequence[str] | None = None,
    *,
    skip_missing: bool = False,
    grey: bool | None = None,
    name: str = "coco",
) -> Dataset:
    """COCO detection JSON (`bbox` = [x, y, width, height] px). Images are matched by `file_name`
    under image_dir (default: the JSON's folder); an image with no annotation is defect-free.
    Classes are the categories in id order unless `classes` names them. skip_missing=True leaves
    out listed images that are not on disk (the shared karpovaknn sample holds 6 of 178)."""
    json_path = Path(json_path)
    image_dir = Path(image_dir) if image_dir is not None else json_path.parent
    data = _load_json(json_path)
    if not isinstance(data, dict):
        raise DatasetError(f"{json_path}: top level must be an object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{json_path}: missing list {key!r}")
    cats = {}
    for c in data["categories"]:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise DatasetError(f"{json_path}: category {c!r} needs integer 'id' and string 'name'")
        cats[c["id"]] = c["name"]
    known = tuple(classes) if classes is not None else tuple(cats[i] for i in sorted(cats))
    cat_index = {cid: _class_index(cname, known, f"{json_path}: category {cid}") for cid, cname in cats.items()}
    images: dict[int, str] = {}
    for im in data["images"]:
        if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not isinstance(im.get("file_name"), str):
            raise DatasetError(f"{json_path}: image entry {str(im)[:80]} needs integer 'id' and string 'file_name'")
        if im["id"] in images:
            raise DatasetError(f"{json_path}: image id {im['id']} listed twice")
        images[im["id"]] = im["file_name"]
    boxes: dict[int, list[Box]] = {i: [] for i in images}
    for n, ann in enumerate(data["annotations"]):
        where = f"{json_path}: annotation {ann.get('id', n) if isinstance(ann, dict) else n}"
        if not isinstance(ann, dict):
            raise DatasetError(f"{where}: must be an object")
        if ann.get("image_id") not in images:
            raise DatasetError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        if ann.get("category_id") not in cat_index:
            raise DatasetError(f"{where}: category_id {ann.get('category_id')!r} is not in 'categories'")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            raise DatasetError(f"{where}: bbox must be [x, y, width, height] numbers, got {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            raise DatasetError(f"{where}: bbox {bbox} has non-positive width or height")
        boxes[ann["image_id"]].append(Box(cat_index[ann["category_id"]], x, y, x + w, y + h))
    items = []
    for image_id, file_name in images.items():
        image_path = image_dir / file_name
        if not image_path.is_file():
            if skip_missing:
                continue
            raise DatasetError(f"{json_path}: image {file_name!r} (id {image_id}) not found in {image_dir}; "
                               "pass skip_missing=True to leave such images out")
        image_boxes = boxes[image_id]

        load = partial(_box_sample, image_path, image_boxes, known, grey)
        items.append(Item(image_path.stem, image_path, _multi_hot((b.cls for b in image_boxes), len(known)), load))
    items.sort(key=lambda item: item.image_path.name)
    return Dataset(name, known, items)


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


# -- profiles ----------------------------------------------------------------------------------


def _dataset_dir(root: Path, folder: str, marker: str) -> Path:
    """`root` may be the shared data root (holding `folder`) or the dataset folder itself."""
    for candidate in (root / folder, root):
        if (candidate / marker).exists():
            return candidate
    raise DatasetError(f"{root}: neither it nor {root / folder} holds {marker!r}; is this the {folder} data?")


def load_profile_dataset(profile: str, root: str | Path, split: str, *, grey: bool = True) -> Dataset:
    """The labelled data of a profile, one split of it, as a lazy Dataset.

    profile: "steel" (neu_det, Pascal VOC boxes, classes STEEL_CLASSES in NEU order),
    "magnetic_tile" (mask folders, MAGNETIC_TILE_CLASSES, MT_Free is defect-free) or
    "kolektorsdd" (YOLO polygons, class "defect"). root: the shared data root (/work/shared/data)
    or the dataset folder itself.

    split, by the first byte b of sha1(file stem as UTF-8):
      "test"  b < 51          (the shared data's documented rule, ~19.9 % of images)
      "val"   51 <= b < 82    (~15.1 % of the rest; used for early stopping and calibration)
      "train" b >= 82
    ("trainval" = b >= 51 and "all" are accepted too.) The split shipped with NEU (30
    `Validation_*` images) and KolektorSDD (train/val folders, 10 defective val images) is pooled
    and replaced by this rule: both are too small to report on, and one rule keeps every
    profile's figures comparable between changes. grey=True: images are 2-D uint8.
    """
    if profile not in PROFILE_CLASSES:
        raise DatasetError(f"unknown profile {profile!r}; known: {', '.join(PROFILE_CLASSES)}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    root = Path(root)
    classes = PROFILE_CLASSES[profile]
    if profile == "steel":
        base = _dataset_dir(root, "neu_det", "ANNOTATIONS")
        ds = read_voc(base / "IMAGES", base / "ANNOTATIONS", classes, grey=grey, name="neu_det")
        if (base / "Validation_Images").is_dir():
            ds = ds + read_voc(base / "Validation_Images", base / "Validation_Annotations", classes, grey=grey, name="neu_det")
    elif profile == "magnetic_tile":
        base = _dataset_dir(root, "magnetic_tile", "MT_Free")
        ds = read_mask_folders(base, MAGNETIC_TILE_FOLDERS, classes, grey=grey, name="magnetic_tile")
    else:
        base = _dataset_dir(root, "kolektorsdd", "Datasets")
        ds = read_yolo_seg(base / "Datasets" / "images", base / "Datasets" / "labels", classes, grey=grey, name="kolektorsdd")
    return ds.split(split)


def default_data_root(start: str | Path | None = None) -> Path | None:
    """/work/shared/data, or ../shared/data relative to the repository; None when neither exists."""
    repo = Path(start) if start is not None else Path(__file__).resolve().parents[1]
    for candidate in (Path("/work/shared/data"), repo.parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None
