"""The demo's roll marks (agent/tools/rollmarks.py): painted where the pitch says, exact in the ground
truth, and found by the agent's periodic search in the steel demo."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.tools.demo import format_periodic
from agent.tools.rollmarks import RollMarks, with_roll_marks

ROOT = Path(__file__).resolve().parents[2]


def test_roll_marks_are_painted_at_the_pitch_across_frame_boundaries_and_in_the_truth():
    frames = [(np.full((256, 1600), 120, np.uint8), np.zeros((6, 256, 1600), bool), []) for _ in range(40)]
    marks = RollMarks(pitch_mm=2000.0, first_mm=500.0, jitter_mm=0.0, missed=(2,))
    out = list(with_roll_marks(frames, marks, mm_per_px_y=1.0))
    assert marks.positions == [500.0, 2500.0, 6500.0, 8500.0]  # repeat 2 (4500 mm) missed
    painted = [i for i, (img, masks, inst) in enumerate(out) if (img < 120).any()]
    # 500 +- 40 mm crosses the boundary of frames 1 and 2 (256 mm each): painted on both; 2500 in frame 9
    assert painted == [1, 2, 9, 25, 33]
    img, masks, inst = out[1]
    assert masks[2].sum() == (img < 120).sum() and inst == [(2, 1050, 204, 1151, 256)]
    assert (frames[1][0] == 120).all()  # the source's frames are not written over
    assert "patches every 2000.0 mm at 1100 mm across, 4 marks painted" in marks.describe(
        ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"))


def test_the_periodic_line_of_the_demo():
    p = {"class": "patches", "pitch_mm": 2513.3, "across_mm": 1102.0, "count": 20, "roll_diameter_mm": 800.0,
         "first_along_mm": 3210.0, "last_along_mm": 76110.0, "confidence": 0.67}
    assert format_periodic(p).startswith("periodic: patches every 2513 mm at 1102 mm, 20 repeats")


@pytest.mark.slow
def test_the_steel_demo_finds_its_roll_mark():
    r = subprocess.run([sys.executable, "-m", "agent.cli", "demo", "--json"], capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    (p,) = doc["summary"]["periodic"]
    assert p["class"] == "patches" and abs(p["pitch_mm"] - 2513.3) / 2513.3 <= 0.01 and p["count"] >= 10
    assert doc["summary"]["grade"]["rule"] == "periodic"
