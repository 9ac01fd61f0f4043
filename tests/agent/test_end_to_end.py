"""A coil through a real agent over real loopback sockets, with exact ground truth."""
from __future__ import annotations

import pytest
from tests_support_events import Collector, check_accounting
from tinypack import clean_frame, frame_with, make_pack

from agent.tools.camera_sim import CameraSim


def collect_coil(agent, coil: str, send) -> list[tuple[str, dict]]:
    """Everything durable the agent publishes (from seq 1) until the coil's final summary."""
    col = Collector(agent.cfg, timeout_s=60.0)
    try:
        send()
        assert col.wait(lambda c: c.summaries(coil), 30), "no final summary arrived"
    finally:
        col.close()
    assert col.error is None
    return col.msgs


@pytest.mark.parametrize(("workers", "gate_input_pool", "per_call"), [(1, 1, 1), (2, 1, 1), (2, 2, 1), (1, 4, 1),
                                                                  (2, 2, 4)])
def test_coil_accounting_events_and_summary(running_agent, tmp_path, workers, gate_input_pool, per_call):
    """gate_input_pool > 1: the pack's gate takes frames pooled by the agent, at a fixed input size
    (feeding it whole frames fails), and finds exactly what the in-graph pool finds, one frame per
    model call or several stacked (per_call, models.cpu_max_batch)."""
    models = {"workers": workers, "threads": 1, "cpu_max_batch": per_call}
    if gate_input_pool > 1:
        models["dir"] = str(make_pack(tmp_path / "pooled", gate_input_pool=gate_input_pool))
    agent = running_agent(models=models)
    frames = []
    truth = {}
    for i in range(40):
        if i % 5 == 0:
            frames.append((frame_with("bright", x=32 + 4 * i, y=16), None))
            truth[i] = ("bright", 32 + 4 * i, 16)
        elif i % 7 == 0:
            frames.append((frame_with("dark", x=200, y=40, size=8), None))
            truth[i] = ("dark", 200, 40)
        else:
            frames.append((clean_frame(), None))
    cam = CameraSim(agent.cfg.ingest.endpoint, camera="cam0")
    sent = []

    def send():
        sent.append(cam.send_coil("coil-A", frames, mm_per_px_y=2.0))
        cam.close()

    out = collect_coil(agent, "coil-A", send)
    summaries = [m for topic, m in out if topic == "summary"]
    defects = [m for topic, m in out if topic == "defect"]
    s = summaries[-1]
    check_accounting(s)
    f = s["frames"]
    assert f["sent"] == sent[0].sent == 40
    assert f["received"] == 40 and f["missing"] == 0 and f["rejected"] == 0
    assert f["inspected"] == len(truth)
    assert s["complete"] and s["end_reason"] == "coil_end"
    # One event per ground-truth square, in the right class, place (px and mm) and size.
    assert sorted(d["index"] for d in defects) == sorted(truth)
    for d in defects:
        kind, x, y = truth[d["index"]]
        assert d["class"] == kind
        size = 16 if kind == "bright" else 8
        assert d["bbox_px"] == [x, y, x + size, y + size]
        assert d["area_px"] == size * size
        assert d["across_mm"] == pytest.approx(100.0 + (x + size / 2) * 0.5)
        assert d["along_mm"] == pytest.approx(d["index"] * 64 * 2.0 + (y + size / 2) * 2.0)
        assert d["models"] == s["models"]
    assert s["defects"] == {"bright": 8, "dark": sum(1 for k in truth.values() if k[0] == "dark")}
    # Publisher sequence numbers: contiguous from 1, no gaps.
    seqs = [m["seq"] for _, m in out]
    assert seqs == list(range(1, len(seqs) + 1))
    assert all(m["v"] == 1 for _, m in out)


def test_camera_sim_ground_truth_reads_back_as_severstal(tmp_path, running_agent):
    """The simulator's ground truth is the Severstal layout the dataset reader and calibration read."""
    import numpy as np

    from training.datasets import read_severstal

    agent = running_agent()
    frames = [(frame_with("bright", 40, 20), None), (clean_frame(), None)]
    masks0 = np.zeros((2, 64, 256), bool)
    masks0[0, 20:36, 40:56] = True
    cam = CameraSim(agent.cfg.ingest.endpoint)
    cam.send_coil("gt-coil", [(frames[0][0], masks0), (frames[1][0], np.zeros((2, 64, 256), bool))],
                  gt_dir=tmp_path / "gt", classes=("bright", "dark"))
    cam.close()
    ds = read_severstal(tmp_path / "gt" / "ground_truth.csv", tmp_path / "gt" / "frames", classes=("bright", "dark"))
    by_stem = {s.stem: s for s in (ds[i] for i in range(len(ds)))}
    assert (by_stem["gt-coil_000000"].masks == masks0).all()


def test_backpressure_mode_sheds_nothing_under_a_burst(running_agent):
    agent = running_agent(ingest={"overload": "backpressure", "max_queue_frames": 4, "rcvhwm": 4})
    cam = CameraSim(agent.cfg.ingest.endpoint, sndhwm=4)

    def send():
        cam.send_coil("burst", [(frame_with("bright", 8, 8), None) if i % 10 == 0 else (clean_frame(), None)
                                for i in range(300)])
        cam.close()

    out = collect_coil(agent, "burst", send)
    f = [m for topic, m in out if topic == "summary"][-1]["frames"]
    assert f["received"] == 300 and f["shed"] == 0 and f["inspected"] == 30 and f["gated_out"] == 270
    assert agent.frames.shed_total == 0


def test_mirrored_camera_positions(tmp_path):
    """flip_x: a camera that sees the strip mirrored reports across positions from the other side."""
    from engines.postprocess import Defect
    from calibration.spatial import CameraGeometry

    d = Defect(0, "bright", 0.9, (10, 4, 30, 8), 80)
    plain = d.to_strip(CameraGeometry(0.5, 2.0, 100.0), 1000.0, 256)
    flipped = d.to_strip(CameraGeometry(0.5, 2.0, 100.0, flip_x=True), 1000.0, 256)
    assert plain == {"across_mm": 110.0, "along_mm": 1012.0, "width_mm": 10.0, "length_mm": 8.0, "area_mm2": 80.0}
    assert flipped["across_mm"] == 100.0 + (256 - 20) * 0.5 and flipped["width_mm"] == 10.0
