"""An exact wafer pack for agent tests: a real ONNX graph with ``scores`` and ``cam`` outputs.

Each CAM cell is the share of failing dies (code 2) in its 4x4 block of the 52x52 map, kept only
inside the class's region (``REGIONS``, in cells); a class's score is a steep sigmoid of its best
cell around 0.5. So a test that fails a whole 4x4-aligned block knows exactly which pattern the
agent must report, with which peak region, independent of any trained model.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from engines.modelpack import sha256_file
from training.gen_wafer import WAFER_PATTERNS

# cell rows, cell cols (inclusive start, exclusive end) per class; classes not listed never fire
REGIONS = {"Center": ((4, 9), (4, 9)), "Edge-Loc": ((10, 13), (3, 10))}


def wafer_graph() -> onnx.ModelProto:
    regions = np.zeros((1, len(WAFER_PATTERNS), 13, 13), np.float32)
    for name, ((r0, r1), (c0, c1)) in REGIONS.items():
        regions[0, WAFER_PATTERNS.index(name), r0:r1, c0:c1] = 1.0
    inp = helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 1, 52, 52])
    consts = [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
              helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
              helper.make_tensor("gain", TensorProto.FLOAT, [], [20.0]),
              helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-6]),
              helper.make_tensor("regions", TensorProto.FLOAT, regions.shape, regions.ravel().tolist())]
    nodes = [
        helper.make_node("Cast", ["image"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Equal", ["xf", "two"], ["failb"]),
        helper.make_node("Cast", ["failb"], ["fail"], to=TensorProto.FLOAT),
        helper.make_node("AveragePool", ["fail"], ["dens"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Mul", ["dens", "regions"], ["raw"]),
        helper.make_node("ReduceMax", ["raw"], ["best"], axes=[2, 3], keepdims=0),
        helper.make_node("Sub", ["best", "half"], ["b0"]),
        helper.make_node("Mul", ["b0", "gain"], ["b1"]),
        helper.make_node("Sigmoid", ["b1"], ["scores"]),
        helper.make_node("ReduceMax", ["raw"], ["peak"], axes=[2, 3], keepdims=1),
        helper.make_node("Add", ["peak", "eps"], ["peak_e"]),
        helper.make_node("Div", ["raw", "peak_e"], ["cam"]),
    ]
    outs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", len(WAFER_PATTERNS)]),
            helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", len(WAFER_PATTERNS), 13, 13])]
    model = helper.make_model(helper.make_graph(nodes, "tiny_wafer", [inp], outs, initializer=consts),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make_wafer_pack(directory: Path, *, threshold: float = 0.5) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(wafer_graph(), directory / "gate.onnx")
    sha = sha256_file(directory / "gate.onnx")
    meta = {"format": 2, "profile": "wafer", "classes": list(WAFER_PATTERNS),
            "input": {"channels": 1, "height": 52, "width": 52, "dtype": "uint8", "layout": "NCHW",
                      "mean": 1 / 255, "std": 1 / 255},
            "models": {"gate": {"file": "gate.onnx", "sha256": sha, "output": "scores", "cam_output": "cam",
                                "cam_stride": 4}},
            "die_map": {"outside": 0, "good": 1, "fail": 2}, "training": {"data": "tests"}}
    (directory / "model.json").write_text(json.dumps(meta))
    cal = {"format": 1, "models": {"gate": sha}, "gate": {"threshold": threshold, "recall_target": None},
           "classes": {c: {"pixel_threshold": threshold, "min_area_px": 0} for c in WAFER_PATTERNS},
           "data": {}, "created": "2026-12-02T00:00:00Z"}
    (directory / "calibration.json").write_text(json.dumps(cal))
    return directory


def wafer_map(blocks: list[tuple[int, int, int, int]] = ()) -> np.ndarray:
    """A 52x52 map: dies inside a circle of radius 25 good, the (y0, y1, x0, x1) blocks failing."""
    yy, xx = np.mgrid[0:52, 0:52]
    w = np.where(np.hypot(yy - 25.5, xx - 25.5) <= 25, 1, 0).astype(np.uint8)
    for y0, y1, x0, x1 in blocks:
        w[y0:y1, x0:x1] = np.where(w[y0:y1, x0:x1] > 0, 2, 0)
    return w
