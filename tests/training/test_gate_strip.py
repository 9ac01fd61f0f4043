"""training/gate_strip.py: the steel gate on whole textured strip frames (issue 17's gate item)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from training import gate_strip
from training.datasets.core import Box, Sample

STEEL = Path(__file__).resolve().parents[2] / "engines" / "models" / "steel"


def _sample() -> Sample:
    img = np.full((60, 80), 120, np.uint8)
    img[10:20, 30:50] = 40  # one dark defect
    return Sample(img, None, [Box(2, 30, 10, 50, 20)], np.eye(6, dtype=np.float32)[2], tuple("abcdef"), "x.jpg")


def test_defect_patches_take_the_level_off_and_keep_a_margin():
    (cls, patch), = gate_strip.defect_patches([_sample()])
    assert cls == 2 and patch.shape == (16, 26)  # the 10x20 box and 3 px around it
    assert patch[3:13, 3:23].max() == pytest.approx(-80.0) and patch[0, 0] == 0.0
    with pytest.raises(gate_strip.GateStripError):
        gate_strip.defect_patches([])


def test_composite_pastes_labelled_defects_into_the_clean_frame():
    frame = gate_strip.clean_frame("val", 3)
    assert frame.shape == (256, 1600) and frame.dtype == np.uint8
    assert np.array_equal(frame, gate_strip.clean_frame("val", 3))  # deterministic
    assert not np.array_equal(frame, gate_strip.clean_frame("test", 3))  # splits are other coils
    patches = gate_strip.defect_patches([_sample()])
    out, labels, boxes = gate_strip.composite(frame, patches, np.random.default_rng(0), 6, n=1)
    (cls, x0, y0, x1, y1), = boxes
    assert labels.tolist() == [0, 0, 1, 0, 0, 0] and cls == 2
    changed = np.abs(out.astype(int) - frame.astype(int)) > 10
    assert changed.any() and not changed[:, :x0].any() and not changed[:, x1:].any()
    assert changed[y0:y1, x0:x1].sum() == changed.sum()


def test_threshold_and_pass_rate():
    pos = np.linspace(0.5, 1.0, 100)
    clean = np.array([0.1, 0.2, 0.6, 0.9])
    r = gate_strip.threshold_and_pass_rate(pos, clean, target=0.99)
    assert r["threshold"] == pytest.approx(pos[1]) and r["recall"] == 0.99 and r["pass_rate_clean"] == 0.5
    with pytest.raises(gate_strip.GateStripError):
        gate_strip.threshold_and_pass_rate(pos, np.array([]))


def test_the_shipped_gate_comes_back_from_its_onnx_exactly():
    pytest.importorskip("torch")
    x = gate_strip.pooled(np.stack([gate_strip.clean_frame("val", i) for i in range(2)]), 2)
    _, pool, diff = gate_strip.load_gate(STEEL, x)
    assert pool == 2 and diff < 1e-4


def test_ship_changes_only_the_gate_entries(tmp_path):
    pack = tmp_path / "steel"
    shutil.copytree(STEEL, pack)
    before_model, before_cal = (json.loads((pack / f).read_text()) for f in ("model.json", "calibration.json"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "meta.json").write_text(json.dumps({"train_frames": {"clean": 2, "composited": 2}, "steps": 1,
                                               "minutes": 0.1, "best": {"step": 1}}))
    candidate = tmp_path / "candidate.onnx"
    shutil.copyfile(pack / "gate.onnx", candidate)
    figures = {"threshold": 0.8, "recall": 0.99, "recall_lower_95": 0.97, "pass_rate_clean": 0.1, "n_composited": 100,
               "n_clean": 100}
    from training.gate_strip_ship import ship

    ship(run, pack, figures, candidate, "cmd")
    model, cal = (json.loads((pack / f).read_text()) for f in ("model.json", "calibration.json"))
    assert model["models"]["seg"] == before_model["models"]["seg"] and model["training"] == before_model["training"]
    assert model["models"]["gate"]["textured_strip"]["command"] == "cmd"
    assert cal["classes"] == before_cal["classes"] and cal["models"]["seg"] == before_cal["models"]["seg"]
    assert cal["gate"]["threshold"] == 0.8 and cal["gate"]["pass_rate"] == 0.1
    assert cal["gate"]["previous_gate"]["threshold"] == before_cal["gate"]["threshold"]


def test_visibility_grows_with_the_pasted_contrast():
    frame = gate_strip.clean_frame("val", 5)
    assert gate_strip.visibility(frame, frame, []) == 0.0
    patches = gate_strip.defect_patches([_sample()])
    out, _, boxes = gate_strip.composite(frame, patches, np.random.default_rng(1), 6, n=1)
    faint = [(0, [(c, p * 0.1) for c, p in patches][0][1])]
    out_faint, _, boxes_faint = gate_strip.composite(frame, [(2, faint[0][1])], np.random.default_rng(1), 6, n=1)
    assert boxes == boxes_faint  # same draws, a tenth of the contrast
    assert gate_strip.visibility(frame, out, boxes) > 3 * gate_strip.visibility(frame, out_faint, boxes_faint)


def test_recall_curve_pass_rate_falls_with_the_recall_target():
    from training.gate_strip_ship import _recall_curve

    rows = _recall_curve(np.linspace(0.0, 1.0, 200), np.linspace(0.0, 0.05, 100))
    assert [r["recall_target"] for r in rows] == [0.9, 0.95, 0.97, 0.98, 0.99]
    rates = [r["pass_rate_clean"] for r in rows]
    assert rates == sorted(rates) and rates[0] == 0.0 and rates[-1] > 0.5
