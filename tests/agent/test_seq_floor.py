"""Sequence numbers are never reused, even when the journal lost its tail and the crash checkpoint is
gone: published.seq (what was surely handed to the PUB socket) is a floor on its own."""
from __future__ import annotations

import time

from tests_support_events import record_ends, send_coil_collected
from tinypack import frame_with

from agent.recovery import CHECKPOINT_NAME


def run_coil(agent, coil: str, n: int, from_seq: int) -> list[int]:
    col = send_coil_collected(agent.cfg, coil, [(frame_with("bright", 8 * i, 16), None) for i in range(n)],
                              from_seq=from_seq)
    assert col.error is None
    return [m["seq"] for _, m in col.msgs]


def stop(agent, timeout_s: float = 20.0) -> None:
    agent.request_stop()
    deadline = time.monotonic() + timeout_s
    while agent.state != "stopped" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agent.state == "stopped"


NO_LAYER = {"stitch": {"enabled": False}}  # defects and summaries only: the seqs below are theirs


def test_the_published_watermark_alone_keeps_seqs_from_being_reused(running_agent):
    first = running_agent(coil=NO_LAYER)
    assert run_coil(first, "A", 5, from_seq=1) == [1, 2, 3, 4, 5, 6]  # 5 defects, 1 summary
    stop(first)
    jdir = first.journal.dir
    assert (jdir / "published.seq").read_text().strip() == "6"
    # The journal keeps records 1 and 2 only (cut at a record boundary: it looks clean), and the
    # checkpoint, whose seq is a floor too, is unreadable: the watermark is the only evidence left.
    path, end = record_ends(jdir)[2]
    with open(path, "r+b") as f:
        f.truncate(end)
    (jdir / CHECKPOINT_NAME).write_text("{not json")

    second = running_agent(coil=NO_LAYER)
    assert second.journal.last_seq == 6
    assert [(d.kind, d.segment) for d in second.journal.damage] == [("missing_records", "published.seq")]
    assert run_coil(second, "B", 2, from_seq=7) == [7, 8, 9]
