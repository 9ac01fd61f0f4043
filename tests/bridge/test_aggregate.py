"""`coilsight aggregate`: two real agents (one per camera group) inspect one coil; the aggregator (a
real process) merges their final summaries into one coil summary on a real mosquitto, with per-box
accounting that adds up; a box that does not report by the deadline shows as missing."""
from __future__ import annotations

import threading
import time

import pytest
from mqtt_support import Consumer, broker, needs_mosquitto, procs, write_bridge_config  # noqa: F401
from tests_support_events import Collector, check_accounting
from tinypack import clean_frame, frame_with

from agent.bridge.aggregate import FRAME_KEYS, merge_coil
from agent.config import with_overrides
from agent.protocol import encode_control
from agent.tools.camera_sim import CameraSim

pytestmark = needs_mosquitto


@pytest.fixture
def two_agents(agent_config, tmp_path):
    from agent.service import Agent

    started = []

    def start(name: str, cams: list[str]):
        cfg = with_overrides(agent_config(), agent={"name": name, "state_dir": str(tmp_path / f"state-{name}")},
                             cameras=[{"id": c, "mm_per_px_x": 0.5, "mm_per_px_y": 2.0, "offset_x_mm": 128.0 * i}
                                      for i, c in enumerate(cams)])
        agent = Agent(cfg, install_signals=False)
        t = threading.Thread(target=agent.run, daemon=True)
        t.start()
        assert agent.ready.wait(60), f"agent {name} did not start"
        started.append((agent, t))
        return agent

    yield start
    for agent, t in started:
        agent.request_stop()
        t.join(20)


def send(cfg, coil: str, cams: list[str], n: int) -> None:
    """Every camera's frames first, then every camera's coil_end, all on one PUSH socket so they
    arrive in that order: the box closes the coil only once all of its cameras ended it (a camera
    whose frames had not arrived yet would not be waited for). Each camera keeps its own seq."""
    sim = CameraSim(cfg.ingest.endpoint)
    seqs = dict.fromkeys(cams, 0)
    for cam_id in cams:
        sim.camera, sim.seq = cam_id, seqs[cam_id]
        sim.send_coil(coil, [(frame_with("bright", 8, 8) if i % 3 == 0 else clean_frame(), None) for i in range(n)],
                      mm_per_px_y=2.0, send_end=False)
        seqs[cam_id] = sim.seq
    for cam_id in cams:
        sim.camera, sim.seq = cam_id, seqs[cam_id]
        sim._send(encode_control("coil_end", cam_id, coil, sim.seq, ts_ns=time.time_ns(), frames=n))
    sim.close()


def test_two_boxes_one_coil_merged_and_missing_box_by_deadline(two_agents, broker, procs, tmp_path):
    b = broker()
    a = two_agents("box-a", ["cam0", "cam1"])
    bb = two_agents("box-b", ["cam2", "cam3"])
    cols = {"box-a": Collector(a.cfg, timeout_s=90.0), "box-b": Collector(bb.cfg, timeout_s=90.0)}
    consumer = Consumer(b.port, "coilsight/L1/all/#")
    assert consumer.connected.wait(10)
    conf = write_bridge_config(tmp_path / "agg.toml", port=b.port, state_dir=tmp_path / "agg",
                               boxes=[("box-a", a.cfg), ("box-b", bb.cfg)], aggregate={"deadline_s": 3.0})
    agg = procs("aggregate", conf, tmp_path / "agg.log")
    assert consumer.wait(lambda c: any(t.endswith("/all/status") and p == b"online" for t, p, _ in c.arrivals),
                         30), agg.log()[-3000:]

    # Coil 1: both boxes report: merged as soon as the second one does, complete, sums add up.
    send(a.cfg, "wide-1", ["cam0", "cam1"], 6)
    send(bb.cfg, "wide-1", ["cam2", "cam3"], 9)
    merged = lambda c, coil: [m for t, m in c.messages("summary") if m.get("coil") == coil]  # noqa: E731
    assert consumer.wait(lambda c: merged(c, "wide-1"), 30), agg.log()[-3000:]
    m1 = merged(consumer, "wide-1")[-1]
    box_summaries = {name: col.summaries("wide-1")[0] for name, col in cols.items()}
    assert m1["type"] == "coil_summary" and m1["line"] == "L1"
    assert m1["deadline"]["merged_by"] == "all_reported" and m1["boxes_missing"] == []
    assert m1["complete"] is True
    assert set(m1["cameras"]) == {"cam0", "cam1", "cam2", "cam3"}
    assert {c["box"] for c in m1["cameras"].values()} == {"box-a", "box-b"}
    for k in FRAME_KEYS:
        assert m1["frames"][k] == sum(s["frames"][k] for s in box_summaries.values()), k
    assert m1["frames"]["sent"] == 2 * 6 + 2 * 9
    assert m1["defect_count"] == sum(s["defect_count"] for s in box_summaries.values()) > 0
    assert m1["boxes"]["box-a"]["seq"] == box_summaries["box-a"]["seq"]
    check_accounting(m1)

    # Coil 2: box-b never sees it: after the deadline it is merged with box-b missing.
    send(a.cfg, "wide-2", ["cam0", "cam1"], 4)
    assert consumer.wait(lambda c: merged(c, "wide-2"), 30), agg.log()[-3000:]
    m2 = merged(consumer, "wide-2")[-1]
    assert m2["boxes_missing"] == ["box-b"] and m2["boxes"]["box-b"] == {"status": "missing"}
    assert m2["deadline"] == {"deadline_s": 3.0, "merged_by": "deadline"}
    assert m2["complete"] is False
    assert m2["frames"]["sent"] == 8
    check_accounting(m2)

    # A late summary of box-b is merged again and republished (aggregate.late = "republish").
    send(bb.cfg, "wide-2", ["cam2"], 2)
    assert consumer.wait(lambda c: any(m["revision"] == 2 for m in merged(c, "wide-2")), 30)
    m3 = [m for m in merged(consumer, "wide-2") if m["revision"] == 2][-1]
    assert m3["boxes_missing"] == [] and m3["deadline"]["merged_by"] == "late_summary"
    assert m3["frames"]["sent"] == 10
    check_accounting(m3)
    consumer.close()
    for col in cols.values():
        col.close()


def test_merge_accounting_adds_up_with_a_missing_box():
    def box(cams: dict[str, tuple[int, int]], complete: bool = True) -> dict:
        cameras, totals = {}, dict.fromkeys(FRAME_KEYS, 0)
        for cam, (received, missing) in cams.items():
            f = {**dict.fromkeys(FRAME_KEYS, 0), "received": received, "inspected": received, "missing": missing,
                 "sent": received + missing}
            cameras[cam] = {**f, "rejected_by_reason": {}, "end_reason": "coil_end"}
            for k in FRAME_KEYS:
                totals[k] += f[k]
        return {"v": 1, "type": "summary", "agent": "x", "seq": 5, "coil": "c", "final": True, "complete": complete,
                "end_reason": "coil_end", "frames": totals, "cameras": cameras, "defects": {"a": 1, "b": 0},
                "defect_count": 1, "length_mm": 2000.0, "rejected_by_reason": {},
                "missing_ranges": {c: [[0, m - 1]] for c, (_, m) in cams.items() if m}}

    m = merge_coil("c", {"a": box({"cam0": (10, 0)}), "b": box({"cam1": (7, 3)}, complete=False), "c": None},
                   line="L", deadline_s=5.0, merged_by="deadline", now_ns=1)
    assert m["frames"]["sent"] == 20 and m["frames"]["received"] == 17 and m["frames"]["missing"] == 3
    assert m["boxes_missing"] == ["c"] and not m["complete"]
    assert m["missing_ranges"] == {"cam1": [[0, 2]]}
    assert m["defects"] == {"a": 2, "b": 0} and m["density_per_m"] == {"a": 1.0}
    check_accounting(m)
    # The same camera id on two boxes: both kept, the second under box:camera.
    m = merge_coil("c", {"a": box({"cam0": (1, 0)}), "b": box({"cam0": (2, 0)})}, line="L", deadline_s=5.0,
                   merged_by="all_reported")
    assert set(m["cameras"]) == {"cam0", "b:cam0"} and m["complete"]
