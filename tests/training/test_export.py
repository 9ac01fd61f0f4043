"""training/export.py: the exported graphs match torch, model.json follows the contract."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from training.export import ExportError, export_pack, load_run, verify_onnx  # noqa: E402
from engines.modelpack import load_model_pack, sha256_file  # noqa: E402
from training.nets import CONFIGS, build_models  # noqa: E402


def _fake_run(folder, profile="steel", classes=("a", "b"), size="tiny"):
    """A training folder as `coilsight train` leaves it, with random weights."""
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    gate, seg = build_models(len(classes), 1, 0.45, 0.2, size)
    torch.save(gate.state_dict(), folder / "best_gate.pt")
    torch.save(seg.state_dict(), folder / "best_seg.pt")
    meta = {"profile": profile, "classes": list(classes), "mean": 0.45, "std": 0.2, "model_size": size,
            "model_config": CONFIGS[size].to_dict(), "seed": 3, "command": "coilsight train --profile steel",
            "data": "/data/neu_det", "minutes": 1.5, "history": [{"epoch": 1}],
            "clean_crops": {"size": 64, "stride": 64, "margin": 4, "max_per_image": 4}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize("pool_in_graph", [False, True])
def test_round_trip_torch_vs_onnxruntime(tmp_path, pool_in_graph):
    """Each graph, fed as model.json says (the gate's frames pooled by the runner unless the pool
    stays in the graph), gives torch's numbers on whole frames."""
    from training.nets import PrePooledGate

    out = tmp_path / "pack"
    doc = export_pack(_fake_run(tmp_path / "run"), out, "steel", pool_in_graph=pool_in_graph)
    assert doc["max_abs_diff"]["gate"] < 1e-4 and doc["max_abs_diff"]["seg"] < 1e-4
    pack = load_model_pack(out)
    _, gate, seg = load_run(tmp_path / "run")
    assert pack.gate.input_pool == (1 if pool_in_graph else 4)  # the tiny size pools 4x4
    x = np.random.default_rng(1).integers(0, 256, (3, 1, 256, 1600), dtype=np.uint8)
    for role, model, name in (("gate", gate, "scores"), ("seg", seg, "probs")):
        entry = pack.models[role]
        sess = ort.InferenceSession(str(entry.path), providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        assert inp.name == "image" and inp.type == "tensor(uint8)"
        got = sess.run([name], {"image": entry.prepare(x)})[0]
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
            pooled = role == "gate" and not pool_in_graph
            exact = PrePooledGate(gate)(torch.from_numpy(entry.prepare(x))).numpy() if pooled else ref
        np.testing.assert_allclose(got, exact, atol=1e-4)  # the graph is the torch model
        # and whole frames give the same answer up to rounding the pooled pixels to grey levels
        np.testing.assert_allclose(got, ref, atol=1e-4 if role == "seg" or pool_in_graph else 2e-2)
    assert got.shape == (3, 2, 64, 400)
    assert ("pool_rounding" in doc) is not pool_in_graph
    if not pool_in_graph:
        assert 0 < doc["pool_rounding"] < 2e-2


def test_model_json_follows_the_contract(tmp_path):
    out = tmp_path / "pack"
    export_pack(_fake_run(tmp_path / "run"), out, "steel")
    doc = json.loads((out / "model.json").read_text())
    assert doc["format"] == 2 and doc["profile"] == "steel" and doc["classes"] == ["a", "b"]
    assert doc["input"] == {"channels": 1, "height": 256, "width": 1600, "dtype": "uint8", "layout": "NCHW",
                            "mean": 0.45, "std": 0.2}
    assert doc["models"]["gate"] == {"file": "gate.onnx", "sha256": sha256_file(out / "gate.onnx"), "output": "scores",
                                     "input_pool": 4}
    assert doc["models"]["seg"] == {"file": "seg.onnx", "sha256": sha256_file(out / "seg.onnx"), "output": "probs",
                                    "output_stride": 4}
    training = doc["training"]
    assert training["seed"] == 3 and training["command"].startswith("coilsight train")
    assert training["clean_crops"]["size"] == 64 and "sha1" in training["split"]
    pack = load_model_pack(out)
    assert (pack.height, pack.width, pack.seg.output_stride) == (256, 1600, 4)


def test_export_refuses_bad_runs(tmp_path):
    with pytest.raises(ExportError, match="no meta.json"):
        export_pack(tmp_path, tmp_path / "out")
    run = _fake_run(tmp_path / "run", profile="kolektorsdd")
    with pytest.raises(ExportError, match="trained profile 'kolektorsdd', not 'steel'"):
        export_pack(run, tmp_path / "out", "steel")
    (run / "best_seg.pt").unlink()
    with pytest.raises(ExportError, match="no best_seg.pt"):
        export_pack(run, tmp_path / "out")


def test_a_graph_that_differs_from_torch_is_refused(tmp_path):
    from training.export import export_onnx

    _, gate, _ = load_run(_fake_run(tmp_path / "run"))
    path = tmp_path / "gate.onnx"
    export_onnx(gate, path, "scores")
    with torch.no_grad():
        gate.head.bias += 1.0  # torch now disagrees with the exported graph
    with pytest.raises(ExportError, match="differs from torch by"):
        verify_onnx(gate, path, "scores")


def test_model_json_names_no_path_of_the_training_machine(tmp_path):
    """meta.json keeps the paths the run really used; the shipped model.json says them portably
    (engines/portable.py): the data root as $COILSIGHT_DATA_ROOT, run folders as runs/NAME."""
    from engines.portable import machine_paths

    run = _fake_run(tmp_path / "run")
    meta = json.loads((run / "meta.json").read_text())
    meta.update(data="/work/shared/data", seg_from={"run": "/tmp/runs/steel_medium2", "command": "coilsight train "
                "--data-root /work/shared/data --out /tmp/runs/steel_medium2"},
                command="coilsight train --profile steel --data-root /work/shared/data --out /home/ana/runs/gate1")
    (run / "meta.json").write_text(json.dumps(meta))
    export_pack(run, tmp_path / "pack", "steel")
    text = (tmp_path / "pack" / "model.json").read_text()
    assert machine_paths(text) == [] and "/work/" not in text
    training = json.loads(text)["training"]
    assert training["command"] == "coilsight train --profile steel --data-root $COILSIGHT_DATA_ROOT --out runs/gate1"
    assert training["data"].endswith("under $COILSIGHT_DATA_ROOT")
    assert training["seg_from"]["run"] == "runs/steel_medium2"
