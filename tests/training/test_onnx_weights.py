"""training/onnx_weights.py: a pack's ONNX weights (BatchNorm folded into the convolutions) taken back
into the torch net give the graph's outputs, so a shipped model can be fine-tuned or re-wrapped."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")


def _export(model, x, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.from_numpy(x),), str(path), input_names=["image"], output_names=["out"],
                          opset_version=19, do_constant_folding=True, dynamo=False)


def _perturb_batchnorms(net, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)


def test_segnet_weights_come_back_from_the_folded_graph(tmp_path):
    from training.nets_lines import DefectSegNet, SegProbs
    from training.onnx_weights import load_from_onnx

    torch.manual_seed(0)
    src = DefectSegNet(6, 3, width=8, mean=[0.2] * 6, std=[0.15] * 6)
    _perturb_batchnorms(src, 1)
    x = np.random.default_rng(0).integers(0, 256, (4, 6, 32, 48), dtype=np.uint8)
    _export(SegProbs(src), x, tmp_path / "seg.onnx")
    torch.manual_seed(5)  # a different initialisation: nothing may survive from it
    dst = DefectSegNet(6, 3, width=8, mean=[0.2] * 6, std=[0.15] * 6)
    diff = load_from_onnx(dst, tmp_path / "seg.onnx", x, SegProbs(dst))
    assert diff < 1e-4
    with torch.no_grad():
        assert float((SegProbs(dst)(torch.from_numpy(x)) - SegProbs(src.eval())(torch.from_numpy(x))).abs().max()) < 1e-4
        dst.train()  # batch statistics of the same sample = the running ones: train mode starts where eval is
        assert float((torch.sigmoid(dst(torch.from_numpy(x))) - SegProbs(src)(torch.from_numpy(x))).abs().max()) < 1e-3


def test_wafer_net_with_deformable_conv_comes_back(tmp_path):
    from training.nets_lines import WaferExport, WaferNet
    from training.onnx_weights import load_from_onnx

    torch.manual_seed(0)
    src = WaferNet(8, width=8)
    _perturb_batchnorms(src, 2)
    with torch.no_grad():
        src.deform.offset.weight.normal_(0, 0.05)
    x = np.random.default_rng(1).integers(0, 3, (3, 1, 52, 52), dtype=np.uint8)
    _export(WaferExport(src), x, tmp_path / "gate.onnx")
    dst = WaferNet(8, width=8)
    assert load_from_onnx(dst, tmp_path / "gate.onnx", x, WaferExport(dst)) < 1e-4


def test_a_graph_of_another_net_is_refused(tmp_path):
    from training.nets_lines import DefectSegNet, SegProbs
    from training.onnx_weights import WeightRecoveryError, load_from_onnx

    src = DefectSegNet(6, 3, width=8)
    x = np.zeros((1, 6, 32, 32), np.uint8)
    _export(SegProbs(src), x, tmp_path / "seg.onnx")
    other = DefectSegNet(6, 3, width=16)
    with pytest.raises(WeightRecoveryError, match="the net.s|does not fit"):
        load_from_onnx(other, tmp_path / "seg.onnx", x, SegProbs(other))
