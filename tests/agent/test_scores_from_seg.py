"""A whole-image inspector (model.json gate ``scores_from: "seg"``; the shipped KolektorSDD pack):
the agent runs its segmenter once per frame and takes the gate's scores from the maps, reaching the
decisions and events the two-model path reaches on the same frames, with one model call per frame
instead of one plus one per passing frame."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from tests_support_events import check_accounting, send_coil_collected

PACK = Path(__file__).resolve().parents[2] / "engines" / "models" / "kolektorsdd"
# gate and pixel threshold: between the clean frames' scores (~0.001) and the scratched ones' (~0.12;
# these synthetic scratches are weak defects to a model trained on commutators)
THRESHOLD = 0.05


def frames() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    out = []
    for i in range(6):
        base = cv2.GaussianBlur(rng.normal(180, 8, (1280, 512)).astype(np.float32), (0, 0), 2)
        if i % 2:
            cv2.line(base, (100 + 20 * i, 300), (140 + 20 * i, 700), 60, 3)
        out.append(np.clip(base, 0, 255).astype(np.uint8))
    return out


def pack_copy(dst: Path, scores_from: bool) -> Path:
    shutil.copytree(PACK, dst, ignore=shutil.ignore_patterns("calibration_report", "*.md"))
    meta = json.loads((dst / "model.json").read_text())
    meta["models"]["gate"].pop("scores_from", None)
    if scores_from:
        meta["models"]["gate"]["scores_from"] = "seg"
    (dst / "model.json").write_text(json.dumps(meta))
    cal = json.loads((dst / "calibration.json").read_text())
    cal["gate"]["threshold"] = THRESHOLD
    cal["classes"]["defect"].update(pixel_threshold=THRESHOLD, min_area_px=0)
    (dst / "calibration.json").write_text(json.dumps(cal))
    return dst


def test_the_shipped_kolektorsdd_pack_says_its_gate_is_its_segmenters_frame_scores():
    from engines.modelpack import load_model_pack
    from engines.postprocess import frame_scores
    from engines.runner import PackRunner

    pack = load_model_pack(PACK)
    assert pack.gate.scores_from == "seg"
    with PackRunner(pack, threads=1) as r:
        for img in frames()[:2]:
            x = img[None, None]
            np.testing.assert_allclose(frame_scores(r.seg(x)[0]), r.gate(x)[0], atol=1e-5)


def run(running_agent, pack: Path, images):
    agent = running_agent(models={"dir": str(pack), "workers": 1, "cpu_max_batch": 1},
                          agent={"profile": "kolektorsdd", "state_dir": str(pack.parent / f"state-{pack.name}")},
                          ingest={"max_width": 512, "max_height": 1280})
    before = agent.inference.model_calls
    col = send_coil_collected(agent.cfg, "ksdd-coil", [(img, None) for img in images], wait_s=60.0)
    s = col.summaries("ksdd-coil")[0]
    check_accounting(s)
    events = sorted((d["index"], d["class"], tuple(d["bbox_px"]), round(d["gate_score"], 4))
                    for d in col.defects("ksdd-coil"))
    return s["frames"]["inspected"], events, agent.inference.model_calls - before


def test_one_segmenter_run_per_frame_and_the_same_decisions(running_agent, tmp_path):
    from engines.modelpack import load_model_pack
    from engines.runner import PackRunner

    images = frames()
    with PackRunner(load_model_pack(PACK), threads=1) as r:
        scores = [float(r.gate(img[None, None])[0].max()) for img in images]
    passing = [i for i, sc in enumerate(scores) if sc >= THRESHOLD]
    assert passing == [1, 3, 5], scores  # the scratched frames, and only they
    once = run(running_agent, pack_copy(tmp_path / "once", True), images)
    twice = run(running_agent, pack_copy(tmp_path / "twice", False), images)
    assert once[0] == twice[0] == len(passing)
    assert once[1] == twice[1] and {e[0] for e in once[1]} <= set(passing)
    assert once[1], "the scratches gave no events: the comparison would hold trivially"
    for idx, _, _, gate_score in once[1]:
        assert gate_score == pytest.approx(scores[idx], abs=1e-3)
    assert (once[2], twice[2]) == (len(images), len(images) + len(passing))
