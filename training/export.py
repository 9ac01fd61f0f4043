"""Export a training run to a model pack: gate.onnx, seg.onnx and model.json (the contract in
docs/architecture.md), checked against torch before anything is written as shipped.

ONNX opset 17, input `image` uint8 [N, C, H, W] with N, H and W dynamic; outputs `scores`
[N, K] and `probs` [N, K, H/4, W/4]. Exported in eval mode, so BatchNorm is folded into the
convolutions. The ONNX Runtime output must match torch within `MAX_ABS_DIFF` on random uint8
frames at two sizes, else `ExportError`; the written pack must load with
`engines.modelpack.load_model_pack`.

A gate that starts with a k x k average pool is exported without it (`PrePooledGate`): its
`image` input is the frame already pooled on uint8 (`engines.modelpack.pool_frames`), which is
what model.json's `input_pool: k` tells every runner. That skips a Cast and a pool over the full
frame in the graph (docs/models.md measures the gain); `pool_in_graph=True` keeps the old form.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from engines.modelpack import MODEL_PACK_FORMAT, load_model_pack, pack_format, sha256_file
from engines.packs import tier_of_model_size
from engines.portable import portable_tree

OPSET = 17
MAX_ABS_DIFF = 1e-4
# A pack without an instance head is written as the lowest format that holds it (engines.modelpack.
# pack_format: 2 with input_pool), so agents that read formats 1-2 still load it; instance packs are
# format 3 (export_instance_pack).
INSTANCE_PACK_FORMAT = 3


class ExportError(RuntimeError):
    """The checkpoint cannot be exported, or the exported graph does not match torch."""


def load_run(checkpoint: str | Path):
    """(meta, gate, seg) from a training folder: meta.json plus best_gate.pt / best_seg.pt."""
    import torch

    from training.nets import ModelConfig, build_models
    from training.train import META_FILE

    checkpoint = Path(checkpoint)
    meta_path = checkpoint / META_FILE
    if not meta_path.is_file():
        raise ExportError(f"{checkpoint}: no {META_FILE}; is this the --out folder of `coilsight train`?")
    meta = json.loads(meta_path.read_text())
    for key in ("profile", "classes", "mean", "std", "model_config"):
        if key not in meta:
            raise ExportError(f"{meta_path}: missing key {key!r}")
    gate, seg = build_models(len(meta["classes"]), 1, meta["mean"], meta["std"],
                             ModelConfig.from_dict(meta["model_config"]))
    for role, model in (("gate", gate), ("seg", seg)):
        path = checkpoint / f"best_{role}.pt"
        if not path.is_file():
            raise ExportError(f"{checkpoint}: no best_{role}.pt")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.eval()
    return meta, gate, seg


def export_onnx(model, path: Path, output: str, channels: int = 1, height: int = 64, width: int = 96) -> None:
    import torch

    dummy = torch.randint(0, 256, (2, channels, height, width), dtype=torch.uint8)
    axes = {"image": {0: "N", 2: "H", 3: "W"}, output: {0: "N"}}
    if output == "probs":
        axes[output].update({2: "H_out", 3: "W_out"})
    model.eval()
    # the TorchScript exporter (dynamo=False) folds BatchNorm into Conv in eval mode; torch warns
    # that it is deprecated, which is noise for every export
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (dummy,), str(path), input_names=["image"], output_names=[output],
                          opset_version=OPSET, dynamic_axes=axes, do_constant_folding=True, dynamo=False)


def verify_onnx(model, path: Path, output: str, shapes=((2, 1, 64, 96), (1, 1, 256, 320)), seed: int = 0) -> float:
    """Largest |torch - ONNX Runtime| over random uint8 inputs; ExportError if >= MAX_ABS_DIFF."""
    import onnx
    import onnxruntime as ort
    import torch

    onnx.checker.check_model(onnx.load(str(path)))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = ([i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()])
    if names != (["image"], [output]):
        raise ExportError(f"{path.name}: graph has inputs/outputs {names}, expected (['image'], [{output!r}])")
    rng = np.random.default_rng(seed)
    worst = 0.0
    for shape in shapes:
        x = rng.integers(0, 256, size=shape, dtype=np.uint8)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        got = sess.run([output], {"image": x})[0]
        if got.shape != ref.shape:
            raise ExportError(f"{path.name}: ONNX Runtime output shape {got.shape} != torch {ref.shape} for input {shape}")
        worst = max(worst, float(np.max(np.abs(got - ref))))
    if not worst < MAX_ABS_DIFF:
        raise ExportError(f"{path.name}: ONNX Runtime differs from torch by {worst:.3g} (limit {MAX_ABS_DIFF})")
    return worst


DATA_DESCRIPTIONS = {
    "steel": "NEU-DET (neu_det: 1,800 200x200 grey images, 6 classes, Pascal VOC boxes; no defect-free images)",
    "magnetic_tile": "Magnetic tile surface defects (magnetic_tile: mask PNG per image, 5 classes + MT_Free)",
    "kolektorsdd": "KolektorSDD (kolektorsdd: ~500x1250 grey images, YOLO polygons, 1 class)",
}


def _data_description(meta: dict[str, Any]) -> str:
    what = DATA_DESCRIPTIONS.get(meta["profile"], meta["profile"])
    extra = f"; plus synthetic strips (training.synth) as {meta['synthetic_fraction']:.0%} of batches" \
        if meta.get("synthetic_fraction") else ""
    return f"{what} under {meta.get('data', '?')}{extra}"


def model_json(meta: dict[str, Any], gate_path: Path, seg_path: Path, height: int, width: int,
               gate_input_pool: int = 1) -> dict[str, Any]:
    """model.json for the pack (format per docs/architecture.md)."""
    from training.nets import OUTPUT_STRIDE

    doc = {
        "format": MODEL_PACK_FORMAT,  # lowered below to the lowest that holds the models (pack_format)
        "profile": meta["profile"],
        "classes": list(meta["classes"]),
        "input": {"channels": 1, "height": height, "width": width, "dtype": "uint8", "layout": "NCHW",
                  "mean": meta["mean"], "std": meta["std"]},
        "models": {
            "gate": {"file": gate_path.name, "sha256": sha256_file(gate_path), "output": "scores"},
            "seg": {"file": seg_path.name, "sha256": sha256_file(seg_path), "output": "probs",
                    "output_stride": OUTPUT_STRIDE},
        },
        "training": {
            "data": _data_description(meta),
            "split": "training.datasets.assign_split: sha1(file stem)[0] < 51 test (never used), < 82 val "
                     "(early stopping, calibration), else train",
            "command": meta.get("command", ""),
            "seed": meta.get("seed", 0),
            "minutes": meta.get("minutes"),
            "epochs_run": len(meta.get("history", [])),
            "best": meta.get("best", {}),
            "model_size": meta.get("model_size"),
            "model_config": meta.get("model_config"),
            "synthetic_fraction": meta.get("synthetic_fraction", 0.0),
            "gate_crop": meta.get("gate_crop"),
            "seg_crop": meta.get("seg_crop"),
            "clean_crops": meta.get("clean_crops"),
        },
    }
    if gate_input_pool > 1:
        doc["models"]["gate"]["input_pool"] = gate_input_pool
    doc["format"] = pack_format(doc["models"])
    if meta.get("seg_from"):  # a gate-only run: the segmenter is another run's, named here
        doc["training"]["seg_from"] = meta["seg_from"]
    return doc


def export_pack(checkpoint: str | Path, out: str | Path, profile: str | None = None,
                height: int | None = None, width: int | None = None, pool_in_graph: bool = False) -> dict[str, Any]:
    """Export both models of a training run into `out`; returns model.json's content plus `max_abs_diff`
    (and, for a gate exported without its pool, `pool_rounding`: the largest gate score change that
    rounding the pooled pixels to uint8 makes on random frames, for the record)."""
    from training.nets import PrePooledGate
    from training.train import PROFILE_TRAINING

    meta, gate, seg = load_run(checkpoint)
    if profile is not None and profile != meta["profile"]:
        raise ExportError(f"{checkpoint}: the run trained profile {meta['profile']!r}, not {profile!r}")
    prof = PROFILE_TRAINING.get(meta["profile"])
    height = height or (prof.height if prof else None)
    width = width or (prof.width if prof else None)
    if not height or not width or height % 8 or width % 8:
        raise ExportError(f"input height {height} and width {width} must be set and multiples of 8")
    pool = 1 if pool_in_graph else gate.pool_size
    if height % pool or width % pool:
        raise ExportError(f"the gate's {pool}x{pool} pool does not divide the {height}x{width} input")
    gate_graph = PrePooledGate(gate).eval() if pool > 1 else gate
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    diffs = {}
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tmp = Path(tmp)
        for role, model, output in (("gate", gate_graph, "scores"), ("seg", seg, "probs")):
            path = tmp / f"{role}.onnx"
            export_onnx(model, path, output)
            diffs[role] = verify_onnx(model, path, output)
        extra = {"pool_rounding": pool_rounding(gate, tmp / "gate.onnx", pool)} if pool > 1 else {}
        for role in ("gate", "seg"):
            shutil.move(str(tmp / f"{role}.onnx"), out / f"{role}.onnx")
    doc = model_json(meta, out / "gate.onnx", out / "seg.onnx", height, width, gate_input_pool=pool)
    doc["training"] = portable_tree(doc["training"])  # no paths of this machine in a shipped file
    (out / "model.json").write_text(json.dumps(doc, indent=1) + "\n")
    load_model_pack(out)
    return {**doc, "max_abs_diff": diffs, **extra}


def pool_rounding(gate, path: Path, pool: int, shape=(4, 1, 64, 96), seed: int = 1) -> float:
    """Largest |torch gate on full frames - ONNX gate on uint8-pooled frames| over random frames."""
    import onnxruntime as ort
    import torch

    from engines.modelpack import pool_frames

    x = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    with torch.no_grad():
        ref = gate(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": pool_frames(x, pool)})[0]
    return float(np.max(np.abs(got - ref)))


# -- instance packs (issue 17): seg.onnx with probs, heatmap, size, offset; model.json format 3 -----

INSTANCE_OUTPUTS = ("probs", "heatmap", "size", "offset")
# size is in input px (up to thousands): its bound is relative; the others are probabilities
MAX_REL_DIFF_SIZE = 1e-4


def load_instance_run(checkpoint: str | Path, weights: str = "best.pt"):
    """(meta, model) from an instance training folder (training.train_instances): meta.json + best.pt."""
    import torch

    from training.nets import InstanceConfig, build_instance_model
    from training.train_instances import META_FILE

    checkpoint = Path(checkpoint)
    meta_path = checkpoint / META_FILE
    if not meta_path.is_file():
        raise ExportError(f"{checkpoint}: no {META_FILE}; is this the --out folder of training.train_instances?")
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") != "instances":
        raise ExportError(f"{meta_path}: not an instance run (kind {meta.get('kind')!r}); use export_pack")
    for key in ("profile", "classes", "mean", "std", "model_config"):
        if key not in meta:
            raise ExportError(f"{meta_path}: missing key {key!r}")
    model = build_instance_model(len(meta["classes"]), 1, meta["mean"], meta["std"],
                                 InstanceConfig.from_dict(meta["model_config"]))
    path = checkpoint / weights
    if not path.is_file():
        raise ExportError(f"{checkpoint}: no {weights}")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return meta, model.eval()


def export_instance_onnx(model, path: Path, channels: int = 1, height: int = 64, width: int = 96) -> None:
    import torch

    dummy = torch.randint(0, 256, (2, channels, height, width), dtype=torch.uint8)
    axes = {"image": {0: "N", 2: "H", 3: "W"}, **{o: {0: "N", 2: "H_out", 3: "W_out"} for o in INSTANCE_OUTPUTS}}
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (dummy,), str(path), input_names=["image"], output_names=list(INSTANCE_OUTPUTS),
                          opset_version=OPSET, dynamic_axes=axes, do_constant_folding=True, dynamo=False)


def verify_instance_onnx(model, path: Path, shapes=((2, 1, 64, 96), (1, 1, 256, 320)), seed: int = 0,
                         frames: list[np.ndarray] | None = None) -> dict[str, float]:
    """Per output, the largest |torch - ONNX Runtime| over random uint8 inputs (and `frames`, uint8
    [N, 1, H, W], e.g. real images); ExportError when a probability output differs by MAX_ABS_DIFF
    or more, or size by more than MAX_REL_DIFF_SIZE of its value (+ MAX_ABS_DIFF)."""
    import onnx
    import onnxruntime as ort
    import torch

    onnx.checker.check_model(onnx.load(str(path)))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = ([i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()])
    if names != (["image"], list(INSTANCE_OUTPUTS)):
        raise ExportError(f"{path.name}: graph has inputs/outputs {names}, expected (['image'], {list(INSTANCE_OUTPUTS)})")
    rng = np.random.default_rng(seed)
    inputs = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in shapes] + list(frames or [])
    worst = dict.fromkeys(INSTANCE_OUTPUTS, 0.0)
    for x in inputs:
        with torch.no_grad():
            refs = [t.numpy() for t in model(torch.from_numpy(x))]
        gots = sess.run(list(INSTANCE_OUTPUTS), {"image": x})
        for name, ref, got in zip(INSTANCE_OUTPUTS, refs, gots):
            if got.shape != ref.shape:
                raise ExportError(f"{path.name}: ONNX Runtime {name} shape {got.shape} != torch {ref.shape} for input {x.shape}")
            diff = np.abs(got - ref)
            if name == "size":
                excess = float(np.max(diff - MAX_REL_DIFF_SIZE * np.abs(ref)))
                if not excess < MAX_ABS_DIFF:
                    raise ExportError(f"{path.name}: ONNX Runtime size differs from torch by {float(diff.max()):.3g} px "
                                      f"(limit {MAX_REL_DIFF_SIZE:g} x size + {MAX_ABS_DIFF:g})")
            worst[name] = max(worst[name], float(diff.max()))
    for name in ("probs", "heatmap", "offset"):
        if not worst[name] < MAX_ABS_DIFF:
            raise ExportError(f"{path.name}: ONNX Runtime {name} differs from torch by {worst[name]:.3g} (limit {MAX_ABS_DIFF})")
    return worst


def instance_model_json(meta: dict[str, Any], seg_path: Path, height: int, width: int,
                        gate: dict[str, Any] | None = None) -> dict[str, Any]:
    """model.json format 3 for an instance pack; `gate`: a gate entry (file, sha256, output,
    input_pool) taken from another pack, or None for a pack without a gate."""
    from engines.instances import InstanceSpec
    from training.nets import OUTPUT_STRIDE

    models: dict[str, Any] = {}
    if gate is not None:
        models["gate"] = gate
    models["seg"] = {"file": seg_path.name, "sha256": sha256_file(seg_path), "output": "probs",
                     "output_stride": OUTPUT_STRIDE, "instances": InstanceSpec(stride=OUTPUT_STRIDE).to_dict()}
    from training.card import portable

    cfg = meta.get("config", {})
    return {
        "format": INSTANCE_PACK_FORMAT,
        "profile": meta["profile"],
        "classes": list(meta["classes"]),
        "input": {"channels": 1, "height": height, "width": width, "dtype": "uint8", "layout": "NCHW",
                  "mean": meta["mean"], "std": meta["std"]},
        "models": models,
        "training": {
            "data": DATA_DESCRIPTIONS.get(meta["profile"], meta["profile"]) + f" under {portable(str(meta.get('data', '?')))}; "
                    + (f"whole train images ({cfg.get('whole_batch')} a step, resized to "
                       f"{min(cfg.get('whole_sides') or [0])}-{max(cfg.get('whole_sides') or [0])} px) in "
                       f"{cfg['whole_fraction']:.0%} of steps, "
                       if cfg.get("whole_fraction") else "")
                    + f"strip mosaics on realistic strip background (training.strip), realistic strips as "
                    f"{cfg.get('synthetic_fraction', 0):.0%} of canvases"
                    + (f"; the strip pools also hold {cfg['synth_frames']} plain synthetic strip frames (training.synth, "
                       f"half defective, own seeds)" if cfg.get("synth_frames") else ""),
            "split": "training.datasets.assign_split: sha1(file stem)[0] < 51 test (never used), < 82 val "
                     "(checkpoint choice by val mAP@0.5, calibration), else train",
            "command": portable(meta.get("command", "")),
            "seed": meta.get("seed", 0),
            "minutes": meta.get("minutes"),
            "epochs_run": len(meta.get("history", [])),
            "best": meta.get("best", {}),
            "model_size": meta.get("model_size"),
            "model_config": meta.get("model_config"),
            "kind": "instances",
            **({"tier": tier} if (tier := tier_of_model_size(meta.get("model_size"))) else {}),
            # where an ImageNet trunk's weights came from (training/lite0.py provenance): file, sha256, package
            **({"pretrained": meta["pretrained"]} if meta.get("pretrained") else {}),
        },
    }


def kept_gate_config(gate_from: str | Path) -> dict[str, Any]:
    """What an instance pack that keeps another pack's gate must record of that gate's net, so that
    training.gate_strip can rebuild it: ``gate_model_size`` and ``gate_model_config``. From a component
    pack's training block its ``model_size`` / ``model_config`` (they describe its gate and segmenter);
    from an instance pack that itself kept a gate, its ``gate_model_*`` (its model_config is its
    segmenter's). Empty when the source records neither."""
    train = json.loads((Path(gate_from) / "model.json").read_text()).get("training") or {}
    if "gate_model_config" in train:
        size, config = train.get("gate_model_size"), train["gate_model_config"]
    elif train.get("kind") != "instances" and train.get("model_config") is not None:
        size, config = train.get("model_size"), train["model_config"]
    else:
        return {}
    return {"gate_model_size": size, "gate_model_config": config}


def export_instance_pack(checkpoint: str | Path, out: str | Path, height: int | None = None, width: int | None = None,
                         gate_from: str | Path | None = None, check_frames: list[np.ndarray] | None = None,
                         profile: str | None = None, tta: str = "none", tier: str | None = None) -> dict[str, Any]:
    """Export an instance run's best.pt as seg.onnx (outputs probs, heatmap, size, offset) plus
    model.json format 3 into `out`; with `gate_from` (a pack folder), that pack's gate.onnx and its
    model.json entry are copied beside it. ``tta``: "flip" or "flip4" puts test-time flips in the graph
    (training.nets.FlipTTA: 2 or 4 passes averaged), recorded as model.json ``training.tta``. ``tier``:
    the pack's tier (default: the model size's). Returns model.json's content plus `max_abs_diff` per output."""
    from engines.modelpack import load_model_pack as load_pack
    from engines.packs import TIERS
    from training.nets import TTA_FLIPS, FlipTTA
    from training.train import PROFILE_TRAINING

    if tta not in TTA_FLIPS:
        raise ExportError(f"tta {tta!r}: expected one of {', '.join(TTA_FLIPS)}")
    if tier is not None and tier not in TIERS:
        raise ExportError(f"tier {tier!r}: expected one of {', '.join(TIERS)}")
    meta, model = load_instance_run(checkpoint)
    if profile is not None and profile != meta["profile"]:
        raise ExportError(f"{checkpoint}: the run trained profile {meta['profile']!r}, not {profile!r}")
    if tta != "none":
        model = FlipTTA(model, tta).eval()
    prof = PROFILE_TRAINING.get(meta["profile"])
    height = height or (prof.height if prof else None)
    width = width or (prof.width if prof else None)
    if not height or not width or height % 16 or width % 16:
        raise ExportError(f"input height {height} and width {width} must be set and multiples of 16")
    gate_entry = None
    out = Path(out)
    if gate_from is not None:
        src = load_pack(gate_from)
        if src.gate is None:
            raise ExportError(f"--gate-from {gate_from}: that pack has no gate")
        if tuple(src.classes) != tuple(meta["classes"]):
            raise ExportError(f"--gate-from {gate_from}: classes {list(src.classes)} differ from the run's {meta['classes']}")
        if (src.height, src.width) != (height, width):
            raise ExportError(f"--gate-from {gate_from}: input {src.height}x{src.width} differs from {height}x{width}")
        raw = json.loads((Path(gate_from) / "model.json").read_text())["models"]["gate"]
        gate_entry = dict(raw)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tmp = Path(tmp)
        export_instance_onnx(model, tmp / "seg.onnx")
        diffs = verify_instance_onnx(model, tmp / "seg.onnx", frames=check_frames)
        shutil.move(str(tmp / "seg.onnx"), out / "seg.onnx")
    if gate_entry is not None:
        shutil.copyfile(Path(gate_from) / gate_entry["file"], out / "gate.onnx")
        gate_entry["file"] = "gate.onnx"
        gate_entry["sha256"] = sha256_file(out / "gate.onnx")
    doc = instance_model_json(meta, out / "seg.onnx", height, width, gate_entry)
    if tta != "none":
        doc["training"]["tta"] = {
            "flips": tta, "passes": model.passes,
            "what": f"test-time augmentation in seg.onnx (training.nets.FlipTTA): the frame and its {tta} flips as one "
                    f"batch, probs, heatmap and size flipped back and averaged, the offset of the plain pass; "
                    f"{model.passes}x the model's arithmetic"}
    if tier is not None:
        doc["training"]["tier"] = tier
    if gate_entry is not None:
        doc["training"]["gate_from"] = str(gate_from)
        doc["training"].update(kept_gate_config(gate_from))  # the kept gate's net, for training.gate_strip
    doc["training"] = portable_tree(doc["training"])  # no paths of this machine in a shipped file
    (out / "model.json").write_text(json.dumps(doc, indent=1) + "\n")
    load_pack(out)
    return {**doc, "max_abs_diff": diffs}
