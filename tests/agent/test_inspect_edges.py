"""`coilsight inspect` at its edges, each test written for a deliberate bug the older tests let
through (docs/testing.md): a score exactly at a threshold, two files with one name, an output
folder inside the input folder, and the CSV's run-length against the Severstal format literally."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
from tinypack import frame_with, make_pack

from agent.cli import main
from agent.tools.inspect import Inspector, inspect_image


def write(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return path


def test_a_gate_score_exactly_at_the_threshold_passes(tmp_path):
    with Inspector(make_pack(tmp_path / "pack"), threads=1) as insp:
        img = frame_with("bright", 64, 8)
        top = inspect_image(insp, img, "a").gate_score
        insp.calibration = dataclasses.replace(insp.calibration, gate_threshold=top)
        res = inspect_image(insp, img, "a")
        assert res.passed and res.events  # the agent's rule: score >= threshold
        insp.calibration = dataclasses.replace(insp.calibration, gate_threshold=float(np.nextafter(top, 2.0)))
        assert not inspect_image(insp, img, "a").passed


def test_a_class_score_exactly_at_its_threshold_is_an_event(tmp_path):
    with Inspector(make_pack(tmp_path / "pack", seg=False), threads=1) as insp:
        img = frame_with("bright", 64, 8)
        insp.calibration = dataclasses.replace(insp.calibration, gate_threshold=0.0)
        score = insp.runner.gate(insp.prepare(img)[0][None], "a")[0][0]  # frame 0, class 0 (bright)
        classes = {**insp.calibration.classes}
        classes["bright"] = dataclasses.replace(classes["bright"], pixel_threshold=float(score))
        insp.calibration = dataclasses.replace(insp.calibration, classes=classes)
        assert "bright" in [e["class"] for e in inspect_image(insp, img, "a").events]
        classes["bright"] = dataclasses.replace(classes["bright"], pixel_threshold=float(np.nextafter(score, 2.0)))
        insp.calibration = dataclasses.replace(insp.calibration, classes=classes)
        assert "bright" not in [e["class"] for e in inspect_image(insp, img, "a").events]


def test_two_files_with_one_name_get_their_own_outputs_and_csv_rows(tmp_path, capsys):
    pack = make_pack(tmp_path / "pack")
    write(tmp_path / "in" / "x" / "a.png", frame_with("bright", 64, 8))
    write(tmp_path / "in" / "y" / "a.png", frame_with("bright", 128, 32))
    out = tmp_path / "in" / "out"  # inside the folder inspected
    args = ["inspect", str(tmp_path / "in"), "--models", str(pack), "--out", str(out), "--csv", "--threads", "1"]
    assert main(args) == 0
    docs = {p.name: json.loads(p.read_text()) for p in out.glob("*.events.json")}
    assert sorted(docs) == ["a-2.events.json", "a.events.json"]
    assert docs["a.events.json"]["events"][0]["bbox_px"] == [64, 8, 80, 24]
    assert docs["a-2.events.json"]["events"][0]["bbox_px"] == [128, 32, 144, 48]
    rows = list(csv.reader((out / "masks.csv").open()))
    assert [r[:2] for r in rows] == [["ImageId", "ClassId"], ["a.png", "1"], ["a-2.png", "1"]]
    # Severstal's format, literally: column-major, 1-based; a 16x16 square at x 64, y 8 of a 64-high
    # image is 16 runs of 16, the first starting at 64 * 64 + 8 + 1
    assert rows[1][2].split()[:4] == [str(64 * 64 + 9), "16", str(65 * 64 + 9), "16"]
    assert len(rows[1][2].split()) == 32
    # run again: the overlays written into the inspected folder the first time are not inspected
    capsys.readouterr()
    assert main(args) == 0
    report = json.loads((out / "inspect.json").read_text())
    assert report["inspected"] == 2 and report["bad"] == 0
    assert sorted(p.name for p in out.glob("*.events.json")) == ["a-2.events.json", "a.events.json"]
