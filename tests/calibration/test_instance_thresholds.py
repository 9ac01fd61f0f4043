"""Instance thresholds: chosen per class on the calibration data by the best F1 of matched instances,
written to calibration.json and read back by the agent's loader (tiny exact instance pack, real ONNX Runtime)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from tinyinstances import CLASSES, SQUARE, clean_frame, frame_with_squares, make_instance_pack
from tinypack import frame_with

from calibration.instances import choose_instance_thresholds, true_boxes
from calibration.run import calibrate
from engines.instances import Instance
from engines.modelpack import load_calibration, load_model_pack
from training.datasets import Box, Sample


def _sample(img, boxes, name, masks=None):
    labels = np.zeros(len(CLASSES), np.float32)
    for b in boxes:
        labels[b.cls] = 1
    return Sample(img, masks, boxes, labels, CLASSES, name)


def _samples():
    out = []
    for i in range(12):  # a 20 px bright square: a defect (the head scores it 0.961)
        x = 8 + 16 * i
        out.append(_sample(frame_with_squares([("bright", x, 20)]), [Box(0, x, 20, x + SQUARE, 20 + SQUARE)],
                           f"defect_{i}.png"))
    for i in range(6):  # a 16 px bright blemish nobody calls a defect (the head scores it 0.579)
        out.append(_sample(frame_with("bright", 16 + 32 * i, 8, size=16), [], f"blemish_{i}.png"))
    for i in range(6):
        out.append(_sample(clean_frame(), [], f"clean_{i}.png"))
    return out


def test_calibrate_chooses_the_instance_threshold_that_drops_the_blemishes(tmp_path):
    pack = load_model_pack(make_instance_pack(tmp_path / "inst"))
    out = tmp_path / "calibration.json"
    result = calibrate(pack, _samples(), recall_target=0.9, min_gate_positives=1, min_positive_images=1,
                       allow_missing_class=True, pixel_thresholds=(0.5,), min_areas=(0,), output=out, threads=1)
    bright, dark = (result.document["classes"][c] for c in CLASSES)
    # at t <= 0.55 the six blemishes are false events (F1 0.8); from 0.6 to 0.95 only the squares: F1 1.
    # Ties go to the highest threshold.
    assert bright["instance_threshold"] == 0.95 and bright["instance_f1"] == 1.0
    assert (bright["instance_events"], bright["instance_matched"], bright["instance_true_boxes"]) == (12, 12, 12)
    assert dark["instance_threshold"] == 0.3 and dark["instance_calibrated"] is False  # no true dark box
    assert "F1 of matched instances" in result.document["search"]["instance_objective"]
    cal = load_calibration(pack, out)
    assert cal.classes["bright"].instance_threshold == 0.95 and cal.classes["dark"].instance_threshold == 0.3
    assert json.loads(out.read_text())["classes"]["bright"]["instance_threshold"] == 0.95


def test_component_packs_get_no_instance_keys(tmp_path):
    from tinypack import make_pack

    pack = load_model_pack(make_pack(tmp_path / "comp"))
    result = calibrate(pack, _samples(), recall_target=0.9, min_gate_positives=1, min_positive_images=1,
                       allow_missing_class=True, pixel_thresholds=(0.5,), min_areas=(0,), write=False, threads=1)
    assert not any(k.startswith("instance") for c in result.document["classes"].values() for k in c)
    assert "instance_objective" not in result.document["search"]


def test_choose_instance_thresholds_by_hand_and_boxes_from_masks():
    def inst(k, box, score):
        return Instance(k, score, box, tuple(int(v) for v in box), 1, (0, 0))

    truth = [Box(0, 0, 0, 10, 10), Box(0, 20, 20, 30, 30)]
    images = [([inst(0, (0, 0, 10, 10), 0.8), inst(0, (20, 20, 30, 30), 0.4), inst(0, (50, 50, 60, 60), 0.6)], truth)]
    got = choose_instance_thresholds(("a", "b"), images, grid=(0.3, 0.5, 0.7))
    # t 0.3: 2/3 and 2/2, F1 0.8; t 0.5: 1/2, 1/2, F1 0.5; t 0.7: 1/1, 1/2, F1 0.667
    assert got["a"]["instance_threshold"] == 0.3 and got["a"]["instance_f1"] == pytest.approx(0.8)
    assert got["b"]["instance_calibrated"] is False
    masks = np.zeros((2, 8, 8), bool)
    masks[1, 1:3, 2:5] = True
    masks[1, 6, 6] = True
    s = _sample(np.zeros((8, 8), np.uint8), [], "m.png", masks)
    assert sorted((b.cls, b.x0, b.y0, b.x1, b.y1) for b in true_boxes(s)) == [(1, 2, 1, 5, 3), (1, 6, 6, 7, 7)]
