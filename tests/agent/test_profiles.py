"""One agent, several product lines: multi-channel dies and classification-only wafer maps."""
from __future__ import annotations

import numpy as np
from tests_support_events import check_accounting, send_coil_collected
from tinypack import make_pack



def run_coil(running_agent, pack, frames, *, width, height):
    agent = running_agent(models={"dir": str(pack)}, ingest={"max_width": width, "max_height": height})
    cfg = agent.cfg
    col = send_coil_collected(cfg, "lot-1", [(f, None) for f in frames], wait_s=20)
    summary = col.summaries("lot-1")[0]
    check_accounting(summary)
    return col.defects("lot-1"), summary


def test_six_channel_dies(tmp_path, running_agent):
    pack = make_pack(tmp_path / "chip", height=224, width=224, channels=6, profile="chip")
    clean = np.full((224, 224, 6), 100, np.uint8)  # HWC on the wire
    bumped = clean.copy()
    bumped[40:72, 100:132, :] = 255
    defects, summary = run_coil(running_agent, pack, [clean, bumped, clean], width=224, height=224)
    assert summary["frames"]["inspected"] == 1 and summary["frames"]["gated_out"] == 2
    assert [(d["index"], d["class"], d["bbox_px"]) for d in defects] == [(1, "bright", [100, 40, 132, 72])]


def test_wrong_channel_count_is_rejected_and_counted(tmp_path, running_agent):
    pack = make_pack(tmp_path / "chip", height=224, width=224, channels=6, profile="chip")
    grey = np.full((224, 224), 100, np.uint8)
    _, summary = run_coil(running_agent, pack, [grey, np.full((224, 224, 6), 100, np.uint8)], width=224, height=224)
    assert summary["frames"]["rejected"] == 1 and summary["rejected_by_reason"] == {"bad_shape": 1}
    assert summary["frames"]["gated_out"] == 1 and not summary["complete"]


def test_classification_only_wafer_maps(tmp_path, running_agent):
    pack = make_pack(tmp_path / "wafer", height=52, width=52, seg=False, profile="wafer")
    clean = np.full((52, 52), 100, np.uint8)
    ring = clean.copy()
    ring[0:8, :] = 0  # an edge pattern: "dark" class
    defects, summary = run_coil(running_agent, pack, [clean, ring], width=52, height=52)
    assert [(d["index"], d["class"]) for d in defects] == [(1, "dark")]
    assert summary["backend"] == {"gate": "onnxruntime-cpu"} and set(summary["models"]) == {"gate"}
