"""The gate decision in a real agent: the pack's calibrated threshold decides which frames go to
segmentation, frames scoring exactly at it included (docs/calibration.md: max_k scores[k] >= threshold).

The tiny pack's gate scores a mid-grey square anywhere in (0, 1) (tinypack.MID_LEVELS), so a
threshold other than the pack's (a hard-coded 0.5, the pixel threshold) or `>` for `>=` changes
how many frames a coil summary reports inspected."""
from __future__ import annotations

import pytest
from tests_support_events import check_accounting, send_coil_collected
from tinypack import MID_LEVELS, clean_frame, frame_with, gate_scores, make_pack



def run_coil(running_agent, pack, images):
    # One worker, one frame per model call: the agent runs the gate as gate_scores() does.
    agent = running_agent(models={"dir": str(pack), "workers": 1, "cpu_max_batch": 1})
    col = send_coil_collected(agent.cfg, "gate-coil", [(img, None) for img in images])
    s = col.summaries("gate-coil")[0]
    check_accounting(s)
    return s, col.defects("gate-coil")


@pytest.mark.parametrize("gate_threshold", [0.3, 0.6])
def test_the_calibrated_gate_threshold_decides_which_frames_are_inspected(running_agent, tmp_path, gate_threshold):
    pack = make_pack(tmp_path / "pack", gate_threshold=gate_threshold, pixel_threshold=0.45)
    images = [frame_with("bright", 32 + 8 * i, 16, level=level) for i, level in enumerate(MID_LEVELS)]
    images += [clean_frame(), frame_with("bright", 100, 40)]
    scores = gate_scores(pack, images)
    # the levels straddle both thresholds used here, 0.5 and the pixel threshold
    assert min(scores) < 0.3 < 0.45 < 0.5 < 0.6 < max(scores[:-2])
    passed = [i for i, sc in enumerate(scores) if sc >= gate_threshold]
    s, defects = run_coil(running_agent, pack, images)
    assert (s["frames"]["inspected"], s["frames"]["gated_out"]) == (len(passed), len(images) - len(passed))
    # Segmentation keeps cells at or over the pixel threshold (0.45), on passed frames only.
    assert sorted(d["index"] for d in defects) == [i for i in passed if scores[i] >= 0.45]
    for d in defects:
        assert d["gate_score"] == pytest.approx(scores[d["index"]], abs=1e-4)


def test_a_frame_scoring_exactly_the_threshold_passes_the_gate(running_agent, tmp_path):
    """The threshold is a recall promise: a frame at it is inspected; the next grey level down is not."""
    probe = make_pack(tmp_path / "probe")
    at, below = gate_scores(probe, [frame_with("bright", 32, 16, level=150), frame_with("bright", 32, 16, level=149)])
    assert below < at < 0.5
    pack = make_pack(tmp_path / "pack", gate_threshold=at, pixel_threshold=0.3)  # same graph: same scores
    images = [frame_with("bright", 32, 16, level=150), frame_with("bright", 64, 16, level=149), clean_frame()]
    assert gate_scores(pack, images)[:2] == [at, below]
    s, defects = run_coil(running_agent, pack, images)
    assert (s["frames"]["inspected"], s["frames"]["gated_out"]) == (1, 2)
    assert [d["index"] for d in defects] == [0]
