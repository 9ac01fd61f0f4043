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
