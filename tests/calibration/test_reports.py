"""The calibration report: PNG plots and one HTML page embedding them."""
from __future__ import annotations

import base64
import re

import cv2
import numpy as np
import pytest

from calibration.reports import plot_gate_curve, write_report
from calibration.classes import pick_class_thresholds, search_class_thresholds
from calibration.gate import choose_gate_threshold
from calibration.run import CalibrationResult


def _result(tmp_path) -> CalibrationResult:
    rng = np.random.default_rng(0)
    scores = np.r_[rng.beta(5, 2, 200), rng.beta(1.5, 6, 800)]
    labels = np.r_[np.ones(200, bool), np.zeros(800, bool)]
    gate = choose_gate_threshold(scores, labels, 0.99)
    probs, masks = [], []
    for i in range(12):
        gt = np.zeros((2, 40, 40), bool)
        gt[i % 2, 10:25, 5 + i : 20 + i] = True
        p = np.clip(gt * 0.7 + rng.uniform(0, 0.45, gt.shape), 0, 1).astype(np.float32)
        probs.append(p)
        masks.append(gt)
    search = search_class_thresholds(probs, masks, ("a", "b"), (0.3, 0.5, 0.7), (0, 8, 32))
    classes = pick_class_thresholds(search, min_positive_images=5)
    document = {
        "format": 1, "profile": "tiny", "models": {"gate": "ab" * 32, "seg": "cd" * 32},
        "gate": gate.to_json(), "classes": {k: c.to_json() for k, c in classes.items()},
        "data": {"what": "generated <data>", "split": "val", "n_images": 1000, "n_defective": 200},
        "backend": "onnxruntime-cpu", "created": "2026-01-01T00:00:00+00:00",
        "tool": {"name": "coilsight calibrate thresholds", "version": "0.1.0"},
    }
    return CalibrationResult(path=None, document=document, gate=gate, classes=classes,
                             gate_scores=scores, gate_labels=labels, search=search)


def test_report_writes_small_pngs_and_an_html_page_embedding_them(tmp_path):
    result = _result(tmp_path)
    page = write_report(result, tmp_path / "report")
    assert page == tmp_path / "report" / "report.html"
    html = page.read_text()
    for name in ("gate_curve.png", "class_dice.png"):
        png = tmp_path / "report" / name
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) < 300_000
        img = cv2.imread(str(png))
        assert img.shape[0] >= 300 and img.shape[1] >= 400
        assert base64.b64encode(data).decode() in html  # embedded, the page stands alone
    assert f"Threshold <b>{result.gate.threshold:.6g}</b>" in html
    assert "generated &lt;data&gt;" in html  # escaped
    assert len(re.findall(r"<tr><td>", html)) == 2


def _left_axes_frame(img: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, x1, y_top, y_bottom) of the left plot's frame: the longest dark lines in the image."""
    dark = img.max(axis=2) < 80
    cols = np.flatnonzero(dark.sum(0) > 0.5 * dark.sum(0).max())
    rows = np.flatnonzero(dark.sum(1) > 0.3 * dark.sum(1).max())
    return int(cols[0]), int(cols[cols < img.shape[1] // 2][-1]), int(rows[0]), int(rows[rows < 0.9 * img.shape[0]][-1])


def _dark_ring_pixels(img: np.ndarray, frame, x: float, y: float, xlim=1.01, ylim=1.02) -> int:
    """Near-black pixels 3..8 px from where data point (x, y) of the left plot lands."""
    x0, x1, top, bottom = frame
    cx, cy = x0 + x / xlim * (x1 - x0), bottom - y / ylim * (bottom - top)
    yy, xx = np.mgrid[:img.shape[0], :img.shape[1]]
    r = np.hypot(xx - cx, yy - cy)
    return int(((img.max(axis=2) < 80) & (r >= 3) & (r <= 8)).sum())


def test_gate_plot_marks_the_chosen_point(tmp_path):
    """The black ring sits at (pass rate, recall) of the chosen threshold, computed here from the
    scores, and not where another threshold's point would be."""
    scores = np.r_[np.linspace(0.6, 1, 50), np.linspace(0, 0.4, 150)]
    labels = np.r_[np.ones(50, bool), np.zeros(150, bool)]
    points = {t: (float((scores >= t).mean()), float((scores >= t)[labels].mean())) for t in (0.7, 0.9)}
    assert points[0.7] != points[0.9] and all(0.05 < r < 0.95 for _, r in points.values())  # inside the plot
    for t, other in ((0.7, 0.9), (0.9, 0.7)):
        img = cv2.imread(str(plot_gate_curve(scores, labels, t, 0.99, tmp_path / f"g{t}.png")))
        frame = _left_axes_frame(img)
        assert frame[1] - frame[0] > 300 and frame[3] - frame[2] > 200, frame
        assert _dark_ring_pixels(img, frame, *points[t]) > 25, f"no marker at the chosen point of t={t}"
        assert _dark_ring_pixels(img, frame, *points[other]) < 5, f"a marker where t={other} would be"


def test_dice_plot_needs_the_search(tmp_path):
    result = _result(tmp_path)
    result.search = None
    with pytest.raises(ValueError, match=r"plot_class_dice needs the threshold search"):
        write_report(result, tmp_path / "r")
