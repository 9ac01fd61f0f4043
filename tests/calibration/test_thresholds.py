"""Gate and per-class threshold calibration: on generated scores and masks, and end to end
through real ONNX Runtime sessions on a tiny model pack built here."""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.cli import main as calibrate_main
from calibration import CalibrationError
from calibration.classes import MISSING_CLASS_DEFAULT, choose_class_thresholds, search_class_thresholds
from calibration.gate import choose_gate_threshold, min_positives_for
from calibration.run import calibrate
from training.datasets import Box, Sample, write_severstal_csv
from engines.modelpack import ModelPackError, load_calibration, load_model_pack, sha256_file

# ----------------------------------------------------------------------------- gate


def _scores(rng: np.random.Generator, n_pos: int, n_neg: int) -> tuple[np.ndarray, np.ndarray]:
    pos = rng.beta(5, 2, n_pos)
    neg = rng.beta(1.5, 6, n_neg)
    return np.r_[pos, neg], np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]


def test_gate_threshold_keeps_recall_on_held_out_data():
    rng = np.random.default_rng(7)
    target = 0.99
    scores, labels = _scores(rng, 3000, 6000)
    g = choose_gate_threshold(scores, labels, target)
    assert g.recall >= target
    assert g.n == 9000 and g.n_defective == 3000 and g.n_clean == 6000
    assert 0 < g.pass_rate < 1
    assert g.precision == pytest.approx(g.passed_defective / (g.passed_defective + g.passed_clean))
    # highest such threshold: the next higher positive score already misses the target
    pos = np.sort(scores[labels])
    higher = pos[pos > g.threshold][0]
    assert (scores[labels] >= higher).mean() < target
    # same distribution, fresh draw: recall is the target up to sampling error of the
    # calibration set (the empirical quantile of 3000 positives has sd sqrt(t(1-t)/n))
    held_scores, held_labels = _scores(np.random.default_rng(8), 100_000, 10)
    held_recall = (held_scores[held_labels] >= g.threshold).mean()
    tolerance = 3 * math.sqrt(target * (1 - target) / 3000)
    assert held_recall >= target - tolerance
    # and a threshold chosen for a stricter target is stricter on held-out data too
    g999 = choose_gate_threshold(scores, labels, 0.999)
    assert g999.threshold < g.threshold
    assert (held_scores[held_labels] >= g999.threshold).mean() > held_recall


def test_gate_threshold_on_a_small_hand_case():
    scores = [0.95, 0.9, 0.8, 0.7, 0.6, 0.3, 0.5, 0.2, 0.1, 0.65]
    labels = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    g = choose_gate_threshold(scores, labels, recall_target=0.8, min_positives=5)
    # 6 positives, 0.8 -> 5 must pass: the 5th highest positive score
    assert g.threshold == 0.6
    assert g.passed_defective == 5 and g.recall == pytest.approx(5 / 6)
    assert g.passed_clean == 1  # 0.65
    assert g.pass_rate == pytest.approx(0.6)
    assert g.precision == pytest.approx(5 / 6)


def test_ties_at_the_threshold_pass():
    scores = [0.5, 0.5, 0.5, 0.9, 0.1, 0.5]
    labels = [1, 1, 1, 1, 0, 0]
    g = choose_gate_threshold(scores, labels, recall_target=0.75, min_positives=4)
    assert g.threshold == 0.5 and g.recall == 1.0 and g.passed_clean == 1


def test_min_positives_rule():
    assert min_positives_for(0.99) == 100
    assert min_positives_for(0.9) == 10
    assert min_positives_for(0.95) == 20


@pytest.mark.parametrize(
    ("scores", "labels", "kwargs", "match"),
    [
        ([0.1, 0.2], [0, 0], {}, r"gate: no defective frames in the calibration data"),
        ([0.1, 0.2], [1, 1], {"min_positives": 1}, r"gate: no clean frames in the calibration data"),
        (list(np.linspace(0, 1, 60)), [1] * 50 + [0] * 10, {},
         r"gate: 50 defective frames are too few for recall target 0.99 \(need >= 100"),
        ([0.4] * 30, [1] * 20 + [0] * 10, {"recall_target": 0.95}, r"gate: all 30 scores are equal \(0.4\)"),
        ([0.1, float("nan"), 0.3], [1, 0, 1], {"min_positives": 1}, r"gate: 1 scores are NaN or infinite"),
        ([0.1, 1.5], [1, 0], {"min_positives": 1}, r"gate: scores must lie in \[0, 1\]"),
        ([0.1, 0.2], [1, 0, 1], {}, r"gate: 2 scores but 3 labels"),
        ([0.1, 0.2], [1, 0], {"recall_target": 1.0}, r"recall_target must be in \(0, 1\), got 1.0"),
        ([], [], {}, r"gate: no frames to calibrate on"),
        ([0.1, 0.2], [2, 0], {}, r"gate: labels must be booleans or 0/1"),
    ],
)
def test_gate_refusals(scores, labels, kwargs, match):
    with pytest.raises(CalibrationError, match=match):
        choose_gate_threshold(scores, labels, **kwargs)


# ----------------------------------------------------------------------------- classes


def _known_optimum_case(n_images: int = 8, stride: int = 1):
    """Truth: one 20x20 square per image (class 0). Probabilities: 0.7 inside the square,
    0.4 on a 3-px halo around it (a worse threshold grows the mask), 0.05 elsewhere, and a
    3x3 blob of 0.9 away from the square (noise only a min area removes). Best: the lowest
    grid threshold above 0.4 and the smallest grid area above 9 px, Dice 1. Class 1 is empty
    in the truth and gets only a 2x2 blob of 0.8: best is an area filter that removes it."""
    rng = np.random.default_rng(1)
    h, w = 64, 64
    probs, masks = [], []
    for i in range(n_images):
        y, x = rng.integers(8, 30, 2)
        y, x = y - y % stride, x - x % stride  # square on the output grid: exact after upsampling
        gt = np.zeros((2, h, w), bool)
        gt[0, y : y + 20, x : x + 20] = True
        p = np.full((2, h, w), 0.05, np.float32)
        p[0, y - 3 : y + 23, x - 3 : x + 23] = 0.4
        p[0, y : y + 20, x : x + 20] = 0.7
        by, bx = (55, 2) if x > 20 else (55, 58)
        p[0, by : by + 3, bx : bx + 3] = 0.9
        p[1, 2:4, 30:32] = 0.8
        if i == 0:
            p[0, :, :] = 0.05  # one image where the model misses the square: Dice 0 on it
            p[0, by : by + 3, bx : bx + 3] = 0.9
        if stride > 1:
            p = p[:, ::stride, ::stride]
        probs.append(p)
        masks.append(gt)
    return probs, masks


def test_dice_optimal_thresholds_on_a_known_case():
    probs, masks = _known_optimum_case()
    grid_t = (0.3, 0.35, 0.45, 0.5, 0.75, 0.95)
    grid_a = (0, 4, 16, 64, 512)
    choices = choose_class_thresholds(probs, masks, ("square", "empty"), grid_t, grid_a, min_positive_images=0)
    sq = choices["square"]
    assert (sq.pixel_threshold, sq.min_area_px) == (0.45, 16)
    assert sq.dice == pytest.approx(7 / 8)  # image 0: missed square -> Dice 0
    assert sq.n_positive_images == 8 and sq.calibrated
    empty = choices["empty"]
    assert empty.min_area_px == 16 and empty.pixel_threshold == 0.3  # tie -> lowest threshold
    assert empty.dice == pytest.approx(1.0)  # empty/empty scores 1
    # the search table agrees with the choice and shows why: halo at 0.35, noise at area 4
    s = search_class_thresholds(probs, masks, ("square", "empty"), grid_t, grid_a)
    g = s.grid[0]
    assert g[grid_t.index(0.45), grid_a.index(16)] > g[grid_t.index(0.35), grid_a.index(16)]
    assert g[grid_t.index(0.45), grid_a.index(16)] > g[grid_t.index(0.45), grid_a.index(4)]
    assert g[grid_t.index(0.45), grid_a.index(512)] == 0.0  # an area filter above 400 px drops every square


def test_stride_upsamples_masks_and_counts_area_in_image_px():
    probs, masks = _known_optimum_case(stride=2)
    # at stride 2 the 3x3 noise blob covers 1-2 cells per axis -> at most 4 cells = 16 px;
    # the square is 10x10 cells = 400 px
    choices = choose_class_thresholds(probs, masks, ("square", "empty"), (0.45,), (0, 20, 64, 1000),
                                      min_positive_images=0, stride=2)
    sq = choices["square"]
    assert sq.min_area_px == 20
    assert sq.dice == pytest.approx(7 / 8)


def test_class_with_too_few_images_is_refused_or_kept_as_default():
    probs, masks = _known_optimum_case(n_images=4)
    with pytest.raises(CalibrationError, match=r"classes with fewer than 5 positive images: 'square' \(4\), 'empty' \(0\)"):
        choose_class_thresholds(probs, masks, ("square", "empty"))
    choices = choose_class_thresholds(probs, masks, ("square", "empty"), min_positive_images=3,
                                      allow_missing_class=True)
    assert choices["square"].calibrated
    e = choices["empty"]
    assert not e.calibrated
    assert (e.pixel_threshold, e.min_area_px) == (MISSING_CLASS_DEFAULT["pixel_threshold"],
                                                   MISSING_CLASS_DEFAULT["min_area_px"])
    assert e.to_json()["calibrated"] is False and "not calibrated" in e.to_json()["note"]


def test_class_search_refusals():
    probs, masks = _known_optimum_case(n_images=2)
    with pytest.raises(CalibrationError, match=r"pixel thresholds must be a non-empty list in \(0, 1\)"):
        search_class_thresholds(probs, masks, ("a", "b"), (0.0, 0.5))
    with pytest.raises(CalibrationError, match=r"min areas must be a non-empty list of integers >= 0"):
        search_class_thresholds(probs, masks, ("a", "b"), (0.5,), (-1,))
    with pytest.raises(CalibrationError, match=r"ascending without repeats"):
        search_class_thresholds(probs, masks, ("a", "b"), (0.5, 0.3))
    with pytest.raises(CalibrationError, match=r"image 0: probs \(2, 64, 64\) and masks \(2, 64, 64\) must both be \[K=3"):
        search_class_thresholds(probs, masks, ("a", "b", "c"))
    bad = [probs[0].copy()]
    bad[0][0, 0, 0] = np.nan
    with pytest.raises(CalibrationError, match=r"image 0: probabilities hold NaN"):
        search_class_thresholds(bad, masks[:1], ("a", "b"))
    with pytest.raises(CalibrationError, match=r"no images with masks"):
        search_class_thresholds([], [], ("a", "b"))


# ----------------------------------------------------------------------------- ONNX pack

H, W, STRIDE = 32, 48, 2
CLASSES = ("bright", "dim")
LEVELS = (0.8, 0.4)  # class k: pixels of value LEVELS[k] * 255


def _build_models(directory: Path, sharpness: float = 40.0) -> None:
    """gate.onnx and seg.onnx following the model contract: uint8 NCHW `image` in;
    p_k = sigmoid(a * (0.1 - |x/255 - level_k|)) per pixel; seg = average pool (stride 2)
    of p -> `probs`; gate = max of p over the image -> `scores`."""
    from onnx import TensorProto, checker, helper, numpy_helper, save

    def graph(name, out_name, out_shape, tail):
        levels = numpy_helper.from_array(np.array(LEVELS, np.float32).reshape(1, -1, 1, 1), "levels")
        consts = [
            numpy_helper.from_array(np.array(255.0, np.float32), "c255"),
            numpy_helper.from_array(np.array(0.1, np.float32), "width"),
            numpy_helper.from_array(np.array(sharpness, np.float32), "sharp"),
            levels,
        ]
        nodes = [
            helper.make_node("Cast", ["image"], ["xf"], to=TensorProto.FLOAT),
            helper.make_node("Div", ["xf", "c255"], ["x"]),
            helper.make_node("Sub", ["x", "levels"], ["d"]),
            helper.make_node("Abs", ["d"], ["ad"]),
            helper.make_node("Sub", ["width", "ad"], ["m"]),
            helper.make_node("Mul", ["m", "sharp"], ["z"]),
            helper.make_node("Sigmoid", ["z"], ["p"]),
            *tail,
        ]
        g = helper.make_graph(
            nodes, name,
            [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 1, "H", "W"])],
            [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)],
            initializer=consts,
        )
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        checker.check_model(model)
        return model

    save(graph("gate", "scores", ["N", len(CLASSES)],
               [helper.make_node("ReduceMax", ["p"], ["scores"], axes=[2, 3], keepdims=0)]),
         str(directory / "gate.onnx"))
    save(graph("seg", "probs", ["N", len(CLASSES), "h", "w"],
               [helper.make_node("AveragePool", ["p"], ["probs"], kernel_shape=[STRIDE, STRIDE],
                                 strides=[STRIDE, STRIDE])]),
         str(directory / "seg.onnx"))


def make_pack(directory: Path, sharpness: float = 40.0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    _build_models(directory, sharpness)
    meta = {
        "format": 1, "profile": "tiny", "classes": list(CLASSES),
        "input": {"channels": 1, "height": H, "width": W, "dtype": "uint8", "layout": "NCHW", "mean": 0.5, "std": 0.25},
        "models": {
            "gate": {"file": "gate.onnx", "sha256": sha256_file(directory / "gate.onnx"), "output": "scores"},
            "seg": {"file": "seg.onnx", "sha256": sha256_file(directory / "seg.onnx"), "output": "probs",
                    "output_stride": STRIDE},
        },
        "training": {"data": "none: hand-built for tests", "command": "tests/calibration", "seed": 0},
    }
    (directory / "model.json").write_text(json.dumps(meta))
    return directory


def make_samples(n: int, seed: int, tmp: Path | None = None) -> list[Sample]:
    """Frames with 0, 1 or 2 rectangles of class levels (jittered), plus dim noise pixels
    that look a little like the classes (so the gate is imperfect)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = rng.integers(0, 20, (H, W)).astype(np.uint8)
        masks = np.zeros((2, H, W), bool)
        kind = i % 3  # 0 clean, 1 one defect, 2 two defects
        for k in rng.permutation(2)[:kind]:
            hh, ww = rng.integers(4, 9, 2)
            y, x = rng.integers(0, H - hh), rng.integers(0, W - ww)
            level = LEVELS[k] + rng.normal(0, 0.04)
            img[y : y + hh, x : x + ww] = np.clip(level * 255 + rng.integers(-3, 4, (hh, ww)), 0, 255)
            masks[k, y : y + hh, x : x + ww] = True
        for _ in range(rng.integers(0, 3)):  # distractor pixels on clean background
            y, x = rng.integers(0, H), rng.integers(0, W)
            if not masks[:, y, x].any():
                img[y, x] = int(rng.uniform(0.5, 0.65) * 255)
        out.append(Sample(image=img, masks=masks, boxes=[], labels=masks.any(axis=(1, 2)).astype(np.float32),
                          classes=CLASSES, source=str((tmp or Path("/gen")) / f"frame_{seed}_{i:04d}.png")))
    return out


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory) -> Path:
    return make_pack(tmp_path_factory.mktemp("pack") / "tiny")


def test_calibrate_writes_a_file_the_agent_loads(pack_dir, tmp_path):
    pack = load_model_pack(pack_dir)
    samples = make_samples(120, seed=3)
    out = tmp_path / "calibration.json"
    result = calibrate(pack, samples, recall_target=0.95, data_info={"what": "generated", "split": "val"},
                       output=out, batch=7, pixel_thresholds=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
                       min_areas=(0, 4, 8, 16))
    assert result.path == out and out.is_file()
    assert not list(tmp_path.glob(".calibration.json.*"))  # temp file replaced, not left behind
    assert out.stat().st_mode & 0o777 == 0o644  # readable by the agent's service user
    doc = json.loads(out.read_text())
    assert doc["format"] == 1
    assert doc["models"] == {"gate": pack.gate.sha256, "seg": pack.seg.sha256}
    assert doc["data"]["n_images"] == 120 and doc["data"]["n_defective"] == 80
    assert doc["gate"]["recall"] >= 0.95 and doc["gate"]["recall_target"] == 0.95
    t = doc["gate"]["threshold"]
    assert doc["gate"]["threshold_logit"] == pytest.approx(math.log(t / (1 - t)), abs=1e-6)
    assert ("note" in doc["gate"]) == (t > 0.999)
    assert set(doc["classes"]) == set(CLASSES)
    cal = load_calibration(pack, out)
    assert cal.gate_threshold == result.gate.threshold
    for name in CLASSES:
        assert cal.classes[name].pixel_threshold == doc["classes"][name]["pixel_threshold"]
        assert doc["classes"][name]["dice"] > 0.8  # the tiny models segment their rectangles
        assert doc["classes"][name]["dice_with_gate"] <= doc["classes"][name]["dice"] + 1e-9
    # the threshold reproduces on the scores ONNX Runtime gives for these frames
    scores = result.gate_scores
    assert ((scores >= cal.gate_threshold)[result.gate_labels]).mean() >= 0.95
    # same distribution, fresh frames: recall within sampling error of the target
    held = calibrate(pack, make_samples(300, seed=4), recall_target=0.95, write=False,
                     pixel_thresholds=(0.5,), min_areas=(0,))
    held_recall = (held.gate_scores[held.gate_labels] >= cal.gate_threshold).mean()
    assert held_recall >= 0.95 - 3 * math.sqrt(0.95 * 0.05 / 80)


def test_calibration_for_other_models_is_refused(pack_dir, tmp_path):
    pack = load_model_pack(pack_dir)
    out = tmp_path / "calibration.json"
    calibrate(pack, make_samples(60, seed=5), recall_target=0.9, output=out,
              pixel_thresholds=(0.5,), min_areas=(0,))
    retrained = make_pack(tmp_path / "retrained", sharpness=30.0)  # different seg/gate weights
    other = load_model_pack(retrained)
    assert other.seg.sha256 != pack.seg.sha256
    with pytest.raises(ModelPackError, match=r"calibration was made for gate model [0-9a-f]{12}, but the loaded gate"):
        load_calibration(other, out)


def test_calibrate_refuses_before_inference(pack_dir):
    pack = load_model_pack(pack_dir)
    samples = make_samples(30, seed=6)
    with pytest.raises(CalibrationError, match=r"gate: 20 defective frames are too few for recall target 0.99"):
        calibrate(pack, samples, write=False)
    clean_only = [s for s in samples if not s.labels.any()]
    with pytest.raises(CalibrationError, match=r"gate: no defective frames"):
        calibrate(pack, clean_only, write=False, min_positive_images=0)
    with pytest.raises(CalibrationError, match=r"classes with fewer than 50 positive images: 'bright' \(\d+\), 'dim'"):
        calibrate(pack, samples, write=False, min_positive_images=50)
    wrong = [Sample(image=s.image, masks=s.masks, boxes=[], labels=np.zeros(3, np.float32), classes=CLASSES,
                    source="x.png") for s in samples[:2]]
    with pytest.raises(CalibrationError, match=r"x.png: 3 labels, the model pack has 2 classes"):
        calibrate(pack, wrong, write=False)
    with pytest.raises(CalibrationError, match=r"no samples to calibrate on"):
        calibrate(pack, [], write=False)


def _write_severstal_folder(folder: Path, samples: list[Sample]) -> None:
    frames = folder / "frames"
    frames.mkdir(parents=True)
    named = []
    for s in samples:
        path = frames / Path(s.source).name
        cv2.imwrite(str(path), s.image)
        named.append(Sample(s.image, s.masks, [], s.labels, CLASSES, str(path)))
    write_severstal_csv(folder / "ground_truth.csv", named)


def test_cli_on_a_simulator_folder(pack_dir, tmp_path, capsys):
    data = tmp_path / "sim"
    _write_severstal_folder(data, make_samples(90, seed=9))
    out = tmp_path / "cal.json"
    report = tmp_path / "report"
    rc = calibrate_main([
        "calibrate", "thresholds", "--profile", "tiny", "--models", str(pack_dir), "--data", str(data),
        "--recall-target", "0.95", "--output", str(out), "--report", str(report),
        "--pixel-thresholds", "0.3,0.5,0.7", "--min-areas", "0,8",
    ])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "gate: threshold" in text.out and "class bright: pixel_threshold" in text.out
    doc = json.loads(out.read_text())
    assert doc["data"]["n_images"] == 90 and doc["data"]["split"] == "all"
    assert load_calibration(load_model_pack(pack_dir), out).gate_threshold == doc["gate"]["threshold"]
    assert (report / "report.html").is_file() and (report / "gate_curve.png").is_file()
    # the data are named without this machine's folders (tmp_path here): the file ships with a pack
    from engines.portable import machine_paths

    assert doc["data"]["what"] == "Severstal-layout folder sim" and doc["data"]["source"] == "ground_truth.csv"
    assert machine_paths(out.read_text()) == [] and machine_paths((report / "report.html").read_text()) == []


def test_cli_errors_are_one_clear_line(pack_dir, tmp_path, capsys):
    rc = calibrate_main(["calibrate", "thresholds", "--profile", "tiny", "--models", str(pack_dir),
                         "--data", str(tmp_path)])
    assert rc == 2
    assert "not a Severstal-layout folder; expected ground_truth.csv + frames/" in capsys.readouterr().err
    rc = calibrate_main(["calibrate", "thresholds", "--profile", "steel", "--models", str(pack_dir),
                         "--data", str(tmp_path)])
    assert rc == 2
    assert "model.json is for profile 'tiny', not 'steel'" in capsys.readouterr().err
    rc = calibrate_main(["calibrate", "thresholds", "--profile", "tiny", "--models", str(tmp_path / "none"),
                         "--data", str(tmp_path)])
    assert rc == 2
    assert "no model.json in" in capsys.readouterr().err
    rc = calibrate_main(["calibrate", "thresholds", "--profile", "tiny", "--models", str(pack_dir),
                         "--data", str(tmp_path), "--min-areas", "a,b"])
    assert rc == 2
    assert "--min-areas: 'a,b' is not a comma-separated list of int" in capsys.readouterr().err


def test_odd_sized_frames_and_gate_only_negatives(pack_dir):
    """Frames of 29x45 are padded to 32x48 for the models and the masks cropped back; defect-free
    crops given as negatives count for the gate (recall, pass rate) and not for the Dice."""
    pack = load_model_pack(pack_dir)
    frames = make_samples(90, seed=11)
    odd = [Sample(s.image[:29, :45].copy(), s.masks[:, :29, :45].copy(), [], s.masks[:, :29, :45].any(axis=(1, 2))
                  .astype(np.float32), CLASSES, s.source) for s in frames]
    defective = [s for s in odd if s.labels.any()]
    clean = [s for s in odd if not s.labels.any()]
    result = calibrate(pack, defective, negatives=clean, recall_target=0.9, write=False,
                       pixel_thresholds=(0.3, 0.5), min_areas=(0, 8))
    doc = result.document
    assert doc["data"]["n_images"] == len(defective) and doc["data"]["n_gate_negatives"] == len(clean)
    assert result.gate.n == len(odd) and result.gate.n_clean == len(clean)
    assert result.search.per_image.shape[0] == len(defective)
    assert min(doc["classes"][c]["dice"] for c in CLASSES) > 0.8
    with pytest.raises(CalibrationError, match=r"a gate negative must be defect-free"):
        calibrate(pack, defective, negatives=defective[:1], recall_target=0.9, write=False)
    # the size-matched view: positives of the negatives' size around the defects
    small_pos = [_crop_around_defect(s, 16, 24) for s in defective]
    small_neg = [Sample(s.image[:16, :24].copy(), None, [], s.labels, CLASSES, s.source) for s in clean]
    images_only = calibrate(pack, defective, negatives=small_neg, recall_target=0.9, write=False,
                            pixel_thresholds=(0.5,), min_areas=(0,))
    both = calibrate(pack, defective, negatives=small_neg, size_matched_positives=small_pos, recall_target=0.9,
                     gate_view="both", write=False, pixel_thresholds=(0.5,), min_areas=(0,))
    sm = both.document["gate"]["size_matched"]
    assert sm["n_defect_crops"] == len(small_pos) and sm["n_clean_crops"] == len(small_neg)
    crop_scores = np.asarray(_gate_scores(pack, small_pos))
    assert sm["recall"] == pytest.approx(np.mean(crop_scores >= both.gate.threshold))
    # the target holds in both views; the threshold is the lower of the two views' own
    assert sm["recall"] >= 0.9 and both.gate.recall >= 0.9
    assert both.gate.threshold == min(images_only.gate.threshold, sm["own_threshold"])
    assert both.document["gate"]["chosen_by"] == (
        "size_matched" if sm["own_threshold"] < images_only.gate.threshold else "images")
    assert both.gate.n == len(defective) + len(small_neg)  # the crops add a view, not frames
    only = calibrate(pack, defective, negatives=small_neg, size_matched_positives=small_pos, recall_target=0.9,
                     write=False, pixel_thresholds=(0.5,), min_areas=(0,))  # default view: images
    assert only.gate.threshold == images_only.gate.threshold
    assert only.document["gate"]["chosen_by"] == "images"
    # a 32x48 frame holds 2x2 windows of 16x24: the frame passes when any window does
    est = only.document["gate"]["size_matched"]["line_frame_pass_rate_estimate"]
    p_crop = only.document["gate"]["size_matched"]["pass_rate_clean_crops"]
    crop_neg_scores = np.asarray(_gate_scores(pack, small_neg))
    assert p_crop == pytest.approx(np.mean(crop_neg_scores >= only.gate.threshold), abs=1e-6)
    assert est["value"] == pytest.approx(1 - (1 - p_crop) ** 4, abs=1e-6)
    assert "holds 4 windows of 16x24" in est["how"]
    with pytest.raises(CalibrationError, match=r"a size-matched positive must hold a defect"):
        calibrate(pack, defective, negatives=small_neg, size_matched_positives=small_neg[:1], recall_target=0.9,
                  write=False)
    with pytest.raises(CalibrationError, match=r"gate_view must be 'both' or 'images', got 'crops'"):
        calibrate(pack, defective, gate_view="crops", write=False)


def _crop_around_defect(sample: Sample, ch: int, cw: int) -> Sample:
    ys, xs = np.nonzero(sample.masks.any(axis=0))
    h, w = sample.shape
    y = int(min(max(0, ys.mean() - ch / 2), h - ch))
    x = int(min(max(0, xs.mean() - cw / 2), w - cw))
    masks = sample.masks[:, y : y + ch, x : x + cw].copy()
    return Sample(sample.image[y : y + ch, x : x + cw].copy(), masks, [], masks.any(axis=(1, 2)).astype(np.float32),
                  CLASSES, sample.source)


def _gate_scores(pack, samples) -> list[float]:
    from engines.backends import load_backend_class

    with load_backend_class("onnxruntime")(pack.gate.path, max_batch=len(samples)) as gate:
        x = np.stack([s.image[None] for s in samples])
        return gate.infer(x)["scores"].max(axis=1).tolist()


def test_dice_on_positive_images_and_the_empty_baseline():
    probs, masks = _known_optimum_case()
    masks = [m.copy() for m in masks]
    for m in masks[4:]:
        m[0] = False  # four images without a square: predicting nothing there scores 1
    probs = [p.copy() for p in probs]
    for p in probs[4:]:
        p[0] = 0.05
    c = choose_class_thresholds(probs, masks, ("square", "empty"), (0.45,), (0, 16), min_positive_images=0)["square"]
    assert c.n_positive_images == 4
    assert c.empty_baseline == 0.5
    assert c.dice_on_positive == pytest.approx(3 / 4)  # image 0 missed, 1-3 exact
    assert c.image_recall == pytest.approx(3 / 4)
    assert c.dice == pytest.approx(7 / 8)
    assert c.to_json()["dice_if_never_predicted"] == 0.5
    assert "note" not in c.to_json()
    # a model that never finds the class: the optimum is to predict nothing, and the file says so
    blind = [np.full_like(p, 0.05) for p in probs]
    c = choose_class_thresholds(blind, masks, ("square", "empty"), (0.45,), (0,), min_positive_images=0)["square"]
    assert c.dice == 0.5 and c.dice_on_positive == 0.0
    assert c.to_json()["note"].startswith("WARNING: no better than never predicting this class (Dice 0.5000 <= 0.5000)")


def test_min_image_recall_trades_dice_for_found_defects():
    """Four images hold a defect (two 20x20, two 3x3), six hold none but show a 3x3 noise blob.
    The Dice optimum drops every 3x3 component (area filter 16): the six empty images score 1
    and the two small defects are lost; a recall floor of 1 keeps them at a Dice cost."""
    rng = np.random.default_rng(3)
    probs, masks = [], []
    for i in range(10):
        gt = np.zeros((1, 64, 64), bool)
        p = np.full((1, 64, 64), 0.05, np.float32)
        y, x = rng.integers(35, 60, 2)
        if i < 2:  # big defect
            gt[0, 10:30, 10:30] = True
            p[0, 10:30, 10:30] = 0.7
        elif i < 4:  # small defect
            gt[0, y : y + 3, x : x + 3] = True
            p[0, y : y + 3, x : x + 3] = 0.7
        else:  # no defect, a noise blob
            p[0, y : y + 3, x : x + 3] = 0.9
        probs.append(p)
        masks.append(gt)
    s = search_class_thresholds(probs, masks, ("d",), (0.5,), (0, 16))
    from calibration.classes import pick_class_thresholds

    best = pick_class_thresholds(s, min_positive_images=0)["d"]
    assert best.min_area_px == 16 and best.image_recall == 0.5
    floor = pick_class_thresholds(s, min_positive_images=0, min_image_recall=1.0)["d"]
    assert best.dice == pytest.approx(0.8)
    assert floor.min_area_px == 0 and floor.image_recall == 1.0 and floor.dice == pytest.approx(0.4)
    unreachable = pick_class_thresholds(
        search_class_thresholds(probs, masks, ("d",), (0.95,), (0,)), min_positive_images=0, min_image_recall=0.9)["d"]
    assert "WARNING: no grid point finds the class in 0.9 of its images; best reached 0.0000" in unreachable.note
    with pytest.raises(CalibrationError, match=r"min_image_recall must be in \(0, 1\], got 1.5"):
        pick_class_thresholds(s, min_positive_images=0, min_image_recall=1.5)


@pytest.mark.parametrize(("stride", "hw"), [(1, (20, 30)), (2, (29, 45)), (4, (61, 50))])
def test_search_equals_scoring_the_masks_evaluate_makes(stride, hw):
    """The count-based search gives, at every grid point, the Dice of the masks that
    training.evaluate.components builds (threshold, components, min area, upsample, crop)."""
    from metrics import dice_pairs
    from training.evaluate import components

    rng = np.random.default_rng(stride)
    h, w = hw
    oh, ow = -(-h // stride), -(-w // stride)
    probs, masks = [], []
    for _ in range(4):
        p = cv2.GaussianBlur(rng.random((oh, ow)).astype(np.float32), (3, 3), 0)
        p = np.stack([p, 1 - p]) ** 2
        gt = np.zeros((2, h, w), bool)
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        gt[0, y : y + 8, x : x + rng.integers(3, 9)] = True
        gt[1] = rng.random((h, w)) > 0.7
        probs.append(p)
        masks.append(gt)
    ts, areas = (0.1, 0.2, 0.35, 0.5), (0, 4, 16, 40)
    search = search_class_thresholds(probs, masks, ("a", "b"), ts, areas, stride=stride)
    for ti, t in enumerate(ts):
        for ai, a in enumerate(areas):
            for i, (p, gt) in enumerate(zip(probs, masks)):
                pred, _ = components(p, [t, t], [a, a], stride, (h, w))
                want = dice_pairs(pred[None], gt[None])[0]
                np.testing.assert_allclose(search.per_image[i, :, ti, ai], want, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- --dataset-root

STEEL = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")


def _neu_like(root: Path, n_val: int) -> None:
    """A NEU-DET-shaped folder (IMAGES/ + ANNOTATIONS/ VOC XML, every image defective) whose
    stems fall in the validation split, 96x96 px, one bright box per image."""
    from training.datasets import assign_split

    images, notes = root / "neu_det" / "IMAGES", root / "neu_det" / "ANNOTATIONS"
    images.mkdir(parents=True)
    notes.mkdir(parents=True)
    rng = np.random.default_rng(0)
    made, i = 0, 0
    while made < n_val:
        cls = STEEL[made % len(STEEL)]
        stem = f"{cls}_{i}"
        i += 1
        if assign_split(stem) != "val":
            continue
        img = rng.integers(0, 20, (96, 96)).astype(np.uint8)
        x0, y0 = int(rng.integers(0, 60)), int(rng.integers(0, 60))
        img[y0 : y0 + 24, x0 : x0 + 24] = 200
        cv2.imwrite(str(images / f"{stem}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 100])
        (notes / f"{stem}.xml").write_text(
            f"<annotation><size><width>96</width><height>96</height><depth>1</depth></size>"
            f"<object><name>{cls}</name><bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin>"
            f"<xmax>{x0 + 24}</xmax><ymax>{y0 + 24}</ymax></bndbox></object></annotation>"
        )
        made += 1


def test_dataset_root_without_clean_images_uses_clean_crops(tmp_path, capsys):
    """The NEU path: the validation split only, clean crops (model.json training.clean_crops)
    as gate negatives, defect crops of their size as the size-matched view."""
    global CLASSES, LEVELS
    saved = CLASSES, LEVELS
    CLASSES, LEVELS = STEEL, (0.78, 0.78, 0.78, 0.78, 0.78, 0.78)
    try:
        pack_dir = make_pack(tmp_path / "steel")
    finally:
        CLASSES, LEVELS = saved
    meta = json.loads((pack_dir / "model.json").read_text())
    meta["profile"] = "steel"
    meta["training"]["clean_crops"] = {"size": 32, "stride": 32, "margin": 2, "max_per_image": 2}
    (pack_dir / "model.json").write_text(json.dumps(meta))
    _neu_like(tmp_path / "data", n_val=60)
    rc = calibrate_main(["calibrate", "thresholds", "--profile", "steel", "--models", str(pack_dir),
                         "--dataset-root", str(tmp_path / "data"), "--recall-target", "0.95"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    doc = json.loads((pack_dir / "calibration.json").read_text())
    assert doc["data"]["split"] == "val" and doc["data"]["n_images"] == 60 and doc["data"]["n_defective"] == 60
    neg = doc["data"]["gate_negatives"]
    assert (neg["size"], neg["margin"], neg["max_per_image"]) == (32, 2, 2) and neg["n"] == doc["gate"]["n_clean"] > 0
    assert doc["gate"]["size_matched"]["n_defect_crops"] == 60
    assert doc["gate"]["recall"] >= 0.95
    assert "gate, size-matched view at this threshold" in out.out
    with pytest.raises(SystemExit):  # the command line never offers the test split
        calibrate_main(["calibrate", "thresholds", "--profile", "steel", "--models", str(pack_dir),
                        "--dataset-root", str(tmp_path / "data"), "--split", "test"])
    assert "invalid choice: 'test'" in capsys.readouterr().err
    from training.calibrate import load_calibration_samples

    with pytest.raises(CalibrationError, match=r"the test split is kept for evaluation; calibrate on --split val"):
        load_calibration_samples(load_model_pack(pack_dir), dataset_root=tmp_path / "data", split="test")
    with pytest.raises(CalibrationError, match=r"give exactly one of --gt-dir DIR or --data-root ROOT"):
        load_calibration_samples(load_model_pack(pack_dir))


def _broken_and_paired(n: int, seed: int) -> list[Sample]:
    """Frames for the linking choice: clean ones; a `bright` defect drawn as two bars with a 4 px gap
    of background (its truth mask is one piece, one box: what a faint stretch of a crack looks
    like); two `dim` defects 6 px apart (two truth boxes)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = rng.integers(0, 20, (H, W)).astype(np.uint8)
        masks = np.zeros((2, H, W), bool)
        boxes = []
        y = 2 * int(rng.integers(1, (H - 8) // 2))
        x = 2 * int(rng.integers(1, (W - 30) // 2))
        if i % 3 == 1:  # bright, broken: bars [x, x+10) and [x+14, x+24); truth [x, x+24)
            for x0 in (x, x + 14):
                img[y:y + 4, x0:x0 + 10] = int(LEVELS[0] * 255)
            masks[0, y:y + 4, x:x + 24] = True
            boxes.append(Box(0, x, y, x + 24, y + 4))
        elif i % 3 == 2:  # dim, two neighbours: [x, x+8) and [x+14, x+22)
            for x0 in (x, x + 14):
                img[y:y + 4, x0:x0 + 8] = int(LEVELS[1] * 255)
                masks[1, y:y + 4, x0:x0 + 8] = True
                boxes.append(Box(1, x0, y, x0 + 8, y + 4))
        out.append(Sample(image=img, masks=masks, boxes=boxes, labels=masks.any(axis=(1, 2)).astype(np.float32),
                          classes=CLASSES, source=f"/gen/link_{seed}_{i:03d}.png"))
    return out


def test_calibrate_chooses_links_that_the_evaluation_and_the_agent_apply(pack_dir, tmp_path):
    from engines.postprocess import extract_defects
    from engines.runner import PackRunner, stack_images
    from training.evaluate import evaluate_samples

    pack = load_model_pack(pack_dir)
    samples = _broken_and_paired(60, seed=11)
    out = tmp_path / "calibration.json"
    calibrate(pack, samples, recall_target=0.9, output=out, pixel_thresholds=(0.3, 0.5), min_areas=(0, 8))
    doc = json.loads(out.read_text())
    bright, dim = doc["classes"]["bright"], doc["classes"]["dim"]
    # the broken bar is one defect from 8 px on (gap 4 px); the smallest such distance wins
    assert bright["link_px"] == 8 and bright["link_ap50_by_px"]["0"] < 0.5 and bright["link_ap50"] > 0.9
    # the neighbours 6 px apart stay two defects
    assert dim["link_px"] == 0 and dim["link_ap50_by_px"]["8"] < dim["link_ap50_by_px"]["0"]
    assert doc["search"]["link_px"][0] == 0
    cal = load_calibration(pack, out)
    assert (cal.classes["bright"].link_px, cal.classes["dim"].link_px) == (8, 0)

    # the evaluation reads the links: its pycocotools AP is the one the calibration chose by
    report = evaluate_samples(pack, cal, samples)
    ap = report["detection"]["ap50_per_class"]
    assert ap["bright"] == pytest.approx(bright["link_ap50"], abs=1e-6)
    assert ap["dim"] == pytest.approx(dim["link_ap50"], abs=1e-6)
    unlinked = json.loads(out.read_text())
    for c in unlinked["classes"].values():
        c["link_px"] = 0
    out.write_text(json.dumps(unlinked))
    report0 = evaluate_samples(pack, load_calibration(pack, out), samples)
    assert report0["detection"]["ap50_per_class"]["bright"] == pytest.approx(bright["link_ap50_by_px"]["0"], abs=1e-6)
    assert report0["instances"]["events"] > report["instances"]["events"]

    # the agent's events: one per broken bar
    broken = [s for s in samples if s.masks[0].any()][:8]
    with PackRunner(pack, roles=("seg",), max_batch=8) as models:
        probs = models.seg_outputs(stack_images(pack, [s.image for s in broken], [s.source for s in broken]),
                                   "test")[pack.seg.output]
    for p in probs:
        got = extract_defects(p, CLASSES, cal.classes, STRIDE, (H, W))
        assert [d.class_name for d in got] == ["bright"]


def test_a_gate_threshold_chosen_on_line_frames_is_kept_unless_recalibrated(tmp_path, capsys):
    """gate_strip ship writes a gate section chosen on whole line frames; recalibrating the classes on a
    dataset must not replace it with a threshold chosen on that dataset's images."""
    from calibration.gate import LINE_FRAMES_CHOSEN_BY

    pack_dir = make_pack(tmp_path / "tiny")
    data = tmp_path / "sim"
    _write_severstal_folder(data, make_samples(90, seed=9))
    args = ["calibrate", "thresholds", "--profile", "tiny", "--models", str(pack_dir), "--data", str(data),
            "--recall-target", "0.95", "--pixel-thresholds", "0.3,0.5,0.7", "--min-areas", "0,8"]
    assert calibrate_main(args) == 0
    cal_path = pack_dir / "calibration.json"
    doc = json.loads(cal_path.read_text())
    own = doc["gate"]["threshold"]
    line_gate = {"threshold": 0.9731, "recall": 0.99, "pass_rate": 0.12, "chosen_by": f"{LINE_FRAMES_CHOSEN_BY}: test"}
    doc["gate"] = dict(line_gate)
    cal_path.write_text(json.dumps(doc))
    capsys.readouterr()

    assert calibrate_main(args) == 0
    out = capsys.readouterr().out
    kept = json.loads(cal_path.read_text())
    assert kept["gate"]["threshold"] == 0.9731 and kept["gate"]["chosen_by"] == line_gate["chosen_by"]
    assert kept["gate"]["on_calibration_samples"]["threshold"] == 0.9731
    assert "threshold KEPT" in out and "gate: threshold 0.9731" in out
    assert load_calibration(load_model_pack(pack_dir)).gate_threshold == 0.9731
    # the classes were recalibrated all the same, and dice_with_gate reads the kept threshold
    assert set(kept["classes"]) == set(CLASSES) and kept["created"] >= doc["created"]
    assert "segmenter_changed" not in kept["gate"] and "WARNING" not in out

    # its recall was measured with the segmenter the pack has: nothing to say; with another: kept, and said
    seg_sha = load_model_pack(pack_dir).seg.sha256
    for measured_with, stale in ((seg_sha[:12], False), ("0" * 12, True)):
        kept["gate"]["textured_strip"] = {"segmenter": measured_with, "recall": 0.99}
        cal_path.write_text(json.dumps(kept))
        assert calibrate_main(args) == 0
        out = capsys.readouterr().out
        again = json.loads(cal_path.read_text())
        assert again["gate"]["threshold"] == 0.9731
        assert ("segmenter_changed" in again["gate"]) == stale == ("WARNING: its line-frame recall" in out)
        if stale:
            assert again["gate"]["segmenter_changed"]["now"] == seg_sha[:12] and "gate_strip measure" in out

    assert calibrate_main(args + ["--recalibrate-gate"]) == 0
    again = json.loads(cal_path.read_text())
    assert again["gate"]["threshold"] == own and again["gate"]["chosen_by"] == "images"

    # a line-frame section for another gate.onnx (its sha differs) is not this gate's: chosen anew
    doc["gate"] = dict(line_gate)
    doc["models"]["gate"] = "0" * 64
    cal_path.write_text(json.dumps(doc))
    assert calibrate_main(args) == 0
    assert json.loads(cal_path.read_text())["gate"]["threshold"] == own


def test_the_link_choice_keeps_only_cells_above_the_lowest_threshold_and_loses_nothing():
    from calibration.run import SparseProbs
    from engines.components import class_components

    rng = np.random.default_rng(5)
    probs = rng.random((3, 40, 60)).astype(np.float32) ** 4  # mostly small, as a clean frame's map
    kept = SparseProbs.of(probs, 0.1)
    assert kept.values.size == int((probs >= 0.1).sum()) < probs.size // 2
    back = kept.dense()
    assert back.shape == probs.shape and np.array_equal(back[probs >= 0.1], probs[probs >= 0.1])
    for t in (0.1, 0.35, 0.7):
        for link in (0, 8, 32):
            a = class_components(probs[1], t, 8, 4, (160, 240), link)[1]
            b = class_components(back[1], t, 8, 4, (160, 240), link)[1]
            assert [(c.bbox_px, c.area_px, c.peak) for c in a] == [(c.bbox_px, c.area_px, c.peak) for c in b]
            assert a  # the case compares something
