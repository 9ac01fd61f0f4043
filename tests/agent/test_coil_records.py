"""agent/tools/coil_records.py (the numbers of `coilsight report`) at its edges, from journals
written by the journal's own writer: which summary and which coil are used, a coil exactly on its
budget, a journal holding every event, and a crop looked up only inside the crops folder. Each
test was written for a deliberate bug the report tests let through (docs/testing.md)."""
from __future__ import annotations

import time

from agent.journal import Journal
from agent.protocol import pack_body
from agent.tools.coil_records import coil_report, find_crop, load_coil


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
    (crops / "A").mkdir(parents=True)
    (crops / "A" / "t1.png").write_bytes(b"\x89PNG")
    (tmp_path / "secret.png").write_bytes(b"\x89PNG")
    assert find_crop(crops, "A", {"track_id": "t1"}) == crops / "A" / "t1.png"
    assert find_crop(crops, "..", {"track_id": "secret"}) is None  # a coil name from a copied journal
    assert find_crop(crops, "A/..", {"track_id": "t1"}) is None
    assert find_crop(crops, "A", {"track_id": "x", "crop": "../../secret.png"}) is None
    assert find_crop(crops, "A", {"track_id": "x", "crop": str(tmp_path / "secret.png")}) is None  # absolute
    assert find_crop(crops, "A", {"track_id": "t1", "crop": "../t1.png"}) == crops / "A" / "t1.png"  # its name only
