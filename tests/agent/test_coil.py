"""CoilRegistry on a fake clock: accounting invariants, duplicates, coil switches, timeouts, deadline."""
from __future__ import annotations

import json
import random

import pytest

from agent.coil import TERMINAL, CoilRegistry


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def registry(clock=None, **kw) -> CoilRegistry:
    args = dict(budget_s=100.0, provisional_at=0.5, idle_timeout_s=10.0, worst_n=3, classes=("bright", "dark"),
                clock=clock or Clock())
    args.update(kw)
    return CoilRegistry(**args)


def invariants(s: dict) -> None:
    for f in [s["frames"], *s["cameras"].values()]:
        assert f["received"] == f["inspected"] + f["gated_out"] + f["rejected"] + f["shed"] + f["pending"] + f["lost"]
    f = s["frames"]
    assert f["sent"] == f["received"] + f["missing"]
    assert f["missing"] == sum(b - a + 1 for r in s["missing_ranges"].values() for a, b in r)
    if s["final"]:  # the gate's decision per frame (docs/protocol.md 2.2): as many as counted
        for cam, c in s["cameras"].items():
            assert sum(b - a + 1 for a, b in s["inspected_ranges"].get(cam, [])) == c["inspected"]
    else:
        assert "inspected_ranges" not in s


def ev(index: int, cls: str = "bright", area: float = 10.0, conf: float = 0.9) -> dict:
    return {"class": cls, "index": index, "area_mm2": area, "confidence": conf}


def test_clean_coil_closes_complete_with_exact_counts():
    r = registry()
    assert r.coil_start("cam0", "A") == []
    for i in range(10):
        assert r.admit("cam0", "A", i, 2.0 * i) == ("ok", [])
    for i in range(10):
        out = r.finish("cam0", "A", i, "inspected" if i % 3 == 0 else "gated_out",
                       [ev(i, area=10.0 + i)] if i % 3 == 0 else [])
        assert out == []
    (s,) = r.coil_end("cam0", "A", 10, 25.0)
    invariants(s)
    assert s["final"] and s["complete"] and s["end_reason"] == "coil_end"
    assert s["frames"] == {"sent": 10, "received": 10, "inspected": 4, "gated_out": 6, "rejected": 0, "shed": 0,
                           "missing": 0, "pending": 0, "lost": 0, "duplicates": 0, "after_end": 0}
    assert s["defects"] == {"bright": 4, "dark": 0} and s["length_mm"] == 25.0
    assert [w["index"] for w in s["worst"]] == [9, 6, 3]  # worst_n = 3, by area x confidence
    assert r.open_coils() == [] and r.is_closed("A")
    assert r.admit("cam0", "A", 11, 0.0) == ("stale_coil", [])


def test_summary_waits_for_pending_frames_after_coil_end():
    r = registry()
    r.admit("cam0", "A", 0, 0.0)
    r.admit("cam0", "A", 1, 0.0)
    assert r.coil_end("cam0", "A", 2, None) == []
    assert r.finish("cam0", "A", 0, "gated_out") == []
    (s,) = r.finish("cam0", "A", 1, "shed")
    invariants(s)
    assert s["frames"]["shed"] == 1 and not s["complete"]


def test_duplicates_missing_rejected_and_frames_above_the_coil_end_count():
    r = registry()
    for i in (0, 1, 2, 5, 6, 9):
        assert r.admit("cam0", "A", i, 0.0)[0] == "ok"
    assert r.admit("cam0", "A", 2, 0.0)[0] == "duplicate"
    r.reject("cam0", "A", 6, "decode_failed")
    r.reject("cam0", "A", None, "schema")  # no index: names no frame, so not counted in the coil
    r.reject("cam0", "A", 6, "size_mismatch")  # already rejected: not counted twice
    for i in (0, 1, 2, 5, 9):
        r.finish("cam0", "A", i, "gated_out")
    (s,) = r.coil_end("cam0", "A", 8, None)  # the camera says 8, yet index 9 arrived
    invariants(s)
    f = s["frames"]
    assert (f["sent"], f["received"], f["missing"], f["duplicates"], f["rejected"]) == (10, 6, 4, 1, 1)
    assert s["missing_ranges"] == {"cam0": [[3, 4], [7, 8]]}
    assert s["rejected_by_reason"] == {"decode_failed": 1}  # sums to frames.rejected (issue 16, item 16)
    assert not s["complete"]


def test_frames_above_the_coil_end_count_alone_make_the_coil_incomplete():
    """Nothing missing, rejected or lost: only the camera's count is wrong. The agent cannot vouch
    for a coil whose camera miscounted, so it is not complete, and the extra frames are counted."""
    r = registry()
    for i in range(12):
        r.admit("cam0", "A", i, 0.0)
        r.finish("cam0", "A", i, "gated_out")
    (s,) = r.coil_end("cam0", "A", 10, None)  # the camera says 10, indices 0..11 arrived
    invariants(s)
    assert s["end_reason"] == "coil_end" and s["missing_ranges"] == {}
    assert (s["frames"]["sent"], s["frames"]["received"], s["frames"]["missing"]) == (12, 12, 0)
    assert s["cameras"]["cam0"]["sent"] == 12
    assert not s["complete"]


def test_finish_of_unknown_or_non_pending_frames_is_ignored_and_bad_state_raises():
    r = registry()
    r.admit("cam0", "A", 0, 0.0)
    assert r.finish("cam0", "B", 0, "inspected") == []
    r.finish("cam0", "A", 0, "inspected")
    assert r.finish("cam0", "A", 0, "inspected") == []  # twice: logged, not counted
    with pytest.raises(ValueError, match="unknown terminal state 'done'"):
        r.finish("cam0", "A", 0, "done")


def test_next_coil_ends_the_previous_one_and_a_late_frame_does_not_switch_back():
    r = registry()
    r.admit("cam0", "A", 0, 0.0)
    r.finish("cam0", "A", 0, "gated_out")
    status, out = r.admit("cam0", "B", 0, 0.0)  # A never got a coil_end
    # held for late (interleaved) frames of A until none came for late_hold_s, then closed by poll()
    assert status == "ok" and out == []
    r.clock.t += r.late_hold_s
    out = r.poll()
    assert len(out) == 1
    assert out[0]["coil"] == "A" and out[0]["end_reason"] == "next_coil" and not out[0]["complete"]
    # B ended by cam0 while cam1 still sends B: a late B frame from cam0 must not end C.
    r.admit("cam1", "B", 0, 0.0)
    r.coil_end("cam0", "B", 2, None)
    r.admit("cam0", "C", 0, 0.0)
    status, out = r.admit("cam0", "B", 1, 0.0)  # reordered straggler of B
    assert status == "ok" and out == []
    assert "C" in r.open_coils() and not r.snapshot()["C"]["cameras"]["cam0"]["end_reason"]


def test_idle_timeout_and_provisional_deadline_summary():
    clock = Clock()
    r = registry(clock)
    r.admit("cam0", "A", 0, 0.0)
    r.admit("cam0", "A", 1, 0.0)
    r.finish("cam0", "A", 0, "inspected", [ev(0)])
    clock.t += 9.0
    assert r.poll() == []
    r.admit("cam0", "A", 2, 0.0)  # a frame resets the idle clock
    clock.t += 9.0
    assert r.poll() == []
    clock.t += 40.0  # 58 s: past provisional_at x budget = 50 s, and idle
    out = r.poll()
    prov = [s for s in out if not s["final"]]
    assert len(prov) == 1
    p = prov[0]
    invariants(p)
    assert p["end_reason"] == "deadline" and not p["complete"] and p["frames"]["pending"] == 2
    assert p["timing"]["wall_s"] == 58.0 and p["timing"]["slack_s"] == 42.0
    assert not [s for s in out if s["final"]], "pending frames hold the final summary back"
    r.finish("cam0", "A", 1, "gated_out")
    (s,) = r.finish("cam0", "A", 2, "gated_out")
    invariants(s)
    assert s["final"] and s["end_reason"] == "idle_timeout" and s["cameras"]["cam0"]["sent"] is None
    assert r.poll() == []  # one provisional summary per coil


def test_close_all_at_shutdown_keeps_pending_or_marks_it_lost():
    r = registry()
    r.admit("cam0", "A", 0, 0.0)
    r.admit("cam1", "B", 0, 0.0)
    (a,) = r.close_all("shutdown")[:1]
    invariants(a)
    assert (a["end_reason"], a["final"], a["complete"], a["frames"]["pending"]) == ("shutdown", True, False, 1)
    r2 = registry()
    r2.admit("cam0", "A", 0, 0.0)
    (s,) = r2.close_all("agent_restart", pending_state="lost")
    assert s["frames"]["lost"] == 1 and s["frames"]["pending"] == 0


def test_invariants_hold_under_random_event_orders():
    rng = random.Random(3)
    for trial in range(30):
        r = registry()
        pending: list[tuple[str, int]] = []
        summaries = []
        for _ in range(300):
            cam = rng.choice(["cam0", "cam1"])
            op = rng.random()
            if op < 0.6:
                i = rng.randrange(60)
                status, out = r.admit(cam, "A", i, 0.0)
                summaries += out
                if status == "ok":
                    pending.append((cam, i))
            elif op < 0.9 and pending:
                cam, i = pending.pop(rng.randrange(len(pending)))
                summaries += r.finish(cam, "A", i, rng.choice(TERMINAL))
            elif op < 0.95:
                r.reject(cam, "A", rng.randrange(60), "size_mismatch")
            else:
                for s in r.snapshot().values():
                    invariants(s)
        summaries += r.coil_end("cam0", "A", 60, None) + r.coil_end("cam1", "A", 50, None)
        summaries += r.close_all("shutdown")
        for s in summaries:
            invariants(s)


def test_export_import_state_continues_the_coil_after_a_crash():
    clock = Clock()
    r = registry(clock)
    r.coil_start("cam0", "A")
    for i in range(6):
        r.admit("cam0", "A", i, 0.0)
    r.finish("cam0", "A", 0, "inspected", [ev(0)])
    r.finish("cam0", "A", 1, "gated_out")
    r.admit("cam1", "Z", 0, 0.0)
    state = json.loads(json.dumps(r.export_state()))  # through JSON, as the checkpoint file does
    r2 = registry(clock)
    assert sorted(r2.import_state(state)) == ["A", "Z"]
    assert r2.recover_frame("A", "cam0", 2, [ev(2, "dark")])  # the journal shows it was inspected
    assert not r2.recover_frame("A", "cam0", 0, [ev(0)])  # counted already
    assert r2.recover_closed("Z") and r2.is_closed("Z")
    assert r2.admit("cam0", "A", 6, 0.0)[0] == "ok"  # the camera goes on with the same coil
    r2.finish("cam0", "A", 6, "gated_out")
    (s,) = r2.coil_end("cam0", "A", 8, None)
    invariants(s)
    f = s["frames"]
    assert (f["inspected"], f["gated_out"], f["lost"], f["missing"]) == (2, 2, 3, 1)
    assert s["defects"] == {"bright": 1, "dark": 1} and s["end_reason"] == "coil_end" and not s["complete"]
    with pytest.raises(ValueError, match="unknown terminal state 'pending'"):
        r2.import_state(state, in_flight="pending")


def test_restored_coil_nobody_continues_closes_as_agent_restart():
    clock = Clock()
    r = registry(clock)
    r.admit("cam0", "A", 0, 0.0)
    r.finish("cam0", "A", 0, "gated_out")
    r2 = registry(clock)
    r2.import_state(r.export_state())
    assert r2.close_settled() == []
    clock.t += 11.0
    (s,) = r2.poll()
    assert s["end_reason"] == "agent_restart" and s["final"] and not s["complete"]
    # Every camera had ended and frames were in flight: closes at once after the restore.
    r3 = registry(clock)
    r3.admit("cam0", "B", 0, 0.0)
    r3.coil_end("cam0", "B", 1, None)
    r4 = registry(clock)
    r4.import_state(r3.export_state())
    (s,) = r4.close_settled()
    assert s["frames"]["lost"] == 1 and s["end_reason"] == "coil_end" and not s["complete"]


def test_huge_index_does_not_cost_its_size():
    r = registry()
    r.admit("cam0", "A", 10_000_000, 0.0)
    r.finish("cam0", "A", 10_000_000, "gated_out")
    (s,) = r.coil_end("cam0", "A", 3, None)
    invariants(s)
    assert s["missing_ranges"] == {"cam0": [[0, 9_999_999]]} and s["frames"]["sent"] == 10_000_001
