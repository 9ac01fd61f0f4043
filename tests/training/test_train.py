"""training/train.py on tiny synthetic data: losses fall, checkpoints are written and resumed."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from training.datasets import STEEL_CLASSES, Sample, mask_boxes  # noqa: E402
from training.synth import StripGenerator  # noqa: E402
from training.train import (  # noqa: E402
    TrainConfig, TrainError, augment, build_pools, gate_batch, pos_weight, seg_batch, seg_loss, seg_target, train,
    window,
)

CLEAN = {"size": 64, "stride": 64, "margin": 4, "max_per_image": 4}


def _samples(n: int, seed: int, h: int = 128, w: int = 192) -> list[Sample]:
    """Synthetic images with exact masks in the Sample form the readers give (half defective)."""
    gen = StripGenerator(w, h, seed=seed)
    out = []
    for i in range(n):
        img, masks = gen.frame(i, defective=i % 2 == 0)
        out.append(Sample(img, masks, mask_boxes(masks), masks.any(axis=(1, 2)).astype(np.float32),
                          STEEL_CLASSES, f"synth_{seed}_{i}.png"))
    return out


def test_pools_use_same_size_crops_and_weights():
    pools = build_pools(_samples(6, 0), STEEL_CLASSES, 64, CLEAN, np.random.default_rng(0))
    assert pools.gate_pos and pools.gate_neg
    assert all(img.shape == (64, 64) for img, _ in pools.gate_pos)
    assert all(img.shape == (64, 64) for img in pools.gate_neg)
    assert all(lab.any() for _, lab in pools.gate_pos)
    pw = pos_weight(pools)
    assert pw.shape == (len(STEEL_CLASSES),) and (pw >= 1).all() and (pw <= 20).all()


def test_window_pads_small_images_and_augment_moves_masks_with_pixels():
    img = np.arange(40 * 30, dtype=np.uint8).reshape(40, 30)
    masks = np.zeros((1, 40, 30), bool)
    masks[0, 5, 7] = True
    w_img, w_m = window(img, masks, 64, None)
    assert w_img.shape == (64, 64) and w_m.shape == (1, 64, 64) and w_m.sum() == 1
    rng = np.random.default_rng(3)
    marked = np.full((32, 32), 100, np.uint8)
    marked[4, 9] = 250
    m = np.zeros((1, 32, 32), bool)
    m[0, 4, 9] = True
    for _ in range(8):
        a_img, a_m = augment(marked, m, rng)
        assert a_img[a_m[0]][0] == a_img.max(), "the mask must follow the flipped pixel"


def test_a_few_steps_reduce_both_losses():
    torch.manual_seed(0)
    from training.nets import build_models

    rng = np.random.default_rng(0)
    pools = build_pools(_samples(8, 1), STEEL_CLASSES, 64, CLEAN, rng)
    gx, gy = gate_batch(pools, 32, 64, 0.0, rng, aug=False)
    sx, sm = seg_batch(pools, 4, 96, 0.0, rng, aug=False)
    gx, gy, sx, st = torch.as_tensor(gx), torch.as_tensor(gy), torch.as_tensor(sx), seg_target(sm)
    gate, seg = build_models(len(STEEL_CLASSES), config="tiny")
    bce = torch.nn.BCEWithLogitsLoss(pos_weight=torch.as_tensor(pos_weight(pools)))
    losses = {"gate": [], "seg": []}
    for model, loss_fn, x, y, key in ((gate, bce, gx, gy, "gate"), (seg, seg_loss, sx, st, "seg")):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(12):
            loss = loss_fn(model.logits(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[key].append(loss.item())
    assert losses["gate"][-1] < 0.8 * losses["gate"][0]
    assert losses["seg"][-1] < 0.9 * losses["seg"][0]


def _loader():
    data = {"train": _samples(8, 2), "val": _samples(4, 3)}
    return lambda split: data[split]


def test_train_writes_checkpoints_and_resumes(tmp_path):
    cfg = dict(profile="magnetic_tile", data_root=tmp_path, out=tmp_path / "run", seed=0, steps_per_epoch=2,
               gate_batch=8, seg_batch=2, model_size="tiny", progress=False, synthetic_fraction=0.0)
    data = {"train": [s for s in _samples(8, 2)], "val": _samples(4, 3)}
    meta = train(TrainConfig(epochs=2, **cfg), data_loader=lambda split: data[split])
    for name in ("last.pt", "best_gate.pt", "best_seg.pt", "meta.json"):
        assert (tmp_path / "run" / name).is_file()
    assert [row["epoch"] for row in meta["history"]] == [1, 2]
    assert json.loads((tmp_path / "run" / "meta.json").read_text())["classes"] == list(STEEL_CLASSES)
    meta = train(TrainConfig(epochs=3, **cfg), data_loader=lambda split: data[split])
    assert [row["epoch"] for row in meta["history"]] == [1, 2, 3], "the second run must resume at epoch 3"
    with pytest.raises(TrainError, match="checkpoint is for profile 'magnetic_tile' size 'tiny', not 'magnetic_tile' 'small'"):
        train(TrainConfig(epochs=4, **{**cfg, "model_size": "small"}), data_loader=lambda split: data[split])


def test_same_seed_same_weights(tmp_path):
    """With the steps-only schedule (clock_schedule=False) a seed reproduces the weights bit for bit."""
    data = {"train": _samples(6, 4), "val": _samples(3, 5)}
    states = []
    for run in ("a", "b"):
        train(TrainConfig(profile="kolektorsdd", data_root=tmp_path, out=tmp_path / run, epochs=1, steps_per_epoch=2,
                          gate_batch=8, seg_batch=2, model_size="tiny", progress=False, clock_schedule=False),
              data_loader=lambda split: data[split])
        states.append(torch.load(tmp_path / run / "best_seg.pt", weights_only=True))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_gate_only_run_takes_the_segmenter_from_another_run(tmp_path):
    """--seg-from trains the gate alone: the segmenter of the source run is copied unchanged and
    recorded; a source whose segmenter layers or data differ is refused."""
    data = {"train": _samples(6, 4), "val": _samples(3, 5)}
    load = lambda split: data[split]  # noqa: E731
    common = dict(profile="steel", data_root=tmp_path, epochs=1, steps_per_epoch=2, gate_batch=8, seg_batch=2,
                  progress=False, synthetic_fraction=0.0)
    train(TrainConfig(out=tmp_path / "medium", model_size="medium", **common), data_loader=load)
    meta = train(TrainConfig(out=tmp_path / "sep", model_size="sepgate", seg_from=tmp_path / "medium", **common),
                 data_loader=load)
    src = torch.load(tmp_path / "medium" / "best_seg.pt", weights_only=True)
    got = torch.load(tmp_path / "sep" / "best_seg.pt", weights_only=True)
    assert all(torch.equal(src[k], got[k]) for k in src)
    assert meta["seg_from"]["run"] == str(tmp_path / "medium") and meta["seg_from"]["model_size"] == "medium"
    assert meta["best"]["seg"]["val_loss"] == meta["seg_from"]["best"]["val_loss"]
    assert all(row["train_seg"] == 0.0 for row in meta["history"])  # no segmenter step was taken
    gate_weights = torch.load(tmp_path / "sep" / "best_gate.pt", weights_only=True)
    assert any("features.1.3" in k for k in gate_weights)  # the separable gate's pointwise conv
    with pytest.raises(TrainError, match="segmenter layers differ"):
        train(TrainConfig(out=tmp_path / "small", model_size="small", seg_from=tmp_path / "medium", **common),
              data_loader=load)
    with pytest.raises(TrainError, match="is this run's own --out"):
        train(TrainConfig(out=tmp_path / "medium", model_size="sepgate", seg_from=tmp_path / "medium", **common),
              data_loader=load)
    with pytest.raises(TrainError, match="needs meta.json and best_seg.pt"):
        train(TrainConfig(out=tmp_path / "x", model_size="sepgate", seg_from=tmp_path / "nowhere", **common),
              data_loader=load)
    other = {"train": _samples(6, 7), "val": _samples(3, 5)}
    with pytest.raises(TrainError, match="normalisation mean/std"):
        train(TrainConfig(out=tmp_path / "y", model_size="sepgate", seg_from=tmp_path / "medium", **common),
              data_loader=lambda split: other[split])


def test_bad_runs_are_refused(tmp_path):
    base = dict(data_root=tmp_path, out=tmp_path / "r", progress=False)
    with pytest.raises(TrainError, match="unknown profile 'wafer'"):
        train(TrainConfig(profile="wafer", **base))
    with pytest.raises(TrainError, match="synthetic fraction must be in"):
        train(TrainConfig(profile="steel", synthetic_fraction=1.5, **base))
    with pytest.raises(TrainError, match="the val split is empty"):
        train(TrainConfig(profile="steel", **base), data_loader=lambda split: _samples(2, 0) if split == "train" else [])
    with pytest.raises(TrainError, match="no images to train on"):
        build_pools([], STEEL_CLASSES, 64, CLEAN, np.random.default_rng(0))
