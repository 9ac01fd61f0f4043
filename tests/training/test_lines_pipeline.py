"""`coilsight train / export / calibrate thresholds / evaluate / card` for the generated lines, end to end on
tiny runs (a few steps: the figures are not the point, the chain and its contracts are)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from engines.modelpack import load_calibration, load_model_pack  # noqa: E402
from engines.runner import PackRunner  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_wafer_train_export_calibrate_evaluate_card(tmp_path):
    from training import line_wafer
    from training.card import write_card
    from training.lines import write_report

    run, pack_dir = tmp_path / "run", tmp_path / "pack"
    meta = line_wafer.train(run, steps=4, pool=64, val=32, threads=1, command="test")
    assert meta["steps"] == 4 and (run / "best.pt").is_file()
    doc = line_wafer.export(run, pack_dir)
    pack = load_model_pack(pack_dir)
    assert pack.profile == "wafer" and pack.channels == 1 and (pack.height, pack.width) == (52, 52)
    assert pack.gate.cam_output == "cam" and pack.gate.cam_stride == 4 and pack.seg is None
    assert pack.meta["die_map"] == {"outside": 0, "good": 1, "fail": 2}
    assert "DeformConv" in doc["training"]["model_config"]["onnx_ops"]
    assert doc["training"]["seeds"] == {"train": 1811, "val": 2811, "test": 3811}
    assert (pack_dir / "gate.onnx").stat().st_size < 1_000_000
    cal = line_wafer.calibrate(pack_dir, n=64, threads=1)
    assert cal["data"]["seed"] == 2811 and cal["gate"]["threshold"] == min(
        c["pixel_threshold"] for c in cal["classes"].values())
    load_calibration(pack)
    report = line_wafer.evaluate(pack_dir, split="test", n=48, threads=1)
    assert report["data"]["seed"] == 3811 and 0.0 <= report["exact_match"] <= 1.0
    assert set(report["per_class"]) == set(pack.classes)
    fig = line_wafer.write_figures(pack_dir, tmp_path / "eval", n=2)
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report["figures"] = [fig.name]
    write_report(report, tmp_path / "eval", line_wafer.render)
    assert "cam_examples.png" in (tmp_path / "eval" / "evaluation_test.md").read_text()
    card = write_card(pack_dir, tmp_path / "eval", measure=False).read_text()
    assert "Exact-match accuracy" in card and "generated wafer maps" in card and "3811" in card
    with pytest.raises(Exception, match="evaluate --split val or test"):
        line_wafer.evaluate(pack_dir, split="train", n=4)
    # ONNX Runtime runs what ships: the pack through the one offline runner
    with PackRunner(pack, threads=1) as runner:
        x = np.stack([line_wafer.maps("test", 2)[0]])[:, :, None][0]
        scores = runner.gate(x)
        cams = runner.models["gate"].raw(x)["cam"]
    assert scores.shape == (2, 8) and cams.shape == (2, 8, 13, 13)


def test_chip_train_export_calibrate_evaluate(tmp_path):
    from training import line_chip, line_seg

    run, pack_dir = tmp_path / "run", tmp_path / "pack"
    line_seg.train(line_chip.LINE, run, steps=2, pool=4, val=4, threads=1, batch=2)
    line_chip.export(run, pack_dir)
    pack = load_model_pack(pack_dir)
    assert pack.channels == 6 and pack.seg.output_stride == 2 and pack.classes == ("bump", "dent", "dot")
    cal = line_chip.calibrate(pack_dir, n=6, threads=1)
    assert cal["gate"]["recall"] >= 0.99 and cal["data"]["seed"] == 2224
    # the gate never hides a defect the segmenter reports: at or under every class's pixel threshold
    assert cal["gate"]["threshold"] <= min(c["pixel_threshold"] for c in cal["classes"].values())
    report = line_chip.evaluate(pack_dir, n=6, threads=1)
    assert set(report["per_class"]) == {"bump", "dent", "dot"} and report["data"]["seed"] == 3224
    assert "Defect-level F1" in line_chip.render(report)


def test_parts_map_by_area_ranges():
    from training.line_parts import map50_by_area

    truth = [[(0, (0, 0, 30, 30)), (0, (100, 100, 180, 180))], [(0, (10, 10, 60, 60))]]
    perfect = [[(0, (0, 0, 30, 30), 0.9), (0, (100, 100, 180, 180), 0.8)], [(0, (10, 10, 60, 60), 0.7)]]
    r = map50_by_area(truth, perfect, [(512, 512), (512, 512)])
    assert r["map50"] == pytest.approx(1.0) and r["gt_per_area"] == {"all": 3, "0-40²": 1, "40-70²": 1,
                                                                     "70-96²": 1, "96²+": 0}
    assert r["ap50_by_area"]["96²+"] is None
    half = [[(0, (0, 0, 30, 30), 0.9)], [(0, (300, 300, 350, 350), 0.95)]]
    r = map50_by_area(truth, half, [(512, 512), (512, 512)])
    assert r["ap50_by_area"]["0-40²"] == pytest.approx(1.0) and r["ap50_by_area"]["40-70²"] == 0.0
    assert r["map50"] < 0.5


def test_cli_refuses_what_generated_lines_cannot_do(tmp_path):
    r = cli("calibrate", "thresholds", "--profile", "wafer", "--split", "train", "--models", str(tmp_path))
    assert r.returncode == 2 and "generated lines calibrate on their val seed only" in r.stderr
    r = cli("export", "--profile", "chip", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "p"))
    assert r.returncode == 2 and "no meta.json / best.pt" in r.stderr
    r = cli("evaluate", "--profile", "wafer", "--models", str(tmp_path / "nope"), "--split", "test")
    assert r.returncode == 2 and "no model.json" in r.stderr
    r = cli("evaluate", "--profile", "wafer", "--models", str(tmp_path / "nope"), "--data-root", str(tmp_path))
    assert r.returncode == 2 and f"--data-root {tmp_path} is not read" in r.stderr  # said, not dropped
    r = cli("calibrate", "thresholds", "--profile", "steel", "--generated")
    assert r.returncode == 2 and "--generated is for the generated lines (wafer, chip, parts), not 'steel'" in r.stderr
    assert "wafer" in cli("train", "--help").stdout


def test_cli_train_wafer_runs(tmp_path):
    r = cli("train", "--profile", "wafer", "--out", str(tmp_path / "run"), "--epochs", "1", "--steps-per-epoch", "2",
            "--threads", "1", "--max-minutes", "5")
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["profile"] == "wafer" and meta["steps"] == 2 and "coilsight train --profile wafer" in meta["command"]
