"""The gate's decision per frame in final summaries (`inspected_ranges`, docs/protocol.md 2.2, "Gate
decisions per frame"; issue 20 item 11): exact, bounded, final summaries only, through a real agent."""
from __future__ import annotations

import json

import msgpack
from test_coil import Clock, registry
from test_protocol_doc import examples, table_keys
from tinypack import clean_frame, frame_with

from agent.summary import MAX_INSPECTED_RANGES


def ranges_to_set(ranges: list[list[int]]) -> set[int]:
    return {i for a, b in ranges for i in range(a, b + 1)}


def test_final_summary_lists_exactly_the_inspected_indices_as_ranges():
    r = registry()
    r.coil_start("cam0", "A")
    r.coil_start("cam1", "A")
    passed = {2, 3, 4, 7, 9}
    for i in range(10):
        r.admit("cam0", "A", i, 0.0)
        r.finish("cam0", "A", i, "inspected" if i in passed else "gated_out")
    for i in (0, 1, 3):  # cam1: nothing inspected, index 2 missing, 1 rejected
        r.admit("cam1", "A", i, 0.0)
    r.finish("cam1", "A", 0, "gated_out")
    r.reject("cam1", "A", 1, "size_mismatch")
    r.finish("cam1", "A", 3, "shed")
    r.coil_end("cam0", "A", 10, None)
    (s,) = r.coil_end("cam1", "A", 4, None)
    assert s["final"]
    assert s["inspected_ranges"] == {"cam0": [[2, 4], [7, 7], [9, 9]]}  # a camera without one is absent
    assert s["missing_ranges"] == {"cam1": [[2, 2]]}
    assert len(ranges_to_set(s["inspected_ranges"]["cam0"])) == s["cameras"]["cam0"]["inspected"] == 5


def test_provisional_summaries_and_status_snapshots_do_not_carry_it():
    clock = Clock()
    r = registry(clock)
    r.admit("cam0", "A", 0, 0.0)
    r.finish("cam0", "A", 0, "inspected")
    r.admit("cam0", "A", 1, 0.0)  # pending: holds the final summary back
    assert "inspected_ranges" not in r.snapshot()["A"]
    clock.t += 60  # past provisional_at x budget
    (p,) = r.poll()
    assert not p["final"] and "inspected_ranges" not in p


def test_the_list_is_bounded_and_says_when_it_is_cut():
    r = registry()
    n = 2 * MAX_INSPECTED_RANGES + 10  # every other frame inspected: one range each
    for i in range(n):
        r.admit("cam0", "A", i, 0.0)
        r.finish("cam0", "A", i, "inspected" if i % 2 == 0 else "gated_out")
    (s,) = r.coil_end("cam0", "A", n, None)
    ranges = s["inspected_ranges"]["cam0"]
    assert len(ranges) == MAX_INSPECTED_RANGES
    assert ranges[0] == [0, 0] and ranges[-1] == [2 * (MAX_INSPECTED_RANGES - 1)] * 2  # the lowest indices first
    # docs: the list is whole exactly when its lengths add up to the camera's `inspected`
    assert len(ranges_to_set(ranges)) < s["cameras"]["cam0"]["inspected"] == n // 2
    assert len(msgpack.packb(s["inspected_ranges"])) < 64 * 1024


def test_a_coil_restored_after_a_crash_keeps_its_earlier_gate_decisions():
    clock = Clock()
    r = registry(clock)
    for i in range(4):
        r.admit("cam0", "A", i, 0.0)
    r.finish("cam0", "A", 0, "inspected")
    r.finish("cam0", "A", 1, "gated_out")
    state = json.loads(json.dumps(r.export_state()))
    r2 = registry(clock)
    r2.import_state(state)  # frames 2 and 3 were in flight: lost
    r2.admit("cam0", "A", 4, 0.0)
    r2.finish("cam0", "A", 4, "inspected")
    (s,) = r2.coil_end("cam0", "A", 5, None)
    assert s["inspected_ranges"] == {"cam0": [[0, 0], [4, 4]]}
    assert s["frames"]["lost"] == 2


def test_the_documented_example_is_a_summary_whose_ranges_agree_with_its_counts():
    ex = examples()["summary_inspected_ranges"]
    common = {"v", "type", "agent", "seq", "ts_ns"}
    assert ex["v"] == 1 and ex["type"] == "summary" and ex["final"] is True
    assert table_keys("### 2.2 `summary`") | common <= set(ex)
    optional = table_keys("#### Gate decisions per frame")
    assert optional == {"inspected_ranges"}
    assert set(ex) - set(examples()["summary"]) == optional  # nothing but the optional key is new
    for cam, ranges in ex["inspected_ranges"].items():
        assert all(a <= b for a, b in ranges) and all(p[1] < q[0] - 1 for p, q in zip(ranges, ranges[1:]))
        assert len(ranges_to_set(ranges)) == ex["cameras"][cam]["inspected"]
        assert max(ranges_to_set(ranges)) < ex["cameras"][cam]["sent"]
    assert msgpack.unpackb(msgpack.packb(ex)) == ex


def test_a_real_agent_publishes_which_frames_its_gate_passed(running_agent):
    from tests_support_events import send_coil_collected

    agent = running_agent()
    bright = frame_with("bright", 8, 8)
    frames = [clean_frame(), bright, bright, clean_frame(), bright, clean_frame()]
    col = send_coil_collected(agent.cfg, "gate-coil", [(f, None) for f in frames])
    (s,) = col.summaries("gate-coil")
    assert s["frames"]["inspected"] == 3 and s["frames"]["gated_out"] == 3
    assert s["inspected_ranges"] == {"cam0": [[1, 2], [4, 4]]}
    assert {d["index"] for d in col.defects("gate-coil")} <= ranges_to_set(s["inspected_ranges"]["cam0"])


def test_camera_sim_reports_the_gates_decisions_on_the_frames_it_painted(running_agent, tmp_path, capsys):
    """camera-sim joins the summary's inspected_ranges with the frames it painted (its verdict's `gate`)."""
    import sys
    from pathlib import Path

    from test_first_hour import camera_sim, write_config

    from agent.logs import configure_logging

    steel = Path(__file__).resolve().parents[2] / "engines" / "models" / "steel"
    agent = running_agent(agent={"profile": "steel"}, models={"dir": str(steel)},
                          ingest={"max_width": 1600, "max_height": 256})
    cfg = write_config(agent, tmp_path / "agent.toml")
    configure_logging(stream=sys.stderr)  # stdout: the verdict only
    code, result, err = camera_sim(capsys, "--config", str(cfg), "--frames", "16", "--defect-fraction", "0.5")
    assert code == 0, err
    gate = result["gate"]
    assert gate["decisions"] == "all" and gate["defective"] == result["defective"] > 0
    assert gate["defective"] + gate["clean"] == result["sent"] == 16
    assert gate["passed_defective"] + gate["passed_clean"] == result["inspected"]
    assert gate["passed_defective"] <= gate["defective"] and gate["passed_clean"] <= gate["clean"]
