"""The lines' nets: the deformable convolution matches ONNX Runtime's DeformConv; the wafer graph exports
scores and CAMs; the standard-convolution fallback exports without DeformConv; a line pack round-trips."""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from training.nets_lines import ONNX_OPSET, DeformConv2d, DefectSegNet, GateFromSeg, SegProbs, WaferExport, WaferNet  # noqa: E402


def _export(model, x, outputs, axes=None) -> bytes:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), f, input_names=["image"], output_names=outputs, opset_version=ONNX_OPSET,
                          dynamic_axes=axes, dynamo=False)
    model.eval()
    return f.getvalue()


def test_deformable_convolution_matches_onnx_runtime_deformconv():
    torch.manual_seed(0)
    m = DeformConv2d(4, 6)
    torch.nn.init.normal_(m.offset.weight, std=0.5)  # large, fractional offsets, many samples outside
    torch.nn.init.normal_(m.offset.bias, std=1.5)
    x = torch.randn(2, 4, 9, 11)
    onnx_bytes = _export(m, x, ["y"])
    ops = {n.op_type for n in onnx.load_from_string(onnx_bytes).graph.node}
    assert "DeformConv" in ops
    got = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        ref = m(x).numpy()
    assert np.abs(got - ref).max() < 1e-4
    # and the offsets matter: with them zeroed the output is another one
    with torch.no_grad():
        m.offset.bias.zero_()
        m.offset.weight.zero_()
        plain = m(x).numpy()
    assert np.abs(plain - ref).max() > 0.1


def test_deformable_convolution_with_zero_offsets_is_a_convolution():
    torch.manual_seed(1)
    m = DeformConv2d(3, 5)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        ref = torch.nn.functional.conv2d(x, m.weight, m.bias, padding=1)
        assert torch.allclose(m(x), ref, atol=1e-5)


@pytest.mark.parametrize("deformable", [True, False])
def test_wafer_graph_exports_scores_and_cams(deformable):
    net = WaferNet(8, width=8, deformable=deformable).eval()
    model = WaferExport(net).eval()
    x = torch.randint(0, 3, (3, 1, 52, 52), dtype=torch.uint8)
    onnx_bytes = _export(model, x, ["scores", "cam"], {"image": {0: "N"}})
    ops = {n.op_type for n in onnx.load_from_string(onnx_bytes).graph.node}
    assert ("DeformConv" in ops) == deformable  # the fallback ships a standard convolution
    scores, cam = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})
    assert scores.shape == (3, 8) and cam.shape == (3, 8, 13, 13)
    assert cam.min() >= 0 and cam.max() <= 1.0 + 1e-6
    with torch.no_grad():
        ref_scores, ref_cam = model(x)
    assert np.abs(scores - ref_scores.numpy()).max() < 1e-4 and np.abs(cam - ref_cam.numpy()).max() < 1e-4


def test_defect_seg_net_and_its_gate_agree():
    net = DefectSegNet(6, 3, width=8, mean=[0.5] * 6, std=[0.25] * 6).eval()
    x = torch.randint(0, 256, (2, 6, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        probs = SegProbs(net)(x)
        gate = GateFromSeg(net)(x)
    assert probs.shape == (2, 3, 32, 48)
    assert torch.allclose(gate, probs.amax(dim=(2, 3)))
