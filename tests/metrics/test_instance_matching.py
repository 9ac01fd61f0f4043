"""metrics.instances on hand-made cases: IoU, one-to-one matching, split, merged, missed, false, confusion."""
from __future__ import annotations

import numpy as np
import pytest

from metrics.instances import InstanceCounts, box_iou, count_instances, greedy_match


def test_box_iou_by_hand():
    iou = box_iou([[0, 0, 10, 10]], [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 0, 0]])
    assert iou[0].tolist() == pytest.approx([1.0, 50 / 150, 0.0, 0.0])
    assert box_iou([], [[0, 0, 1, 1]]).shape == (0, 1)
    with pytest.raises(ValueError, match="x1 >= x0"):
        box_iou([[10, 0, 0, 10]], [[0, 0, 1, 1]])


def test_greedy_match_takes_the_highest_iou_first_and_each_box_once():
    iou = np.array([[0.9, 0.6], [0.8, 0.55]])
    assert greedy_match(iou, 0.5) == [(0, 0), (1, 1)]
    assert greedy_match(iou, 0.58) == [(0, 0)]  # row 1's only partner above the bar is taken
    assert greedy_match(iou, 0.5, allowed=np.array([[False, True], [True, True]])) == [(1, 0), (0, 1)]


def test_one_defect_one_event_is_matched():
    c = count_instances([[0, 0, 40, 40]], [2], [[2, 2, 40, 42]], [2], 3)
    assert (c.true, c.events, c.matched, c.matched_same_class, c.split, c.merged, c.missed, c.false) == \
        (1, 1, 1, 1, 0, 0, 0, 0)
    assert c.matched_ious == pytest.approx([38 * 38 / (40 * 40 + 38 * 40 - 38 * 38)])


def test_a_fragmented_scratch_is_one_split_defect_and_at_most_one_match():
    scratch = [[100, 0, 110, 200]]
    fragments = [[100, 0, 110, 50], [100, 60, 110, 110], [100, 120, 110, 170], [101, 180, 109, 200]]
    c = count_instances(scratch, [5], fragments, [5, 5, 1, 5], 6)
    assert c.split == 1 and c.merged == 0
    assert c.matched == 0 and c.missed == 1 and c.false == 4  # no fragment reaches IoU 0.5
    assert c.best_ious == pytest.approx([0.25])
    d = c.to_dict()
    assert d["events_per_defect"] == 4.0 and d["recall"] == 0.0
    # one big event and a small fragment: the big one matches, the defect still counts as split
    c = count_instances(scratch, [5], [[100, 0, 110, 180], [100, 185, 110, 200]], [5, 5], 6)
    assert (c.matched, c.split, c.false) == (1, 1, 1)


def test_one_event_over_two_defects_is_merged():
    c = count_instances([[0, 0, 20, 20], [30, 0, 50, 20]], [0, 0], [[0, 0, 50, 20]], [0], 2)
    assert c.merged == 1 and c.split == 0
    assert c.matched == 0 and c.missed == 2 and c.false == 1  # IoU 0.4 each: neither matches


def test_wrong_class_matches_but_is_counted_in_the_confusion_matrix():
    c = count_instances([[0, 0, 10, 10], [50, 50, 60, 60]], [0, 1], [[0, 0, 10, 10], [80, 80, 90, 90]], [1, 1], 2)
    assert c.matched == 1 and c.matched_same_class == 0 and c.missed == 1 and c.false == 1
    # rows truth (0, 1, none), columns events (0, 1, none)
    assert c.confusion.tolist() == [[0, 1, 0], [0, 0, 1], [0, 1, 0]]


def test_no_events_or_no_defects_and_accumulation():
    a = count_instances([[0, 0, 5, 5], [9, 9, 12, 12]], [1, 1], [], [], 2)
    assert (a.missed, a.false, a.best_ious) == (2, 0, [0.0, 0.0])
    assert a.confusion.tolist() == [[0, 0, 0], [0, 0, 2], [0, 0, 0]]
    b = count_instances([], [], [[0, 0, 5, 5]], [0], 2)
    assert (b.missed, b.false) == (0, 1) and b.confusion.tolist() == [[0, 0, 0], [0, 0, 0], [1, 0, 0]]
    total = InstanceCounts(2).add(a).add(b)
    assert (total.true, total.events, total.missed, total.false) == (2, 1, 2, 1)
    assert total.to_dict(["x", "y"])["confusion"]["labels"] == ["x", "y", "(none)"]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"true classes must be in \[0, 2\), got \[2\]"):
        count_instances([[0, 0, 1, 1]], [2], [], [], 2)
    with pytest.raises(ValueError, match="1 true boxes with 2 classes"):
        count_instances([[0, 0, 1, 1]], [0, 1], [], [], 2)
    with pytest.raises(ValueError, match="min_iou and cover must be in"):
        count_instances([], [], [], [], 2, min_iou=0.0)


def test_match_by_score_is_cocos_greedy_order_and_same_class():
    from metrics.instances import match_by_score

    gt = [[0, 0, 10, 10]]
    # the higher-scored event takes the defect even with the lower IoU; a wrong-class event never matches
    tp = match_by_score(gt, [0], [[0, 0, 10, 10], [1, 0, 10, 10], [0, 0, 10, 10]], [0, 0, 1], [0.5, 0.9, 0.99])
    assert tp.tolist() == [False, True, False]
    assert match_by_score([], [], [[0, 0, 1, 1]], [0], [0.5]).tolist() == [False]


def test_choose_score_threshold_maximises_f1_and_prefers_the_higher_tie():
    from metrics.instances import choose_score_threshold

    scores = [0.9, 0.8, 0.6, 0.4, 0.35]
    matched = [True, True, False, True, False]
    t, at = choose_score_threshold(scores, matched, 4, [0.3, 0.5, 0.7])
    # t 0.3: 3/5 events, 3/4 defects, F1 .667; t 0.5: 2/3, 2/4, F1 .571; t 0.7: 2/2, 2/4, F1 .667 -> 0.7
    assert t == 0.7 and at["events"] == 2 and at["matched"] == 2 and at["f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no candidate thresholds"):
        choose_score_threshold(scores, matched, 4, [])


def test_average_precision_is_cocos_101_point_reading():
    from metrics.instances import average_precision

    assert average_precision([0.9, 0.8], [True, True], 2) == pytest.approx(1.0)
    # tp, fp, tp of 2 true defects: precision 1 up to recall 0.5, then 2/3 up to recall 1
    assert average_precision([0.9, 0.8, 0.7], [True, False, True], 2) == pytest.approx((51 + 50 * 2 / 3) / 101)
    # the ranking, not the order given, counts
    assert average_precision([0.7, 0.8, 0.9], [True, False, True], 2) == pytest.approx((51 + 50 * 2 / 3) / 101)
    assert average_precision([0.9], [True], 4) == pytest.approx(26 / 101)  # recall 0.25 reached, nothing after
    assert average_precision([], [], 3) == 0.0
    assert average_precision([0.5], [False], 0) is None
    with pytest.raises(ValueError):
        average_precision([0.9, 0.8], [True, True], 1)


def test_recall_by_size_counts_true_defects_by_the_root_of_their_area():
    from metrics.instances import size_bins

    gt = [[0, 0, 10, 10], [100, 0, 150, 50], [200, 0, 280, 80], [300, 0, 400, 100], [0, 100, 40, 140]]
    assert size_bins(gt).tolist() == [0, 1, 2, 3, 1], "40 px exactly is not small: [0, 40)"
    events = [[1, 1, 10, 10], [300, 0, 398, 100], [100, 0, 120, 20]]  # small hit, large hit, a fragment
    c = count_instances(gt, [0] * 5, events, [0] * 3, 1)
    by = c.to_dict()["recall_by_size"]
    assert by["0-40"] == {"true": 1, "matched": 1, "recall": 1.0}
    assert by["40-70"] == {"true": 2, "matched": 0, "recall": 0.0}
    assert by["96+"]["matched"] == 1 and by["70-96"]["recall"] == 0.0
    total = InstanceCounts(1).add(c).add(count_instances([[0, 0, 8, 8]], [0], [], [], 1))
    assert total.to_dict()["recall_by_size"]["0-40"] == {"true": 2, "matched": 1, "recall": 0.5}
    assert InstanceCounts(1).to_dict()["recall_by_size"]["0-40"]["recall"] is None
