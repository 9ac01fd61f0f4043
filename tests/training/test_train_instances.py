"""training/train_instances.py on tiny data: targets, losses that fall, checkpoints, resume, decode."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from training.datasets import STEEL_CLASSES, Box, Sample  # noqa: E402
from training.strip import RealisticStripGenerator  # noqa: E402
from training.train_instances import (  # noqa: E402
    CanvasSource, InstanceTrainConfig, InstanceTrainError, batch_targets, decode, focal_loss, instance_loss,
    instance_targets, train_instances,
)


def _samples(n: int, seed: int, h: int = 128, w: int = 160) -> list[Sample]:
    gen = RealisticStripGenerator(w, h, seed=seed, small_rate=0.0, stains_per_frame=0.5)
    out = []
    for i in range(n):
        f = gen.frame(i, defective=True)
        out.append(Sample(f.image, None, f.boxes, f.masks.any(axis=(1, 2)).astype(np.float32), STEEL_CLASSES,
                          f"strip_{seed}_{i}.png"))
    return out


def test_targets_put_one_peak_with_size_and_offset_at_each_centre():
    boxes = [Box(1, 10, 20, 50, 36), Box(0, 100, 4, 104, 8)]
    t = instance_targets(boxes, 64, 128, 2)
    assert t["heatmap"].shape == (2, 16, 32) and t["size"].shape == t["offset"].shape == (2, 16, 32)
    # box 1: centre (30, 28) px -> cell (i=7, j=7), offset (0.5, 0.0)
    assert t["heatmap"][1, 7, 7] == 1.0 and (t["heatmap"][1] == 1.0).sum() == 1
    assert tuple(t["size"][:, 7, 7]) == (40.0, 16.0)
    assert np.allclose(t["offset"][:, 7, 7], (0.5, 0.0))
    assert t["heatmap"][1, 7, 9] < 1.0 and t["heatmap"][1, 7, 9] > t["heatmap"][1, 7, 12], "a Gaussian around it"
    assert t["heatmap"][0, 1, 25] == 1.0 and t["heatmap"][0, 7, 7] < 1e-3, "classes do not mix"
    assert t["weight"].sum() == 2
    # decoding the targets themselves gives the boxes back
    got = decode(t["heatmap"], t["size"], t["offset"], 0.5, 10, 4, (64, 128))
    assert sorted((b.cls, b.x0, b.y0, b.x1, b.y1) for b, _ in got) == [(0, 100, 4, 104, 8), (1, 10, 20, 50, 36)]


def test_focal_loss_is_low_for_the_target_and_high_for_its_opposite():
    t = torch.from_numpy(instance_targets([Box(0, 8, 8, 24, 24)], 32, 32, 1)["heatmap"])[None]
    good = torch.logit(t.clamp(1e-4, 1 - 1e-4))
    assert float(focal_loss(good, t)) < 0.05 and float(focal_loss(-good, t)) > 1.0


def test_canvases_hold_whole_images_and_never_cut_a_box():
    samples = _samples(6, 0)
    src = CanvasSource(samples, STEEL_CLASSES, (256, 512), 0.5, (0.8, 1.25), 4, 0)
    rng = np.random.default_rng(0)
    for _ in range(10):
        img, boxes = src.draw(rng)
        assert img.shape == (256, 512) and img.dtype == np.float32
        for b in boxes:
            assert 0 <= b.x0 < b.x1 <= 512 and 0 <= b.y0 < b.y1 <= 256
    xs, tg = batch_targets([src.draw(rng) for _ in range(3)], len(STEEL_CLASSES))
    assert xs.shape == (3, 1, 256, 512) and tg["probs"].shape == (3, 6, 64, 128) and tg["heatmap"].shape == (3, 6, 64, 128)


def test_a_few_steps_reduce_the_loss():
    from training.nets import build_instance_model

    torch.manual_seed(0)
    src = CanvasSource(_samples(4, 1), STEEL_CLASSES, (128, 256), 0.0, (1.0, 1.0), 0, 0)
    xs, tg = batch_targets([src.draw(np.random.default_rng(i)) for i in range(2)], len(STEEL_CLASSES))
    tg = {k: torch.from_numpy(v) for k, v in tg.items()}
    model = build_instance_model(len(STEEL_CLASSES), config="test")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = instance_loss(model.raw(torch.from_numpy(xs)), tg)
        opt.zero_grad()
        loss["total"].backward()
        opt.step()
        losses.append({k: float(v.detach()) for k, v in loss.items()})
    assert losses[-1]["total"] < 0.5 * losses[0]["total"]
    assert losses[-1]["heatmap"] < losses[0]["heatmap"] and losses[-1]["size"] < losses[0]["size"]


def _cfg(tmp_path, **kw):
    base = dict(profile="steel", data_root=tmp_path, out=tmp_path / "run", model_size="test", steps_per_epoch=2,
                batch=2, canvas=(128, 256), strip_frames=2, progress=False, max_minutes=30.0)
    return InstanceTrainConfig(**{**base, **kw})


def test_training_writes_checkpoints_chooses_by_val_map_and_resumes(tmp_path):
    data = {"train": _samples(4, 2), "val": _samples(2, 3)}
    meta = train_instances(_cfg(tmp_path, epochs=2), data_loader=lambda split: data[split])
    run = tmp_path / "run"
    for name in ("last.pt", "best.pt", "meta.json"):
        assert (run / name).is_file()
    assert [r["epoch"] for r in meta["history"]] == [1, 2]
    assert all(r["val_map50"] is not None for r in meta["history"])
    best = max(meta["history"], key=lambda r: r["val_map50"])
    assert meta["best"]["val_map50"] == best["val_map50"], "best.pt is the epoch of the best val mAP"
    assert json.loads((run / "meta.json").read_text())["kind"] == "instances"
    meta = train_instances(_cfg(tmp_path, epochs=3), data_loader=lambda split: data[split])
    assert [r["epoch"] for r in meta["history"]] == [1, 2, 3], "the second run resumes at epoch 3"
    with pytest.raises(InstanceTrainError, match="checkpoint is for profile 'steel' size 'test', not 'steel' 'edge'"):
        train_instances(_cfg(tmp_path, epochs=4, model_size="edge"), data_loader=lambda split: data[split])


def test_bad_runs_are_refused(tmp_path):
    data = {"train": _samples(2, 2), "val": []}
    with pytest.raises(InstanceTrainError, match="splits must both hold images"):
        train_instances(_cfg(tmp_path, epochs=1), data_loader=lambda split: data[split])
    with pytest.raises(InstanceTrainError, match="must be multiples of 16"):
        train_instances(_cfg(tmp_path, canvas=(100, 256)), data_loader=lambda split: data[split])
    with pytest.raises(InstanceTrainError, match="unknown instance model size"):
        train_instances(_cfg(tmp_path, model_size="huge"), data_loader=lambda split: data[split])


def test_whole_batches_are_whole_images_resized_with_their_boxes():
    samples = _samples(3, 4, h=100, w=120)
    src = CanvasSource(samples, STEEL_CLASSES, (128, 256), 0.0, (1.0, 1.0), 0, 0)
    items = src.whole(np.random.default_rng(0), 5, 64)
    assert len(items) == 5
    n_boxes = sorted(len(s.boxes) for s in samples)
    for img, boxes in items:
        assert img.shape == (64, 64) and img.dtype == np.float32
        assert len(boxes) in n_boxes, "every box of the image comes along, none cut"
        for b in boxes:
            assert 0 <= b.x0 < b.x1 <= 64 and 0 <= b.y0 < b.y1 <= 64
    # boxes scale with the image: a box covering the whole source image covers the whole item
    whole = Sample(samples[0].image, None, [Box(2, 0, 0, 120, 100)], samples[0].labels, STEEL_CLASSES, "w.png")
    img, boxes = CanvasSource([whole], STEEL_CLASSES, (128, 256), 0.0, (1.0, 1.0), 0, 0).whole(
        np.random.default_rng(1), 1, 48)[0]
    assert [(b.cls, b.x0, b.y0, b.x1, b.y1) for b in boxes] == [(2, 0.0, 0.0, 48.0, 48.0)]


def test_gaussian_alpha_narrows_the_heatmap_but_keeps_the_peak():
    boxes = [Box(0, 0, 0, 96, 96)]
    wide = instance_targets(boxes, 128, 128, 1, alpha=1.0)["heatmap"][0]
    narrow = instance_targets(boxes, 128, 128, 1, alpha=0.5)["heatmap"][0]
    assert wide[12, 12] == narrow[12, 12] == 1.0
    assert narrow[12, 18] < wide[12, 18] * 0.6, "half the sigma: the tail falls much faster"
    assert (narrow > 0.5).sum() < (wide > 0.5).sum() / 3


def test_seg_weight_scales_only_the_seg_term():
    src = CanvasSource(_samples(2, 5), STEEL_CLASSES, (128, 256), 0.0, (1.0, 1.0), 0, 0)
    xs, tg = batch_targets([src.draw(np.random.default_rng(0))], len(STEEL_CLASSES))
    tg = {k: torch.from_numpy(v) for k, v in tg.items()}
    from training.nets import build_instance_model

    torch.manual_seed(0)
    with torch.no_grad():
        raw = build_instance_model(len(STEEL_CLASSES), config="test").raw(torch.from_numpy(xs))
    full, none = instance_loss(raw, tg, 1.0), instance_loss(raw, tg, 0.0)
    assert float(none["total"]) == pytest.approx(float(none["heatmap"] + none["size"] + none["offset"]))
    assert float(full["total"] - none["total"]) == pytest.approx(float(full["seg"]), rel=1e-5)


def test_a_run_on_whole_batches_trains_and_records_its_settings(tmp_path):
    data = {"train": _samples(4, 6), "val": _samples(2, 7)}
    meta = train_instances(_cfg(tmp_path, epochs=1, whole_fraction=1.0, whole_batch=3, whole_sides=(64,),
                                gaussian_alpha=0.54, seg_weight=0.5), data_loader=lambda split: data[split])
    assert meta["config"]["whole_fraction"] == 1.0 and meta["config"]["gaussian_alpha"] == 0.54
    assert meta["history"][0]["train_total"] > 0
    with pytest.raises(InstanceTrainError, match="whole sides"):
        train_instances(_cfg(tmp_path, whole_sides=(100,)), data_loader=lambda split: data[split])
    with pytest.raises(InstanceTrainError, match="gaussian alpha"):
        train_instances(_cfg(tmp_path, gaussian_alpha=0.0), data_loader=lambda split: data[split])


def test_synth_frames_join_the_strip_pools_with_their_painted_boxes():
    from training.synth import StripGenerator
    from training.train_instances import SYNTH_SEED

    base = CanvasSource(_samples(2, 8), STEEL_CLASSES, (128, 256), 1.0, (1.0, 1.0), 0, 3)
    src = CanvasSource(_samples(2, 8), STEEL_CLASSES, (128, 256), 1.0, (1.0, 1.0), 0, 3, synth_frames=4)
    assert (len(base.clean), len(base.defective)) == (0, 0)
    assert len(src.clean) == 2 and len(src.defective) == 2
    _, _, painted = StripGenerator(width=1600, height=128, seed=SYNTH_SEED + 3).frame_with_instances(1, True)
    assert [(b.cls, b.x0, b.y0, b.x1, b.y1) for b in src.defective[0].boxes] == [tuple(map(float, p)) for p in painted]
    assert painted and src.defective[0].image.shape == (128, 1600)
    rng = np.random.default_rng(0)
    for _ in range(6):  # synthetic fraction 1: windows of those frames, no box cut
        img, boxes = src.draw(rng)
        assert img.shape == (128, 256)
        for b in boxes:
            assert 0 <= b.x0 < b.x1 <= 256 and 0 <= b.y0 < b.y1 <= 128



STEEL_PACK = Path(__file__).resolve().parents[2] / "engines" / "models" / "steel"


def _tiny_pack(tmp_path, data) -> Path:
    """A real instance pack: a tiny run trained one epoch, exported (and checked against torch) by
    training.export, with the shipped steel gate beside it."""
    from training.export import export_instance_pack

    train_instances(_cfg(tmp_path, epochs=1, out=tmp_path / "first"), data_loader=lambda split: data[split])
    export_instance_pack(tmp_path / "first", tmp_path / "pack", gate_from=STEEL_PACK)
    return tmp_path / "pack"


def test_init_from_a_pack_starts_where_its_graph_is(tmp_path):
    import onnxruntime as ort

    from training.nets import build_instance_model
    from training.train_instances import init_normalisation, load_init

    data = {"train": _samples(4, 2), "val": _samples(2, 3)}
    pack = _tiny_pack(tmp_path, data)
    mean, std = init_normalisation(pack)
    spec = json.loads((pack / "model.json").read_text())
    assert (mean, std) == (spec["input"]["mean"], spec["input"]["std"])
    torch.manual_seed(7)  # other random weights than the run's
    model = build_instance_model(len(STEEL_CLASSES), 1, mean, std, "test")
    x = np.stack([s.image for s in data["val"]])[:, None]
    sess = ort.InferenceSession(str(pack / "seg.onnx"), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"image": x})
    with torch.no_grad():
        before = [t.numpy() for t in model.eval()(torch.from_numpy(x))]
    assert np.abs(before[1] - want[1]).max() > 1e-3, "a fresh net differs from the pack"
    got_meta = load_init(model, pack, STEEL_CLASSES, x)
    assert got_meta["kind"] == "pack" and got_meta["max_abs_diff"] < 1e-4
    with torch.no_grad():
        after = [t.numpy() for t in model.eval()(torch.from_numpy(x))]
    for name, a, b in zip(("probs", "heatmap", "size", "offset"), after, want):
        tol = 1e-3 * max(1.0, float(np.abs(b).max()))
        assert np.abs(a - b).max() < tol, name

    # through a run: it records where it started, and its first val is the pack's, not a fresh net's
    meta = train_instances(_cfg(tmp_path, epochs=1, out=tmp_path / "cont", init=pack, lr=1e-9),
                           data_loader=lambda split: data[split])
    assert meta["init"]["kind"] == "pack" and meta["init"]["sha256"] == spec["models"]["seg"]["sha256"]
    assert (meta["mean"], meta["std"]) == (mean, std)
    kept = torch.load(tmp_path / "cont" / "best.pt", weights_only=True)  # lr 1e-9: the weights stay the loaded ones
    loaded = model.state_dict()
    convs = [k for k, v in loaded.items() if k.endswith(".weight") and v.ndim == 4]
    assert convs and all(torch.allclose(kept[k], loaded[k], atol=1e-5) for k in convs)
    # a folder that holds last.pt resumes; --init no longer applies
    meta = train_instances(_cfg(tmp_path, epochs=2, out=tmp_path / "cont", init=tmp_path / "nowhere"),
                           data_loader=lambda split: data[split])
    assert [r["epoch"] for r in meta["history"]] == [1, 2] and meta["init"] is None

    # from a run folder (best.pt)
    model2 = build_instance_model(len(STEEL_CLASSES), 1, mean, std, "test")
    assert load_init(model2, tmp_path / "first", STEEL_CLASSES, x)["kind"] == "run"
    best = torch.load(tmp_path / "first" / "best.pt", weights_only=True)
    assert all(torch.equal(v, best[k]) for k, v in model2.state_dict().items())


def test_init_refuses_what_does_not_fit(tmp_path):
    from training.nets import build_instance_model
    from training.train_instances import load_init

    data = {"train": _samples(4, 2), "val": _samples(2, 3)}
    pack = _tiny_pack(tmp_path, data)
    x = np.stack([s.image for s in data["val"]])[:, None]
    model = build_instance_model(len(STEEL_CLASSES), 1, 0.5, 0.25, "test")
    with pytest.raises(InstanceTrainError, match="are not the data's"):
        load_init(model, pack, ["a", "b", "c", "d", "e", "f"], x)
    with pytest.raises(InstanceTrainError, match="not this run's"):
        load_init(build_instance_model(len(STEEL_CLASSES), 1, 0.5, 0.25, "edge"), pack, STEEL_CLASSES, x)
    # a pack written before InstanceConfig had `trunk` (the shipped steel pack) is the same net as "own"
    doc = json.loads((pack / "model.json").read_text())
    assert doc["training"]["model_config"].pop("trunk") == "own"
    (pack / "model.json").write_text(json.dumps(doc))
    from training.train_instances import init_normalisation

    mean, std = init_normalisation(pack)
    assert load_init(build_instance_model(len(STEEL_CLASSES), 1, mean, std, "test"), pack, STEEL_CLASSES, x)["kind"] == "pack"
    with pytest.raises(InstanceTrainError, match="not this run's"):
        load_init(build_instance_model(len(STEEL_CLASSES), 1, 0.5, 0.25, "line_lite0"), pack, STEEL_CLASSES, x)
    doc = json.loads((pack / "model.json").read_text())
    del doc["models"]["seg"]["instances"]
    (pack / "model.json").write_text(json.dumps(doc))
    with pytest.raises(InstanceTrainError, match="no instance outputs"):
        load_init(model, pack, STEEL_CLASSES, x)
    with pytest.raises(InstanceTrainError, match="neither a pack folder"):
        load_init(model, tmp_path, STEEL_CLASSES, x)
    with pytest.raises(InstanceTrainError, match="neither a pack folder"):
        train_instances(_cfg(tmp_path, epochs=1, out=tmp_path / "x", init=tmp_path / "nowhere"),
                        data_loader=lambda split: data[split])
