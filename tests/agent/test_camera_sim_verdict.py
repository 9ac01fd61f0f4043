"""camera-sim's verdict on the final summary the agent published (agent/tools/camera_run.py
`_verdict`): a coil summarised incomplete, with no frame rejected, is "incomplete" and a problem
(exit 1), not "inspected". The summaries are the coil registry's own (agent/coil.py), held by a
real AgentListener that is not started (its socket connects to nothing). Written for deliberate
bugs the camera-sim tests let through (docs/testing.md)."""
from __future__ import annotations

import io

import pytest
import zmq
from test_coil import registry

from agent.tools.camera_run import AgentListener, _verdict
from agent.tools.progress import ProgressLine


@pytest.fixture
def listener():
    ctx = zmq.Context()
    ln = AgentListener("tcp://127.0.0.1:9", ctx=ctx)
    yield ln
    ln.sock.close(linger=0)
    ln.watch.close()
    ctx.term()


def final_summary(coil: str, states: dict[int, str], count: int) -> dict:
    r = registry()
    for i, state in states.items():
        r.admit("cam0", coil, i, 0.0)
        r.finish("cam0", coil, i, state)
    (s,) = r.coil_end("cam0", coil, count, None)
    assert s["final"]
    return s


def verdict(listener, summary: dict, n_sent: int):
    listener.summaries[summary["coil"]] = summary
    progress = ProgressLine("t", n_sent, stream=io.StringIO(), enabled=False)
    return _verdict(listener, "cam0", summary["coil"], n_sent - 1, {}, 1.0, progress, n_sent)


def test_a_whole_coil_is_inspected_and_no_problem(listener):
    out, problem = verdict(listener, final_summary("A", {0: "inspected", 1: "gated_out", 2: "inspected"}, 3), 3)
    assert problem is None
    assert out["verdict"] == "inspected" and out["complete"] is True and out["inspected"] == 2


def test_a_coil_summarised_incomplete_is_a_problem_even_without_rejections(listener):
    s = final_summary("B", {0: "inspected", 1: "shed", 3: "inspected"}, 4)  # index 2 never came, 1 shed
    assert not s["complete"] and s["frames"]["rejected"] == 0
    out, problem = verdict(listener, s, 4)
    assert out["verdict"] == "incomplete" and out["complete"] is False and out["missing"] == 1
    assert problem == "coil B was summarised incomplete (coil_end): 1 missing, 1 shed, 0 lost"
