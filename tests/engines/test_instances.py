"""engines.instances: peaks, ties, borders, thresholds, the max count, boxes and masks on hand-made maps."""
from __future__ import annotations

import numpy as np
import pytest

from engines.instances import decode_instances, find_peaks


def _maps(k=2, h=8, w=12):
    return np.zeros((k, h, w), np.float32), np.zeros((2, h, w), np.float32), np.zeros((2, h, w), np.float32)


def test_one_isolated_peak_gives_one_box_centred_by_offset_and_sized_by_size():
    heat, size, off = _maps()
    heat[1, 3, 5] = 0.9
    heat[1, 2:5, 4:7] += 0.2  # a slope around it: neighbours are lower, not peaks
    heat[1, 3, 5] = 0.9
    size[:, 3, 5] = (10.0, 6.0)
    off[:, 3, 5] = (0.25, 0.75)
    (inst,) = decode_instances(heat, size, off, stride=4, thresholds=0.3, frame_hw=(32, 48))
    assert inst.class_id == 1 and inst.score == pytest.approx(0.9) and inst.peak == (3, 5)
    cx, cy = (5 + 0.25) * 4, (3 + 0.75) * 4  # 21, 15
    assert inst.box == pytest.approx((cx - 5, cy - 3, cx + 5, cy + 3))
    assert inst.bbox_px == (16, 12, 26, 18)
    assert inst.area_px == 60  # no probs: the box's area


def test_plateau_of_equal_values_gives_one_peak_at_its_centre():
    heat, size, off = _maps(h=10, w=10)
    heat[0, 2:7, 3:8] = 0.8  # 5x5 flat top: 25 cells equal their 3x3 max
    peaks = find_peaks(heat, [0.3, 0.3])
    assert peaks == [(0, 4, 5, pytest.approx(0.8))]
    # an L-shaped plateau is still one plateau: one peak
    heat[:] = 0
    heat[0, 1:6, 1] = 0.7
    heat[0, 5, 1:6] = 0.7
    assert len(find_peaks(heat, [0.3, 0.3])) == 1
    # a 2x2 plateau has no centre cell: the first of the equally near cells in raster order wins
    heat[:] = 0
    heat[0, 4:6, 4:6] = 0.5
    assert find_peaks(heat, [0.3, 0.3]) == [(0, 4, 4, pytest.approx(0.5))]


def test_separate_equal_maxima_are_separate_peaks_and_ties_sort_by_class_row_column():
    heat, _, _ = _maps(h=8, w=12)
    heat[1, 1, 1] = 0.6
    heat[0, 6, 10] = 0.6
    heat[0, 1, 8] = 0.6
    heat[1, 5, 5] = 0.9
    assert [p[:3] for p in find_peaks(heat, [0.3, 0.3])] == [(1, 5, 5), (0, 1, 8), (0, 6, 10), (1, 1, 1)]


def test_neighbour_higher_suppresses_and_diagonal_counts():
    heat, _, _ = _maps(k=1, h=5, w=5)
    heat[0, 2, 2] = 0.5
    heat[0, 1, 1] = 0.51  # diagonal neighbour higher: (2, 2) is not a peak
    assert [p[1:3] for p in find_peaks(heat, [0.3])] == [(1, 1)]


def test_peaks_on_the_border_and_in_corners_count_and_boxes_clip_to_the_frame():
    heat, size, off = _maps(k=1, h=4, w=6)
    heat[0, 0, 0] = 0.9
    heat[0, 3, 5] = 0.8
    size[:, 0, 0] = (20.0, 20.0)
    size[:, 3, 5] = (8.0, 8.0)
    off[:] = 0.5
    a, b = decode_instances(heat, size, off, stride=4, thresholds=[0.3], frame_hw=(16, 24))
    assert a.peak == (0, 0) and a.box == (0.0, 0.0, 12.0, 12.0) and a.bbox_px == (0, 0, 12, 12)
    assert b.peak == (3, 5) and b.box == (18.0, 10.0, 24.0, 16.0) and b.bbox_px == (18, 10, 24, 16)


def test_class_threshold_is_inclusive_and_per_class():
    heat, _, _ = _maps()
    heat[0, 2, 2] = 0.5
    heat[1, 5, 8] = 0.5
    assert [p[0] for p in find_peaks(heat, [0.5, 0.6])] == [0]  # >= t counts, 0.5 < 0.6 does not
    assert find_peaks(heat, [0.51, 0.6]) == []
    with pytest.raises(ValueError, match="3 instance thresholds given for 2 classes"):
        find_peaks(heat, [0.3, 0.3, 0.3])


def test_max_instances_keeps_the_best_scores():
    heat = np.zeros((1, 20, 20), np.float32)
    for n, (i, j) in enumerate((i, j) for i in range(1, 20, 3) for j in range(1, 20, 3)):
        heat[0, i, j] = 0.4 + n / 200.0
    all_peaks = find_peaks(heat, [0.3], max_instances=1000)
    assert len(all_peaks) == 49
    top = find_peaks(heat, [0.3], max_instances=5)
    assert [p[3] for p in top] == sorted((p[3] for p in all_peaks), reverse=True)[:5]
    assert find_peaks(heat, [0.3], max_instances=0) == []


def test_nan_heat_is_never_a_peak_and_broken_sizes_make_a_point_box():
    heat, size, off = _maps(k=1)
    heat[0, 1, 1] = np.nan
    heat[0, 4, 4] = 0.7
    size[:, 4, 4] = (np.nan, -3.0)
    off[:, 4, 4] = (np.inf, 0.5)
    (inst,) = decode_instances(heat, size, off, stride=2, thresholds=[0.3], frame_hw=(16, 24))
    assert inst.peak == (4, 4) and inst.bbox_px == (9, 9, 10, 10)  # a 1x1 px box at the cell centre (4.5 x 2)


def test_mask_is_the_class_probs_inside_the_box():
    heat, size, off = _maps(h=8, w=8)
    heat[0, 4, 4] = 0.9
    size[:, 4, 4] = (16.0, 16.0)
    off[:] = 0.0
    probs = np.zeros((2, 8, 8), np.float32)
    probs[0, 3:5, 3:6] = 0.8  # 6 cells inside the box (x 8..24, y 8..24 = cells 2..5)
    probs[0, 0, 0] = 0.9  # outside the box: not part of this instance
    probs[1, 3:5, 3:5] = 0.9  # another class: not part of this instance
    (inst,) = decode_instances(heat, size, off, stride=4, thresholds=[0.3, 0.3], frame_hw=(32, 32), probs=probs,
                               pixel_thresholds=[0.5, 0.5])
    assert inst.mask_px == 6 * 16 and inst.area_px == 96
    (inst,) = decode_instances(heat, size, off, stride=4, thresholds=[0.3, 0.3], frame_hw=(32, 32), probs=probs,
                               pixel_thresholds=[0.85, 0.5])
    assert inst.mask_px == 0 and inst.area_px == 16 * 16  # empty mask: the box's area


def test_shape_mismatches_are_refused_with_clear_messages():
    heat, size, off = _maps()
    with pytest.raises(ValueError, match="instance outputs disagree"):
        decode_instances(heat, size[:, :4], off, stride=4, thresholds=0.3, frame_hw=(32, 48))
    with pytest.raises(ValueError, match="probs given without pixel_thresholds"):
        decode_instances(heat, size, off, stride=4, thresholds=0.3, frame_hw=(32, 48), probs=heat)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        decode_instances(heat, size, off, stride=0, thresholds=0.3, frame_hw=(32, 48))
