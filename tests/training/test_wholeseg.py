"""training.wholeseg / wholeseg_cv: the stride-2 whole-image inspector of magnetic tile and KolektorSDD."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from training.wholeseg import (  # noqa: E402
    OUTPUT_STRIDE,
    FrameScores,
    Image,
    TrainSettings,
    WholeSeg,
    average_precision,
    batch,
    best_threshold,
    frame_scores,
    metrics,
    predict,
    roc_auc,
    train,
)
from training.wholeseg_cv import export_pack, folds, inner_split  # noqa: E402


def _image(stem: str, k: int = 2, hole: tuple[int, int] | None = None, cls: int = 0, hw=(40, 56)) -> Image:
    rng = np.random.default_rng(abs(hash(stem)) % 1000)
    im = rng.integers(90, 110, size=hw, dtype=np.uint8)
    defect = np.zeros(hw, bool)
    if hole is not None:
        y, x = hole
        defect[y:y + 3, x:x + 3] = True  # a 3x3 px hole: what stride 4 lost
        im[defect] = 20
    types = np.where(defect, cls, -1).astype(np.int8)
    present = np.zeros(k, bool)
    if hole is not None:
        present[cls] = True
    return Image(stem, im, defect, types, hole is not None, present)


def test_probs_are_stride_2_and_split_the_defect_probability_by_type():
    torch.manual_seed(0)
    m = WholeSeg(3, 0.4, 0.2).eval()
    x = torch.randint(0, 256, (2, 1, 48, 64), dtype=torch.uint8)
    with torch.no_grad():
        p = m(x)
        r = m.raw(x)
    assert p.shape == (2, 3, 48 // OUTPUT_STRIDE, 64 // OUTPUT_STRIDE)
    torch.testing.assert_close(p.sum(1, keepdim=True), torch.sigmoid(r[:, :1]))
    one = WholeSeg(1, 0.4, 0.2).eval()
    assert one.head.out_channels == 1 and one(x).shape == (2, 1, 24, 32)


def test_frame_score_is_the_max_of_a_3x3_mean_so_one_hot_cell_does_not_make_a_frame():
    p = torch.zeros(1, 2, 8, 8)
    p[0, 0, 4, 4] = 0.9  # a single cell
    p[0, 1, 1:4, 1:4] = 0.6  # a 3x3 blob
    s = frame_scores(p)[0]
    assert s[0].item() == pytest.approx(0.9 / 9, rel=1e-5)  # interior cell: mean over 9
    assert s[1].item() == pytest.approx(0.6, rel=1e-5)
    m = WholeSeg(2, 0.4, 0.2).eval()
    x = torch.randint(0, 256, (1, 1, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(FrameScores(m)(x), frame_scores(m(x)))


def test_batch_targets_keep_a_3px_hole_at_stride_2():
    img = _image("a", hole=(20, 30), cls=1)
    rng = np.random.default_rng(0)
    x, d, t, defective = batch([img], 6, 32, rng, on_defect=1.0)
    assert x.dtype == torch.uint8 and x.shape == (6, 1, 32, 32)
    assert d.shape == (6, 1, 16, 16) and t.shape == (6, 16, 16)
    assert defective.tolist() == [1.0] * 6  # every window was placed on the hole
    for i in range(6):
        cells = d[i, 0] > 0
        assert 2 <= int(cells.sum()) <= 4  # 3x3 px touch 2x2 .. 2x2+ cells of 2x2 px
        assert set(t[i][cells].tolist()) == {1} and set(t[i][~cells].tolist()) == {-1}
        assert float(d[i].sum()) * 4 == pytest.approx(9.0)  # mask pixels conserved
    small = Image("s", np.full((10, 12), 5, np.uint8), np.zeros((10, 12), bool), np.full((10, 12), -1, np.int8),
                  False, np.zeros(2, bool))
    x, d, _, defective = batch([small], 2, 16, rng)  # smaller than the window: edge-padded
    assert x.shape == (2, 1, 16, 16) and not d.any() and not defective.any()


def test_ranking_figures_on_hand_made_scores():
    labels = np.array([True, True, False, False])
    assert roc_auc(np.array([0.9, 0.8, 0.1, 0.2]), labels) == 1.0
    assert roc_auc(np.array([0.1, 0.8, 0.9, 0.2]), labels) == 0.25
    assert average_precision(np.array([0.9, 0.1, 0.8, 0.2]), labels) == pytest.approx((1 + 2 / 4) / 2)
    imgs = [_image("p", hole=(10, 10)), _image("n")]
    truth = np.zeros((2, 40, 56), np.float32)
    truth[0][imgs[0].defect] = 0.9
    m = metrics(imgs, [(truth, 0.9), (np.zeros_like(truth), 0.1)], 0.5, ("blowhole", "crack"))
    assert m["dice_pos"] == 1.0 and m["image_auc"] == 1.0
    assert m["dice_pos_by_class"] == {"blowhole": 1.0, "crack": None}
    half = truth * (0.35 / 0.9)
    assert best_threshold(imgs, [(half, 0.35), (np.zeros_like(truth), 0.1)]) == 0.3  # the only one that finds it


def test_folds_are_stratified_and_the_inner_val_is_disjoint():
    imgs = [_image(f"d{i}", hole=(5, 5)) for i in range(9)] + [_image(f"c{i}") for i in range(12)]
    f = folds(imgs, 3)
    for g in range(3):
        held = [im for im, k in zip(imgs, f) if k == g]
        assert sum(im.defective for im in held) == 3 and len(held) == 7
    tr, va = inner_split(imgs, every=6)
    assert {im.stem for im in tr}.isdisjoint({im.stem for im in va}) and len(tr) + len(va) == len(imgs)
    assert any(im.defective for im in va) and any(not im.defective for im in va)


def test_a_few_steps_train_and_the_pack_exports_with_its_gate_made_of_the_segmenter(tmp_path):
    """Train 4 steps, export: gate.onnx's scores are seg.onnx's frame scores (ONNX Runtime), the pack
    loads with output stride 2, and predict() gives full-size maps."""
    import onnxruntime as ort

    from engines.modelpack import load_model_pack

    torch.set_num_threads(1)
    imgs = [_image(f"d{i}", hole=(8 + i, 12 + 2 * i), cls=i % 2) for i in range(4)] + [_image(f"c{i}") for i in range(3)]
    model, info = train(imgs, imgs[:2] + imgs[-2:], ("blowhole", "crack"), 0.4, 0.2,
                        TrainSettings(crop=32, batch=2, minutes=5, max_steps=4, eval_every=2), tmp_path)
    assert info["steps"] == 4 and [h["step"] for h in info["history"]] == [2, 4] and (tmp_path / "best.pt").is_file()
    preds = predict(model, imgs[:1])
    assert preds[0][0].shape == (2, 40, 56)
    res = export_pack(model, tmp_path / "pack", "magnetic_tile", ("blowhole", "crack"), 0.4, 0.2, 256, 256,
                      {"command": "test"})
    assert max(res["max_abs_diff"].values()) < 1e-4
    pack = load_model_pack(tmp_path / "pack")
    assert pack.models["seg"].output_stride == 2 and pack.meta["format"] == 2
    x = np.random.default_rng(1).integers(0, 256, (2, 1, 64, 80), dtype=np.uint8)
    gate = ort.InferenceSession(str(pack.models["gate"].path), providers=["CPUExecutionProvider"])
    seg = ort.InferenceSession(str(pack.models["seg"].path), providers=["CPUExecutionProvider"])
    scores = gate.run(["scores"], {"image": x})[0]
    probs = seg.run(["probs"], {"image": x})[0]
    assert probs.shape == (2, 2, 32, 40)
    np.testing.assert_allclose(scores, frame_scores(torch.from_numpy(probs)).numpy(), atol=1e-5)
    # the pack tells the agent it may take the gate's scores from one seg run (the agent's numpy rule)
    from engines.postprocess import frame_scores as runtime_frame_scores

    assert pack.gate.scores_from == "seg"
    np.testing.assert_allclose(scores, np.stack([runtime_frame_scores(p) for p in probs]), atol=1e-5)
