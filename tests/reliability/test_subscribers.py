"""Subscribers absent, late and slow: after replay each holds every event exactly once."""
from __future__ import annotations

import time

from harness import Collector, figures
from tinypack import clean_frame, frame_with

from agent.tools.camera_sim import CameraSim


def frames(n: int, every: int):
    for i in range(n):
        yield (frame_with("bright", x=4 * (i % 50), y=8) if i % every == 0 else clean_frame()), None


def test_absent_then_late_then_slow_subscribers_hold_every_event_once(running_agent, tmp_path):
    # A tiny PUB high-water mark, and IPC (whose socket buffers are small, unlike loopback TCP's
    # autotuned megabytes): a slow subscriber really loses messages on the live stream.
    agent = running_agent(publish={"sndhwm": 8, "max_replay": 50, "endpoint": f"ipc://{tmp_path}/pub.sock"},
                          ingest={"max_queue_frames": 5000})
    cam = CameraSim(agent.cfg.ingest.endpoint, camera="cam0")
    cam.send_coil("S1", frames(60, 3))  # nobody listens
    deadline = time.monotonic() + 20
    while agent.summaries_published < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    late = Collector(agent.cfg, from_seq=1)
    slow = Collector(agent.cfg, from_seq=1, slow_s=0.001, rcvhwm=4, stall_s=2.0)
    time.sleep(0.3)
    cam.send_coil("S2", frames(1200, 1))
    cam.send_coil("S3", frames(100, 2))
    cam.close()
    last = lambda: agent.journal.last_seq  # noqa: E731
    for c in (late, slow):
        assert c.wait(lambda c: len(c.summaries("S3")) == 1 and len(c.msgs) >= last(), 60), (len(c.msgs), last())
    n = last()
    time.sleep(0.5)
    for c in (late, slow):
        c.close()
        assert c.error is None
        assert [m["seq"] for _, m in c.msgs] == list(range(1, n + 1)), "every event once, in order"
        assert c.sub.unrecoverable == 0
    assert late.msgs == slow.msgs
    assert slow.sub.replayed > late.sub.replayed, "the slow subscriber lost live messages and replayed them"
    # What they hold is what the journal holds, byte for byte decoded.
    import msgpack

    journal = [msgpack.unpackb(b, raw=False) for _, _, b in agent.journal.read(1, n, limit=10**6)]
    assert [m for _, m in late.msgs] == journal
    s2 = late.summaries("S2")[0]
    assert s2["defect_count"] == len(late.defects("S2")) == 1200
    figures("subscribers absent/late/slow", events=n, late_replayed=late.sub.replayed, late_gaps=late.sub.gaps,
            slow_replayed=slow.sub.replayed, slow_gaps=slow.sub.gaps, sndhwm=8)
