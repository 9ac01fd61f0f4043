"""The generated lines in the camera simulator and the demo: frames, ground truth, found vs truth."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from tinypack import make_pack
from tests_support_events import collect

from agent.tools.camera_sim import CameraSim
from agent.tools.line_sim import found_vs_truth, line_classes, line_frames, render_found_vs_truth


def test_line_frames_shapes_and_defect_fraction():
    wafers = list(line_frames("wafer", 60, 0.5, seed=1))
    assert all(w.shape == (52, 52) and w.dtype == np.uint8 and m.shape == (8, 52, 52) for w, m in wafers)
    with_patterns = sum(bool(m.any()) for _, m in wafers)
    assert 18 <= with_patterns <= 42
    assert not any(m.any() for _, m in line_frames("wafer", 10, 0.0))
    dies = list(line_frames("chip", 3, 1.0, seed=2))
    assert all(d.shape == (224, 224, 6) and m.shape == (3, 224, 224) and m.any() for d, m in dies)
    assert np.array_equal(next(line_frames("chip", 1, 1.0, seed=2))[0], dies[0][0])
    with pytest.raises(ValueError, match="no generator for profile 'steel'"):
        list(line_frames("steel", 1, 0.5))
    with pytest.raises(ValueError, match=r"defect_fraction must be in \[0, 1\]"):
        list(line_frames("chip", 1, 1.5))


def test_found_vs_truth_counts_per_class_and_frame():
    truth = {0: {"Center"}, 2: {"Center", "Scratch"}}
    events = [{"index": 0, "class": "Center", "patterns": [{"class": "Center"}]},
              {"index": 2, "class": "Center", "patterns": [{"class": "Center"}]},
              {"index": 3, "class": "Loc", "patterns": [{"class": "Loc"}]}]
    t = found_vs_truth("wafer", line_classes("wafer"), 4, truth, events)
    assert t["per_class"]["Center"] == {"truth": 2, "found": 2, "both": 2}
    assert t["per_class"]["Scratch"] == {"truth": 1, "found": 0, "both": 0}
    assert t["per_class"]["Loc"] == {"truth": 0, "found": 1, "both": 0}
    assert t["frames_exact"] == 2 and [d["index"] for d in t["differ"]] == [2, 3]
    text = render_found_vs_truth(t)
    assert "frame    2: truth Center, Scratch; found Center" in text


def test_camera_sim_streams_generated_dies_with_ground_truth(running_agent, tmp_path):
    """camera-sim --profile chip: 6-channel dies over the wire; frames kept as .npy (PNG holds 4 channels)
    and their masks in ground_truth.csv."""
    pack = make_pack(tmp_path / "chip", height=224, width=224, channels=6, profile="chip")
    agent = running_agent(models={"dir": str(pack)}, ingest={"max_width": 224, "max_height": 224})
    out, t, sub = collect(agent, lambda topic, msg: topic == "summary" and msg["final"])
    cam = CameraSim(agent.cfg.ingest.endpoint)
    frames = list(line_frames("chip", 4, 0.75, seed=3))
    sent = cam.send_coil("dies-1", iter(frames), gt_dir=tmp_path / "gt", classes=line_classes("chip"))
    cam.close()
    t.join(30)
    sub.close()
    (summary,) = [m for topic, m in out if topic == "summary" and m["final"]]
    assert summary["frames"]["received"] == 4 and summary["frames"]["rejected"] == 0
    for i, (img, masks) in enumerate(frames):
        assert np.array_equal(np.load(tmp_path / "gt" / "frames" / f"dies-1_{i:06d}.npy"), img)
        assert sent.classes.get(i, set()) == {c for k, c in enumerate(line_classes("chip")) if masks[k].any()}
    with open(tmp_path / "gt" / "ground_truth.csv") as f:
        rows = list(csv.reader(f))[1:]
    assert {(r[0], int(r[1])) for r in rows} == {(f"dies-1_{i:06d}.npy", k + 1) for i, (_, m) in enumerate(frames)
                                                  for k in range(3) if m[k].any()}
