"""Evaluation's instance view: mAP by area, per-class mAP@0.5:0.95, instance counts and the confusion
matrix, from an instance head (tiny exact pack, real ONNX Runtime) or from components."""
from __future__ import annotations

import numpy as np
import pytest
from tinyinstances import SQUARE, frame_with_squares, make_instance_pack
from tinypack import CLASSES, make_pack

from engines.modelpack import load_calibration, load_model_pack
from training.datasets import Box, Sample
from training.evaluate import coco_map, evaluate_samples, render_markdown


def test_coco_map_by_area_range_and_per_class_map50_95():
    # image 0: a 30x30 box (0-40 range) found exactly; image 1: a 100x100 box (96+) missed entirely
    gt = [[Box(0, 10, 10, 40, 40)], [Box(1, 0, 0, 100, 100)]]
    dt = [[(Box(0, 10, 10, 40, 40), 0.9)], [(Box(1, 150, 150, 160, 160), 0.8)]]
    r = coco_map(gt, dt, [(200, 200), (200, 200)], 2)
    a = r["by_area"]
    assert a["0-40"] == {"gt_boxes": 1, "map50": pytest.approx(1.0), "map50_95": pytest.approx(1.0)}
    assert a["96+"]["gt_boxes"] == 1 and a["96+"]["map50"] == 0.0
    assert a["40-70"]["gt_boxes"] == 0 and a["40-70"]["map50"] is None  # nothing to score
    assert r["map50"] == pytest.approx(0.5) and a["all"]["map50"] == r["map50"]
    assert r["ap50_95_per_class"] == [pytest.approx(1.0), pytest.approx(0.0)]
    # a box off by a few px: AP@0.5 1, AP@0.5:0.95 lower
    r = coco_map([[Box(0, 10, 10, 40, 40)]], [[(Box(0, 13, 13, 43, 43), 0.9)]], [(100, 100)], 1)
    assert r["ap50_per_class"] == [pytest.approx(1.0)] and 0.0 < r["ap50_95_per_class"][0] < 1.0


def _sample(squares, truth, name):
    img = frame_with_squares(squares)
    k = len(CLASSES)
    labels = np.zeros(k, np.float32)
    for b in truth:
        labels[b.cls] = 1.0
    return Sample(img, None, list(truth), labels, CLASSES, name)


def _box(cls, x, y, size=SQUARE):
    return Box(cls, float(x), float(y), float(x + size), float(y + size))


def _samples():
    return [
        _sample([("bright", 40, 20)], [_box(0, 40, 20)], "one.png"),
        _sample([("bright", 8, 4), ("dark", 200, 40)], [_box(0, 8, 4), _box(1, 200, 40)], "two.png"),
        # truth says dark where the image is bright: a matched pair of the wrong class
        _sample([("bright", 120, 20)], [_box(1, 120, 20)], "wrong_class.png"),
        # a true defect the image does not show (missed) and a square nobody labelled (false)
        _sample([("dark", 160, 8)], [_box(0, 20, 20)], "missed_and_false.png"),
        _sample([], [], "clean.png"),
    ]


def test_instance_pack_counts_events_from_its_head(tmp_path):
    pack = load_model_pack(make_instance_pack(tmp_path / "inst", instance_threshold=0.5))
    report = evaluate_samples(pack, load_calibration(pack), _samples(), threads=1, max_batch=2)
    inst = report["instances"]
    assert report["detection"]["events_from"] == inst["events_from"] == "instances"
    assert (inst["true_defects"], inst["events"], inst["matched"], inst["matched_same_class"]) == (5, 5, 4, 3)
    assert (inst["split"], inst["merged"], inst["missed"], inst["false_events"]) == (0, 0, 1, 1)
    assert inst["median_matched_iou"] == 1.0 and inst["events_per_defect"] == 1.0
    # rows truth (bright, dark, none), columns events
    assert inst["confusion"]["matrix"] == [[2, 0, 1], [1, 1, 0], [0, 1, 0]]
    md = render_markdown({**report, "profile": "tiny", "split": "test", "models": {}})
    assert "## Instances (events from instances" in md and "| 5 | 5 | 4 | 3 | 0 | 0 | 1 | 1 |" in md
    assert md.index("Dice on images holding the class") < md.index("Severstal Dice mean")
    assert "### mAP by true box area" in md


def test_component_packs_get_the_same_figures_from_their_components(tmp_path):
    """The shipped packs have no instance head: their events are the components, counted the same way.
    The tiny components pack finds a square as one component whose box is the square."""
    pack = load_model_pack(make_pack(tmp_path / "comp", min_area_px=16))
    report = evaluate_samples(pack, load_calibration(pack), _samples(), threads=1, max_batch=2)
    inst = report["instances"]
    assert inst["events_from"] == "components"
    assert (inst["true_defects"], inst["events"], inst["matched"], inst["missed"], inst["false_events"]) == \
        (5, 5, 4, 1, 1)
    assert report["detection"]["by_area"]["0-40"]["gt_boxes"] == 5
    seg = report["segmentation"]
    assert list(seg)[:2] == ["truth", "dice_positive_mean"]  # Dice on positives comes first


def test_coco_view_scores_peaks_below_the_calibrated_threshold_and_the_gate_view_drops_stopped_frames(tmp_path):
    """Three true squares of class bright, the instance threshold 0.7, the gate threshold 0.9:
    - a 20 px white square: peak 0.961, gate score ~1 (an event everywhere);
    - a 16 px white square: peak 0.579 (a 2x2 plateau), below 0.7: in the COCO view only;
    - a 20 px square at grey 160: peak 0.961 but gate score ~0.69: the gate stops its frame."""
    pack = load_model_pack(make_instance_pack(tmp_path / "inst", instance_threshold=0.7, gate_threshold=0.9))
    img_b = frame_with_squares([("bright", 60, 20)], size=16)
    img_c = frame_with_squares([("bright", 100, 20)])
    img_c[20:40, 100:120] = 160
    samples = [_sample([("bright", 40, 20)], [_box(0, 40, 20)], "a.png"),
               Sample(img_b, None, [_box(0, 60, 20, 16)], np.array([1, 0], np.float32), CLASSES, "b.png"),
               Sample(img_c, None, [_box(0, 100, 20)], np.array([1, 0], np.float32), CLASSES, "c.png")]
    report = evaluate_samples(pack, load_calibration(pack), samples, threads=1, max_batch=1)
    assert report["gate"]["tp"] == 2 and report["gate"]["fn"] == 1  # c is stopped
    op, coco = report["detection"], report["detection_coco"]
    assert op["view"] == "operating_point" and coco["view"] == "coco"
    assert coco["score_floor"] == 0.05 and coco["max_per_image"] == 100
    # COCOeval's 101-point interpolation: precision 1 up to recall r scores (floor(100 r) + 1) / 101
    two_of_three, one_of_three = 67 / 101, 34 / 101
    assert coco["predicted_boxes"] == 3 and coco["map50"] == pytest.approx(1.0)  # b counts here
    assert op["predicted_boxes"] == 2 and op["map50"] == pytest.approx(two_of_three)  # ... and not here
    assert coco["ap50_per_class"]["bright"] == pytest.approx(1.0) and coco["ap50_per_class"]["dark"] is None
    assert coco["after_gate"]["predicted_boxes"] == 2 and coco["after_gate"]["map50"] == pytest.approx(two_of_three)
    assert op["after_gate"]["predicted_boxes"] == 1 and op["after_gate"]["map50"] == pytest.approx(one_of_three)
    # b's box is 2 px off (the plateau's cell centre): right at IoU 0.5, short of 0.95
    assert 0.0 < coco["map50_95"] < coco["map50"]
    assert coco["by_area"]["0-40"]["gt_boxes"] == 3 and coco["by_area"]["0-40"]["map50"] == pytest.approx(1.0)
    inst = report["instances"]  # the counts are the operating point's events
    assert (inst["true_defects"], inst["events"], inst["matched"], inst["missed"]) == (3, 2, 2, 1)
    md = render_markdown({**report, "profile": "tiny", "split": "test", "models": {}})
    assert md.index("- COCO view (every instance-head peak >= 0.05") < md.index("- Operating point (") \
        < md.index("## Gate")
    assert "mAP@0.5 **1.000**" in md and f"mAP@0.5 **{two_of_three:.3f}**" in md
    assert "| bright | 3 | 1.000 |" in md and "| 0-40 (sqrt of area) | 3 | 1.000 |" in md


def test_component_packs_have_no_coco_view_and_say_so(tmp_path):
    pack = load_model_pack(make_pack(tmp_path / "comp", min_area_px=16))
    report = evaluate_samples(pack, load_calibration(pack), _samples(), threads=1, max_batch=2)
    assert report["detection_coco"] is None and report["detection"]["view"] == "operating_point"
    assert report["detection"]["after_gate"]["gt_boxes"] == report["detection"]["gt_boxes"] == 5
    md = render_markdown({**report, "profile": "tiny", "split": "test", "models": {}})
    assert "No COCO view: the pack has no instance head" in md


def test_the_coco_view_decodes_as_training_validates():
    from training import evaluate, train_instances

    assert evaluate.COCO_SCORE_FLOOR == train_instances.VAL_DECODE_THRESHOLD
    assert evaluate.COCO_MAX_DETS == train_instances.MAX_INSTANCES
