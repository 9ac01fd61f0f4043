"""agent/tools/coil_records.py (the numbers of `coilsight report`) at its edges, from journals
written by the journal's own writer: which summary and which coil are used, a coil exactly on its
budget, a journal holding every event, and a crop looked up only inside the crops folder. Each
test was written for a deliberate bug the report tests let through (docs/testing.md)."""
from __future__ import annotations

import time

import numpy as np

from agent.crops import CropStore
from agent.journal import Journal
from agent.protocol import pack_body
from agent.tools.coil_records import coil_report, find_crop, load_coil
from agent.tracks import part_key


def envelope(topic: str, body: dict, seq: int) -> tuple[bytes, bytes]:
    return topic.encode(), pack_body({"v": 1, "type": topic, "agent": "line-7", "seq": seq,
                                      "ts_ns": time.time_ns(), **body})


def journal(directory, records: list[tuple[str, dict]]):
    j = Journal(directory, fsync=False)
    j.append_many([envelope(t, b, n + 1) for n, (t, b) in enumerate(records)])
    j.close()
    return directory


def defect(coil: str, along_mm: float) -> dict:
    return {"coil": coil, "class": "bright", "class_id": 0, "confidence": 0.9, "across_mm": 10.0,
            "along_mm": along_mm, "width_mm": 5.0, "length_mm": 5.0, "area_mm2": 25.0, "index": 1, "camera": "cam0"}


def summary(coil: str, *, final: bool = True, **extra) -> dict:
    return {"coil": coil, "final": final, "defects": {"bright": 1}, "defect_count": 1, "length_mm": 1000.0, **extra}


def test_the_last_final_summary_and_the_last_summarised_coil_are_the_ones_used(tmp_path):
    j = journal(tmp_path / "j", [
        ("defect", defect("A", 100.0)), ("summary", summary("A", final=False, length_mm=500.0)),
        ("summary", summary("A", length_mm=1000.0)), ("summary", summary("A", length_mm=1200.0)),  # re-sent, later
        ("defect", defect("B", 50.0)), ("summary", summary("B")), ("defect", defect("C", 10.0))])  # C still running
    rec = load_coil(j, "A")
    assert rec.summary["length_mm"] == 1200.0
    assert coil_report(rec)["provisional_summaries"] == 1
    assert load_coil(j, "latest").coil == "B"  # the last coil with a summary, not the last with a record


def test_a_coil_exactly_on_its_budget_is_within_it(tmp_path):
    j = journal(tmp_path / "j", [("defect", defect("A", 100.0)),
                                 ("summary", summary("A", timing={"budget_s": 60.0, "wall_s": 60.0}))])
    assert coil_report(load_coil(j, "A"))["timing"]["verdict"].startswith("within budget: 60.0 s of 60.0 s")
    j2 = journal(tmp_path / "j2", [("summary", summary("A", timing={"budget_s": 60.0, "wall_s": 61.5}))])
    assert coil_report(load_coil(j2, "A"))["timing"]["verdict"].startswith("over budget by 1.5 s")


def test_the_rotated_away_note_only_when_events_are_missing(tmp_path):
    j = journal(tmp_path / "j", [("defect", defect("A", 100.0)), ("summary", summary("A"))])
    assert not any("rotated away" in n for n in coil_report(load_coil(j, "A"))["notes"])
    j2 = journal(tmp_path / "j2", [("summary", summary("A"))])
    assert any("holds 0 of the summary's 1" in n for n in coil_report(load_coil(j2, "A"))["notes"])


def test_a_crop_is_looked_up_only_inside_the_crops_folder(tmp_path):
    crops = tmp_path / "crops"
    # the agent's own crop file (agent/crops.py), written by its crop thread
    store = CropStore(crops)
    store.start()
    part = {"coil": "A", "camera": "cam0", "index": 0, "bbox_px": [1, 1, 9, 9], "class_id": 0}
    assert store.offer(np.zeros((16, 16), np.uint8), [part])
    assert store.request("A", 2, part_key(part)) == "A/2"
    store.stop()
    png = find_crop(crops, "A", {"track_id": 2})
    assert png is not None and png.startswith(b"\x89PNG")
    assert find_crop(crops, "A", {"track_id": 3}) is None  # never written
    # a plain <crops>/<coil>/<track_id>.png, plain names only
    (crops / "B").mkdir(parents=True)
    (crops / "B" / "1.png").write_bytes(b"\x89PNG-B1")
    (tmp_path / "1.png").write_bytes(b"\x89PNG-secret")
    assert find_crop(crops, "B", {"track_id": 1}) == b"\x89PNG-B1"
    assert find_crop(crops, "..", {"track_id": 1}) is None  # a coil name from a copied journal
    assert find_crop(crops, "B/..", {"track_id": 1}) is None
    assert find_crop(crops, ".hidden", {"track_id": 1}) is None
    assert find_crop(crops, "B", {"track_id": "../1"}) is None
    assert find_crop(None, "B", {"track_id": 1}) is None and find_crop(crops, "B", {}) is None
