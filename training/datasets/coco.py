"""COCO detection JSON boxes (karpovaknn_scratches)."""
from __future__ import annotations

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
    _load_json,
    _multi_hot,
    read_image,
)

# -- COCO --------------------------------------------------------------------------------------



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
