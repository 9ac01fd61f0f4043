"""engines/components.py: the one threshold / components / minimum-area rule, shared by the
agent's events and the evaluation's masks and boxes."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from engines.postprocess import extract_defects
from engines.components import class_components
from training.evaluate import components
from engines.modelpack import ClassThreshold


def _probs(seed: int, k: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (5, 5), 0) ** 3 for _ in range(k)])


def test_one_blob_exactly():
    prob = np.zeros((8, 10), np.float32)
    prob[2:4, 3:6] = 0.6
    prob[3, 4] = 0.9
    prob[7, 9] = 0.7  # a single cell: 16 px at stride 4
    labels, comps = class_components(prob, 0.5, 17, 4, (30, 40))
    assert len(comps) == 1 and labels is not None
    c = comps[0]
    assert c.bbox_px == (12, 8, 24, 16) and c.area_px == 6 * 16 and c.peak == pytest.approx(0.9)
    assert class_components(prob, 0.95, 0, 4, (30, 40)) == (None, [])
    # clipped to the frame, and dropped when wholly outside it
    _, comps = class_components(prob, 0.5, 0, 4, (30, 40))
    assert {c.bbox_px for c in comps} == {(12, 8, 24, 16), (36, 28, 40, 30)}
    _, comps = class_components(prob, 0.5, 0, 4, (30, 36))
    assert {c.bbox_px for c in comps} == {(12, 8, 24, 16)}


@pytest.mark.parametrize("seed", range(4))
def test_agent_events_are_the_evaluation_boxes(seed):
    """What the line reports (engines.postprocess) is what the evaluation scores (training.evaluate)."""
    classes = ("a", "b", "c")
    probs = _probs(seed, 3, 32, 96)
    thresholds = {"a": ClassThreshold(0.2, 0), "b": ClassThreshold(0.3, 64), "c": ClassThreshold(0.25, 160)}
    defects = extract_defects(probs, classes, thresholds, 4, (128, 384), max_defects=10_000)
    masks, boxes = components(probs, [0.2, 0.3, 0.25], [0, 64, 160], 4, (128, 384))
    got = sorted((d.class_id, d.bbox_px, d.confidence) for d in defects)
    want = sorted((b.cls, (int(b.x0), int(b.y0), int(b.x1), int(b.y1)), round(score, 4)) for b, score in boxes)
    assert got == want and len(got) > 3
    for d in defects:  # every reported defect lies on its class's evaluated mask
        x0, y0, x1, y1 = d.bbox_px
        assert masks[d.class_id, y0:y1, x0:x1].any()


def test_link_joins_pieces_within_the_distance_and_not_beyond():
    prob = np.zeros((10, 40), np.float32)
    prob[2:4, 2:6] = 0.6    # piece A: cells x 2..5
    prob[2:4, 8:12] = 0.8   # piece B: 2 empty cells after A (8 px at stride 4)
    prob[2:4, 17:20] = 0.7  # piece C: 5 empty cells after B (20 px)
    prob[7, 30] = 0.9       # far away, alone
    frame = (40, 160)
    _, alone = class_components(prob, 0.5, 0, 4, frame)
    assert len(alone) == 4
    labels, linked = class_components(prob, 0.5, 0, 4, frame, link_px=8)
    assert sorted(c.bbox_px for c in linked) == [(8, 8, 48, 16), (68, 8, 80, 16), (120, 28, 124, 32)]
    ab = next(c for c in linked if c.bbox_px == (8, 8, 48, 16))
    assert ab.area_px == (8 + 8) * 16, "the group's own cells, not the gap between them"
    assert ab.peak == pytest.approx(0.8)
    assert labels is not None and not labels[prob < 0.5].any(), "only on cells carry a label"
    assert (labels[2:4, 2:6] == ab.label).all() and (labels[2:4, 8:12] == ab.label).all()
    _, wider = class_components(prob, 0.5, 0, 4, frame, link_px=20)
    assert sorted(c.bbox_px for c in wider)[0] == (8, 8, 80, 16)
    _, short = class_components(prob, 0.5, 0, 4, frame, link_px=4)  # a gap of 1 cell, not A-B's 2
    assert len(short) == 4
    _, exact = class_components(prob, 0.5, 0, 4, frame, link_px=5)  # rounded up to 2 cells
    assert len(exact) == 3
    _, c_joins = class_components(prob, 0.5, 0, 4, frame, link_px=17)  # 5 cells: B-C join, the far cell does not
    assert sorted(c.bbox_px for c in c_joins) == [(8, 8, 80, 16), (120, 28, 124, 32)]
    _, c_not = class_components(prob, 0.5, 0, 4, frame, link_px=16)
    assert len(c_not) == 3
    # the minimum area counts the group: two 8-cell pieces pass 200 px together, not alone
    assert len(class_components(prob, 0.5, 200, 4, frame)[1]) == 0
    assert len(class_components(prob, 0.5, 200, 4, frame, link_px=8)[1]) == 1
    with pytest.raises(ValueError, match="link_px"):
        class_components(prob, 0.5, 0, 4, frame, link_px=-1)


def test_agent_events_use_the_class_link():
    prob = np.zeros((2, 10, 40), np.float32)
    prob[0, 2:4, 2:6] = prob[0, 2:4, 8:12] = 0.9
    prob[1, 2:4, 2:6] = prob[1, 2:4, 8:12] = 0.9
    th = {"a": ClassThreshold(0.5, 0, link_px=8), "b": ClassThreshold(0.5, 0)}
    got = extract_defects(prob, ("a", "b"), th, 4, (40, 160))
    assert sorted(d.class_name for d in got) == ["a", "b", "b"]
