"""Deadline policy: a coil about to overrun its budget gets a provisional summary, then the final one."""
from __future__ import annotations

from tests_support_events import check_accounting, send_coil_collected
from tinypack import clean_frame, frame_with



def test_provisional_summary_at_deadline_then_final(running_agent):
    agent = running_agent(coil={"budget_s": 1.0, "provisional_at": 0.5})
    cfg = agent.cfg
    frames = [(frame_with("dark", 16, 16), None) if i % 4 == 0 else (clean_frame(), None) for i in range(40)]
    col = send_coil_collected(cfg, "slow-coil", frames, rate_hz=25.0, wait_s=20)  # 1.6 s of frames, a 1 s budget
    summaries = col.summaries("slow-coil", final=None)
    provisional, final = summaries[0], summaries[-1]
    assert len(summaries) == 2
    assert not provisional["final"] and not provisional["complete"] and provisional["end_reason"] == "deadline"
    p = provisional["frames"]
    assert 0 < p["received"] < 40  # published while the coil was still streaming
    check_accounting(provisional)
    check_accounting(final)
    assert final["final"] and final["complete"] and final["frames"]["received"] == 40
    assert final["timing"]["slack_s"] < 0  # overran, and says so
    assert final["defects"]["dark"] == 10
