"""training/gate_strip.py: the steel gate on whole textured strip frames (issue 17's gate item)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from training import gate_strip
from training.datasets.core import Box, Sample

STEEL = Path(__file__).resolve().parents[2] / "engines" / "models" / "steel"


def _sample() -> Sample:
    img = np.full((60, 80), 120, np.uint8)
    img[10:20, 30:50] = 40  # one dark defect
    return Sample(img, None, [Box(2, 30, 10, 50, 20)], np.eye(6, dtype=np.float32)[2], tuple("abcdef"), "x.jpg")


def test_defect_patches_take_the_level_off_and_keep_a_margin():
    (cls, patch), = gate_strip.defect_patches([_sample()])
    assert cls == 2 and patch.shape == (16, 26)  # the 10x20 box and 3 px around it
    assert patch[3:13, 3:23].max() == pytest.approx(-80.0) and patch[0, 0] == 0.0
    with pytest.raises(gate_strip.GateStripError):
        gate_strip.defect_patches([])


def test_composite_pastes_labelled_defects_into_the_clean_frame():
    frame = gate_strip.clean_frame("val", 3)
    assert frame.shape == (256, 1600) and frame.dtype == np.uint8
    assert np.array_equal(frame, gate_strip.clean_frame("val", 3))  # deterministic
    assert not np.array_equal(frame, gate_strip.clean_frame("test", 3))  # splits are other coils
    patches = gate_strip.defect_patches([_sample()])
    out, labels, boxes = gate_strip.composite(frame, patches, np.random.default_rng(0), 6, n=1)
    (cls, x0, y0, x1, y1), = boxes
    assert labels.tolist() == [0, 0, 1, 0, 0, 0] and cls == 2
    changed = np.abs(out.astype(int) - frame.astype(int)) > 10
    assert changed.any() and not changed[:, :x0].any() and not changed[:, x1:].any()
    assert changed[y0:y1, x0:x1].sum() == changed.sum()


def test_threshold_and_pass_rate():
    pos = np.linspace(0.5, 1.0, 100)
    clean = np.array([0.1, 0.2, 0.6, 0.9])
    r = gate_strip.threshold_and_pass_rate(pos, clean, target=0.99)
    assert r["threshold"] == pytest.approx(pos[1]) and r["recall"] == 0.99 and r["pass_rate_clean"] == 0.5
    with pytest.raises(gate_strip.GateStripError):
        gate_strip.threshold_and_pass_rate(pos, np.array([]))


def test_the_shipped_gate_comes_back_from_its_onnx_exactly():
    pytest.importorskip("torch")
    x = gate_strip.pooled(np.stack([gate_strip.clean_frame("val", i) for i in range(2)]), 2)
    _, pool, diff = gate_strip.load_gate(STEEL, x)
    assert pool == 2 and diff < 1e-4


def test_ship_changes_only_the_gate_entries(tmp_path):
    pack = tmp_path / "steel"
    shutil.copytree(STEEL, pack)
    before_model, before_cal = (json.loads((pack / f).read_text()) for f in ("model.json", "calibration.json"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "meta.json").write_text(json.dumps({"train_frames": {"clean": 2, "composited": 2}, "steps": 1,
                                               "minutes": 0.1, "best": {"step": 1}}))
    candidate = tmp_path / "candidate.onnx"
    shutil.copyfile(pack / "gate.onnx", candidate)
    figures = {"threshold": 0.8, "recall": 0.99, "recall_lower_95": 0.97, "pass_rate_clean": 0.1, "n_composited": 100,
               "n_clean": 100}
    from training.gate_strip_ship import ship

    ship(run, pack, figures, candidate, "cmd")
    model, cal = (json.loads((pack / f).read_text()) for f in ("model.json", "calibration.json"))
    assert model["models"]["seg"] == before_model["models"]["seg"] and model["training"] == before_model["training"]
    assert model["models"]["gate"]["textured_strip"]["command"] == "cmd"
    trained = model["models"]["gate"]["textured_strip"]["trained"]
    assert "2 clean, 2 with NEU" in trained and "plain" not in trained and "NEU-DET train images" not in trained
    # a run with plain strip and NEU steps says so in the pack
    (run / "meta.json").write_text(json.dumps({"train_frames": {"clean": 2, "composited": 2, "plain_clean": 1,
                                                                "plain_composited": 1}, "neu": 0.5, "steps": 1,
                                               "minutes": 0.1, "best": {"step": 1}}))
    ship(run, pack, figures, candidate, "cmd")
    trained = json.loads((pack / "model.json").read_text())["models"]["gate"]["textured_strip"]["trained"]
    assert "plain strip (training.synth) 1 clean, 1 composited" in trained and "crops in 50% of steps" in trained
    assert "checkpoint_key" in trained
    assert cal["classes"] == before_cal["classes"] and cal["models"]["seg"] == before_cal["models"]["seg"]
    assert cal["gate"]["threshold"] == 0.8 and cal["gate"]["pass_rate"] == 0.1
    assert cal["gate"]["previous_gate"]["threshold"] == before_cal["gate"]["threshold"]


def test_visibility_grows_with_the_pasted_contrast():
    frame = gate_strip.clean_frame("val", 5)
    assert gate_strip.visibility(frame, frame, []) == 0.0
    patches = gate_strip.defect_patches([_sample()])
    out, _, boxes = gate_strip.composite(frame, patches, np.random.default_rng(1), 6, n=1)
    faint = [(0, [(c, p * 0.1) for c, p in patches][0][1])]
    out_faint, _, boxes_faint = gate_strip.composite(frame, [(2, faint[0][1])], np.random.default_rng(1), 6, n=1)
    assert boxes == boxes_faint  # same draws, a tenth of the contrast
    assert gate_strip.visibility(frame, out, boxes) > 3 * gate_strip.visibility(frame, out_faint, boxes_faint)


def test_recall_curve_pass_rate_falls_with_the_recall_target():
    from training.gate_strip_ship import _recall_curve

    rows = _recall_curve(np.linspace(0.0, 1.0, 200), np.linspace(0.0, 0.05, 100))
    assert [r["recall_target"] for r in rows] == [0.9, 0.95, 0.97, 0.98, 0.99]
    rates = [r["pass_rate_clean"] for r in rows]
    assert rates == sorted(rates) and rates[0] == 0.0 and rates[-1] > 0.5


def _ship_gate_as_run(tmp_path, gate, input_pool: int) -> Path:
    """Save ``gate`` as a run (best.pt, meta.json), export it (torch vs ONNX checked) and ship it into
    a copy of the steel pack at threshold 0.5; returns the pack copy."""
    import dataclasses

    import torch

    from training.gate_strip_ship import export_gate, ship

    run = tmp_path / "run"
    run.mkdir()
    torch.save(gate.state_dict(), run / "best.pt")
    spec = json.loads((STEEL / "model.json").read_text())
    (run / "meta.json").write_text(json.dumps({
        "classes": spec["classes"], "mean": spec["input"]["mean"], "std": spec["input"]["std"],
        "config": dataclasses.asdict(gate.config), "input_pool": input_pool,
        "train_frames": {"clean": 2, "composited": 2}, "steps": 1, "minutes": 0.1, "best": {"step": 1}}))
    candidate = tmp_path / "gate.onnx"
    assert export_gate(run, candidate) < 1e-4
    pack = tmp_path / "steel"
    shutil.copytree(STEEL, pack)
    ship(run, pack, {"threshold": 0.5, "recall": 0.99, "recall_lower_95": 0.97, "pass_rate_clean": 0.1,
                     "n_composited": 10, "n_clean": 10}, candidate, "cmd")
    return pack


def test_a_gate_retargeted_to_pool_1_keeps_its_weights_and_ships_as_a_full_frame_gate(tmp_path):
    torch = pytest.importorskip("torch")

    from engines.modelpack import load_calibration, load_model_pack

    x2 = gate_strip.pooled(np.stack([gate_strip.clean_frame("val", i) for i in range(2)]), 2)
    gate, _, _ = gate_strip.load_gate(STEEL, x2)
    fine = gate_strip.with_pool(gate, 1)
    assert fine.config.gate_pool == 1 and fine.pool_size == 1 and gate_strip.with_pool(gate, 2) is gate
    assert all(torch.equal(v, gate.state_dict()[k]) for k, v in fine.state_dict().items())
    full = torch.from_numpy(np.stack([gate_strip.clean_frame("val", 0)])[:, None])
    with torch.no_grad():  # pool 1: the whole-frame logit map is the pooled one of the unpooled frame
        assert torch.allclose(fine.logit_map(full), gate.pooled_logit_map(full))
        assert fine.logit_map(full).shape[-1] == 2 * gate.logit_map(full).shape[-1]

    pack = _ship_gate_as_run(tmp_path, fine, 1)
    model = json.loads((pack / "model.json").read_text())
    assert "input_pool" not in model["models"]["gate"] and model["training"]["gate_model_config"]["gate_pool"] == 1
    loaded = load_model_pack(pack)
    assert loaded.gate.input_pool == 1 and load_calibration(loaded).gate_threshold == 0.5


def _neu_tree(root, n: int = 48, invisible_every: int = 0):
    """A NEU-DET-shaped folder (IMAGES/*.jpg, ANNOTATIONS/*.xml): 200x200 grey images with one box;
    with ``invisible_every`` k, every k-th image's box is drawn in the background's grey (a labelled
    defect no gate sees)."""
    import cv2

    (root / "IMAGES").mkdir(parents=True)
    (root / "ANNOTATIONS").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        kind = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")[i % 6]
        image = rng.integers(90, 110, (200, 200)).astype(np.uint8)
        image[60:110, 40:90] = 100 if invisible_every and i % invisible_every == 0 else 30
        cv2.imwrite(str(root / "IMAGES" / f"{kind}_{i}.jpg"), np.dstack([image] * 3))
        (root / "ANNOTATIONS" / f"{kind}_{i}.xml").write_text(
            f"<annotation><object><name>{kind}</name><bndbox><xmin>40</xmin><ymin>60</ymin>"
            "<xmax>90</xmax><ymax>110</ymax></bndbox></object></annotation>")


def test_a_short_run_on_the_instance_pack_records_the_gates_own_net_and_exports(tmp_path):
    pytest.importorskip("torch")
    from training.gate_strip_ship import export_gate

    _neu_tree(tmp_path / "data" / "neu_det")
    meta = gate_strip.train(tmp_path / "run", STEEL, tmp_path / "data", steps=2, n_clean=2, n_pos=2, n_val=2,
                            batch=2, minutes=5, input_pool=1)
    # the shipped pack is an instance pack: its model_config is the segmenter's; the run keeps the gate's
    assert meta["config"]["gate_pool"] == 1 and meta["input_pool"] == 1
    assert set(meta["config"]) >= {"gate_widths", "gate_block"} and "widths" not in meta["config"]
    assert export_gate(tmp_path / "run", tmp_path / "gate.onnx") < 1e-4
    with pytest.raises(gate_strip.GateStripError, match="input pool 3"):
        gate_strip.train(tmp_path / "run3", STEEL, tmp_path / "data", steps=1, n_clean=2, n_pos=2, n_val=2, input_pool=3)


def test_plain_frames_are_the_synth_strip_and_a_run_with_them_measures_both_strips(tmp_path):
    pytest.importorskip("torch")
    from training.synth import StripGenerator

    seed = gate_strip.SEEDS["val"] + gate_strip.PLAIN_SEED_OFFSET
    assert np.array_equal(gate_strip.plain_frame("val", 3), StripGenerator(1600, 256, seed=seed).frame(3, False)[0])
    assert not np.array_equal(gate_strip.plain_frame("train", 3), gate_strip.plain_frame("val", 3))
    with pytest.raises(gate_strip.GateStripError, match="background"):
        gate_strip.frames("val", 1, 0, [], 6, background="wavy")
    _neu_tree(tmp_path / "data" / "neu_det")
    meta = gate_strip.train(tmp_path / "run", STEEL, tmp_path / "data", steps=2, n_clean=2, n_pos=2, n_val=2,
                            batch=2, minutes=5, input_pool=1, plain=1.0)
    assert meta["train_frames"] == {"clean": 2, "composited": 2, "plain_clean": 2, "plain_composited": 2}
    cached = np.load(tmp_path / "run" / "train_plain_2_2_cells.npz")
    first = cached[cached.files[0]]
    assert first.shape[0] == 4 and np.array_equal(first[0, 0], gate_strip.plain_frame("train", 0))
    assert all("pass_rate_clean_plain" in h for h in meta["history"])
    # best.pt is the lowest of the worse of the two clean pass rates
    worst = min(max(h["pass_rate_clean"], h["pass_rate_clean_plain"]) for h in meta["history"])
    assert max(meta["best"]["pass_rate_clean"], meta["best"]["pass_rate_clean_plain"]) == worst
    with pytest.raises(gate_strip.GateStripError, match="plain -1"):
        gate_strip.train(tmp_path / "run2", STEEL, tmp_path / "data", steps=1, n_clean=2, n_pos=2, n_val=2,
                         input_pool=1, plain=-1)


def test_the_checkpoint_key_puts_the_neu_floor_then_the_strip_goal_then_real_steel():
    key = gate_strip.checkpoint_key
    goal = gate_strip.STRIP_PASS_GOAL

    def v(textured, plain=0.0, neu_recall=1.0, crops=0.0, threshold=0.5):
        return {"pass_rate_clean": textured, "pass_rate_clean_plain": plain, "neu_recall": neu_recall,
                "neu_pass_rate_clean_crops": crops, "threshold": threshold}

    floor = gate_strip.NEU_RECALL_FLOOR
    assert key(v(0.5, neu_recall=floor)) < key(v(0.0, neu_recall=floor - 0.01))  # real defects first
    assert key(v(goal + 0.05, crops=0.0)) < key(v(goal + 0.1, crops=0.0))  # above the goal: the strip
    assert key(v(goal, plain=goal + 0.01, crops=0.0)) > key(v(goal, crops=0.9))  # the worse strip counts
    # under the goal on both strips: fewer real clean crops passed wins over a lower strip pass rate
    assert key(v(goal, crops=0.3)) < key(v(0.0, crops=0.4))
    assert key(v(0.01, crops=0.3)) < key(v(0.02, crops=0.3))  # then the strip, then the higher threshold
    assert key(v(0.01, threshold=0.6)) < key(v(0.01, threshold=0.5))
    # a run without plain or NEU figures: the textured pass rate, then the threshold, as before
    assert key({"pass_rate_clean": 0.3, "threshold": 0.1}) < key({"pass_rate_clean": 0.35, "threshold": 0.9})
    assert key({"pass_rate_clean": 0.05, "threshold": 0.1}) < key({"pass_rate_clean": 0.06, "threshold": 0.9})


def test_the_ship_decision_reads_val_recall_and_the_pack_gates_pass_rate():
    from training.gate_strip_ship import decide

    def figs(recall, rate, before):
        return {"recall": recall, "pass_rate_clean": rate, "pack_gate_before": {"pass_rate_clean": before}}

    ok, why = decide(figs(0.99, 0.35, 0.8))
    assert ok and "misses the target" in why
    ok, why = decide(figs(0.995, 0.15, 0.8))
    assert ok and "meets the target" in why
    assert decide(figs(0.985, 0.1, 0.8)) == (False, "val recall 0.985 is below 0.99")
    ok, why = decide(figs(0.99, 0.8, 0.8))
    assert not ok and "no lower than the pack gate's 0.8" in why
    neu = {**figs(0.99, 0.0, 0.6), "neu": {"recall": 0.9, "pass_rate_clean_crops": 0.5}}
    ok, why = decide(neu)
    assert not ok and "real NEU-DET val images" in why and "0.9" in why
    neu["neu"]["recall"] = 0.985
    assert decide(neu)[0]
    # above the floor, but below what the shipped gate passes at its shipped threshold: refused
    neu["pack_gate_before"]["neu_shipped"] = {"recall": 0.991}
    ok, why = decide(neu)
    assert not ok and "shipped gate 0.991" in why and "0.985" in why
    neu["neu"]["recall"] = 0.991
    assert decide(neu)[0]
    plain = {**figs(0.99, 0.4, 0.8), "pass_rate_clean_plain": 0.55}
    plain["pack_gate_before"]["pass_rate_clean_plain"] = 0.04
    ok, why = decide(plain)
    assert not ok and "plain strip" in why and "0.55" in why
    plain["pass_rate_clean_plain"] = 0.08
    assert decide(plain)[0]
    own = {**figs(0.995, 0.06, 0.6), "recall_own": 0.948}  # NEU's pasted defects kept, the generators' own lost
    ok, why = decide(own)
    assert not ok and "generators' own defects" in why and "0.948" in why
    own["recall_own"] = 0.99
    assert decide(own)[0]


def test_a_broken_pack_is_one_clear_error(tmp_path, capsys):
    from training.gate_strip_ship import main

    pack = tmp_path / "steel"
    shutil.copytree(STEEL, pack)
    assert gate_strip.pack_gate_pool(pack) == json.loads((STEEL / "model.json").read_text())["models"]["gate"].get(
        "input_pool", 1)
    (pack / "gate.onnx").write_bytes(b"not the shipped gate")
    with pytest.raises(gate_strip.GateStripError, match="sha256"):
        gate_strip.pack_gate_pool(pack)
    rc = main(["measure", "--run", str(tmp_path / "run"), "--pack", str(pack), "--data-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("gate_strip measure: error:") and "sha256" in err


def test_reported_means_an_event_of_the_ungated_segmenter_overlaps_the_defect():
    """The gate's recall counts the defects the pipeline would report: an event of the pack's
    segmenter (engines.postprocess at the calibrated thresholds) over the defect's box."""
    from engines.modelpack import load_calibration, load_model_pack
    from engines.postprocess import extract_instances
    from engines.runner import PackRunner
    from training.gate_strip_ship import REPORTED_IOU, reported_by_segmenter

    frames = [gate_strip.generated_defective_frame("test", 1000 + i) for i in range(4)]
    x = np.stack([f.image for f in frames])
    pack = load_model_pack(STEEL)
    cal = load_calibration(pack)
    with PackRunner(pack, threads=1, max_batch=1, roles=("seg",)) as models:
        events = [extract_instances({k: v[0] for k, v in models.seg_outputs(x[i:i + 1, None]).items()}, pack.seg.instances,
                                    pack.seg.output, pack.seg.output_stride, pack.classes, cal.classes, x[i].shape)
                  for i in range(len(x))]
    i = next(i for i, e in enumerate(events) if e)  # a frame with an event: its box is "the defect"
    e = events[i][0].bbox_px
    on_event = [[(0, *e)]]
    x0, y0, x1, y1 = e
    far = [[(0, (x0 + 800) % 1500, y0, (x0 + 800) % 1500 + (x1 - x0), y1)]]
    far_iou = max((_iou(far[0][0][1:], ev.bbox_px) for ev in events[i]), default=0.0)
    assert REPORTED_IOU > far_iou  # the moved box overlaps no event
    got = reported_by_segmenter(STEEL, np.stack([x[i]] * 3), on_event + far + [[]])
    assert got.tolist() == [True, False, False]


def _iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_measure_chooses_the_threshold_on_the_frames_the_segmenter_reports(tmp_path):
    from training.gate_strip_ship import onnx_frame_scores, measure

    _neu_tree(tmp_path / "data" / "neu_det")
    pool = json.loads((STEEL / "model.json").read_text())["models"]["gate"].get("input_pool", 1)
    every = measure(STEEL / "gate.onnx", tmp_path / "data", n=6, pool=pool, cache=tmp_path)
    assert every["recall_of"] == "all composited frames" and every["n_reported"] == every["n_composited"] == 6
    rep = measure(STEEL / "gate.onnx", tmp_path / "data", n=6, pool=pool, cache=tmp_path, seg_pack=STEEL)
    assert "segmenter reports" in rep["recall_of"]
    # recompute from the cached frames: the threshold is the lowest score among the reported positives
    # (6 frames: recall 0.99 keeps them all), recall_all counts every composited frame at it
    cached = np.load(tmp_path / f"measure_val_6_0_pool{pool}.npz")
    x, y = cached[cached.files[0]], cached[cached.files[1]]
    reported_file, = tmp_path.glob("reported_val_6_0_*.npz")
    r = np.load(reported_file)
    reported = r[r.files[0]]
    pos = y.max(axis=1) > 0
    scores = onnx_frame_scores(STEEL / "gate.onnx", x)
    assert 1 <= rep["n_reported"] == int(reported[pos].sum()) < 6  # the made-up defects: one is not reported
    # the generators' own defects (3 frames) hold the threshold too: the lowest reported score of both kinds
    own_file, = tmp_path.glob("measure_own_defects_val_3_*_pool*.npz")
    own_rep_file, = tmp_path.glob("reported_own_defects_val_3_*.npz")
    own_x, own_rep = (np.load(f)[np.load(f).files[0]] for f in (own_file, own_rep_file))
    own_scores = onnx_frame_scores(STEEL / "gate.onnx", own_x)[own_rep.astype(bool)]
    assert rep["n_own"] == 3 and rep["n_own_reported"] == len(own_scores) and rep["recall_own"] in (1.0, None)
    lowest = [float(scores[pos][reported[pos]].min())] + ([float(own_scores.min())] if len(own_scores) else [])
    # and the real NEU val images (each holds a defect) at their floor, 0.98
    samples, _ = gate_strip._neu_split(STEEL, tmp_path / "data", "val")
    neu = gate_strip.image_scores(STEEL / "gate.onnx", [s.image for s in samples], pool)
    lowest.append(float(np.sort(neu)[int(np.floor(0.02 * len(neu)))]))
    assert rep["threshold"] == pytest.approx(min(lowest))
    assert rep["recall_neu"] == pytest.approx(float((neu >= rep["threshold"]).mean())) and rep["recall_neu"] >= 0.98
    every_neu = measure(STEEL / "gate.onnx", tmp_path / "data", n=6, pool=pool, cache=tmp_path, seg_pack=STEEL,
                        neu_target=1.0)  # what a shipped gate passing every NEU val image asks of a candidate
    assert every_neu["threshold"] == pytest.approx(min(min(lowest), float(neu.min()))) and every_neu["recall_neu"] == 1.0
    assert rep["recall_all"] == pytest.approx(float((scores[pos] >= rep["threshold"]).mean()))
    assert rep["recall"] == 1.0


def test_a_run_with_real_neu_steps_reads_neu_recall_on_val_and_prefers_the_floor(tmp_path):
    pytest.importorskip("torch")
    _neu_tree(tmp_path / "data" / "neu_det")
    meta = gate_strip.train(tmp_path / "run", STEEL, tmp_path / "data", steps=2, n_clean=2, n_pos=2, n_val=3,
                            batch=2, minutes=5, input_pool=1, neu=1.0)
    assert meta["neu"] == 1.0 and all("neu_recall" in h and "recall_all" in h for h in meta["history"])
    best = meta["best"]
    below = [h for h in meta["history"] if h["neu_recall"] < gate_strip.NEU_RECALL_FLOOR]
    if len(below) < len(meta["history"]):  # some checkpoint reaches the floor: best is one of those
        assert best["neu_recall"] >= gate_strip.NEU_RECALL_FLOOR
    with pytest.raises(gate_strip.GateStripError, match="neu 2"):
        gate_strip.train(tmp_path / "run2", STEEL, tmp_path / "data", steps=1, n_clean=2, n_pos=2, n_val=2,
                         input_pool=1, neu=2)
    # neu_in_threshold: every checkpoint is read at a threshold that keeps the floor on the NEU val images,
    # here half of them with a labelled defect no gate sees (they, not the strip frames, set the threshold)
    _neu_tree(tmp_path / "faint" / "neu_det", invisible_every=2)
    held = gate_strip.train(tmp_path / "run3", STEEL, tmp_path / "faint", steps=2, n_clean=2, n_pos=2, n_val=3,
                            batch=2, minutes=5, input_pool=2, neu=1.0, own=1.0, neu_in_threshold=True)
    assert held["neu_in_threshold"] and all(h["neu_recall"] >= gate_strip.NEU_RECALL_FLOOR for h in held["history"])


def test_neu_figures_are_the_gate_on_real_images_and_their_clean_crops(tmp_path):
    from training.gate_strip_ship import onnx_frame_scores

    _neu_tree(tmp_path / "data" / "neu_det")
    pool = gate_strip.pack_gate_pool(STEEL)
    lo = gate_strip.neu_figures(STEEL / "gate.onnx", STEEL, tmp_path / "data", 0.0, pool, "train")
    hi = gate_strip.neu_figures(STEEL / "gate.onnx", STEEL, tmp_path / "data", 1.01, pool, "train")
    assert lo["recall"] == 1.0 and lo["pass_rate_clean_crops"] == 1.0 and lo["n_clean_crops"] > 0
    assert hi["recall"] == 0.0 and hi["pass_rate_clean_crops"] == 0.0
    from training.datasets.profiles import load_profile_dataset

    ds = load_profile_dataset("steel", tmp_path / "data", "train")
    scores = onnx_frame_scores(STEEL / "gate.onnx", gate_strip.pooled(np.stack([ds[i].image for i in range(len(ds))]), pool))
    mid = float(np.median(scores))
    assert gate_strip.neu_figures(STEEL / "gate.onnx", STEEL, tmp_path / "data", mid, pool, "train")["recall"] == \
        pytest.approx(float((scores >= mid).mean()))


def test_a_run_stopped_from_outside_leaves_the_record_of_its_best(tmp_path, monkeypatch):
    """meta.json is written with best.pt, not only at the end: a run killed mid-way can still be
    measured and shipped (export_gate reads meta.json beside best.pt)."""
    pytest.importorskip("torch")
    from training.gate_strip_ship import export_gate

    _neu_tree(tmp_path / "data" / "neu_det")
    real_info = gate_strip.log.info

    def stop_after_the_first_val(event, **kw):
        real_info(event, **kw)
        if event == "gate_strip_val" and kw.get("step", 0) > 0:
            raise KeyboardInterrupt  # what a kill does to the loop: no end-of-run code runs
    monkeypatch.setattr(gate_strip.log, "info", stop_after_the_first_val)
    with pytest.raises(KeyboardInterrupt):
        gate_strip.train(tmp_path / "run", STEEL, tmp_path / "data", steps=3, n_clean=2, n_pos=2, n_val=2, batch=2,
                         minutes=5, input_pool=2)
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["finished"] is False and meta["best"]["step"] == 0 and meta["steps"] == 0
    assert export_gate(tmp_path / "run", tmp_path / "gate.onnx") < 1e-4  # the stopped run's best.pt exports
    monkeypatch.setattr(gate_strip.log, "info", real_info)
    done = gate_strip.train(tmp_path / "run2", STEEL, tmp_path / "data", steps=1, n_clean=2, n_pos=2, n_val=2,
                            batch=2, minutes=5, input_pool=2)
    assert done["finished"] is True and json.loads((tmp_path / "run2" / "meta.json").read_text())["steps"] == 1


def test_own_defects_alternate_textured_and_plain_strip_and_the_joint_threshold_keeps_both():
    from training.synth import StripGenerator

    x, boxes = gate_strip.own_defective("val", 4, start=10)
    assert x.shape == (4, 256, 1600) and x.dtype == np.uint8 and all(boxes)
    tex = gate_strip.generated_defective_frame("val", 10)
    assert np.array_equal(x[0], tex.image) and boxes[0] == [(b.cls, int(b.x0), int(b.y0), int(b.x1), int(b.y1))
                                                            for b in tex.boxes]
    plain = StripGenerator(1600, 256, seed=gate_strip.SEEDS["val"] + gate_strip.PLAIN_SEED_OFFSET)
    img, _, inst = plain.frame_with_instances(11, True)
    assert np.array_equal(x[1], img) and boxes[1] == [tuple(int(v) for v in b) for b in inst]
    assert not np.array_equal(x[1], gate_strip.plain_frame("val", 11))  # the defective frame, not the clean one
    labels = gate_strip.box_labels(boxes, 6)
    assert labels.shape == (4, 6) and all(labels[n, b[0]] == 1 for n, fb in enumerate(boxes) for b in fb)
    assert labels.sum() == sum(len({b[0] for b in fb}) for fb in boxes)
    # the joint threshold: the lowest of each set's own threshold, each set's recall at it
    comp, own, clean = np.linspace(0.5, 1.0, 100), np.linspace(0.2, 1.0, 100), np.linspace(0.0, 0.6, 100)
    jt = gate_strip.joint_threshold({"composited": comp, "own": own}, clean)
    assert jt["threshold"] == pytest.approx(gate_strip.threshold_and_pass_rate(own, clean)["threshold"])
    assert jt["recalls"]["own"] >= 0.99 and jt["recalls"]["composited"] == 1.0
    assert jt["pass_rate_clean"] == pytest.approx(float((clean >= jt["threshold"]).mean()))
    assert gate_strip.joint_threshold({"composited": comp, "neu": own}, clean, targets={"neu": 0.9})["threshold"] == \
        pytest.approx(gate_strip.threshold_and_pass_rate(own, clean, 0.9)["threshold"])  # a set's own target
    assert gate_strip.joint_threshold({"composited": comp, "own": np.array([])}, clean)["threshold"] == \
        pytest.approx(gate_strip.threshold_and_pass_rate(comp, clean)["threshold"])  # an empty set holds nothing


def test_a_run_with_own_defects_trains_on_them_and_holds_their_recall_on_val(tmp_path):
    pytest.importorskip("torch")
    _neu_tree(tmp_path / "data" / "neu_det")
    meta = gate_strip.train(tmp_path / "run", STEEL, tmp_path / "data", steps=2, n_clean=2, n_pos=2, n_val=4,
                            batch=2, minutes=5, input_pool=2, own=1.0)
    assert meta["own_frames"] == 2
    cached = np.load(tmp_path / "run" / "train_own_2_cells.npz")
    x, y, cells = (cached[f] for f in cached.files)
    assert x.shape[0] == y.shape[0] == cells.shape[0] == 2 and (y.max(axis=1) == 1).all() and (cells == 1).any()
    for h in meta["history"]:
        assert "recall_own" in h and h["recall_own"] >= gate_strip.RECALL_TARGET and h["n_own"] >= 1
    with pytest.raises(gate_strip.GateStripError, match="own -1"):
        gate_strip.train(tmp_path / "run2", STEEL, tmp_path / "data", steps=1, n_clean=2, n_pos=2, n_val=2,
                         input_pool=2, own=-1)


def test_a_grown_gate_starts_as_the_packs_and_ships_with_its_context_blocks(tmp_path):
    """--config ctxgate: the pack's gate grown by two dilated residual context blocks computes exactly
    what it computed (the blocks start as the identity); once they hold weights, export, ship and
    load_gate bring the grown net back from the pack's gate.onnx (model.json records its config)."""
    torch = pytest.importorskip("torch")
    x2 = gate_strip.pooled(np.stack([gate_strip.clean_frame("val", i) for i in range(2)]), 2)
    gate, _, _ = gate_strip.load_gate(STEEL, x2)
    grown = gate_strip.grow(gate, "ctxgate").eval()
    assert grown.config.gate_context == (2, 4) and len(grown.features) == len(gate.features) + 2
    with torch.no_grad():
        x = torch.from_numpy(x2)
        assert torch.equal(grown.pooled_logit_map(x), gate.pooled_logit_map(x))
        for block in grown.features[-2:]:  # give the context blocks weights of their own
            block.body[4].weight.fill_(0.5)
            block.body[4].bias.fill_(0.1)
        assert not torch.allclose(grown.pooled_logit_map(x), gate.pooled_logit_map(x), atol=1e-3)
    with pytest.raises(gate_strip.GateStripError, match="does not grow"):
        gate_strip.grow(gate, "tiny")  # other widths
    with pytest.raises(gate_strip.GateStripError, match="not one of"):
        gate_strip.grow(gate, "huge")

    pack = _ship_gate_as_run(tmp_path, grown, 2)
    assert json.loads((pack / "model.json").read_text())["training"]["gate_model_config"]["gate_context"] == [2, 4]
    back, _, diff = gate_strip.load_gate(pack, x2)  # the next fine-tune starts from the shipped grown gate
    assert back.config.gate_context == (2, 4) and diff < 1e-4


def test_a_reported_only_run_trains_on_the_defects_the_segmenter_reports(tmp_path):
    """--reported-only: the training frames carry what the pack's segmenter reports, and a defective
    frame it reports nothing in is left out (clean frames all stay); without it every frame stays."""
    pytest.importorskip("torch")
    _neu_tree(tmp_path / "data" / "neu_det")
    kw = dict(steps=1, n_clean=2, n_pos=3, n_val=4, batch=2, minutes=5, input_pool=2, own=2.0)
    meta = gate_strip.train(tmp_path / "run", STEEL, tmp_path / "data", reported_only=True, **kw)
    tag = json.loads((STEEL / "model.json").read_text())["models"]["seg"]["sha256"][:12]
    expected = 0
    for name in (f"train_2_3_cells_reported_{tag}.npz", f"train_own_6_cells_reported_{tag}.npz"):
        with np.load(tmp_path / "run" / name) as f:
            x, y, cells, rep = (f[k] for k in f.files)
        positive = y.max(axis=1) > 0
        assert len(rep) == len(x) and not rep[~positive].any()
        expected += int((~positive).sum() + (positive & rep.astype(bool)).sum())
    assert meta["reported_only"] and meta["train_frames_kept"] == expected < 2 + 3 + 6  # some are too faint
    every = gate_strip.train(tmp_path / "run_all", STEEL, tmp_path / "data", **kw)
    assert not every["reported_only"] and every["train_frames_kept"] == 2 + 3 + 6
