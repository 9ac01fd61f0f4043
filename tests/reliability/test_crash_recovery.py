"""A real agent process SIGKILLed mid-coil and restarted; SIGTERM mid-coil; journal damaged between runs."""
from __future__ import annotations

import random
import threading
import time

import pytest
from harness import (  # noqa: F401 (agent_process: a fixture)
    Collector,
    agent_process,
    check_accounting,
    figures,
    send_coil_collected,
)
from tinypack import clean_frame, frame_with

from agent.tools.camera_sim import CameraSim
from agent.journal import Journal
from agent.service import status_request


def coil_frames(n: int, every: int = 4):
    """Frame i has one bright square when i % every == 0: the ground truth of defects."""
    for i in range(n):
        yield (frame_with("bright", x=4 * (i % 50), y=16) if i % every == 0 else clean_frame()), None


def journal_records(cfg) -> list[tuple[int, bytes, dict]]:
    import msgpack

    j = Journal(cfg.state_path() / "journal" / cfg.agent.name, fsync=False)
    try:
        return [(s, t, msgpack.unpackb(b, raw=False)) for s, t, b in j.read(1, j.last_seq, limit=10**7)]
    finally:
        j.close()


@pytest.mark.parametrize("seed", [1, 2, 3] + [pytest.param(s, marks=pytest.mark.slow) for s in range(4, 16)])
def test_sigkill_mid_coil_loses_no_event_and_reuses_no_seq(agent_process, seed):
    """Seeds 2, 3, 5, 6, ...: the kill comes while the journal's disk stalls (each fsync takes 3 s,
    longer than the coil), so the publisher holds events it produced but could not journal yet,
    and the restart must re-send them (agent/recovery.py): the run asserts it did (resent > 0).
    Seeds 1, 4, ...: a healthy disk, the kill lands wherever it lands."""
    rng = random.Random(seed)
    n = 240
    stalled = seed % 3 != 1
    ap = agent_process(slow_fsync_s=3.0 if stalled else 0.0, ingest={"coil_idle_timeout_s": 30.0},
                       publish={"fsync": stalled})
    ap.start()
    live = Collector(ap.cfg)  # sees run 1 live: what a subscriber may have acted on before the kill
    time.sleep(0.3)
    cam = CameraSim(ap.cfg.ingest.endpoint, camera="cam0", sndhwm=1000, send_timeout_ms=15_000)
    sent_box = {}
    sender = threading.Thread(target=lambda: sent_box.setdefault(
        "s", cam.send_coil("K1", coil_frames(n), rate_hz=120.0, mm_per_px_y=2.0)), daemon=True)
    sender.start()
    kill_at = rng.uniform(0.3, 1.6)
    time.sleep(kill_at)
    ap.kill()
    live_before = list(live.msgs)
    live.close()
    down_s = rng.uniform(0.0, 0.5)
    time.sleep(down_s)
    ap.slow_fsync_s = 0.0  # the disk is healthy again after the restart
    t0 = time.monotonic()
    ap.start()
    ready_s = time.monotonic() - t0
    after = Collector(ap.cfg)  # from seq 1: replays everything the journal holds
    sender.join(60)
    sent = sent_box["s"]
    cam.close()
    assert after.wait(lambda c: c.summaries("K1"), 40), ap.log()[-3000:]
    time.sleep(0.5)  # anything after the summary (there must be nothing for K1)
    after.close()
    assert after.error is None
    s = after.summaries("K1")
    assert len(s) == 1, "exactly one final summary for the interrupted coil"
    s = s[0]
    check_accounting(s)
    f = s["frames"]
    assert f["sent"] == sent.sent == n
    assert s["complete"] is False or (f["lost"] == 0 and f["missing"] == 0)
    assert f["inspected"] + f["gated_out"] + f["lost"] + f["missing"] + f["shed"] == n
    # 0 events lost: every message a subscriber saw before the kill is in the journal, byte-for-byte
    # the same under the same seq (no seq reused after the restart).
    records = journal_records(ap.cfg)
    by_seq = {seq: body for seq, _, body in records}
    for topic, msg in live_before:
        assert by_seq[msg["seq"]] == msg
    seqs = [seq for seq, _, _ in records]
    assert seqs == list(range(1, len(seqs) + 1)), "journal seqs contiguous, none reused"
    assert [m["seq"] for _, m in after.msgs] == seqs, "the subscriber holds every event exactly once"
    # The summary's defect count is what the stream carries for this coil, and every inspected
    # defective frame has its event. Ground truth: frame i has one bright square iff i % 4 == 0;
    # the tiny gate passes exactly those (clean frames score ~0.002), and each gives one event. So
    # the frames with events are the inspected frames, all of them defective.
    defects = after.defects("K1")
    assert defects, "the coil has inspected defective frames"
    assert s["defect_count"] == len(defects)
    keys = [(d["index"], tuple(d["bbox_px"])) for d in defects]
    assert len(keys) == len(set(keys)), "no defect event twice"
    event_frames = {d["index"] for d in defects}
    assert all(i % 4 == 0 for i in event_frames), "defects only where the camera drew them"
    assert len(event_frames) == len(defects) == f["inspected"], "one event per inspected frame, none missing"
    assert f["gated_out"] <= n - n // 4, "only clean frames are gated out"
    restored = ap.events("coils_restored")
    # K1 comes back from the checkpoint, or, killed before any checkpoint held it, from the journal
    # as an orphan (agent/recovery.py): either way exactly once
    assert len(restored) == 1 and restored[0]["coils"] + restored[0].get("orphans", []) == ["K1"]
    if stalled:
        assert restored[0]["resent"] > 0, "the kill left events owed; the restart re-sent them"
    figures(f"sigkill seed={seed}", recovered_from_journal=restored[0]["frames_recovered_from_journal"],
            resent=restored[0]["resent"], kill_at_s=round(kill_at, 2), down_s=round(down_s, 2),
            ready_after_restart_s=round(ready_s, 2), events_before_kill=len(live_before), journal_records=len(seqs),
            sent=f["sent"], inspected=f["inspected"], gated_out=f["gated_out"], shed=f["shed"], lost=f["lost"],
            missing=f["missing"], end_reason=s["end_reason"], complete=s["complete"], defects=len(defects),
            camera_dropped=len(sent.dropped))


def test_coil_nobody_continues_closes_as_agent_restart(agent_process):
    ap = agent_process(ingest={"coil_idle_timeout_s": 1.0})
    ap.start()
    cam = CameraSim(ap.cfg.ingest.endpoint, camera="cam0")
    cam.send_coil("K2", coil_frames(30), send_end=False)
    cam.close()
    time.sleep(0.6)  # the frames are through; a checkpoint has been written
    ap.kill()
    ap.start()
    c = Collector(ap.cfg)
    assert c.wait(lambda c: c.summaries("K2"), 20), ap.log()[-3000:]
    c.close()
    s = c.summaries("K2")[0]
    check_accounting(s)
    assert s["end_reason"] == "agent_restart" and s["complete"] is False and s["final"] is True
    assert s["frames"]["received"] == 30
    figures("agent_restart close", **{k: s["frames"][k] for k in ("received", "inspected", "gated_out", "lost")},
            ready_s=round(ap.ready_s[-1], 2))


def test_sigterm_mid_coil_publishes_a_partial_summary_and_exits_0(agent_process):
    ap = agent_process()
    ap.start()
    c = Collector(ap.cfg)
    time.sleep(0.3)
    cam = CameraSim(ap.cfg.ingest.endpoint, camera="cam0")
    cam.send_coil("T1", coil_frames(50), send_end=False)
    cam.close()
    assert c.wait(lambda c: len(c.defects("T1")) >= 13, 20)
    t0 = time.monotonic()
    rc = ap.terminate(timeout_s=20.0)  # a drain that hangs fails here; its time is a figure, not a limit
    exit_s = time.monotonic() - t0
    assert rc == 0
    assert c.wait(lambda c: c.summaries("T1"), 5)
    c.close()
    s = c.summaries("T1")[0]
    check_accounting(s)
    assert (s["end_reason"], s["final"], s["complete"]) == ("shutdown", True, False)
    assert s["frames"]["received"] == 50 and s["frames"]["sent"] == 50
    records = journal_records(ap.cfg)
    journaled = [b for _, t, b in records if t == b"summary" and b["coil"] == "T1"]
    assert journaled == [s], "the partial summary is journaled as published"
    # Restarted, the camera goes on with T1: it was summarised at shutdown, so its frames are stale.
    ap.start()
    cam = CameraSim(ap.cfg.ingest.endpoint, camera="cam0")
    cam.send_coil("T1", coil_frames(5), send_end=False, start_index=50)
    cam.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = status_request(ap.cfg.control.endpoint)
        if status["health"]["rejected"].get("stale_coil", 0) >= 5:
            break
        time.sleep(0.1)
    assert status["health"]["rejected"] == {"stale_coil": 5} and "T1" not in status["coils"]
    figures("sigterm mid-coil", exit_code=rc, exit_s=round(exit_s, 2), end_reason=s["end_reason"],
            received=s["frames"]["received"], inspected=s["frames"]["inspected"],
            gated_out=s["frames"]["gated_out"], pending=s["frames"]["pending"])


@pytest.mark.parametrize("damage", ["truncate_mid_record", "flip_byte", "truncate_at_record"])
def test_journal_damaged_between_runs_is_reported(agent_process, damage):
    ap = agent_process()
    ap.start()
    send_coil_collected(ap.cfg, "J1", coil_frames(40), wait_s=20)
    assert ap.terminate() == 0
    jdir = ap.cfg.state_path() / "journal" / ap.cfg.agent.name
    seg = sorted(jdir.glob("segment-*.log"))[-1]
    data = bytearray(seg.read_bytes())
    last_before = journal_records(ap.cfg)[-1][0]
    starts = [i for i in range(len(data)) if data[i:i + 4] == b"CSJ1"]
    if damage == "truncate_mid_record":
        data = data[:starts[-1] + 20]
    elif damage == "flip_byte":
        data[(starts[3] + starts[4]) // 2] ^= 0xFF
    else:
        data = data[:starts[-2]]  # a clean cut: only the publish watermark shows the loss
    seg.write_bytes(bytes(data))
    health = ap.start()["health"]
    assert health["journal_damage"] >= 1
    # The agent runs on: a new coil gets seqs above every seq used before.
    c = send_coil_collected(ap.cfg, "J2", coil_frames(8), from_seq=None, wait_s=20)
    first_new = min(m["seq"] for _, m in c.msgs)
    assert first_new > last_before
    figures(f"journal damage {damage}", journal_damage=health["journal_damage"], last_seq_before=last_before,
            first_seq_after=first_new)
