"""Readers against tiny files written in each real format (never the shared data, except the
last test, which skips when the shared data is absent)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from training.datasets import (
    CLEAN_CROPS_DEFAULT,
    MAGNETIC_TILE_CLASSES,
    STEEL_CLASSES,
    Box,
    DatasetError,
    Sample,
    assign_split,
    boxes_to_masks,
    clean_crop_settings,
    clean_crops,
    defect_crops,
    default_data_root,
    load_profile_dataset,
    mask_boxes,
    read_coco,
    read_image,
    read_labelme,
    read_mask_folders,
    read_severstal,
    read_voc,
    read_yolo_seg,
    rle_decode,
    rle_encode,
    split_of,
    write_severstal_csv,
)


def _grey(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _write(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


# -- images ------------------------------------------------------------------------------------


def test_read_image_grey_content_in_three_channels_stays_2d(tmp_path):
    g = _grey(10, 12)
    p = _write(tmp_path / "a.png", np.dstack([g, g, g]))
    assert read_image(p).shape == (10, 12)
    np.testing.assert_array_equal(read_image(p), g)
    assert read_image(p, grey=False).shape == (10, 12, 3)


def test_read_image_colour_is_rgb(tmp_path):
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 0] = 200  # blue in OpenCV order
    p = _write(tmp_path / "c.png", bgr)
    rgb = read_image(p)
    assert rgb.shape == (4, 5, 3) and rgb[0, 0, 2] == 200 and rgb[0, 0, 0] == 0
    assert read_image(p, grey=True).ndim == 2


def test_read_image_errors(tmp_path):
    with pytest.raises(DatasetError, match="image file not found"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="junk.png: cannot decode image"):
        read_image(tmp_path / "junk.png")
    p = tmp_path / "deep.png"
    cv2.imwrite(str(p), np.zeros((3, 3), np.uint16))
    with pytest.raises(DatasetError, match="deep.png: expected an 8-bit image, got uint16"):
        read_image(p)


# -- Pascal VOC --------------------------------------------------------------------------------


def _voc_xml(objects: list[tuple[str, tuple]], filename: str = "x") -> str:
    objs = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b in objects
    )
    return f"<annotation><filename>{filename}</filename><size><width>20</width><height>16</height><depth>1</depth></size>{objs}</annotation>"


def _voc_tree(root: Path) -> Path:
    g = _grey(16, 20)
    _write(root / "IMAGES" / "crazing_1.jpg", np.dstack([g, g, g]))
    _write(root / "IMAGES" / "scratches_2.jpg", g)
    (root / "ANNOTATIONS").mkdir(parents=True)
    (root / "ANNOTATIONS" / "crazing_1.xml").write_text(_voc_xml([("crazing", (1, 2, 5, 8)), ("patches", (10, 10, 20, 16))]))
    # NEU quirk: <filename> without extension; pairing is by stem.
    (root / "ANNOTATIONS" / "scratches_2.xml").write_text(_voc_xml([("scratches", (3, 1, 4, 16))], "scratches_2"))
    return root


def test_read_voc_boxes_are_zero_based_exclusive(tmp_path):
    root = _voc_tree(tmp_path)
    ds = read_voc(root / "IMAGES", root / "ANNOTATIONS", STEEL_CLASSES)
    assert len(ds) == 2 and ds.classes == STEEL_CLASSES
    s = ds[0]
    assert s.image.shape == (16, 20) and s.image.dtype == np.uint8  # JPEG of 3 equal channels -> 2-D
    assert s.masks is None
    assert s.boxes == [Box(0, 0.0, 1.0, 5.0, 8.0), Box(2, 9.0, 9.0, 20.0, 16.0)]
    np.testing.assert_array_equal(s.labels, [1, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(ds.labels[1], [0, 0, 0, 0, 0, 1])
    assert s.source == str(root / "IMAGES" / "crazing_1.jpg")
    m = boxes_to_masks(s)
    assert m.shape == (6, 16, 20)
    assert m[0].sum() == 5 * 7 and m[0, 1, 0] and not m[0, 0, 0] and not m[0, 8, 4]
    assert m[2].sum() == 11 * 7


def test_read_voc_discovers_classes_when_not_given(tmp_path):
    root = _voc_tree(tmp_path)
    ds = read_voc(root / "IMAGES", root / "ANNOTATIONS")
    assert ds.classes == ("crazing", "patches", "scratches")


@pytest.mark.parametrize(
    "xml, message",
    [
        ("<annotation><object>", "crazing_1.xml: not valid XML"),
        ("<ann/>", r"crazing_1.xml: root element is <ann>"),
        ("<annotation><object><name>crazing</name></object></annotation>", r"object 0 \(crazing\) has no <bndbox>"),
        (_voc_xml([("crazing", (1, 2, "a", 8))]), r"<xmax> is not a number: 'a'"),
        (_voc_xml([("crazing", (5, 2, 1, 8))]), "empty box xmin=5.0 xmax=1.0"),
        (_voc_xml([("rust", (1, 2, 5, 8))]), "object 0: unknown class 'rust'"),
        ("<annotation><object><bndbox/></object></annotation>", "object 0 has no <name>"),
    ],
)
def test_read_voc_malformed(tmp_path, xml, message):
    root = _voc_tree(tmp_path)
    (root / "ANNOTATIONS" / "crazing_1.xml").write_text(xml)
    with pytest.raises(DatasetError, match=message):
        read_voc(root / "IMAGES", root / "ANNOTATIONS", STEEL_CLASSES)


def test_read_voc_image_without_xml(tmp_path):
    root = _voc_tree(tmp_path)
    (root / "ANNOTATIONS" / "scratches_2.xml").unlink()
    with pytest.raises(DatasetError, match="scratches_2.jpg: no annotation scratches_2.xml"):
        read_voc(root / "IMAGES", root / "ANNOTATIONS", STEEL_CLASSES)


# -- mask folders ------------------------------------------------------------------------------


def _mask_tree(root: Path) -> Path:
    mask = np.zeros((12, 10), np.uint8)
    mask[2:5, 3:6] = 255
    mask[2, 6] = 100  # soft edge below the threshold
    mask[8:10, 0:2] = 200
    _write(root / "MT_Crack" / "Imgs" / "exp1_num_1.jpg", _grey(12, 10))
    _write(root / "MT_Crack" / "Imgs" / "exp1_num_1.png", mask)
    _write(root / "MT_Free" / "Imgs" / "exp2_num_2.jpg", _grey(12, 10, 1))
    _write(root / "MT_Free" / "Imgs" / "exp2_num_2.png", np.zeros((12, 10), np.uint8))
    return root


FOLDERS = {"MT_Crack": "crack", "MT_Free": None}


def test_read_mask_folders(tmp_path):
    ds = read_mask_folders(_mask_tree(tmp_path), FOLDERS, MAGNETIC_TILE_CLASSES)
    assert len(ds) == 2
    crack, free = ds[0], ds[1]
    assert crack.masks.shape == (5, 12, 10) and crack.masks.dtype == bool
    assert crack.masks[2].sum() == 9 + 4 and not crack.masks[2, 2, 6]
    assert crack.masks[[0, 1, 3, 4]].sum() == 0
    np.testing.assert_array_equal(crack.labels, [0, 0, 1, 0, 0])
    assert sorted((b.x0, b.y0, b.x1, b.y1) for b in crack.boxes) == [(0, 8, 2, 10), (3, 2, 6, 5)]
    assert free.masks.sum() == 0 and free.labels.sum() == 0 and free.boxes == []


def test_read_mask_folders_errors(tmp_path):
    root = _mask_tree(tmp_path)
    with pytest.raises(DatasetError, match="MT_Fray: class folder not found"):
        read_mask_folders(root, {"MT_Fray": "fray"}, MAGNETIC_TILE_CLASSES)
    _write(root / "MT_Free" / "Imgs" / "exp2_num_2.png", np.full((12, 10), 255, np.uint8))
    with pytest.raises(DatasetError, match="exp2_num_2.png: image is in a defect-free folder but its mask has 120"):
        read_mask_folders(root, FOLDERS, MAGNETIC_TILE_CLASSES)[1]
    _write(root / "MT_Crack" / "Imgs" / "exp1_num_1.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(DatasetError, match=r"exp1_num_1.png: mask is 5x5 \(WxH\), image exp1_num_1.jpg is 10x12"):
        read_mask_folders(root, FOLDERS, MAGNETIC_TILE_CLASSES)[0]
    (root / "MT_Crack" / "Imgs" / "exp1_num_1.png").unlink()
    with pytest.raises(DatasetError, match="exp1_num_1.jpg: mask file not found"):
        read_mask_folders(root, FOLDERS, MAGNETIC_TILE_CLASSES)


# -- YOLO segmentation -------------------------------------------------------------------------


def _yolo_tree(root: Path, line: str = "0 0.2 0.25 0.6 0.25 0.6 0.75 0.2 0.75") -> Path:
    _write(root / "images" / "train" / "000.jpg", _grey(8, 10))
    _write(root / "images" / "val" / "001.jpg", _grey(8, 10, 1))
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "train" / "000.txt").write_text(line + "\n")
    (root / "labels" / "val" / "001.txt").write_text("")
    return root


def test_read_yolo_seg_rasterises_polygons(tmp_path):
    root = _yolo_tree(tmp_path)
    ds = read_yolo_seg(root / "images", root / "labels", ("defect",))
    assert ds.stems == ["000", "001"]
    s = ds[0]
    # corners (2, 2), (6, 2), (6, 6), (2, 6) in pixels; boundary pixels included
    expected = np.zeros((8, 10), bool)
    expected[2:7, 2:7] = True
    np.testing.assert_array_equal(s.masks[0], expected)
    assert s.boxes == [Box(0, 2.0, 2.0, 7.0, 7.0)]
    assert s.labels.tolist() == [1.0]
    assert ds[1].labels.tolist() == [0.0] and ds[1].masks.sum() == 0


@pytest.mark.parametrize(
    "line, message",
    [
        ("0 0.1 0.1 0.5 0.1 0.5", "000.txt:1: odd number of coordinates"),
        ("1 0.1 0.1 0.5 0.1 0.5 0.5", "000.txt:1: class id 1 outside 0..0"),
        ("0 0.1 0.1 0.5 0.1", "000.txt:1: a polygon needs at least 3 points, got 2"),
        ("0 0.1 0.1 1.5 0.1 0.5 0.5", r"000.txt:1: coordinates must be normalised to \[0, 1\]"),
        ("0 0.1 x 0.5 0.1 0.5 0.5", "000.txt:1: expected 'class x1 y1 x2 y2 ...' with numbers"),
    ],
)
def test_read_yolo_seg_malformed(tmp_path, line, message):
    root = _yolo_tree(tmp_path, line)
    with pytest.raises(DatasetError, match=message):
        read_yolo_seg(root / "images", root / "labels", ("defect",))


# -- COCO --------------------------------------------------------------------------------------


def _coco(tmp_path: Path, **override) -> Path:
    _write(tmp_path / "a.jpg", np.dstack([_grey(30, 40)] * 3))
    _write(tmp_path / "b.jpg", np.dstack([_grey(30, 40, 1)] * 3))
    data = {
        "categories": [{"id": 3, "name": "scratch"}, {"id": 1, "name": "dent"}],
        "images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
                   {"id": 2, "file_name": "b.jpg", "width": 40, "height": 30},
                   {"id": 7, "file_name": "gone.jpg", "width": 40, "height": 30}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [4, 5, 10, 6], "iscrowd": 0},
                        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [35, 20, 10, 20], "iscrowd": 0}],
    }
    data.update(override)
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(data))
    return path


def test_read_coco(tmp_path):
    ds = read_coco(_coco(tmp_path), skip_missing=True)
    assert ds.classes == ("dent", "scratch")  # category id order
    assert [Path(i.image_path).name for i in ds.items] == ["a.jpg", "b.jpg"]
    a = ds[0]
    assert a.masks is None
    assert a.boxes == [Box(1, 4.0, 5.0, 14.0, 11.0), Box(0, 35.0, 20.0, 40.0, 30.0)]  # clipped to the image
    assert a.labels.tolist() == [1.0, 1.0] and ds[1].labels.tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "override, message",
    [
        ({}, r"image 'gone.jpg' \(id 7\) not found .* pass skip_missing=True"),
        ({"annotations": [{"id": 4, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3]}]}, r"annotation 4: bbox must be \[x, y, width, height\]"),
        ({"annotations": [{"id": 4, "image_id": 1, "category_id": 3, "bbox": [1, 2, 0, 3]}]}, "annotation 4: bbox .* non-positive width"),
        ({"annotations": [{"id": 4, "image_id": 9, "category_id": 3, "bbox": [1, 2, 3, 3]}]}, "annotation 4: image_id 9 is not in 'images'"),
        ({"annotations": [{"id": 4, "image_id": 1, "category_id": 5, "bbox": [1, 2, 3, 3]}]}, "annotation 4: category_id 5 is not in 'categories'"),
        ({"images": "x"}, "coco.json: missing list 'images'"),
        ({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}]}, "image id 1 listed twice"),
    ],
)
def test_read_coco_malformed(tmp_path, override, message):
    with pytest.raises(DatasetError, match=message):
        read_coco(_coco(tmp_path, **override))


def test_read_coco_not_json(tmp_path):
    (tmp_path / "coco.json").write_text("{")
    with pytest.raises(DatasetError, match="coco.json: not valid JSON"):
        read_coco(tmp_path / "coco.json")


# -- labelme -----------------------------------------------------------------------------------


def _labelme(tmp_path: Path, shapes: list[dict], size=(20, 30)) -> Path:
    _write(tmp_path / "data" / "p1.jpg", np.dstack([_grey(20, 30)] * 3))
    (tmp_path / "label").mkdir(exist_ok=True)
    doc = {"version": "4.5.6", "shapes": shapes, "imagePath": "..\\data\\p1.jpg",
           "imageHeight": size[0], "imageWidth": size[1], "imageData": None}
    (tmp_path / "label" / "p1.json").write_text(json.dumps(doc))
    return tmp_path


def test_read_labelme_polygons_and_rectangles(tmp_path):
    shapes = [
        {"label": "Pitting", "shape_type": "polygon", "points": [[2, 3], [8, 3], [8, 9]]},
        {"label": "Pitting", "shape_type": "rectangle", "points": [[20, 10], [25, 12]]},
    ]
    root = _labelme(tmp_path, shapes)
    ds = read_labelme(root / "label", root / "data")
    assert ds.classes == ("Pitting",)
    s = ds[0]
    assert s.masks.shape == (1, 20, 30)
    assert s.masks[0, 3, 2:9].all() and s.masks[0, 9, 8] and not s.masks[0, 9, 2]  # triangle
    assert s.masks[0, 10:13, 20:26].all() and s.masks[0, 10:13, 20:26].sum() == 18
    assert s.boxes == [Box(0, 2.0, 3.0, 9.0, 10.0), Box(0, 20.0, 10.0, 26.0, 13.0)]
    assert s.labels.tolist() == [1.0]


def test_read_labelme_errors(tmp_path):
    poly = {"label": "Pitting", "shape_type": "polygon", "points": [[2, 3], [8, 3], [8, 9]]}
    root = _labelme(tmp_path, [dict(poly, shape_type="circle")])
    with pytest.raises(DatasetError, match="p1.json: shape 0: unsupported shape_type 'circle'"):
        read_labelme(root / "label", root / "data")
    root = _labelme(tmp_path, [dict(poly, points=[[1, 2], [3, 4]])])
    with pytest.raises(DatasetError, match="p1.json: shape 0: a polygon needs at least 3 points, got 2"):
        read_labelme(root / "label", root / "data")
    root = _labelme(tmp_path, [poly], size=(21, 30))
    with pytest.raises(DatasetError, match=r"p1.json: says the image is 30x21 \(WxH\), but p1.jpg is 30x20"):
        read_labelme(root / "label", root / "data")[0]
    root = _labelme(tmp_path, [poly])
    with pytest.raises(DatasetError, match="p1.json: unknown class 'Pitting'; known: crack"):
        read_labelme(root / "label", root / "data", classes=("crack",))
    with pytest.raises(DatasetError, match=r"p1.json: image 'p1.jpg' \(imagePath\) not found"):
        read_labelme(root / "label")


# -- Severstal run-length ----------------------------------------------------------------------


def test_rle_hand_computed():
    mask = np.array([[0, 1, 0],
                     [1, 1, 0]], dtype=bool)
    # column-major pixel numbers: (0,0)=1 (1,0)=2 (0,1)=3 (1,1)=4 (0,2)=5 (1,2)=6
    assert rle_encode(mask) == "2 3"
    np.testing.assert_array_equal(rle_decode("2 3", (2, 3)), mask)
    full = np.ones((2, 3), bool)
    assert rle_encode(full) == "1 6"
    assert rle_encode(np.zeros((4, 4), bool)) == ""
    assert rle_decode("", (4, 4)).sum() == 0
    np.testing.assert_array_equal(rle_decode("1 1 6 1", (2, 3)), [[1, 0, 0], [0, 0, 1]])


def test_rle_round_trip_random():
    rng = np.random.default_rng(3)
    for _ in range(20):
        mask = rng.random((7, 13)) < rng.random()
        np.testing.assert_array_equal(rle_decode(rle_encode(mask), mask.shape), mask)


@pytest.mark.parametrize(
    "rle, message",
    [
        ("1 2 3", "odd number of values"),
        ("0 2", "starts are 1-based"),
        ("1 0", "run of length 0"),
        ("5 3 6 1", r"run 1 \(start 6\) overlaps"),
        ("1 x", "'x' is not a non-negative integer"),
        ("5 3", r"reaches pixel 7, beyond the 3x2 image \(6 pixels\)"),
    ],
)
def test_rle_decode_malformed(rle, message):
    with pytest.raises(DatasetError, match=message):
        rle_decode(rle, (2, 3))


def _severstal_images(tmp_path: Path) -> tuple[Path, list[Sample]]:
    rng = np.random.default_rng(5)
    samples = []
    for i in range(3):
        image = _grey(16, 40, i)
        path = _write(tmp_path / "train_images" / f"img{i}.png", image)
        masks = np.zeros((4, 16, 40), bool)
        if i < 2:
            masks[i, 2:9, 5 + i : 20] = True
            masks[3] = rng.random((16, 40)) < 0.1
        samples.append(Sample(image, masks, [], masks.any((1, 2)).astype(np.float32), ("a", "b", "c", "d"), str(path)))
    return tmp_path / "train_images", samples


def test_severstal_csv_encode_and_decode_both_ways(tmp_path):
    image_dir, samples = _severstal_images(tmp_path)
    csv_path = tmp_path / "train.csv"
    write_severstal_csv(csv_path, samples)
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "ImageId,ClassId,EncodedPixels"
    assert len(rows) == 1 + 4  # two images x two non-empty classes; the clean image has no row
    assert rows[1].startswith("img0.png,1,")
    ds = read_severstal(csv_path, image_dir, ("a", "b", "c", "d"))
    assert ds.stems == ["img0", "img1", "img2"]
    for want, got in zip(samples, ds):
        np.testing.assert_array_equal(got.masks, want.masks)
        np.testing.assert_array_equal(got.labels, want.labels)
    # decode -> encode gives the same text back
    write_severstal_csv(tmp_path / "again.csv", ds)
    assert (tmp_path / "again.csv").read_text() == csv_path.read_text()


def test_severstal_hand_written_csv(tmp_path):
    _write(tmp_path / "imgs" / "f.jpg", _grey(4, 5))
    # 4 rows: column 1 (pixels 5..8) and the top pixel of column 3 (pixel 13)
    (tmp_path / "train.csv").write_text("ImageId,ClassId,EncodedPixels\nf.jpg,2,5 4 13 1\n")
    s = read_severstal(tmp_path / "train.csv", tmp_path / "imgs")[0]
    assert s.masks[1].sum() == 5 and s.masks[1][:, 1].all() and s.masks[1][0, 3]
    assert s.labels.tolist() == [0, 1, 0, 0]
    assert sorted((b.x0, b.y0, b.x1, b.y1) for b in s.boxes) == [(1, 0, 2, 4), (3, 0, 4, 1)]


@pytest.mark.parametrize(
    "body, message",
    [
        ("ImageId_ClassId,EncodedPixels\n", "header must be ImageId,ClassId,EncodedPixels"),
        ("ImageId,ClassId,EncodedPixels\nf.jpg,5,1 2\n", "train.csv:2: ClassId 5 outside 1..4"),
        ("ImageId,ClassId,EncodedPixels\nf.jpg,one,1 2\n", "train.csv:2: ClassId 'one' is not an integer"),
        ("ImageId,ClassId,EncodedPixels\nf.jpg,1,1 2 3\n", "train.csv:2: run-length has an odd number"),
        ("ImageId,ClassId,EncodedPixels\nf.jpg,1,1 2\nf.jpg,1,5 1\n", "train.csv:3: second row for f.jpg ClassId 1"),
        ("ImageId,ClassId,EncodedPixels\nnope.jpg,1,1 2\n", "train.csv:2: image 'nope.jpg' not found"),
        ("ImageId,ClassId,EncodedPixels\nf.jpg,1\n", "train.csv:2: expected 3 columns, got 2"),
    ],
)
def test_severstal_malformed_csv(tmp_path, body, message):
    _write(tmp_path / "imgs" / "f.jpg", _grey(4, 5))
    (tmp_path / "train.csv").write_text(body)
    with pytest.raises(DatasetError, match=message):
        read_severstal(tmp_path / "train.csv", tmp_path / "imgs")


def test_severstal_run_beyond_image_names_csv_and_image(tmp_path):
    _write(tmp_path / "imgs" / "f.jpg", _grey(4, 5))
    (tmp_path / "train.csv").write_text("ImageId,ClassId,EncodedPixels\nf.jpg,3,19 5\n")
    ds = read_severstal(tmp_path / "train.csv", tmp_path / "imgs")
    with pytest.raises(DatasetError, match="train.csv: f.jpg ClassId 3: run-length reaches pixel 23"):
        ds[0]


# -- helpers, splits, crops --------------------------------------------------------------------


def test_mask_boxes_one_per_component():
    masks = np.zeros((2, 6, 6), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one 8-connected component
    masks[1, 4:6, 2:5] = True
    assert mask_boxes(masks) == [Box(0, 0, 0, 2, 2), Box(1, 2, 4, 5, 6)]


def test_split_rule_matches_sha1_and_fractions():
    stems = [f"img_{i}" for i in range(4000)]
    for stem in stems[:50]:
        byte = hashlib.sha1(stem.encode()).digest()[0]
        assert split_of(stem) == ("test" if byte < 51 else "trainval")
        assert assign_split(stem) == ("test" if byte < 51 else "val" if byte < 82 else "train")
    splits = [assign_split(s) for s in stems]
    test_frac = splits.count("test") / len(stems)
    val_of_rest = splits.count("val") / (len(stems) - splits.count("test"))
    assert 0.17 < test_frac < 0.23 and 0.12 < val_of_rest < 0.18


def test_clean_crops_avoid_boxes_and_are_deterministic():
    image = _grey(16, 16)
    s = Sample(image, None, [Box(0, 4, 4, 8, 8)], np.array([1.0], np.float32), ("d",), "x.png")
    crops = clean_crops([s], 4)
    # a 4x4 grid of 4x4 windows; only the window at (4, 4) overlaps the box
    assert [c.crop for c in crops] == [(y, x, 4, 4) for y in (0, 4, 8, 12) for x in (0, 4, 8, 12) if (y, x) != (4, 4)]
    assert all(c.labels.sum() == 0 and c.boxes == [] and c.masks is None for c in crops)
    np.testing.assert_array_equal(crops[0].image, image[0:4, 0:4])
    grown = clean_crops([s], 4, margin=1)
    assert len(grown) == 16 - 9  # the margin reaches into the 8 neighbours
    assert len(clean_crops([s], 4, max_per_image=2)) == 2
    masks = np.zeros((1, 16, 16), bool)
    masks[0, 13, 13] = True
    with_mask = Sample(image, masks, [], np.array([1.0], np.float32), ("d",), "x.png")
    assert (12, 12, 4, 4) not in [c.crop for c in clean_crops([with_mask], 4)]
    assert clean_crops([with_mask], 4)[0].masks.shape == (1, 4, 4)
    with pytest.raises(DatasetError, match="must be >= 1"):
        clean_crops([s], 0)


def test_defect_crops_centre_on_boxes_inside_the_image():
    image = _grey(20, 30)
    boxes = [Box(0, 2, 2, 6, 4), Box(1, 20, 10, 30, 20)]
    s = Sample(image, None, boxes, np.array([1.0, 1.0], np.float32), ("a", "b"), "x.png")
    first = defect_crops([s], 8)
    assert len(first) == 1
    c = first[0]
    # box centre (4, 3) -> window would start at (-1, 0): shifted into the image
    assert c.crop == (0, 0, 8, 8)
    np.testing.assert_array_equal(c.image, image[0:8, 0:8])
    assert c.boxes == [Box(0, 2, 2, 6, 4)] and c.labels.tolist() == [1.0, 0.0]
    both = defect_crops([s], (8, 12), max_per_image=2)
    # second box centre (25, 15) -> window x 19..31 shifted to 18..30, y 11..19
    assert both[1].crop == (11, 18, 8, 12)
    assert both[1].boxes == [Box(1, 2, 0, 12, 8)] and both[1].labels.tolist() == [0.0, 1.0]
    masks = np.zeros((2, 20, 30), bool)
    masks[1, 12:14, 22:24] = True
    with_masks = Sample(image, masks, mask_boxes(masks), np.array([0.0, 1.0], np.float32), ("a", "b"), "m.png")
    m = defect_crops([with_masks], 8)[0]
    assert m.masks.shape == (2, 8, 8) and m.masks[1].sum() == 4 and m.labels.tolist() == [0.0, 1.0]
    assert defect_crops([s], 40) == []  # image smaller than the crop
    with pytest.raises(DatasetError, match="max_per_image 0 must be >= 1"):
        defect_crops([s], 8, max_per_image=0)


def test_clean_crop_settings():
    assert clean_crop_settings(None) == CLEAN_CROPS_DEFAULT
    assert clean_crop_settings({"clean_crops": {"size": 32}})["size"] == 32
    with pytest.raises(DatasetError, match="training.clean_crops: unknown key 'sise'"):
        clean_crop_settings({"clean_crops": {"sise": 32}})
    with pytest.raises(DatasetError, match="training.clean_crops.stride: must be an integer >= 1, got 0"):
        clean_crop_settings({"clean_crops": {"stride": 0}})


def test_load_profile_dataset_on_generated_neu_tree(tmp_path):
    g = _grey(16, 20)
    data = tmp_path / "data" / "neu_det"
    stems = [f"{c}_{i}" for c in STEEL_CLASSES for i in range(1, 8)]
    for stem in stems:
        _write(data / "IMAGES" / f"{stem}.jpg", np.dstack([g] * 3))
        (data / "ANNOTATIONS").mkdir(exist_ok=True)
        (data / "ANNOTATIONS" / f"{stem}.xml").write_text(_voc_xml([(stem.rsplit("_", 1)[0], (1, 1, 5, 5))]))
    parts = {s: load_profile_dataset("steel", tmp_path / "data", s) for s in ("train", "val", "test")}
    assert sorted(sum((p.stems for p in parts.values()), [])) == sorted(stems)
    for split, ds in parts.items():
        assert all(assign_split(stem) == split for stem in ds.stems)
        assert ds.classes == STEEL_CLASSES
    # root may be the dataset folder itself
    assert load_profile_dataset("steel", data, "all").stems == load_profile_dataset("steel", tmp_path / "data", "all").stems
    with pytest.raises(DatasetError, match="unknown profile 'wood'"):
        load_profile_dataset("wood", tmp_path, "test")
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        load_profile_dataset("steel", tmp_path / "data", "dev")
    with pytest.raises(DatasetError, match="is this the magnetic_tile data"):
        load_profile_dataset("magnetic_tile", tmp_path / "data", "test")


def test_shared_data_profiles_if_present():
    root = default_data_root()
    if root is None:
        pytest.skip("shared data (/work/shared/data or ../shared/data) not present")
    steel = load_profile_dataset("steel", root, "all")
    assert len(steel) == 1800 and steel.labels.sum(1).min() >= 1
    s = steel[0]
    assert s.image.shape == (200, 200) and s.image.dtype == np.uint8
    assert all(0 <= b.x0 < b.x1 <= 200 and 0 <= b.y0 < b.y1 <= 200 for b in s.boxes)
    tiles = load_profile_dataset("magnetic_tile", root, "test")
    t = tiles[0]
    assert t.masks.shape[0] == 5 and t.masks.shape[1:] == t.image.shape
    kol = load_profile_dataset("kolektorsdd", root, "all")
    assert len(kol) == 104 and int(kol.labels.sum()) == 52
    defective = kol[int(np.argmax(kol.labels[:, 0]))]
    assert defective.masks[0].any()


def test_datasets_pickle_for_worker_processes(tmp_path):
    import pickle

    root = _voc_tree(tmp_path / "voc")
    yolo = _yolo_tree(tmp_path / "yolo")
    for ds in (read_voc(root / "IMAGES", root / "ANNOTATIONS", STEEL_CLASSES),
               read_yolo_seg(yolo / "images", yolo / "labels", ("defect",))):
        again = pickle.loads(pickle.dumps(ds))
        assert again.stems == ds.stems
        np.testing.assert_array_equal(again[0].image, ds[0].image)
        assert again[0].boxes == ds[0].boxes
