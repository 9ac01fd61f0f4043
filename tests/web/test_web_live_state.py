"""The page's live state (agent/web/live.py LiveState) when messages of two coils interleave: which
coil the page shows, and that one coil's track, periodic series or late summary never lands on
another's. Written for deliberate bugs the feed tests let through (docs/testing.md)."""
from __future__ import annotations

import pytest

pytest.importorskip("starlette")

from agent.web.live import LiveState  # noqa: E402


def defect(coil: str, seq: int) -> dict:
    return {"v": 1, "type": "defect", "seq": seq, "ts_ns": 1_763_771_523_041_000_000, "coil": coil, "camera": "cam0",
            "index": seq, "class": "bright", "class_id": 0, "confidence": 0.9, "across_mm": 10.0, "along_mm": 20.0,
            "width_mm": 8.0, "length_mm": 8.0, "area_mm2": 64.0, "bbox_px": [0, 0, 16, 16]}


def summary(coil: str, final: bool, seq: int) -> dict:
    return {"v": 1, "type": "summary", "seq": seq, "coil": coil, "final": final, "complete": final,
            "defects": {"bright": 1}, "defect_count": 1, "timing": {"started_ns": 1_763_771_523_000_000_000}}


def test_a_late_final_summary_of_the_last_coil_does_not_take_the_page_from_the_running_one():
    st = LiveState(300.0)
    st.on_defect(defect("A", 1))
    st.on_defect(defect("B", 2))  # B started before A's final summary came
    st.on_summary(summary("A", True, 3))
    snap = st.snapshot()
    assert snap["coil"] == "B" and [d["seq"] for d in snap["defects"]] == [2] and snap["summary"] is None
    st.on_summary(summary("B", False, 4))  # B's provisional summary is shown
    assert st.snapshot()["summary"]["final"] is False
    st.on_summary(summary("B", True, 5))
    st.on_summary(summary("C", False, 6))  # B is done: the next coil's summary switches the page
    assert st.snapshot()["coil"] == "C"


def test_tracks_and_periodic_series_of_another_coil_stay_off_the_current_one():
    st = LiveState(300.0)
    st.on_defect(defect("B", 7))
    st.on_track({"coil": "A", "track_id": "A/1", "event_seqs": [7], "class": "bright"})
    st.on_periodic({"coil": "A", "class": "bright", "pitch_mm": 900.0})
    snap = st.snapshot()
    assert "track_id" not in snap["defects"][0] and snap["periodic"] == []
    st.on_track({"coil": "B", "track_id": "B/1", "event_seqs": [7], "class": "bright"})
    st.on_periodic({"coil": "B", "class": "bright", "pitch_mm": 900.0})
    snap = st.snapshot()
    assert snap["defects"][0]["track_id"] == "B/1" and [p["pitch_mm"] for p in snap["periodic"]] == [900.0]


def test_progress_follows_the_current_coil_while_it_is_open():
    st = LiveState(300.0)
    st.on_defect(defect("B", 1))
    open_coils = {"B": {"frames": {"received": 3}, "timing": {"started_ns": 1}},
                  "C": {"frames": {"received": 1}, "timing": {"started_ns": 2}}}  # C newer, B still open
    assert st.on_progress(open_coils)["progress"]["coil"] == "B"
    assert st.snapshot()["coil"] == "B"
    st.on_summary(summary("B", True, 2))
    assert st.on_progress({"C": open_coils["C"]})["progress"]["coil"] == "C"  # B done: the newest open one
