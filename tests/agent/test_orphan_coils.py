"""Coils the crash checkpoint never saw (issue 16, item 6): recovery finds them in the journal."""
from __future__ import annotations

import time

import msgpack

from agent.coil import CoilRegistry
from agent.journal import Journal
from agent.recovery import CHECKPOINT_NAME, Recovery


def registry(clock) -> CoilRegistry:
    return CoilRegistry(budget_s=300.0, provisional_at=0.9, idle_timeout_s=5.0, worst_n=5, classes=("bright", "dark"),
                        clock=clock)


def defect(coil: str, index: int, camera: str = "cam0", x: int = 0) -> dict:
    return {"coil": coil, "camera": camera, "index": index, "class": "bright", "bbox_px": [x, 0, x + 4, 4],
            "area_mm2": 4.0, "confidence": 0.9}


def journal_append(j: Journal, topic: str, body: dict) -> int:
    full = {"v": 1, "type": topic, "agent": "t", "seq": j.last_seq + 1, "ts_ns": time.time_ns(), **body}
    return j.append_many([(topic.encode(), msgpack.packb(full))])[0]


def test_a_coil_that_started_after_the_checkpoint_is_closed_with_a_summary(tmp_path):
    clock = [100.0]
    j = Journal(tmp_path / "j", fsync=False)
    before = registry(lambda: clock[0])
    before.admit("cam0", "OLD", 0, 0.0)
    rec = Recovery(tmp_path / CHECKPOINT_NAME)
    rec.save(before, j.last_seq, force=True)  # the checkpoint knows OLD only
    # After it, before the next: a short coil Q on two cameras; some of its events reach the journal.
    journal_append(j, "defect", defect("Q", 0))
    journal_append(j, "defect", defect("Q", 4))
    journal_append(j, "defect", defect("Q", 4, x=20))  # two defects in one frame
    journal_append(j, "defect", defect("Q", 2, camera="cam1"))
    # ... and a coil R that also finished: its summary is journaled, so it is not reopened.
    journal_append(j, "defect", defect("R", 0))
    journal_append(j, "summary", {"coil": "R", "final": True})
    after = registry(lambda: clock[0])
    owed = rec.restore(after, j)
    assert owed == []
    assert sorted(after.open_coils()) == ["OLD", "Q"] and after.is_closed("R")
    snap = after.snapshot()["Q"]
    assert snap["frames"]["inspected"] == 3 and snap["defect_count"] == 4
    assert snap["cameras"]["cam0"]["inspected"] == 2 and snap["cameras"]["cam1"]["inspected"] == 1
    clock[0] += 6.0  # no camera goes on with Q: it closes at the idle timeout
    (q,) = [s for s in after.poll() if s["coil"] == "Q"]
    assert (q["final"], q["complete"], q["end_reason"]) == (True, False, "agent_restart")
    assert q["defect_count"] == 4 and q["defects"]["bright"] == 4
    f = q["frames"]
    assert f["received"] == f["inspected"] == 3 and f["sent"] == f["received"] + f["missing"]
    assert q["missing_ranges"] == {"cam0": [[1, 3]], "cam1": [[0, 1]]}  # the frames nothing vouches for


def test_a_camera_that_goes_on_continues_the_reopened_coil(tmp_path):
    clock = [100.0]
    j = Journal(tmp_path / "j", fsync=False)
    rec = Recovery(tmp_path / CHECKPOINT_NAME)
    rec.save(registry(lambda: clock[0]), j.last_seq, force=True)
    journal_append(j, "defect", defect("Q", 0))
    r = registry(lambda: clock[0])
    rec.restore(r, j)
    assert r.admit("cam0", "Q", 1, 0.0)[0] == "ok"
    r.finish("cam0", "Q", 1, "gated_out")
    (s,) = r.coil_end("cam0", "Q", 2, None)
    assert s["coil"] == "Q" and s["defect_count"] == 1 and s["frames"]["received"] == 2
    assert s["frames"]["inspected"] == 1 and s["frames"]["gated_out"] == 1


def test_without_any_checkpoint_the_journal_still_names_the_coil(tmp_path):
    """The checkpoint was never written (a kill right after start) or was moved aside as damaged."""
    clock = [100.0]
    j = Journal(tmp_path / "j", fsync=False)
    journal_append(j, "defect", defect("DONE", 0))
    journal_append(j, "summary", {"coil": "DONE", "final": True})
    journal_append(j, "defect", defect("Q", 3))
    r = registry(lambda: clock[0])
    assert Recovery(tmp_path / CHECKPOINT_NAME).restore(r, j) == []
    assert r.open_coils() == ["Q"] and r.is_closed("DONE")
    clock[0] += 6.0
    (q,) = r.poll()
    assert q["coil"] == "Q" and q["end_reason"] == "agent_restart" and q["defect_count"] == 1


def test_a_fresh_journal_and_no_checkpoint_restore_nothing(tmp_path):
    j = Journal(tmp_path / "j", fsync=False)
    r = registry(time.monotonic)
    assert Recovery(tmp_path / CHECKPOINT_NAME).restore(r, j) == [] and r.open_coils() == []
