"""Tiny models that keep the model contract (docs/architecture.md), built with onnx.helper.

uint8 input ``image`` [N, C, H, W] with dynamic N/H/W, Cast + Div + Sub + Div normalisation,
Conv layers, Sigmoid outputs: ``scores`` [N, K] for the gate, ``probs`` [N, K, H/2, W/2] for seg.
Small enough for 2 CPU cores; used by the engines tests (FP16, parity, build, select, GPU).
Frames for them come from engines.parity.synthetic_frames.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CLASSES = ("a", "b", "c")


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def make_model(role: str, *, channels: int = 1, classes: int = len(CLASSES), seed: int = 0,
               width: int = 8, layer_norm: bool = True) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Cast", ["image"], ["x0"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["x0", "c255"], ["x1"]),
        helper.make_node("Sub", ["x1", "mean"], ["x2"]),
        helper.make_node("Div", ["x2", "std"], ["x3"]),
        helper.make_node("Conv", ["x3", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
    ]
    inits = [
        _init("c255", 255.0), _init("mean", 0.5), _init("std", 0.25),
        _init("w1", rng.normal(0, 0.4, (width, channels, 3, 3))), _init("b1", rng.normal(0, 0.1, width)),
    ]
    feat = "r1"
    if layer_norm:  # a decomposed-free LayerNorm over channels-last would need transposes; use GroupNorm-like InstanceNorm
        nodes.append(helper.make_node("InstanceNormalization", ["r1", "g1", "be1"], ["n1"], epsilon=1e-5))
        inits += [_init("g1", np.ones(width)), _init("be1", np.zeros(width))]
        feat = "n1"
    nodes.append(helper.make_node("Conv", [feat, "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node("Relu", ["c2"], ["r2"]))
    inits += [_init("w2", rng.normal(0, 0.3, (width, width, 3, 3))), _init("b2", rng.normal(0, 0.1, width))]
    if role == "seg":
        nodes += [
            helper.make_node("Conv", ["r2", "w3", "b3"], ["logits"], pads=[1, 1, 1, 1]),
            helper.make_node("Sigmoid", ["logits"], ["probs"]),
        ]
        inits += [_init("w3", rng.normal(0, 0.3, (classes, width, 3, 3))), _init("b3", rng.normal(-0.5, 0.1, classes))]
        out = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", classes, "h", "w"])
    elif role == "gate":
        nodes += [
            helper.make_node("ReduceMean", ["r2", "axes"], ["pooled"], keepdims=0),
            helper.make_node("Gemm", ["pooled", "wf", "bf"], ["logits"], transB=1),
            helper.make_node("Sigmoid", ["logits"], ["scores"]),
        ]
        inits += [numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes"),
                  _init("wf", rng.normal(0, 1.0, (classes, width))), _init("bf", rng.normal(-0.5, 0.2, classes))]
        out = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", classes])
    else:
        raise ValueError(f"role must be gate or seg, got {role!r}")
    for i, node in enumerate(nodes):
        node.name = f"{role}_{node.op_type}_{i}"
    graph = helper.make_graph(
        nodes, f"tiny_{role}",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", channels, "H", "W"])], [out], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="coilsight-tests")
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def save_model(role: str, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(make_model(role, **kwargs), str(path))
    return path


def make_pack(directory: Path, *, profile: str = "tiny", height: int = 32, width: int = 48,
              roles: tuple[str, ...] = ("gate", "seg"), gate_threshold: float = 0.5) -> Path:
    """A model pack (model.json + calibration.json) around tiny models, as engines.modelpack reads it."""
    from tinypack import write_pack_files

    directory.mkdir(parents=True, exist_ok=True)
    models = {}
    for role in roles:
        path = save_model(role, directory / f"{role}.onnx")
        models[role] = {"file": path.name, "output": "scores" if role == "gate" else "probs"}
        if role == "seg":
            models[role]["output_stride"] = 2
    return write_pack_files(directory, models, CLASSES, profile=profile, channels=1, height=height, width=width,
                            gate_threshold=gate_threshold, min_area_px=4)

