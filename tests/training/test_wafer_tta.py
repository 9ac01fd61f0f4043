"""Wafer stage 3: scores averaged over the 8 symmetries inside the graph, thresholds for exact match."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def test_symmetry_mean_scores_are_invariant_and_the_cam_is_the_maps_own():
    from training.nets_lines import WaferExport, WaferNet, dihedral_views

    torch.manual_seed(0)
    net = WaferNet(8, width=8).eval()
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 3, (2, 1, 52, 52), dtype=np.uint8))
    views = dihedral_views(x)
    assert len(views) == 8 and len({v.numpy().tobytes() for v in views}) == 8  # 8 different symmetries
    tta, plain = WaferExport(net, 8).eval(), WaferExport(net).eval()
    with torch.no_grad():
        s0, cam0 = tta(x)
        for v in views:  # the mean over the group is the same for every member
            assert torch.allclose(tta(v)[0], s0, atol=1e-5)
        assert torch.allclose(cam0, plain(x)[1])
        assert not torch.allclose(plain(views[3])[0], plain(x)[0], atol=1e-5)  # one pass alone is not invariant
    with pytest.raises(ValueError):
        WaferExport(net, 4)


def test_exact_match_thresholds_report_their_exact_match_on_a_hand_made_case():
    from training.line_wafer import exact_match_thresholds

    # class 0: positives at 0.6, negatives at 0.4 and one negative at 0.7 on a map that class 1 gets wrong anyway
    truth = np.array([[1, 0], [1, 0], [0, 0], [0, 1], [0, 1]], bool)
    scores = np.array([[0.6, 0.2], [0.6, 0.2], [0.4, 0.2], [0.7, 0.1], [0.4, 0.8]])
    t, em = exact_match_thresholds(truth, scores, np.array([0.5, 0.5]))
    assert em == pytest.approx(((scores >= t) == truth).all(axis=1).mean())
    assert em >= 0.8 and t[1] <= 0.8


def test_the_shipped_wafer_pack_averages_symmetries():
    import json
    from pathlib import Path

    import onnxruntime as ort

    from training.line_wafer import dihedral, maps

    pack = Path(__file__).resolve().parents[2] / "engines" / "models" / "wafer"
    doc = json.loads((pack / "model.json").read_text())
    if doc["training"]["model_config"].get("symmetries") != 8:
        pytest.skip("the shipped wafer pack is a one-pass graph")
    sess = ort.InferenceSession(str(pack / "gate.onnx"), providers=["CPUExecutionProvider"])
    x, _ = maps("val", 4)
    ref = sess.run(["scores"], {"image": x[:, None]})[0]
    for k in (1, 5):
        got = sess.run(["scores"], {"image": np.ascontiguousarray(dihedral(x, k))[:, None]})[0]
        assert np.abs(got - ref).max() < 1e-5
