"""Metrics against hand-computed cases."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from metrics import dice_pairs, dice_severstal, iou, precision_recall, roc_auc


def _masks():
    """Two images, two classes, 3x3 masks, with the four kinds of pairs."""
    pred = np.zeros((2, 2, 3, 3), bool)
    gt = np.zeros((2, 2, 3, 3), bool)
    # image 0, class 0: both empty -> 1
    # image 0, class 1: pred 2 px, gt 3 px, 1 px shared -> 2*1/(2+3) = 0.4
    pred[0, 1, 0, 0:2] = True
    gt[0, 1, 0, 1] = gt[0, 1, 1, 1] = gt[0, 1, 2, 1] = True
    # image 1, class 0: empty prediction on non-empty truth -> 0
    gt[1, 0, 2, 2] = True
    # image 1, class 1: identical non-empty masks -> 1
    pred[1, 1, 1:, 1:] = gt[1, 1, 1:, 1:] = True
    return pred, gt


def test_dice_severstal_hand_computed():
    pred, gt = _masks()
    np.testing.assert_allclose(dice_pairs(pred, gt), [[1.0, 0.4], [0.0, 1.0]])
    mean, per_class = dice_severstal(pred, gt)
    assert mean == pytest.approx((1 + 0.4 + 0 + 1) / 4)
    np.testing.assert_allclose(per_class, [0.5, 0.7])


def test_dice_prediction_on_empty_truth_scores_zero():
    pred = np.ones((1, 1, 2, 2), bool)
    gt = np.zeros((1, 1, 2, 2), bool)
    assert dice_severstal(pred, gt).mean == 0.0
    assert dice_severstal(gt, gt).mean == 1.0  # empty / empty


def test_dice_accepts_iterables_of_different_sizes():
    pred, gt = _masks()
    result = dice_severstal(iter(list(pred)), (g for g in gt))
    assert result.mean == pytest.approx(dice_severstal(pred, gt).mean)
    big_pred = np.zeros((2, 5, 7), bool)
    big_gt = np.zeros((2, 5, 7), bool)
    big_pred[0, 0, :4] = big_gt[0, 0, :2] = True  # 2*2/(4+2)
    pairs = dice_pairs([pred[0], big_pred], [gt[0], big_gt])
    np.testing.assert_allclose(pairs, [[1.0, 0.4], [4 / 6, 1.0]])


def test_dice_input_errors():
    pred, gt = _masks()
    with pytest.raises(ValueError, match=r"pred shape \(2, 2, 3, 3\) differs from gt shape \(2, 2, 3, 4\)"):
        dice_severstal(pred, np.zeros((2, 2, 3, 4), bool))
    with pytest.raises(ValueError, match="masks pred must be a bool array, got dtype float32"):
        dice_severstal(pred.astype(np.float32), gt)
    with pytest.raises(ValueError, match="pred and gt differ in length: gt has more than 1 images"):
        dice_severstal([pred[0]], [gt[0], gt[1]])
    with pytest.raises(ValueError, match=r"image 0: expected masks \[K, H, W\], got shape \(3, 3\)"):
        dice_severstal([pred[0, 0]], [gt[0, 0]])
    with pytest.raises(ValueError, match=r"expected \[N, K, H, W\] masks"):
        dice_severstal(pred[0], gt[0])
    with pytest.raises(ValueError, match="dice needs at least one image"):
        dice_severstal([], [])


def test_iou_pooled_per_class():
    pred, gt = _masks()
    # class 0: inter 0, union 1 (image 1) -> 0; class 1: image 0 inter 1 union 4, image 1 inter 4 union 4 -> 5/8
    np.testing.assert_allclose(iou(pred, gt), [0.0, 5 / 8])
    empty = np.zeros((1, 2, 2, 2), bool)
    full = empty.copy()
    full[0, 1] = True
    result = iou(empty, full)
    assert math.isnan(result[0]) and result[1] == 0.0


def test_roc_auc_hand_computed():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # ties count one half: pairs (0.5>0.2)=1, (0.5=0.5)=0.5, (0.9>0.2)=1, (0.9>0.5)=1
    assert roc_auc([0.2, 0.5, 0.5, 0.9], [0, 1, 0, 1]) == pytest.approx(3.5 / 4)
    assert roc_auc([0.5, 0.5, 0.5], [True, False, True]) == pytest.approx(0.5)
    assert roc_auc([0.9, 0.1], [0, 1]) == 0.0


def test_roc_auc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    for _ in range(10):
        scores = rng.integers(0, 6, 40).astype(float)  # many ties
        labels = rng.integers(0, 2, 40)
        labels[:2] = [0, 1]
        pos, neg = scores[labels == 1], scores[labels == 0]
        wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
        assert roc_auc(scores, labels) == pytest.approx(wins / (len(pos) * len(neg)))


def test_roc_auc_errors():
    with pytest.raises(ValueError, match=r"got only positives \(3 samples\)"):
        roc_auc([0.1, 0.2, 0.3], [1, 1, 1])
    with pytest.raises(ValueError, match="got only negatives"):
        roc_auc([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match=r"labels shape \(2,\) does not match scores shape \(3,\)"):
        roc_auc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="labels must be 0/1"):
        roc_auc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="scores hold NaN"):
        roc_auc([0.1, float("nan")], [0, 1])


def test_precision_recall_at_threshold():
    scores, labels = [0.1, 0.6, 0.7, 0.3], [0, 1, 0, 1]
    pr = precision_recall(scores, labels, 0.5)
    assert (pr.tp, pr.fp, pr.fn, pr.tn) == (1, 1, 1, 1)
    assert pr.precision == 0.5 and pr.recall == 0.5 and pr.positive_rate == 0.5
    assert precision_recall(scores, labels, 0.6).tp == 1  # score == threshold is positive
    low = precision_recall(scores, labels, 0.0)
    assert low.recall == 1.0 and low.precision == 0.5 and low.positive_rate == 1.0
    none = precision_recall(scores, labels, 0.95)
    assert math.isnan(none.precision) and none.recall == 0.0
    assert math.isnan(precision_recall([0.2], [0], 0.1).recall)
