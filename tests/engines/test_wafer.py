"""engines/wafer.py: CAM peak regions in dies, die counts, a wafer's patterns and the lot block."""
from __future__ import annotations

import numpy as np
import pytest

from engines.wafer import die_counts, lot_add, lot_summary, patterns, peak_region

DIE_MAP = {"outside": 0, "good": 1, "fail": 2}


def test_peak_region_is_the_cells_connected_to_the_peak():
    cam = np.zeros((13, 13), np.float32)
    cam[2:4, 3:6] = 0.8
    cam[3, 4] = 1.0
    cam[10, 10] = 0.9  # another hot cell, not connected to the peak
    assert peak_region(cam, 4, (52, 52)) == (12, 8, 24, 16)
    assert peak_region(cam, 4, (52, 52), level=0.95) == (16, 12, 20, 16)
    with pytest.raises(ValueError, match="cam must be a 2-D map"):
        peak_region(np.zeros(3), 4, (52, 52))


def test_peak_region_clips_to_the_frame():
    cam = np.zeros((13, 13), np.float32)
    cam[12, 12] = 1.0
    assert peak_region(cam, 4, (50, 50)) == (48, 48, 50, 50)


def test_die_counts_and_patterns():
    w = np.zeros((52, 52), np.uint8)
    w[10:20, 10:20] = 1
    w[12:14, 12:15] = 2
    assert die_counts(w[None], DIE_MAP) == {"dies": 100, "good": 94, "failing": 6}
    scores = np.array([0.9, 0.2, 0.7, 0.1, 0.1, 0.1, 0.1, 0.1], np.float32)
    cams = np.zeros((8, 13, 13), np.float32)
    cams[0, 6, 6] = 1.0
    cams[2, 0, 5] = 1.0
    classes = tuple(f"p{k}" for k in range(8))
    found = patterns(scores, cams, classes, [0.5, 0.5, 0.75, 0.5, 0.5, 0.5, 0.5, 0.5], 4, (52, 52))
    assert [(p["class"], p["score"], p["peak_die"]) for p in found] == [("p0", 0.9, [24, 24, 28, 28])]
    found = patterns(scores, cams, classes, [0.5] * 8, 4, (52, 52))
    assert [p["class"] for p in found] == ["p0", "p2"]  # highest score first
    assert found[1]["peak_die"] == [20, 0, 24, 4] and found[1]["cam"][0][5] == 100


def test_lot_summary_sums_wafers():
    lot: dict = {}
    lot_add(lot, {"dies": 100, "good": 90, "failing": 10}, [{"class": "Center"}])
    lot_add(lot, {"dies": 100, "good": 100, "failing": 0}, [])
    lot_add(lot, {"dies": 50, "good": 20, "failing": 30}, [{"class": "Center"}, {"class": "Scratch"}])
    s = lot_summary(lot, ("Center", "Donut", "Scratch"))
    assert s == {"wafers": 3, "dies": 250, "good_dies": 210, "failing_dies": 40, "yield": 0.84,
                 "wafers_with_patterns": 2, "wafers_mixed": 1, "patterns": {"Center": 2, "Donut": 0, "Scratch": 1}}
    assert lot_summary({}, ("Center",))["yield"] is None
