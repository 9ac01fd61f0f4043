"""A tiny, exact model pack for agent tests: real ONNX models run by real ONNX Runtime.

Class "bright": 4x4 cells whose mean grey level is high; class "dark": cells that are low.
So a test can draw a bright square at a known place and know exactly which defect the agent
must report, independent of any trained model.

Scores are spread across (0, 1), not only near 0 and 1: a square at a grey ``level`` between the
background and white scores sigmoid(30 (level/255 - 0.6)) (``gate_scores`` runs the pack's own gate
to get the exact float32 value), and the pack's default thresholds (gate 0.3, pixels 0.4) are
neither 0.5 nor equal to each other, so a test can pick frames the thresholds decide: ``MID_LEVELS``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from engines.modelpack import sha256_file

CLASSES = ("bright", "dark")
BACKGROUND = 100  # grey level of a clean frame
GATE_THRESHOLD = 0.3  # make_pack's defaults: a hard-coded 0.5 (or the pixel threshold) decides otherwise
PIXEL_THRESHOLD = 0.4
# Grey levels of a "bright" square and (about) the score the tiny gate gives them: each side of both
# default thresholds and of 0.5, so which frames pass depends on the threshold the pack sets.
MID_LEVELS = {135: 0.11, 147: 0.33, 150: 0.41, 152: 0.47, 155: 0.56, 158: 0.64, 170: 0.88}


def cell_nodes(k: int = 4) -> list[onnx.NodeProto]:
    """The tiny models' cells: ``image`` (uint8, any channels) -> ``probs`` [N, 2, h, w], bright and
    dark per k x k cell (sigmoids around the initializers ``hi`` and ``lo``, steepness ``gain``, after
    ``scale``); ``b0`` (pooled - hi) and ``d0`` (lo - pooled) are left for heads that read them
    (tests/tinyinstances.py)."""
    return [
        helper.make_node("Cast", ["image"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xf", "scale"], ["xc"]),
        helper.make_node("ReduceMean", ["xc"], ["x"], axes=[1], keepdims=1),  # channels -> one grey plane
        helper.make_node("AveragePool", ["x"], ["pooled"], kernel_shape=[k, k], strides=[k, k]),
        helper.make_node("Sub", ["pooled", "hi"], ["b0"]),
        helper.make_node("Mul", ["b0", "gain"], ["b1"]),
        helper.make_node("Sigmoid", ["b1"], ["bright"]),
        helper.make_node("Sub", ["lo", "pooled"], ["d0"]),
        helper.make_node("Mul", ["d0", "gain"], ["d1"]),
        helper.make_node("Sigmoid", ["d1"], ["dark"]),
        helper.make_node("Concat", ["bright", "dark"], ["probs"], axis=1),
    ]


def _graph(output: str, channels: int = 1, input_pool: int = 1, hw: tuple[int, int] | None = None) -> onnx.ModelProto:
    """The 4x4-cell model; with input_pool k it takes frames already pooled k x k and pools the rest.
    ``hw`` fixes the input's H and W (else dynamic), so a runner that feeds another size fails loudly."""
    if 4 % input_pool:
        raise ValueError(f"input_pool {input_pool} must divide the 4x4 cells")
    k = 4 // input_pool
    inp = helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", channels, *(hw or ("H", "W"))])
    consts = [
        helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / 255.0]),
        helper.make_tensor("hi", TensorProto.FLOAT, [], [0.6]),
        helper.make_tensor("lo", TensorProto.FLOAT, [], [0.15]),
        helper.make_tensor("gain", TensorProto.FLOAT, [], [30.0]),
    ]
    nodes = cell_nodes(k)
    if output == "scores":
        nodes.append(helper.make_node("ReduceMax", ["probs"], ["scores"], axes=[2, 3], keepdims=0))
        out = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 2])
    else:
        out = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 2, "h", "w"])
    g = helper.make_graph(nodes, output, [inp], [out], initializer=consts)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_pack_files(directory: Path, models: dict[str, dict], classes, *, profile: str, channels: int, height: int,
                     width: int, gate_threshold: float, min_area_px: int,
                     pixel_threshold: float = PIXEL_THRESHOLD) -> Path:
    """model.json + calibration.json for ONNX files already in ``directory`` (engines/modelpack.py format).
    ``models``: role -> {"file", "output"[, "output_stride"]}; hashes are computed here."""
    entries = {role: {**m, "sha256": sha256_file(directory / m["file"])} for role, m in models.items()}
    meta = {
        "format": 2 if any("input_pool" in m for m in models.values()) else 1, "profile": profile,
        "classes": list(classes),
        "input": {"channels": channels, "height": height, "width": width, "dtype": "uint8", "layout": "NCHW",
                  "mean": 0.5, "std": 0.25},
        "models": entries, "training": {"data": "tests", "command": "tests", "seed": 0},
    }
    (directory / "model.json").write_text(json.dumps(meta, indent=1))
    cal = {"format": 1, "models": {k: v["sha256"] for k, v in entries.items()},
           "gate": {"threshold": gate_threshold, "recall_target": 0.99},
           "classes": {c: {"pixel_threshold": pixel_threshold, "min_area_px": min_area_px} for c in classes},
           "data": {}, "created": "2026-11-22T00:00:00Z"}
    (directory / "calibration.json").write_text(json.dumps(cal, indent=1))
    return directory


def make_pack(directory: Path, *, height: int = 64, width: int = 256, gate_threshold: float = GATE_THRESHOLD,
              min_area_px: int = 16, profile: str = "tiny", channels: int = 1, seg: bool = True,
              gate_input_pool: int = 1, pixel_threshold: float = PIXEL_THRESHOLD) -> Path:
    """seg=False makes a classification-only pack (wafer maps): events per class over its threshold.
    gate_input_pool k > 1: the gate takes frames the agent pooled k x k (a format-2 pack)."""
    directory.mkdir(parents=True, exist_ok=True)
    fixed = (height // gate_input_pool, width // gate_input_pool) if gate_input_pool > 1 else None
    onnx.save(_graph("scores", channels, gate_input_pool, fixed), directory / "gate.onnx")
    models = {"gate": {"file": "gate.onnx", "output": "scores"}}
    if gate_input_pool > 1:
        models["gate"]["input_pool"] = gate_input_pool
    if seg:
        onnx.save(_graph("probs", channels), directory / "seg.onnx")
        models["seg"] = {"file": "seg.onnx", "output": "probs", "output_stride": 4}
    return write_pack_files(directory, models, CLASSES, profile=profile, channels=channels, height=height,
                            width=width, gate_threshold=gate_threshold, min_area_px=min_area_px,
                            pixel_threshold=pixel_threshold)


def clean_frame(height: int = 64, width: int = 256) -> np.ndarray:
    return np.full((height, width), BACKGROUND, np.uint8)


def frame_with(kind: str, x: int, y: int, size: int = 16, height: int = 64, width: int = 256,
               level: int | None = None) -> np.ndarray:
    """A clean frame with one bright (255) or dark (0) square at (x, y); aligned to 4 px it is exact.
    ``level``: the square's grey level instead (MID_LEVELS: scores spread across (0, 1))."""
    img = clean_frame(height, width)
    img[y:y + size, x:x + size] = level if level is not None else 255 if kind == "bright" else 0
    return img


def gate_scores(pack_dir: Path, images: list[np.ndarray]) -> list[float]:
    """The top class score the pack's gate gives each frame (H x W grey), one frame per ONNX Runtime
    call as the agent runs them on the CPU: the exact float32 values a threshold is compared with."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(Path(pack_dir) / "gate.onnx"), providers=["CPUExecutionProvider"])
    return [float(sess.run(None, {"image": img[None, None]})[0].max()) for img in images]
