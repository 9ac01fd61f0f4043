"""agent/statefiles.py on real files: the state-directory lock, the watermark and checkpoint checks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from agent import statefiles
from agent.coil import CoilRegistry
from agent.journal import Journal
from agent.recovery import CHECKPOINT_NAME, FORMAT, Recovery
from agent.statefiles import (
    LockHeld,
    StateDirLocked,
    StateFileInvalid,
    StateLock,
    StateReport,
    flock_exclusive,
    validate_checkpoint,
)


def registry() -> CoilRegistry:
    return CoilRegistry(budget_s=300.0, provisional_at=0.9, idle_timeout_s=30.0, worst_n=5, classes=("bright",))


def test_second_lock_on_a_state_dir_is_refused_with_the_holder_named(tmp_path):
    first = StateLock(tmp_path).acquire()
    with pytest.raises(StateDirLocked, match=r"in use by another agent \(pid \d+ holds .*coilsight.lock\)"):
        StateLock(tmp_path).acquire()  # the same process: flock belongs to the open file, so this is refused too
    first.release()
    StateLock(tmp_path).acquire().release()  # released: the next agent takes it


def test_the_shared_flock_names_the_recorded_holder_only(tmp_path):
    """flock_exclusive, under StateLock and the bridge's AckState: the directory is made, a second
    open is refused (LockHeld), with the holder's pid only when the holder recorded it."""
    path = tmp_path / "new" / "dir" / "x.lock"
    fd = flock_exclusive(path, record_pid=True)
    try:
        with pytest.raises(LockHeld) as held:
            flock_exclusive(path)
        assert held.value.holder == os.getpid() and path.read_text() == f"{os.getpid()}\n"
    finally:
        os.close(fd)
    plain = tmp_path / "plain.lock"
    fd = flock_exclusive(plain)  # the bridge's way: nothing written into the file
    try:
        with pytest.raises(LockHeld) as held:
            flock_exclusive(plain, record_pid=True)
        assert held.value.holder is None and plain.read_text() == ""
        # the agent's message for a holder that left no pid
        with pytest.raises(StateDirLocked, match=r"in use by another agent \(another process holds"):
            os.replace(plain, tmp_path / "coilsight.lock")
            StateLock(tmp_path).acquire()
    finally:
        os.close(fd)
    os.close(flock_exclusive(path))  # closed: free again


def test_lock_of_a_killed_process_is_free_at_once(tmp_path):
    code = ("import sys, time; from agent.statefiles import StateLock; StateLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(StateDirLocked, match=f"pid {p.pid} holds"):
            StateLock(tmp_path).acquire()
        p.kill()
        p.wait(10)
        StateLock(tmp_path).acquire().release()  # SIGKILL left no stale lock
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)


@pytest.mark.parametrize("content, reason", [
    (b"99999999999999999999999999", "must hold one decimal seq"),
    (b"9" * 5000, "bytes; at most 64 expected"),
    (b"-5", "must hold one decimal seq"),
    (b"\xff\xfe garbage", "must hold one decimal seq"),
    (b"5000000", "implausible: more than 1000000 above the journal's last seq 3"),
])
def test_bad_watermark_is_moved_aside_and_reported(tmp_path, content, reason):
    path = tmp_path / "published.seq"
    path.write_bytes(content)
    report = StateReport()
    assert statefiles.read_watermark(path, 3, report) == 0
    assert not path.exists()
    (entry,) = report.moved_aside
    assert reason in entry["reason"] and entry["path"] == str(path)
    assert entry["moved_to"].startswith(str(path) + ".bad-")
    with open(entry["moved_to"], "rb") as f:
        assert f.read() == content  # kept for forensics, not deleted


def test_good_watermark_is_read_and_left_alone(tmp_path):
    path = tmp_path / "published.seq"
    path.write_text("1000003\n")
    report = StateReport()
    assert statefiles.read_watermark(path, 3, report) == 1_000_003 and path.exists() and not report.moved_aside
    assert statefiles.read_watermark(tmp_path / "absent.seq", 3, report) == 0 and not report.moved_aside


def _checkpoint(tmp_path) -> dict:
    r = registry()
    r.admit("cam0", "A", 0, 0.0)
    r.admit("cam0", "A", 1, 0.0)
    r.finish("cam0", "A", 0, "inspected", [{"coil": "A", "camera": "cam0", "index": 0, "class": "bright",
                                           "bbox_px": [0, 0, 4, 4], "area_mm2": 4.0, "confidence": 0.9}])
    rec = Recovery(tmp_path / CHECKPOINT_NAME)
    rec.save(r, 7, force=True)
    return json.loads(rec.path.read_text())


def test_a_checkpoint_the_agent_wrote_is_valid(tmp_path):
    validate_checkpoint(_checkpoint(tmp_path), fmt=FORMAT)


@pytest.mark.parametrize("damage, match", [
    (lambda d: d.update(coils=[]), r"checkpoint coils: expected an object, got list"),
    (lambda d: d["coils"]["A"].pop("cameras"), r"checkpoint coils.A.cameras: expected an object"),
    (lambda d: d["coils"]["A"]["cameras"]["cam0"]["states"].update(lost=[[0, 10**12]]),
     r"checkpoint coils.A.cameras.cam0.states: more than 10000000 frames"),
    (lambda d: d["coils"]["A"]["cameras"]["cam0"]["states"].update(lost=[[5, 2]]), r"runs backwards"),
    (lambda d: d["coils"]["A"]["cameras"]["cam0"]["states"].update(exploded=[[0, 1]]), r"states key: expected one of"),
    (lambda d: d.update(last_seq="12"), r"checkpoint last_seq: expected an integer"),
    (lambda d: d.update(recent=[[1, "defect", {"coil": "A"}]]), r"recent\[0\]\[2\].camera: expected a string"),
    (lambda d: d.update(recent=[[1, "summary", {"coil": "A", "final": True}]]), r"recent\[0\]\[2\].complete"),
    (lambda d: d.update(format=2), r"checkpoint format: expected 1, got 2"),
    (lambda d: d["coils"]["A"].update(length_mm=float("nan")), r"length_mm: expected a finite number"),
])
def test_checkpoint_of_the_wrong_shape_is_named(tmp_path, damage, match):
    doc = _checkpoint(tmp_path)
    damage(doc)
    with pytest.raises(StateFileInvalid, match=match):
        validate_checkpoint(doc, fmt=FORMAT)


@pytest.mark.parametrize("write", [
    lambda p, d: p.write_bytes(b"\x00\xff" * 1000),  # garbage bytes
    lambda p, d: p.write_text(json.dumps({**d, "coils": {"A": {**d["coils"]["A"], "cameras": "cam0"}}})),
    lambda p, d: p.write_text(json.dumps({**d, "last_seq": 10**15})),  # huge seq: implausible
    lambda p, d: p.write_text(json.dumps({**d, "coils": {"A": {**d["coils"]["A"], "cameras": {"cam0": {
        **d["coils"]["A"]["cameras"]["cam0"], "states": {"lost": [[0, 10**13]]}}}}}})),  # would loop 10^13 times
])
def test_bad_checkpoint_is_moved_aside_and_restore_goes_on(tmp_path, write):
    doc = _checkpoint(tmp_path)
    path = tmp_path / CHECKPOINT_NAME
    write(path, doc)
    report = StateReport()
    j = Journal(tmp_path / "j", fsync=False)
    r = registry()
    t0 = time.monotonic()
    assert Recovery(path).restore(r, j, report) == []
    assert time.monotonic() - t0 < 30, "never a hang"  # a guard against a hang, not a speed figure
    assert r.open_coils() == [] and j.last_seq == 0
    (entry,) = report.moved_aside
    assert entry["path"] == str(path) and not path.exists()
    assert entry["moved_to"].startswith(str(path) + ".bad-")


@pytest.mark.parametrize("make", ["directory", "huge sparse file"])
def test_a_segment_that_cannot_be_one_is_moved_aside_not_read(tmp_path, make):
    j = Journal(tmp_path / "j", fsync=False)
    j.append_many([(b"defect", b"one")])
    j.close()
    bad = tmp_path / "j" / "segment-0000000000000002.log"
    if make == "directory":
        bad.mkdir()
    else:
        with open(bad, "wb") as f:
            f.truncate(5 << 30)  # 5 GiB of holes: read_bytes() would take it all into memory
    j = Journal(tmp_path / "j", fsync=False)
    (d,) = [d for d in j.damage if d.kind == "moved_aside"]
    assert d.segment == bad.name and not bad.exists()
    assert [p.name.startswith(bad.name + ".bad-") for p in (tmp_path / "j").iterdir()].count(True) == 1
    assert j.read(1, 10) == [(1, b"defect", b"one")] and j.append_many([(b"defect", b"two")]) == [2]
    j.close()
