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


def test_gate_plot_marks_the_chosen_point(tmp_path):
    # a gate that separates perfectly: the curve reaches recall 1 at the defective share
    scores = np.r_[np.linspace(0.6, 1, 50), np.linspace(0, 0.4, 150)]
    labels = np.r_[np.ones(50, bool), np.zeros(150, bool)]
    path = plot_gate_curve(scores, labels, 0.6, 0.99, tmp_path / "g.png")
    img = cv2.imread(str(path))
    assert img is not None and img.std() > 10  # something was drawn


def test_dice_plot_needs_the_search(tmp_path):
    result = _result(tmp_path)
    result.search = None
    with pytest.raises(ValueError, match=r"plot_class_dice needs the threshold search"):
        write_report(result, tmp_path / "r")
