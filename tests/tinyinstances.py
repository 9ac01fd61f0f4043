"""A tiny, exact instance pack (model.json format 3) for tests: real ONNX graphs, built with onnx.helper.

Same classes and cells as tests/tinypack.py ("bright", "dark": 4x4 px cells whose mean grey level
is high or low), plus the instance head of the contract (docs/architecture.md) at stride 4:

- ``heatmap`` = sigmoid(8 (d - 0.6)), d = the share of the class's "on" cells (the cells whose
  probability is over 0.5) in the 5x5 cells around (zeros outside the map): a square of 5x5 cells
  (20 px, aligned to 4 px) peaks at its centre cell with sigmoid(3.2) = 0.961, its neighbours
  lower; a 16 px square (4x4 cells) tops out at a 2x2 plateau of sigmoid(0.32) = 0.579;
- ``size``    = 4 x the number of "on" cells (any class) in the cell's row (w) and column (h)
  within +-4 cells: the square's 20 x 20 px at its centre cell;
- ``offset``  = 0.5, 0.5 everywhere: the centre of the cell, which is the square's centre.

So a frame with a 20x20 px square at (x, y) (multiples of 4) must give exactly one instance with
box (x, y, x + 20, y + 20). ``size_gain`` scales the size head (a perturbed head for parity tests).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tinypack import BACKGROUND, CLASSES, cell_nodes, clean_frame, write_pack_files

__all__ = ["BACKGROUND", "CLASSES", "SQUARE", "clean_frame", "frame_with_squares", "make_instance_pack",
           "instance_graph"]

SQUARE = 20  # px: 5 cells of 4 px, an odd count so the heatmap has one centre cell


def _f(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def instance_graph(role: str, channels: int = 1, size_gain: float = 1.0) -> onnx.ModelProto:
    """role "gate": ``scores`` [N, 2]; role "seg": ``probs``, ``heatmap`` [N, 2, H/4, W/4], ``size`` and
    ``offset`` [N, 2, H/4, W/4]."""
    inp = helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", channels, "H", "W"])
    size_w = np.zeros((2, 2, 9, 9), np.float32)  # on cells of either class
    size_w[0, :, 4, :] = 4.0 * size_gain  # row: width in px
    size_w[1, :, :, 4] = 4.0 * size_gain  # column: height in px
    inits = [
        _f("scale", 1 / 255.0), _f("hi", 0.6), _f("lo", 0.15), _f("gain", 30.0),
        _f("size_w", size_w), _f("size_b", np.zeros(2)),
        _f("off_w", np.zeros((2, 2, 1, 1))), _f("off_b", np.full(2, 0.5)),
        _f("heat_mid", 0.6), _f("heat_gain", 8.0),
    ]
    nodes = cell_nodes(4)  # the tiny pack's cells: probs, and b0 / d0 for the head below
    if role == "gate":
        nodes.append(helper.make_node("ReduceMax", ["probs"], ["scores"], axes=[2, 3], keepdims=0))
        outs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 2])]
        inits = inits[:4]
    else:
        # the head reads the cells' "on" masks (the same tests as probs > 0.5), not probs, so the FP16
        # converter keeps probs' final Sigmoid in FP32 with nothing downstream of it
        nodes += [
            helper.make_node("Sign", ["b0"], ["bright_s"]),  # pooled - hi
            helper.make_node("Relu", ["bright_s"], ["bright_on"]),  # 1 where over, else 0
            helper.make_node("Sign", ["d0"], ["dark_s"]),  # lo - pooled
            helper.make_node("Relu", ["dark_s"], ["dark_on"]),
            helper.make_node("Concat", ["bright_on", "dark_on"], ["on"], axis=1),
            helper.make_node("AveragePool", ["on"], ["density"], kernel_shape=[5, 5], strides=[1, 1],
                             pads=[2, 2, 2, 2], count_include_pad=1),
            helper.make_node("Sub", ["density", "heat_mid"], ["h0"]),
            helper.make_node("Mul", ["h0", "heat_gain"], ["h1"]),
            helper.make_node("Sigmoid", ["h1"], ["heatmap"]),
            helper.make_node("Conv", ["on", "size_w", "size_b"], ["size_raw"], pads=[4, 4, 4, 4]),
            helper.make_node("Relu", ["size_raw"], ["size"]),
            helper.make_node("Conv", ["on", "off_w", "off_b"], ["offset"]),
        ]
        outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 2, "h", "w"])
                for n in ("probs", "heatmap", "size", "offset")]
    g = helper.make_graph(nodes, f"tiny_instances_{role}", [inp], outs, initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make_instance_pack(directory: Path, *, height: int = 64, width: int = 256, gate_threshold: float = 0.5,
                       min_area_px: int = 16, profile: str = "tiny", channels: int = 1, size_gain: float = 1.0,
                       instance_threshold: float | None = None, stride: int = 4) -> Path:
    """A format-3 pack: gate.onnx + seg.onnx with the instance head; calibration.json with
    ``instance_threshold`` per class when given (else absent: the default 0.3 applies)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(instance_graph("gate", channels), directory / "gate.onnx")
    onnx.save(instance_graph("seg", channels, size_gain), directory / "seg.onnx")
    models = {"gate": {"file": "gate.onnx", "output": "scores"},
              "seg": {"file": "seg.onnx", "output": "probs", "output_stride": 4,
                      "instances": {"heatmap": "heatmap", "size": "size", "offset": "offset", "stride": stride}}}
    write_pack_files(directory, models, CLASSES, profile=profile, channels=channels, height=height, width=width,
                     gate_threshold=gate_threshold, min_area_px=min_area_px)
    meta_path = directory / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["format"] = 3
    meta_path.write_text(json.dumps(meta, indent=1))
    if instance_threshold is not None:
        cal_path = directory / "calibration.json"
        cal = json.loads(cal_path.read_text())
        for c in cal["classes"].values():
            c["instance_threshold"] = instance_threshold
        cal_path.write_text(json.dumps(cal, indent=1))
    return directory


def frame_with_squares(squares: list[tuple[str, int, int]], height: int = 64, width: int = 256,
                       size: int = SQUARE) -> np.ndarray:
    """A clean frame with ``size`` px squares: (kind "bright"/"dark", x, y) each."""
    img = clean_frame(height, width)
    for kind, x, y in squares:
        img[y:y + size, x:x + size] = 255 if kind == "bright" else 0
    return img
