"""The wafer, chip and parts profiles end to end through a real agent (real sockets, real ONNX Runtime),
each with a tiny exact pack: wafer events per wafer with patterns and CAM peaks, the lot's yield in
the summary; 6-channel and RGB frames through ingest."""
from __future__ import annotations

import numpy as np
import pytest
from lines_tinypacks import make_wafer_pack, wafer_map
from tinypack import make_pack
from tests_support_events import collect

from agent.tools.camera_sim import CameraSim
from training.gen_wafer import WAFER_PATTERNS


def _run(agent, frames, coil="lot-1", camera="cam0"):
    out, t, sub = collect(agent, lambda topic, msg: topic == "summary" and msg["final"])
    cam = CameraSim(agent.cfg.ingest.endpoint, camera=camera)
    sent = cam.send_coil(coil, [(f, None) for f in frames], mm_per_px_y=1.0)
    cam.close()
    t.join(30)
    sub.close()
    events = [m for topic, m in out if topic == "defect"]
    summaries = [m for topic, m in out if topic == "summary" and m["final"]]
    assert summaries, "no final summary"
    return sent, events, summaries[-1]


def test_wafer_lot_events_patterns_cam_and_yield(running_agent, tmp_path):
    pack = make_wafer_pack(tmp_path / "wafer")
    agent = running_agent(models={"dir": str(pack)}, ingest={"max_width": 52, "max_height": 52})
    center = (16, 36, 16, 36)  # cells 4..8: the Center region
    edge = (40, 44, 20, 32)  # cells row 10, cols 5..7: the Edge-Loc region
    frames = [wafer_map(), wafer_map([center]), wafer_map([edge]), wafer_map([center, edge]),
              wafer_map([(24, 28, 4, 8)])]  # a failing block outside every region: no pattern
    sent, events, summary = _run(agent, frames)
    assert sent.sent == 5
    by_index = {e["index"]: e for e in events}
    assert sorted(by_index) == [1, 2, 3], "one event per wafer with a pattern, none for the others"
    assert len(events) == 3
    assert [p["class"] for p in by_index[1]["patterns"]] == ["Center"]
    assert by_index[1]["class"] == "Center" and by_index[1]["class_id"] == WAFER_PATTERNS.index("Center")
    assert by_index[1]["bbox_px"] == [16, 16, 36, 36] == by_index[1]["patterns"][0]["peak_die"]
    assert by_index[2]["patterns"][0]["peak_die"] == [20, 40, 32, 44]
    cam = np.array(by_index[2]["patterns"][0]["cam"])
    assert cam.shape == (13, 13) and cam.max() == 100 and cam[10, 5:8].tolist() == [100, 100, 100]
    assert {p["class"] for p in by_index[3]["patterns"]} == {"Center", "Edge-Loc"}
    for e in events:
        assert e["dies"]["dies"] == int((frames[e["index"]] > 0).sum())
        assert e["dies"]["failing"] == int((frames[e["index"]] == 2).sum())
    lot = summary["lot"]
    good = sum(int((f == 1).sum()) for f in frames)
    dies = sum(int((f > 0).sum()) for f in frames)
    assert lot["wafers"] == 5 and lot["dies"] == dies and lot["good_dies"] == good
    assert lot["yield"] == pytest.approx(good / dies, abs=1e-6)
    assert lot["wafers_with_patterns"] == 3 and lot["wafers_mixed"] == 1
    assert lot["patterns"] == {**dict.fromkeys(WAFER_PATTERNS, 0), "Center": 2, "Edge-Loc": 2}
    assert summary["frames"]["inspected"] == 3 and summary["frames"]["gated_out"] == 2
    assert summary["defects"]["Center"] == 2 and summary["defect_count"] == 3  # counted by the top pattern


def test_steel_summaries_have_no_lot_block(running_agent):
    from tinypack import clean_frame

    agent = running_agent()
    _, _, summary = _run(agent, [clean_frame()] * 2)
    assert "lot" not in summary


def test_six_channel_die_frames_through_ingest(running_agent, tmp_path):
    """The chip profile's frames: uint8 HWC with 6 channels on the wire; the model takes [N, 6, H, W]."""
    pack = make_pack(tmp_path / "chip", height=224, width=224, channels=6, profile="chip")
    agent = running_agent(models={"dir": str(pack)}, ingest={"max_width": 224, "max_height": 224})
    clean = np.full((224, 224, 6), 100, np.uint8)
    bump = clean.copy()
    bump[40:56, 120:136, :] = 255  # every channel bright: the tiny model averages channels
    three = np.full((224, 224, 3), 100, np.uint8)  # wrong channel count for this pack
    sent, events, summary = _run(agent, [clean, bump, three])
    assert [(e["index"], e["class"], e["bbox_px"]) for e in events] == [(1, "bright", [120, 40, 136, 56])]
    assert summary["frames"]["rejected"] == 1 and summary["rejected_by_reason"] == {"bad_shape": 1}


def test_rgb_part_frames_through_ingest_with_input_pool(running_agent, tmp_path):
    """The parts profile's frames: RGB, both models on frames the agent pools 2x2."""
    pack = make_pack(tmp_path / "parts", height=128, width=256, channels=3, profile="parts", gate_input_pool=2)
    agent = running_agent(models={"dir": str(pack)}, ingest={"max_width": 256, "max_height": 128})
    part = np.full((128, 256, 3), 100, np.uint8)
    part[64:80, 32:48] = (255, 255, 255)
    _, events, _ = _run(agent, [part])
    assert [(e["class"], e["bbox_px"]) for e in events] == [("bright", [32, 64, 48, 80])]


def test_wafer_keys_are_the_ones_docs_protocol_lists(running_agent, tmp_path):
    """docs/protocol.md 2.5 is the contract for wafer subscribers: its examples carry every key the agent
    publishes for a wafer, and the agent publishes every key they show."""
    from test_protocol_doc import examples

    ex = examples()
    pack = make_wafer_pack(tmp_path / "wafer")
    agent = running_agent(models={"dir": str(pack)}, ingest={"max_width": 52, "max_height": 52})
    _, events, summary = _run(agent, [wafer_map([(16, 36, 16, 36)])])
    (event,) = events
    assert set(event) == set(ex["wafer_defect"])
    assert set(event["patterns"][0]) == set(ex["wafer_defect"]["patterns"][0])
    assert set(event["dies"]) == set(ex["wafer_defect"]["dies"])
    assert set(summary["lot"]) == set(ex["wafer_lot"])
    assert set(summary["lot"]["patterns"]) == set(ex["wafer_lot"]["patterns"])


SHIPPED = __import__("pathlib").Path(__file__).resolve().parents[2] / "engines" / "models"


@pytest.mark.parametrize("profile", ["wafer", "chip", "parts"])
def test_shipped_generated_line_packs_are_small_and_name_their_seeds(profile):
    from engines.modelpack import load_calibration, load_model_pack

    pack_dir = SHIPPED / profile
    if not (pack_dir / "model.json").is_file():
        pytest.skip(f"no shipped {profile} pack")
    pack = load_model_pack(pack_dir)
    load_calibration(pack)
    assert all(m.path.stat().st_size < 1_000_000 for m in pack.models.values())
    seeds = pack.meta["training"]["seeds"]
    assert set(seeds) == {"train", "val", "test"} and len(set(seeds.values())) == 3
    card = (pack_dir / "MODEL_CARD.md").read_text()
    assert f"test {seeds['test']}" in card and "generated" in card


def test_shipped_wafer_pack_through_the_agent_finds_the_true_patterns(running_agent):
    """Generated test-seed maps through a real agent with the shipped pack: the patterns found per wafer
    against the generator's truth (what `coilsight demo --profile wafer` prints)."""
    from agent.tools.line_sim import found_vs_truth
    from training.gen_wafer import SEEDS, WaferGenerator

    if not (SHIPPED / "wafer" / "model.json").is_file():
        pytest.skip("no shipped wafer pack")
    agent = running_agent(models={"dir": str(SHIPPED / "wafer")}, ingest={"max_width": 52, "max_height": 52})
    gen = WaferGenerator(SEEDS["test"])
    samples = [gen.sample(i) for i in range(40)]
    _, events, summary = _run(agent, [s.wafer for s in samples])
    truth = {i: set(s.patterns) for i, s in enumerate(samples) if s.patterns}
    t = found_vs_truth("wafer", WAFER_PATTERNS, 40, truth, events)
    assert t["frames_exact"] >= 32, t["differ"]  # the card: exact match ~0.9 on the test seed
    assert summary["lot"]["wafers"] == 40
    dies = sum(int((s.wafer > 0).sum()) for s in samples)
    good = sum(int((s.wafer == 1).sum()) for s in samples)
    assert summary["lot"]["dies"] == dies and summary["lot"]["yield"] == pytest.approx(good / dies, abs=1e-6)
