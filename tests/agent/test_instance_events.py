"""An instance pack (model.json format 3) through a real agent: one event per instance, with its score.

The tiny instance pack (tests/tinyinstances.py) is exact: a 20x20 px square aligned to 4 px is one
instance whose box is the square. Real sockets on loopback, real ONNX Runtime sessions.
"""
from __future__ import annotations

import pytest
from tests_support_events import send_coil_collected
from tinyinstances import SQUARE, clean_frame, frame_with_squares, make_instance_pack
from tinypack import frame_with



def _run_coil(agent, coil, frames):
    got = send_coil_collected(agent.cfg, coil, [(f, None) for f in frames], mm_per_px_y=2.0)
    return got.defects(coil), got.summaries(coil)[-1]


def test_one_event_per_instance_with_box_score_mask_area_and_strip_position(running_agent, tmp_path):
    pack = make_instance_pack(tmp_path / "inst", instance_threshold=0.5)
    agent = running_agent(models={"dir": str(pack), "threads": 1})
    frames = [clean_frame(),
              frame_with_squares([("bright", 40, 20)]),
              frame_with_squares([("bright", 8, 4), ("dark", 200, 40)]),
              frame_with_squares([("dark", 236, 44)])]  # touching the right and bottom edges
    defects, summary = _run_coil(agent, "coil-I", frames)
    truth = {(1, "bright", 40, 20), (2, "bright", 8, 4), (2, "dark", 200, 40), (3, "dark", 236, 44)}
    got = {(d["index"], d["class"], d["bbox_px"][0], d["bbox_px"][1]) for d in defects}
    assert got == truth and len(defects) == len(truth)  # one event per square, nothing else
    for d in defects:
        x, y = d["bbox_px"][:2]
        assert d["bbox_px"] == [x, y, x + SQUARE, y + SQUARE]
        assert d["instance"] == d["confidence"] == pytest.approx(0.961, abs=0.001)
        assert d["area_px"] == SQUARE * SQUARE  # the class mask inside the box: 25 cells of 16 px
        assert d["across_mm"] == pytest.approx(100.0 + (x + SQUARE / 2) * 0.5)
        assert d["along_mm"] == pytest.approx(d["index"] * 64 * 2.0 + (y + SQUARE / 2) * 2.0)
        assert d["width_mm"] == pytest.approx(SQUARE * 0.5) and d["length_mm"] == pytest.approx(SQUARE * 2.0)
    assert summary["defects"] == {"bright": 2, "dark": 2}


def test_the_class_instance_threshold_decides(running_agent, tmp_path):
    """The heatmap of a 16 px square tops out at 0.579: under a 0.7 threshold it is no event, while a
    20 px square (peak 0.961) is."""
    pack = make_instance_pack(tmp_path / "inst", instance_threshold=0.7)
    agent = running_agent(models={"dir": str(pack), "threads": 1})
    defects, _ = _run_coil(agent, "coil-T", [frame_with("bright", 40, 20, size=16),
                                             frame_with_squares([("bright", 40, 20)])])
    assert [(d["index"], d["bbox_px"]) for d in defects] == [(1, [40, 20, 60, 40])]


def test_component_packs_send_no_instance_key(running_agent):
    agent = running_agent(models={"threads": 1})  # the tiny components pack (format 1)
    defects, _ = _run_coil(agent, "coil-C", [frame_with("bright", 40, 20)])
    assert len(defects) == 1 and "instance" not in defects[0]
    assert defects[0]["bbox_px"] == [40, 20, 56, 36]
