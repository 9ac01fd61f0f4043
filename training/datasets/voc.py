"""Pascal VOC XML boxes, one XML per image (neu_det)."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from training.datasets.core import (
    Box,
    Dataset,
    DatasetError,
    Item,
    Sample,
    _class_index,
    _list_images,
    _multi_hot,
    read_image,
)

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
