"""Train `training.wholeseg` on the fixed split (and export a pack) or k-fold cross-validated.

    python -m training.wholeseg_cv fixed --profile magnetic_tile --data-root DATA --out RUN --minutes 20
    python -m training.wholeseg_cv cv --profile kolektorsdd --data-root DATA --out RUN --folds 3 --minutes 4

fixed: train on the `train` split, choose the checkpoint on `val`, export the pack to RUN/pack
(gate.onnx = the frame scores of seg.onnx, same weights) and write RUN/result.json with the val
figures; the test split is read by `coilsight evaluate` afterwards, never here.
cv: folds over every image of the profile (train, val and test splits pooled), stratified by
defective / defect-free in sha1(stem) order; in each fold the training part loses every 6th image
(same order) to an inner validation set that picks the checkpoint and the pixel threshold; the
held-out fold is read once. RUN/cv.json holds per-fold and pooled figures (image ROC AUC and AP
over the pooled frame scores, Dice on defective images over the pooled images).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from training.wholeseg import (
    OUTPUT_STRIDE,
    FrameScores,
    Image,
    TrainSettings,
    WholeSeg,
    WholeSegConfig,
    best_threshold,
    metrics,
    predict,
    to_image,
    train,
)


def load_images(profile: str, root: str | Path, split: str = "all") -> tuple[list[Image], tuple[str, ...]]:
    from training.datasets import load_profile_dataset

    ds = load_profile_dataset(profile, root, split)
    return [to_image(s) for s in ds], tuple(ds.classes)


def _hash(stem: str) -> str:
    return hashlib.sha1(stem.encode()).hexdigest()


def folds(images: list[Image], k: int) -> list[int]:
    """Fold index per image: stratified by defective, round-robin in sha1(stem) order."""
    fold = [0] * len(images)
    for group in (True, False):
        idx = sorted((i for i, im in enumerate(images) if im.defective == group), key=lambda i: _hash(images[i].stem))
        for j, i in enumerate(idx):
            fold[i] = j % k
    return fold


def inner_split(images: list[Image], every: int = 6) -> tuple[list[Image], list[Image]]:
    """(train, val): every `every`-th image of each group in sha1 order goes to val."""
    tr, va = [], []
    for group in (True, False):
        idx = sorted((im for im in images if im.defective == group), key=lambda im: _hash(im.stem))
        for j, im in enumerate(idx):
            (va if j % every == every // 2 else tr).append(im)
    return tr, va


def norm_stats(images: list[Image]) -> tuple[float, float]:
    px = np.concatenate([im.image[::4, ::4].ravel() for im in images]).astype(np.float64) / 255.0
    return round(float(px.mean()), 4), round(float(px.std()), 4)


def export_pack(model: WholeSeg, out: Path, profile: str, classes: tuple[str, ...], mean: float, std: float,
                height: int, width: int, training: dict[str, Any]) -> dict[str, Any]:
    """gate.onnx (frame scores) + seg.onnx (probs, stride 2) + model.json, checked against torch."""
    from engines.modelpack import load_model_pack, pack_format, sha256_file
    from engines.portable import portable_tree
    from training.export import export_onnx, verify_onnx

    out.mkdir(parents=True, exist_ok=True)
    diffs = {}
    for role, graph, output in (("gate", FrameScores(model).eval(), "scores"), ("seg", model.eval(), "probs")):
        export_onnx(graph, out / f"{role}.onnx", output)
        diffs[role] = verify_onnx(graph, out / f"{role}.onnx", output)
    models = {
        "gate": {"file": "gate.onnx", "sha256": sha256_file(out / "gate.onnx"), "output": "scores",
                 "scores_from": "seg"},  # the agent may take these scores from one seg run
        "seg": {"file": "seg.onnx", "sha256": sha256_file(out / "seg.onnx"), "output": "probs",
                "output_stride": OUTPUT_STRIDE},
    }
    doc = {"format": pack_format(models), "profile": profile, "classes": list(classes),
           "input": {"channels": 1, "height": height, "width": width, "dtype": "uint8", "layout": "NCHW",
                     "mean": mean, "std": std},
           "models": models, "training": portable_tree(training)}
    (out / "model.json").write_text(json.dumps(doc, indent=1) + "\n")
    load_model_pack(out)
    return {"max_abs_diff": diffs}


NOMINAL = {"magnetic_tile": (256, 256), "kolektorsdd": (1280, 512)}
DATA = {"magnetic_tile": "Magnetic tile surface defects (magnetic_tile: mask PNG per image, 5 classes + MT_Free)",
        "kolektorsdd": "KolektorSDD (kolektorsdd: ~500x1250 grey images, YOLO polygons, 1 class)"}


def run_fixed(a) -> dict[str, Any]:
    import torch

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tr, classes = load_images(a.profile, a.data_root, "train")
    va, _ = load_images(a.profile, a.data_root, "val")
    mean, std = norm_stats(tr)
    init = None
    if a.init:  # continue a run: its weights (and so its normalisation), a fresh schedule
        init = torch.load(Path(a.init) / "final.pt", map_location="cpu", weights_only=True)
        prev = json.loads((Path(a.init) / "result.json").read_text())
        mean, std = prev.get("mean", mean), prev.get("std", std)  # older runs: the same norm_stats(train)
    s = TrainSettings(crop=a.crop, batch=a.batch, minutes=a.minutes, eval_every=a.eval_every, seed=a.seed,
                      lr=a.lr)
    model, info = train(tr, va, classes, mean, std, s, out, WholeSegConfig(), log=lambda m: print(m, flush=True),
                        init=init)
    preds = predict(model, va)
    thr = best_threshold(va, preds)
    result = {"profile": a.profile, "settings": vars(s), "threshold": thr, "mean": mean, "std": std,
              "continued_from": a.init and Path(a.init).name,
              "val": metrics(va, preds, thr, classes), **info}
    torch.save(model.state_dict(), out / "final.pt")
    h, w = NOMINAL[a.profile]
    cmd = (f"python -m training.wholeseg_cv fixed --profile {a.profile} --data-root $COILSIGHT_DATA_ROOT --out RUN "
           f"--minutes {a.minutes} --crop {a.crop} --batch {a.batch} --seed {a.seed}"
           + (f" --lr {a.lr} --init RUN0" if a.init else ""))
    training = {"data": f"{DATA[a.profile]} under $COILSIGHT_DATA_ROOT",
                "split": "training.datasets.assign_split: sha1(file stem)[0] < 51 test (never used), < 82 val "
                         "(checkpoint choice, calibration), else train",
                "command": cmd, "seed": a.seed, "minutes": info["minutes"], "steps": info["steps"],
                "best": {"seg": {k: info["best"][k] for k in ("step", "image_auc", "dice_pos")}},
                "model_size": "wholeseg", "model_config": WholeSegConfig().to_dict(),
                "architecture": "training/wholeseg.py WholeSeg: stride-2 binary defect + type head; "
                                "gate = its frame scores (FrameScores), same weights",
                "seg_crop": a.crop, "whole_images": True, "synthetic_fraction": 0.0}
    result["export"] = export_pack(model, out / "pack", a.profile, classes, mean, std, h, w, training)
    (out / "result.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(json.dumps(result["val"], default=float), flush=True)
    return result


def run_cv(a) -> dict[str, Any]:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    images, classes = load_images(a.profile, a.data_root, "all")
    fold = folds(images, a.folds)
    per_fold, pooled_imgs, pooled_preds, pooled_thr = [], [], [], []
    for f in range(a.folds):
        test = [im for im, g in zip(images, fold) if g == f]
        tr, va = inner_split([im for im, g in zip(images, fold) if g != f])
        mean, std = norm_stats(tr)
        s = TrainSettings(crop=a.crop, batch=a.batch, minutes=a.minutes, eval_every=a.eval_every, seed=a.seed + f,
                          lr=a.lr)
        model, info = train(tr, va, classes, mean, std, s, None, WholeSegConfig(),
                            log=lambda m, f=f: print(f"fold {f}: {m}", flush=True))
        thr = best_threshold(va, predict(model, va))
        preds = predict(model, test)
        m = metrics(test, preds, thr, classes)
        per_fold.append({"fold": f, "train": len(tr), "val": len(va), "threshold": thr, "test": m,
                         "steps": info["steps"], "minutes": info["minutes"], "best_step": info["best"]["step"]})
        print(f"fold {f}: test {json.dumps(m, default=float)}", flush=True)
        pooled_imgs += test
        # each fold's maps are thresholded at its own threshold: scale so 0.5 means that threshold
        pooled_preds += [(p * (0.5 / thr), sc) for p, sc in preds]
        pooled_thr.append(thr)
        (out / "cv.json").write_text(json.dumps({"per_fold": per_fold}, indent=1, default=float) + "\n")
    pooled = metrics(pooled_imgs, pooled_preds, 0.5, classes)
    result = {"profile": a.profile, "folds": a.folds, "minutes_per_fold": a.minutes, "crop": a.crop,
              "batch": a.batch, "pooled": pooled, "per_fold": per_fold,
              "note": "image AUC/AP over the pooled frame scores of all held-out folds; Dice on defective images "
                      "at each fold's threshold (chosen on its inner val)"}
    (out / "cv.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"pooled: {json.dumps(pooled, default=float)}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(prog="python -m training.wholeseg_cv", description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=("fixed", "cv"))
    p.add_argument("--profile", required=True, choices=sorted(NOMINAL))
    p.add_argument("--data-root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--minutes", type=float, default=10.0, help="per run (per fold in cv)")
    p.add_argument("--crop", type=int, default=192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--init", help="fixed: continue from this earlier fixed run's folder (final.pt, result.json)")
    a = p.parse_args(argv)
    if a.crop % 8 or a.crop < 32:
        p.error(f"--crop {a.crop}: expected a multiple of 8, >= 32")
    if a.folds < 2:
        p.error(f"--folds {a.folds}: expected >= 2")
    torch.set_num_threads(a.threads)
    (run_fixed if a.mode == "fixed" else run_cv)(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
