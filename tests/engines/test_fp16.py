"""FP16 conversion on the CPU with ONNX Runtime: precision placement, contract, accuracy."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _tiny_onnx import make_model, save_model
from onnx import TensorProto, helper

from engines import fp16
from engines.parity import synthetic_frames


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]


def _node_types(model) -> dict[str, int]:
    """Node name -> elem type of its first output, from shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.output]}
    return {n.name: types.get(n.output[0]) for n in inferred.graph.node}


@pytest.mark.parametrize("role", ["gate", "seg"])
def test_convert_keeps_contract_and_matches_fp32(tmp_path, role):
    src = save_model(role, tmp_path / f"{role}.onnx")
    result = fp16.convert(src, tmp_path / f"{role}.fp16.onnx")
    model = onnx.load(str(result.path))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    # Convs really run in FP16: their weights were converted.
    weights = {i.name: i.data_type for i in model.graph.initializer}
    assert weights["w1"] == TensorProto.FLOAT16 and weights["w2"] == TensorProto.FLOAT16
    x = synthetic_frames(4, 1, 32, 48)
    ref, got = _run(src, x), _run(result.path, x)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.abs(ref - got).max() < 5e-3


def test_unsafe_ops_input_chain_and_final_sigmoid_stay_fp32(tmp_path):
    src = save_model("gate", tmp_path / "gate.onnx")
    result = fp16.convert(src, tmp_path / "gate.fp16.onnx")
    types = _node_types(onnx.load(str(result.path)))
    for name in ("gate_Cast_0", "gate_Div_1", "gate_Sub_2", "gate_Div_3", "gate_InstanceNormalization_6",
                 "gate_ReduceMean_9", "gate_Sigmoid_11"):
        assert types[name] == TensorProto.FLOAT, name
    for name in ("gate_Conv_4", "gate_Conv_7", "gate_Gemm_10"):
        assert types[name] == TensorProto.FLOAT16, name
    assert set(result.blocked_nodes) >= {"gate_Cast_0", "gate_Div_3", "gate_Sigmoid_11"}


def test_default_block_list_is_extended_not_replaced():
    from onnxconverter_common import float16

    ops = fp16.FP16Recipe(keep_fp32=("Relu", "NotInModel")).op_block_list({"Relu", "Conv"})
    assert set(float16.DEFAULT_OP_BLOCK_LIST) <= set(ops)
    assert "Resize" in ops and "ReduceMean" in ops and "Relu" in ops and "NotInModel" not in ops


def test_keep_fp32_by_op_type_and_node_name(tmp_path):
    src = save_model("seg", tmp_path / "seg.onnx")
    recipe = fp16.FP16Recipe(keep_fp32=("Relu", "seg_Conv_4"))
    types = _node_types(onnx.load(str(fp16.convert(src, tmp_path / "s.onnx", recipe).path)))
    assert types["seg_Relu_5"] == TensorProto.FLOAT
    assert types["seg_Conv_4"] == TensorProto.FLOAT
    assert types["seg_Conv_7"] == TensorProto.FLOAT16


def test_unnamed_nodes_do_not_collide(tmp_path):
    model = make_model("seg")
    for node in model.graph.node:
        node.name = ""
    src = tmp_path / "anon.onnx"
    onnx.save(model, str(src))
    result = fp16.convert(src, tmp_path / "anon.fp16.onnx")
    x = synthetic_frames(2, 1, 32, 48)
    assert np.abs(_run(src, x) - _run(result.path, x)).max() < 5e-3


def test_float_input_is_refused(tmp_path):
    node = helper.make_node("Sigmoid", ["image"], ["probs"], name="s")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 1, 4, 4])])
    src = tmp_path / "float_in.onnx"
    onnx.save(helper.make_model(graph), str(src))
    with pytest.raises(fp16.FP16Error, match=r"float_in.onnx: input 'image' is FLOAT, the model contract wants uint8"):
        fp16.convert(src, tmp_path / "out.onnx")


def test_unreadable_model_named_in_error(tmp_path):
    src = tmp_path / "junk.onnx"
    src.write_bytes(b"\x00not a protobuf\xff" * 10)
    with pytest.raises(fp16.FP16Error, match=r"junk.onnx: cannot load ONNX model"):
        fp16.convert(src, tmp_path / "out.onnx")


def test_recipe_record_names_converter_and_lists():
    record = fp16.FP16Recipe(keep_fp32=("Relu",)).to_dict()
    assert record["converter"].startswith("onnxconverter-common ")
    assert record["keep_fp32"] == ["Relu"] and "ReduceMean" in record["fp32_ops"]


@pytest.mark.parametrize("profile", ["steel", "magnetic_tile", "kolektorsdd"])
def test_shipped_packs_convert_load_and_keep_their_decisions(tmp_path, profile):
    """The graphs TensorRT will build from: every shipped model converts, loads in ONNX Runtime,
    and its FP16 gate decisions and masks match FP32 at the calibrated thresholds (the parity
    gate `coilsight engines build` applies), on small frames to keep CPU FP16 quick."""
    from pathlib import Path

    from engines.backends.onnxrt import OnnxRuntimeBackend
    from engines.modelpack import load_calibration, load_model_pack
    from engines.parity import ParityBar, compare

    pack = load_model_pack(Path(__file__).resolve().parents[2] / "engines" / "models" / profile)
    cal = load_calibration(pack)
    x = synthetic_frames(4, pack.channels, 64, 256, seed=3)
    for role, entry in pack.models.items():
        result = fp16.convert(entry.path, tmp_path / f"{role}.fp16.onnx")
        with OnnxRuntimeBackend(entry.path, max_batch=4, threads=1) as ref, \
                OnnxRuntimeBackend(result.path, max_batch=4, threads=1) as cand:
            report = compare(ref, cand, [x], role=role, gate_threshold=cal.gate_threshold,
                             pixel_thresholds=[cal.classes[c].pixel_threshold for c in pack.classes],
                             instances=entry.instances,  # a format-3 seg model: its boxes are judged too
                             instance_thresholds=[cal.classes[c].instance_threshold for c in pack.classes])
        report.check(ParityBar())  # raises ParityError naming what differs


def test_input_flips_and_their_concat_stay_in_the_uint8_input_chain(tmp_path):
    """A graph with test-time flips (training.nets.FlipTTA) moves the uint8 input (negative-step Slice,
    batch Concat) before its Cast: those nodes join the input chain, so the FP16 model loads (the
    converter otherwise retyped the Cast after them and ONNX Runtime refused the graph)."""
    i64 = lambda name, v: helper.make_tensor(name, TensorProto.INT64, [len(v)], v)  # noqa: E731
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 1, 3, 3], rng.normal(0, 0.3, 18).astype(np.float32).tolist())
    nodes = [
        helper.make_node("Slice", ["image", "st", "en", "ax", "sp"], ["flipped"], name="flip"),
        helper.make_node("Concat", ["image", "flipped"], ["both"], axis=0, name="batch"),
        helper.make_node("Cast", ["both"], ["f"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Mul", ["f", "scale"], ["m"], name="mul"),
        helper.make_node("Add", ["m", "shift"], ["x"], name="add"),
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Sigmoid", ["c"], ["probs"], name="sigmoid"),
    ]
    graph = helper.make_graph(
        nodes, "flips", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, None)],
        [i64("st", [-1]), i64("en", [-(2 ** 63)]), i64("ax", [3]), i64("sp", [-1]), w,
         helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / 255 / 0.25]),
         helper.make_tensor("shift", TensorProto.FLOAT, [], [-2.0])])
    src = tmp_path / "flips.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    assert fp16.input_chain(onnx.load(str(src)).graph) == ["flip", "batch", "cast", "mul", "add"]
    result = fp16.convert(src, tmp_path / "flips.fp16.onnx")
    assert {"flip", "batch", "cast", "mul", "add", "sigmoid"} <= set(result.blocked_nodes)
    x = synthetic_frames(2, 1, 32, 48)
    ref, got = _run(src, x), _run(result.path, x)
    assert ref.shape == (4, 2, 32, 48)
    assert np.array_equal(ref[2:], _run(src, x[..., ::-1].copy())[:2])  # the second half is the flipped frame's
    assert np.abs(ref - got).max() < 5e-3
