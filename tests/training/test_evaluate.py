"""Evaluation: COCO mAP, post-processing, and end to end with real ONNX Runtime sessions on tiny
models built here with onnx.helper and tiny datasets written in their real formats."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import structlog
from onnx import TensorProto, helper, numpy_helper

from metrics import dice_severstal
from training import datasets
from training.datasets import STEEL_CLASSES, Box, assign_split, clean_crops, load_profile_dataset
from training.commands import register
from training.evaluate import (
    EvaluationError,
    coco_map,
    components,
    evaluate_profile,
    pad_to_multiple,
    to_chw,
)
from engines.modelpack import sha256_file

@pytest.fixture(autouse=True)
def _reset_logging():
    """`coilsight evaluate` points structlog at the (captured) stderr; undo it for later tests."""
    yield
    structlog.reset_defaults()


BG = 100  # background grey level: prob sigmoid(20 * 100/255 - 15) ~ 0.0007 for the "bright" class


# -- tiny models -------------------------------------------------------------------------------


def _model(role: str, weights: list[float], biases: list[float], stride: int, fixed_hw: tuple[int, int] | None = None) -> onnx.ModelProto:
    """prob_k = sigmoid(w_k * avgpool_stride(x / 255) + b_k); gate score_k = max over pixels."""
    k = len(weights)
    nodes = [
        helper.make_node("Cast", ["image"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["xf", "c255"], ["x"]),
        helper.make_node("AveragePool", ["x"], ["pooled"], kernel_shape=[stride, stride], strides=[stride, stride]),
        helper.make_node("Conv", ["pooled", "w", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["probs"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(255.0, np.float32), "c255"),
        numpy_helper.from_array(np.asarray(weights, np.float32).reshape(k, 1, 1, 1), "w"),
        numpy_helper.from_array(np.asarray(biases, np.float32), "b"),
    ]
    if role == "gate":
        nodes.append(helper.make_node("ReduceMax", ["probs"], ["scores"], axes=[2, 3], keepdims=0))
        out = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", k])
    else:
        out = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", k, "h", "w"])
    h, w = fixed_hw or ("H", "W")
    inp = helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 1, h, w])
    graph = helper.make_graph(nodes, f"tiny_{role}", [inp], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _pack(directory: Path, profile: str, classes: tuple[str, ...], weights, biases, *, stride: int = 4,
          declared_stride: int | None = None, gate_threshold: float = 0.5, pixel_threshold: float = 0.5,
          min_area: int = 16, training: dict | None = None, fixed_hw=None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(_model("gate", weights, biases, stride, fixed_hw), directory / "gate.onnx")
    onnx.save(_model("seg", weights, biases, stride), directory / "seg.onnx")
    hashes = {role: sha256_file(directory / f"{role}.onnx") for role in ("gate", "seg")}
    meta = {
        "format": 1, "profile": profile, "classes": list(classes),
        "input": {"channels": 1, "height": 64, "width": 64, "dtype": "uint8", "layout": "NCHW", "mean": 0.0, "std": 1.0},
        "models": {"gate": {"file": "gate.onnx", "sha256": hashes["gate"], "output": "scores"},
                   "seg": {"file": "seg.onnx", "sha256": hashes["seg"], "output": "probs",
                           "output_stride": declared_stride or stride}},
        "training": training or {"data": "generated in the test", "command": "none", "seed": 0},
    }
    (directory / "model.json").write_text(json.dumps(meta))
    cal = {"format": 1, "models": hashes, "gate": {"threshold": gate_threshold, "recall_target": 0.99},
           "classes": {c: {"pixel_threshold": pixel_threshold, "min_area_px": min_area} for c in classes},
           "data": {}, "created": "2026-01-01T00:00:00+00:00"}
    (directory / "calibration.json").write_text(json.dumps(cal))
    return directory


# bright detector: sigmoid(20 x - 15) >= 0.5 <=> cell mean >= 0.75; dark detector: mean <= 0.25
BRIGHT, DARK, NEVER = (20.0, -15.0), (-20.0, 5.0), (0.0, -10.0)


def _reference_masks(image: np.ndarray, stride: int, detectors, pixel_threshold: float, min_area: int) -> np.ndarray:
    """The same pipeline in plain numpy: edge pad to 8, mean per cell, sigmoid, threshold,
    components at cell level with area cells*stride^2, repeat and crop."""
    h, w = image.shape
    x = np.pad(image.astype(np.float64) / 255.0, ((0, -h % 8), (0, -w % 8)), mode="edge")
    cells = x.reshape(x.shape[0] // stride, stride, x.shape[1] // stride, stride).mean(axis=(1, 3))
    out = []
    for wk, bk in detectors:
        on = 1 / (1 + np.exp(-(wk * cells + bk))) >= pixel_threshold
        n, labels, stats, _ = cv2.connectedComponentsWithStats(on.astype(np.uint8), connectivity=8)
        keep = stats[:, cv2.CC_STAT_AREA] * stride * stride >= min_area
        keep[0] = False
        full = np.repeat(np.repeat(keep[labels], stride, 0), stride, 1)[:h, :w]
        out.append(full)
    return np.stack(out)


# -- pieces ------------------------------------------------------------------------------------


def test_pad_to_multiple_uses_edge_values_and_to_chw():
    chw = np.arange(2 * 5 * 6, dtype=np.uint8).reshape(2, 5, 6)
    padded = pad_to_multiple(chw, 8)
    assert padded.shape == (2, 8, 8)
    np.testing.assert_array_equal(padded[:, :5, :6], chw)
    np.testing.assert_array_equal(padded[:, 7, :6], chw[:, 4, :])
    np.testing.assert_array_equal(padded[:, :5, 7], chw[:, :, 5])
    assert pad_to_multiple(np.zeros((1, 8, 16), np.uint8)).shape == (1, 8, 16)
    rgb = np.zeros((3, 4, 3), np.uint8)
    assert to_chw(rgb, 1).shape == (1, 3, 4) and to_chw(rgb[:, :, 0], 3).shape == (3, 3, 4)
    with pytest.raises(EvaluationError, match="x.png: image dtype float32; the model contract needs uint8"):
        to_chw(np.zeros((3, 4), np.float32), 1, "x.png")


def test_components_area_filter_boxes_and_scores():
    probs = np.zeros((2, 4, 5), np.float32)
    probs[0, 0:2, 0:2] = [[0.6, 0.9], [0.7, 0.6]]  # 4 cells = 64 px at stride 4
    probs[0, 3, 4] = 0.8  # 1 cell = 16 px: below min area 32
    probs[1, 1, 1] = 0.4  # below the class-1 threshold
    masks, boxes = components(probs, [0.5, 0.5], [32, 0], 4, (14, 18))
    assert masks.shape == (2, 14, 18)
    assert masks[0].sum() == 64 and masks[0, :8, :8].all() and masks[1].sum() == 0
    assert len(boxes) == 1
    box, score = boxes[0]
    assert box == Box(0, 0.0, 0.0, 8.0, 8.0) and score == pytest.approx(0.9)
    # min area 0 keeps the single cell, clipped at the image edge (cell 16..20 -> 16..18)
    _, boxes = components(probs, [0.5, 0.5], [0, 0], 4, (14, 18))
    assert (Box(0, 16.0, 12.0, 18.0, 14.0), pytest.approx(0.8)) in [(b, s) for b, s in boxes]


def test_coco_map_perfect_and_shifted():
    gt = [[Box(0, 10, 10, 30, 40), Box(1, 50, 5, 70, 25)], [Box(0, 0, 0, 20, 20)], []]
    sizes = [(80, 80)] * 3
    perfect = [[(b, 0.9) for b in image] for image in gt]
    result = coco_map(gt, perfect, sizes, 2)
    assert result["map50"] == pytest.approx(1.0) and result["map50_95"] == pytest.approx(1.0)
    assert result["ap50_per_class"] == [pytest.approx(1.0), pytest.approx(1.0)]
    shifted = [[(Box(b.cls, b.x0 + 3, b.y0 + 3, b.x1 + 3, b.y1 + 3), 0.9) for b in image] for image in gt]
    small = coco_map(gt, shifted, sizes, 2)
    assert small["map50"] == pytest.approx(1.0)  # IoU still above 0.5
    assert small["map50_95"] < 0.9
    far = [[(Box(b.cls, b.x0 + 12, b.y0 + 12, b.x1 + 12, b.y1 + 12), 0.9) for b in image] for image in gt]
    assert coco_map(gt, far, sizes, 2)["map50"] < 0.5
    # a false positive ranked above the true one lowers AP@0.5
    with_fp = [image + [(Box(0, 60, 60, 79, 79), 0.99)] for image in perfect]
    assert coco_map(gt, with_fp, sizes, 2)["ap50_per_class"][0] < 1.0
    none = coco_map(gt, [[], [], []], sizes, 2)
    assert none["map50"] == 0.0 and none["predicted_boxes"] == 0
    assert coco_map([[], [], []], perfect, sizes, 2)["map50"] is None


# -- end to end --------------------------------------------------------------------------------


def _stems(n_test: int, n_other: int) -> tuple[list[str], list[str]]:
    test, other = [], []
    i = 0
    while len(test) < n_test or len(other) < n_other:
        stem = f"{i:03d}"
        (test if assign_split(stem) == "test" else other).append(stem)
        i += 1
    return test[:n_test], other[:n_other]


def _kolektor_tree(root: Path) -> tuple[Path, list[str]]:
    """kolektorsdd layout; 50x60 images (padded to 56x64), bright rectangles as defects."""
    base = root / "kolektorsdd" / "Datasets"
    test, other = _stems(8, 4)
    rects = [(8, 8, 16, 12), (5, 9, 18, 11), (24, 30, 12, 8), (40, 2, 16, 14), None, None, None, None]
    for n, stem in enumerate(test + other):
        image = np.full((50, 60), BG, np.uint8)
        rect = rects[n % len(rects)] if n < len(test) else (8, 8, 16, 12)
        line = ""
        if rect:
            x, y, w, h = rect
            image[y : y + h, x : x + w] = 255
            pts = [(x, y), (x + w - 1, y), (x + w - 1, y + h - 1), (x, y + h - 1)]
            line = "0 " + " ".join(f"{px / 60:.6f} {py / 50:.6f}" for px, py in pts)
        sub = "train" if n % 2 else "val"
        (base / "images" / sub).mkdir(parents=True, exist_ok=True)
        (base / "labels" / sub).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(base / "images" / sub / f"{stem}.png"), image)
        (base / "labels" / sub / f"{stem}.txt").write_text(line)
    return root, test


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="coilsight")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_evaluate_cli_end_to_end_kolektorsdd(tmp_path, capsys):
    data, test_stems = _kolektor_tree(tmp_path / "data")
    models = _pack(tmp_path / "models", "kolektorsdd", ("defect",), [BRIGHT[0]], [BRIGHT[1]], min_area=16)
    out = tmp_path / "out"
    rc = _cli(["evaluate", "--profile", "kolektorsdd", "--models", str(models), "--data", str(data),
               "--out", str(out), "--threads", "1", "--batch", "3"])
    printed = capsys.readouterr().out
    assert rc == 0
    report = json.loads((out / "evaluation_test.json").read_text())
    assert (out / "evaluation_test.md").read_text() in printed
    assert "# Evaluation: kolektorsdd / test" in printed and "| defect |" in printed

    samples = list(load_profile_dataset("kolektorsdd", data, "test"))
    assert sorted(s.stem for s in samples) == sorted(test_stems)
    assert report["images"] == 8 and report["defective_images"] == 4
    g = report["gate"]
    # bright rectangles score ~1, the plain background ~0: perfectly separated
    assert g["auc"] == 1.0 and g["recall"] == 1.0 and g["precision"] == 1.0 and g["pass_rate"] == 0.5
    assert g["negative_crops"] == 0 and report["data"]["negative_crops"] is None
    # Dice against the same pipeline written in numpy (padding, pooling, area filter, crop)
    ref = [_reference_masks(s.image, 4, [BRIGHT], 0.5, 16) for s in samples]
    want = dice_severstal(ref, [s.masks for s in samples])
    seg = report["segmentation"]
    assert seg["dice_mean"] == pytest.approx(want.mean)
    assert seg["dice_per_class"]["defect"] == pytest.approx(want.per_class[0])
    assert 0.5 < seg["dice_mean"] < 1.0  # unaligned rectangles lose their partial cells
    assert seg["dice_mean_after_gate"] == pytest.approx(seg["dice_mean"])  # every defect passed the gate
    # 4 of 8 images hold a defect: never predicting scores 0.5; Dice on those 4 alone is lower
    assert seg["dice_never_predict"] == 0.5 and seg["positive_pairs_per_class"]["defect"] == 4
    positive = [i for i, s in enumerate(samples) if s.masks.any()]
    want_pos = dice_severstal([ref[i] for i in positive], [samples[i].masks for i in positive])
    assert seg["dice_positive_mean"] == pytest.approx(want_pos.mean) and seg["dice_positive_mean"] < seg["dice_mean"]
    inter = sum(np.logical_and(r, s.masks).sum() for r, s in zip(ref, samples))
    union = sum(np.logical_or(r, s.masks).sum() for r, s in zip(ref, samples))
    assert seg["iou_per_class"]["defect"] == pytest.approx(inter / union)
    det = report["detection"]
    assert det["gt_boxes"] == 4 and det["predicted_boxes"] == 4
    assert 0.0 < det["map50_95"] <= det["map50"] <= 1.0
    assert report["defect_type"] is None  # one class: nothing to tell apart
    assert report["gate_size_matched"] is None  # real defect-free images: no crops needed


def test_evaluate_steel_uses_clean_crops_and_scores_defect_type(tmp_path):
    root = tmp_path / "neu_det"
    (root / "IMAGES").mkdir(parents=True)
    (root / "ANNOTATIONS").mkdir()
    kinds = ["crazing"] * 4 + ["inclusion"] * 3 + ["patches"] * 2
    for i, kind in enumerate(kinds):
        image = np.full((40, 48), BG, np.uint8)
        image[0:12, 0:16] = 0 if kind == "inclusion" else 255  # inclusion is dark here
        cv2.imwrite(str(root / "IMAGES" / f"{kind}_{i}.jpg"), np.dstack([image] * 3))
        (root / "ANNOTATIONS" / f"{kind}_{i}.xml").write_text(
            f"<annotation><object><name>{kind}</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
            "<xmax>16</xmax><ymax>12</ymax></bndbox></object></annotation>")
    crops = {"size": 16, "stride": 16, "margin": 0, "max_per_image": 2}
    detectors = [BRIGHT, DARK] + [NEVER] * 4
    models = _pack(tmp_path / "models", "steel", STEEL_CLASSES, [d[0] for d in detectors], [d[1] for d in detectors],
                   training={"clean_crops": crops})
    report = evaluate_profile("steel", models, tmp_path, "all", threads=1)
    ds = load_profile_dataset("steel", tmp_path, "all")
    expected_crops = clean_crops(ds, 16, stride=16, margin=0, max_per_image=2)
    g = report["gate"]
    assert g["negative_crops"] == len(expected_crops) == report["data"]["negative_crops"]["n"] > 0
    assert g["negatives"] == len(expected_crops) and g["positives"] == len(kinds)
    assert g["auc"] == 1.0  # background crops score ~0, every image holds a detected box
    matched = report["gate_size_matched"]
    assert matched["positives"] == len(datasets.defect_crops(ds, 16)) == len(kinds)
    assert matched["negatives"] == len(expected_crops) and matched["auc"] == 1.0
    # bright patches are taken for crazing (the bright detector): only crazing and inclusion are right
    dt = report["defect_type"]
    assert dt["images"] == len(kinds)
    assert dt["accuracy"] == pytest.approx((kinds.count("crazing") + kinds.count("inclusion")) / len(kinds))
    assert dt["confusion"][2][0] == kinds.count("patches")
    assert report["segmentation"]["truth"] == "boxes rasterised as masks"
    # boxes 16x12 at the origin, aligned to the 4-px cells: found exactly
    assert report["segmentation"]["dice_per_class"]["crazing"] == pytest.approx(
        dice_severstal([_reference_masks(s.image, 4, detectors, 0.5, 16) for s in ds],
                       [datasets.boxes_to_masks(s) for s in ds]).per_class[0])
    assert report["detection"]["ap50_per_class"]["crazing"] == pytest.approx(1.0)
    assert report["detection"]["ap50_per_class"]["patches"] == 0.0  # found, but named crazing


def test_evaluate_errors(tmp_path, capsys):
    data, _ = _kolektor_tree(tmp_path / "data")
    pack = _pack(tmp_path / "m1", "kolektorsdd", ("defect",), [BRIGHT[0]], [BRIGHT[1]])
    with pytest.raises(EvaluationError, match="the model pack is for profile 'kolektorsdd', not 'steel'"):
        evaluate_profile("steel", pack, data)
    wrong_classes = _pack(tmp_path / "m2", "kolektorsdd", ("scratch",), [BRIGHT[0]], [BRIGHT[1]])
    with pytest.raises(EvaluationError, match=r"classes \['defect'\] differ from the model pack's \['scratch'\]"):
        evaluate_profile("kolektorsdd", wrong_classes, data)
    bad_stride = _pack(tmp_path / "m3", "kolektorsdd", ("defect",), [BRIGHT[0]], [BRIGHT[1]], stride=2, declared_stride=4)
    with pytest.raises(EvaluationError, match=r"seg output 'probs' has shape \(\d, 1, 28, 32\), expected \(\d, 1, 14, 16\)"):
        evaluate_profile("kolektorsdd", bad_stride, data, threads=1)
    fixed = _pack(tmp_path / "m4", "kolektorsdd", ("defect",), [BRIGHT[0]], [BRIGHT[1]], fixed_hw=(64, 64))
    with pytest.raises(EvaluationError, match=r"the gate model takes a fixed 64x64 \(HxW\) input, this batch is 56x64"):
        evaluate_profile("kolektorsdd", fixed, data, threads=1)
    # the CLI turns errors into one line and exit status 2
    rc = _cli(["evaluate", "--profile", "magnetic_tile", "--models", str(pack), "--data", str(data)])
    assert rc == 2
    assert "evaluate: " in capsys.readouterr().err
    rc = _cli(["evaluate", "--profile", "kolektorsdd", "--models", str(pack), "--data", str(tmp_path / "nowhere")])
    assert rc == 2
    assert "is this the kolektorsdd data?" in capsys.readouterr().err


def test_batching_and_size_mixes_do_not_change_results(tmp_path):
    from training.datasets import Sample
    from training.evaluate import evaluate_samples
    from engines.modelpack import load_calibration, load_model_pack

    pack = load_model_pack(_pack(tmp_path / "m", "kolektorsdd", ("defect",), [BRIGHT[0]], [BRIGHT[1]]))
    cal = load_calibration(pack)
    rng = np.random.default_rng(1)
    samples = []
    for i in range(14):
        h, w = 20 + 3 * (i % 7), 24 + 5 * (i % 5)  # ten or so different sizes, none a multiple of 8 for some
        image = np.full((h, w), BG, np.uint8)
        masks = np.zeros((1, h, w), bool)
        if i % 3:
            y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
            image[y : y + 8, x : x + 8] = 255
            masks[0, y : y + 8, x : x + 8] = True
        samples.append(Sample(image, masks, datasets.mask_boxes(masks), masks.any(axis=(1, 2)).astype(np.float32),
                              ("defect",), f"s{i}.png"))
    reports = [evaluate_samples(pack, cal, samples, threads=1, max_batch=b) for b in (1, 2, 8)]
    for r in reports:
        r.pop("timing")
    assert reports[0] == reports[1] == reports[2]
    assert reports[0]["images"] == 14 and reports[0]["gate"]["auc"] == 1.0
    with pytest.raises(EvaluationError, match="max_batch must be >= 1, got 0"):
        evaluate_samples(pack, cal, samples, max_batch=0)


def test_a_gate_that_stops_everything_leaves_the_never_predict_dice(tmp_path):
    from training.datasets import Sample
    from training.evaluate import evaluate_samples
    from engines.modelpack import load_calibration, load_model_pack

    pack = load_model_pack(_pack(tmp_path / "m", "kolektorsdd", ("defect",), [BRIGHT[0]], [BRIGHT[1]],
                                 gate_threshold=1.0))
    samples = []
    for i in range(4):
        image = np.full((16, 16), BG, np.uint8)
        masks = np.zeros((1, 16, 16), bool)
        if i < 3:
            image[4:12, 4:12] = 255
            masks[0, 4:12, 4:12] = True
        samples.append(Sample(image, masks, datasets.mask_boxes(masks), masks.any(axis=(1, 2)).astype(np.float32),
                              ("defect",), f"s{i}.png"))
    report = evaluate_samples(pack, load_calibration(pack), samples, threads=1)
    g, seg = report["gate"], report["segmentation"]
    assert g["recall"] == 0.0 and g["pass_rate"] == 0.0 and g["precision"] is None and g["auc"] == 1.0
    assert seg["dice_mean"] == 1.0  # the seg model alone finds the aligned squares exactly
    assert seg["dice_mean_after_gate"] == seg["dice_never_predict"] == 0.25


def test_evaluate_on_shared_magnetic_tile_if_present(tmp_path):
    from training.datasets import MAGNETIC_TILE_CLASSES, default_data_root

    root = default_data_root()
    if root is None:
        pytest.skip("shared data (/work/shared/data or ../shared/data) not present")
    detectors = [DARK, BRIGHT, NEVER, NEVER, NEVER]
    models = _pack(tmp_path / "m", "magnetic_tile", MAGNETIC_TILE_CLASSES, [d[0] for d in detectors],
                   [d[1] for d in detectors])
    report = evaluate_profile("magnetic_tile", models, root, "test", threads=1, limit=30)
    samples = list(load_profile_dataset("magnetic_tile", root, "test")[:30])
    assert report["images"] == 30 and report["defective_images"] == int(sum(s.labels.any() for s in samples))
    # real JPEGs of many sizes (padded to 8, cropped back) scored like the numpy reference
    ref = [_reference_masks(s.image, 4, detectors, 0.5, 16) for s in samples]
    want = dice_severstal(ref, [s.masks for s in samples])
    assert report["segmentation"]["dice_mean"] == pytest.approx(want.mean)
    assert report["detection"]["gt_boxes"] == sum(len(s.boxes) for s in samples)
