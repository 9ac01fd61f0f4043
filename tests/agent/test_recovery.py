"""agent/recovery.py on real files: checkpoint, restore against what the journal holds."""
from __future__ import annotations

import time

import msgpack

from agent.coil import CoilRegistry
from agent.journal import Journal
from agent.recovery import CHECKPOINT_NAME, Recovery


def registry() -> CoilRegistry:
    # late_hold_s=0: a coil ended by next_coil closes as soon as its frames are through (the hold for
    # late frames is tested in test_coil.py; these tests are about what a restart re-sends)
    return CoilRegistry(budget_s=300.0, provisional_at=0.9, idle_timeout_s=30.0, worst_n=5,
                        classes=("bright", "dark"), late_hold_s=0.0)


def defect(coil: str, index: int, x: int = 0) -> dict:
    return {"coil": coil, "camera": "cam0", "index": index, "class": "bright", "bbox_px": [x, 0, x + 4, 4],
            "area_mm2": 4.0, "confidence": 0.9}


def journal_append(j: Journal, topic: str, body: dict) -> int:
    full = {"v": 1, "type": topic, "agent": "t", "seq": j.last_seq + 1, "ts_ns": time.time_ns(), **body}
    return j.append_many([(topic.encode(), msgpack.packb(full))])[0]


def test_save_is_atomic_throttled_and_cleared(tmp_path):
    clock = [0.0]
    rec = Recovery(tmp_path / CHECKPOINT_NAME, interval_s=1.0, clock=lambda: clock[0])
    r = registry()
    r.admit("cam0", "A", 0, 0.0)
    assert rec.save(r, 7) and not rec.save(r, 8)
    clock[0] = 1.5
    assert rec.save(r, 9)
    doc = rec.load()
    assert doc["last_seq"] == 9 and "A" in doc["coils"] and not (tmp_path / "coils.checkpoint.tmp").exists()
    r.finish("cam0", "A", 0, "gated_out")
    r.close_all("shutdown")
    rec.clear(r, 12)
    doc = rec.load()
    assert doc["coils"] == {} and doc["last_seq"] == 12 and doc["closed"] == ["A"]
    r2 = registry()
    rec.restore(r2, Journal(tmp_path / "j", fsync=False))
    assert r2.admit("cam0", "A", 1, 0.0)[0] == "stale_coil"  # summarised at shutdown: no second summary


def test_missing_or_unreadable_checkpoint_restores_nothing(tmp_path):
    j = Journal(tmp_path / "j", fsync=False)
    rec = Recovery(tmp_path / CHECKPOINT_NAME)
    assert rec.restore(registry(), j) == []
    rec.path.write_text("{not json")
    assert rec.restore(registry(), j) == []
    rec.path.write_text('{"format": 99}')
    assert rec.load() is None


def test_restore_resends_only_what_the_journal_lacks(tmp_path):
    j = Journal(tmp_path / "j", fsync=False)
    r = registry()
    for i in range(4):
        r.admit("cam0", "A", i, 0.0)
    r.admit("cam0", "B", 0, 0.0)  # ends A (next_coil) once A's frames are through
    r.finish("cam0", "A", 0, "inspected", [defect("A", 0)])
    r.finish("cam0", "A", 1, "inspected", [defect("A", 1)])
    journal_append(j, "defect", defect("A", 0))  # the event of frame 1 never reached the journal
    r.finish("cam0", "A", 2, "gated_out")
    (summary_a,) = r.finish("cam0", "A", 3, "gated_out")  # A closes; its summary is not journaled either
    r.finish("cam0", "B", 0, "inspected", [defect("B", 0)])
    rec = Recovery(tmp_path / CHECKPOINT_NAME)
    rec.save(r, j.last_seq, force=True)
    # After the checkpoint, before the kill: B frame 1 arrives, is inspected, its event is journaled.
    journal_append(j, "defect", defect("B", 1, x=8))
    journal_append(j, "defect", defect("B", 1, x=16))
    r2 = registry()
    owed = rec.restore(r2, j)
    kinds = sorted((t, b["coil"], b.get("index")) for t, b in owed)
    assert kinds == [("defect", "A", 1), ("defect", "B", 0), ("summary", "A", None)]
    assert r2.is_closed("A") and r2.open_coils() == ["B"]
    snap = r2.snapshot()["B"]
    assert snap["frames"]["inspected"] == 2 and snap["defect_count"] == 3  # 1 before, 2 from the journal


def test_a_coil_closed_after_the_checkpoint_is_not_reopened(tmp_path):
    j = Journal(tmp_path / "j", fsync=False)
    r = registry()
    r.admit("cam0", "A", 0, 0.0)
    rec = Recovery(tmp_path / CHECKPOINT_NAME)
    rec.save(r, j.last_seq, force=True)
    r.finish("cam0", "A", 0, "gated_out")
    (s,) = r.coil_end("cam0", "A", 1, None)
    journal_append(j, "summary", s)
    r2 = registry()
    assert rec.restore(r2, j) == []
    assert r2.open_coils() == [] and r2.admit("cam0", "A", 1, 0.0)[0] == "stale_coil"


def test_checkpoint_seq_is_a_floor_for_a_journal_cut_short(tmp_path):
    j = Journal(tmp_path / "j", fsync=False)
    journal_append(j, "defect", defect("A", 0))
    rec = Recovery(tmp_path / CHECKPOINT_NAME)
    rec.clear(registry(), 41)  # the agent had journaled up to 41; the segments now end at 1
    rec.restore(registry(), j)
    assert j.last_seq == 41 and [d.kind for d in j.damage] == ["missing_records"]
    assert journal_append(j, "defect", defect("A", 1)) == 42


def test_events_a_stalled_journal_holds_back_survive_a_crash_however_old(tmp_path):
    """The publisher's journal write (fsync on a slow card) stalls for longer than the checkpoint's
    window: what it still holds must be in the checkpoint, and a restart sends it."""
    import zmq

    from agent.publish import Publisher

    j = Journal(tmp_path / "j", fsync=False)
    r = registry()
    for i in range(2):
        r.admit("cam0", "A", i, 0.0)
    events = [defect("A", 0), defect("A", 0, x=8)]
    r.finish("cam0", "A", 0, "inspected", events)
    # A publisher whose thread never runs: it holds every message, as a stalled journal write would.
    pub = Publisher(zmq.Context.instance(), endpoint="inproc://stalled", replay_endpoint="inproc://stalled-replay",
                    journal=j, agent="t", heartbeat_s=1.0, sndhwm=100, linger_ms=0, max_replay=100)
    assert pub.oldest_unjournaled_ns() is None
    t0 = time.time_ns()
    for ev in events:
        pub.submit("defect", ev)
    owed_since = pub.oldest_unjournaled_ns()
    assert t0 <= owed_since <= time.time_ns()
    time.sleep(0.05)
    # a window of 0 s stands for "older than the window": without the publisher's stamp they are left out
    rec = Recovery(tmp_path / CHECKPOINT_NAME, recent_s=0.0)
    rec.save(r, j.last_seq, force=True)
    assert rec.load()["recent"] == []
    rec.save(r, j.last_seq, owed_since_ns=owed_since, force=True)
    assert sorted(b["bbox_px"][0] for _, t, b in rec.load()["recent"] if t == "defect") == [0, 8]
    owed = rec.restore(registry(), j)  # the kill: nothing reached the journal
    assert sorted(b["bbox_px"][0] for t, b in owed if t == "defect") == [0, 8]


def test_the_publisher_owes_nothing_once_it_has_journaled(tmp_path):
    import zmq

    from agent.publish import Publisher

    j = Journal(tmp_path / "j", fsync=False)
    pub = Publisher(zmq.Context.instance(), endpoint="inproc://owed", replay_endpoint="inproc://owed-replay",
                    journal=j, agent="t", heartbeat_s=1.0, sndhwm=100, linger_ms=0, max_replay=100)
    for i in range(3):
        pub.submit("defect", defect("A", i))
    assert pub.oldest_unjournaled_ns() is not None
    pub.start()
    deadline = time.monotonic() + 10
    while pub.published < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert j.last_seq == 3 and pub.oldest_unjournaled_ns() is None
    pub.stop()
