"""training/export.py's instance packs: seg.onnx with probs, heatmap, size, offset matches torch,
model.json format 3 names the instance outputs, and the runtime decodes what torch would."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from engines.instances import decode_instances  # noqa: E402
from engines.modelpack import load_model_pack, sha256_file  # noqa: E402
from training.datasets import STEEL_CLASSES  # noqa: E402
from training.export import (  # noqa: E402
    INSTANCE_OUTPUTS, ExportError, export_instance_onnx, export_instance_pack, load_instance_run,
    verify_instance_onnx,
)
from training.nets import INSTANCE_CONFIGS, build_instance_model  # noqa: E402
from training.strip import RealisticStripGenerator  # noqa: E402

STEEL_PACK = Path(__file__).resolve().parents[2] / "engines" / "models" / "steel"


def _fake_run(folder: Path, size: str = "test", classes=STEEL_CLASSES, mean: float = 0.45, std: float = 0.2) -> Path:
    """An instance training folder as training.train_instances leaves it, with random weights and a
    heatmap bias raised so that random frames give peaks."""
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = build_instance_model(len(classes), 1, mean, std, size)
    with torch.no_grad():
        model.heatmap.bias.fill_(0.0)
    torch.save(model.state_dict(), folder / "best.pt")
    meta = {"kind": "instances", "profile": "steel", "classes": list(classes), "mean": mean, "std": std,
            "model_size": size, "model_config": INSTANCE_CONFIGS[size].to_dict(), "seed": 0,
            "command": "python -m training.train_instances --profile steel", "data": "/data", "minutes": 1.0,
            "history": [{"epoch": 1}], "best": {"epoch": 1, "val_map50": 0.1}, "config": {"synthetic_fraction": 0.15}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_round_trip_torch_vs_onnxruntime_for_every_output(tmp_path):
    frame = RealisticStripGenerator(seed=0).frame(1, defective=True).image
    doc = export_instance_pack(_fake_run(tmp_path / "run"), tmp_path / "pack", gate_from=STEEL_PACK,
                               check_frames=[frame[None, None]])
    assert set(doc["max_abs_diff"]) == set(INSTANCE_OUTPUTS)
    assert all(v < 1e-3 for v in doc["max_abs_diff"].values()), doc["max_abs_diff"]
    pack = load_model_pack(tmp_path / "pack")
    raw = json.loads((tmp_path / "pack" / "model.json").read_text())
    assert raw["format"] == 3 and raw["models"]["seg"]["output"] == "probs"
    assert raw["models"]["seg"]["instances"] == {"heatmap": "heatmap", "size": "size", "offset": "offset", "stride": 4}
    assert pack.seg.instances is not None and pack.seg.instances.stride == 4
    assert (pack.height, pack.width) == (256, 1600)
    # the gate is the shipped pack's, byte for byte, with its pooled input
    assert raw["models"]["gate"]["sha256"] == sha256_file(STEEL_PACK / "gate.onnx")
    assert raw["models"]["gate"]["input_pool"] == 2
    # ONNX Runtime on a whole strip frame: the same instances as torch
    _, model = load_instance_run(tmp_path / "run")
    sess = ort.InferenceSession(str(tmp_path / "pack" / "seg.onnx"), providers=["CPUExecutionProvider"])
    x = frame[None, None]
    probs, heat, size, off = sess.run(list(INSTANCE_OUTPUTS), {"image": x})
    with torch.no_grad():
        t_probs, t_heat, t_size, t_off = (t.numpy() for t in model(torch.from_numpy(x)))
    kw = dict(stride=4, thresholds=0.3, frame_hw=(256, 1600), max_instances=10)  # the 10 best: no near-ties
    ours = decode_instances(heat[0], size[0], off[0], **kw)
    theirs = decode_instances(t_heat[0], t_size[0], t_off[0], **kw)
    assert len(ours) > 0
    assert [(d.class_id, d.peak) for d in ours] == [(d.class_id, d.peak) for d in theirs]
    assert np.allclose([d.box for d in ours], [d.box for d in theirs], atol=0.05)


def test_a_graph_that_differs_from_torch_is_refused(tmp_path):
    torch.manual_seed(0)
    model = build_instance_model(2, config="test").eval()
    export_instance_onnx(model, tmp_path / "seg.onnx")
    assert max(verify_instance_onnx(model, tmp_path / "seg.onnx").values()) < 1e-4
    with torch.no_grad():
        model.size.bias.add_(0.5)  # a perturbed size head: boxes 1.65x larger in torch than in the graph
    with pytest.raises(ExportError, match="ONNX Runtime size differs from torch by"):
        verify_instance_onnx(model, tmp_path / "seg.onnx")
    with torch.no_grad():
        model.size.bias.sub_(0.5)
        model.heatmap.bias.add_(0.01)
    with pytest.raises(ExportError, match=r"ONNX Runtime heatmap differs from torch by .* \(limit 0.0001\)"):
        verify_instance_onnx(model, tmp_path / "seg.onnx")


def test_export_refuses_bad_runs(tmp_path):
    with pytest.raises(ExportError, match="no meta.json"):
        export_instance_pack(tmp_path, tmp_path / "out")
    run = _fake_run(tmp_path / "run", classes=("a", "b"))
    with pytest.raises(ExportError, match=r"--gate-from .*: classes .* differ from the run's \['a', 'b'\]"):
        export_instance_pack(run, tmp_path / "out", gate_from=STEEL_PACK)
    with pytest.raises(ExportError, match="the run trained profile 'steel', not 'kolektorsdd'"):
        export_instance_pack(run, tmp_path / "out", profile="kolektorsdd")
    with pytest.raises(ExportError, match="must be set and multiples of 16"):
        export_instance_pack(run, tmp_path / "out", height=200, width=200)
    (run / "best.pt").unlink()
    with pytest.raises(ExportError, match="no best.pt"):
        export_instance_pack(run, tmp_path / "out")
    meta = json.loads((run / "meta.json").read_text())
    (run / "meta.json").write_text(json.dumps({**meta, "kind": "components"}))
    with pytest.raises(ExportError, match="not an instance run"):
        export_instance_pack(run, tmp_path / "out")


def test_cli_trains_and_exports_an_instance_run(tmp_path):
    """`coilsight export` recognises an instance run and writes a format-3 pack (a real subprocess)."""
    import os
    import subprocess
    import sys

    run = _fake_run(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "agent.cli", "export", "--checkpoint", str(run), "--profile", "steel",
           "--out", str(tmp_path / "pack"), "--gate-from", str(STEEL_PACK)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "instance pack (format 3)" in done.stdout and "heatmap" in done.stdout
    assert load_model_pack(tmp_path / "pack").seg.instances is not None
    bad = subprocess.run(cmd[:-2] + ["--profile", "kolektorsdd"], capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2 and "not 'kolektorsdd'" in bad.stderr
    line = subprocess.run(cmd[:-4] + ["--out", str(tmp_path / "line"), "--gate-from", str(STEEL_PACK), "--tta", "flip",
                           "--tier", "line"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert line.returncode == 0, line.stderr
    assert "line tier, flip test-time flips in the graph (2 passes)" in line.stdout
    assert json.loads((tmp_path / "line" / "model.json").read_text())["training"]["tta"]["passes"] == 2
    for profile in ("wafer",):  # the generated lines' packs take neither
        refused = subprocess.run([sys.executable, "-m", "agent.cli", "export", "--checkpoint", str(run), "--profile",
                                  profile, "--out", str(tmp_path / "w"), "--tta", "flip4"],
                                 capture_output=True, text=True, timeout=300, env=env)
        assert refused.returncode == 2 and "--tta: not for the wafer line's packs" in refused.stderr


def _gate_strip_roundtrip(pack: Path) -> float:
    """training.gate_strip rebuilds the pack's gate from model.json alone; its largest difference from ONNX Runtime."""
    from training import gate_strip

    x = gate_strip.pooled(np.stack([gate_strip.clean_frame("val", i) for i in range(2)]), 2)
    _, pool, diff = gate_strip.load_gate(pack, x)
    assert pool == 2
    return diff


def test_gate_from_records_the_kept_gates_net_so_gate_strip_can_rebuild_it(tmp_path):
    """--gate-from writes gate_model_size / gate_model_config into the new model.json: from an instance
    pack that kept a gate (the shipped steel pack: its gate_model_*), and from a component pack (its
    model_size / model_config, which describe its gate). Without them gate_strip cannot rebuild the gate."""
    import shutil

    from training.export import kept_gate_config

    shipped = json.loads((STEEL_PACK / "model.json").read_text())
    steel, norm = shipped["training"], {k: shipped["input"][k] for k in ("mean", "std")}
    run = _fake_run(tmp_path / "run", **norm)  # gate_strip rebuilds the gate with model.json's normalisation
    export_instance_pack(run, tmp_path / "from_instances", gate_from=STEEL_PACK)
    got = json.loads((tmp_path / "from_instances" / "model.json").read_text())["training"]
    assert got["gate_model_config"] == steel["gate_model_config"] and got["gate_model_size"] == "sepgate"
    assert got["model_config"] == INSTANCE_CONFIGS["test"].to_dict()  # the segmenter's, as before
    assert "tier" not in got  # a "test" net belongs to no tier
    assert _gate_strip_roundtrip(tmp_path / "from_instances") < 1e-4
    # a component pack as the gate's source (the steel pack as it was before the instance model)
    comp = tmp_path / "components"
    shutil.copytree(STEEL_PACK, comp)
    doc = json.loads((comp / "model.json").read_text())
    doc["format"] = 2
    doc["models"]["seg"].pop("instances")
    doc["training"] = {"model_size": "sepgate", "model_config": steel["gate_model_config"], "command": "coilsight train"}
    (comp / "model.json").write_text(json.dumps(doc))
    assert kept_gate_config(comp) == {"gate_model_size": "sepgate", "gate_model_config": steel["gate_model_config"]}
    export_instance_pack(_fake_run(tmp_path / "run_edge", size="edge", **norm), tmp_path / "from_components", gate_from=comp)
    got = json.loads((tmp_path / "from_components" / "model.json").read_text())["training"]
    assert got["gate_model_config"] == steel["gate_model_config"] and got["gate_from"].endswith("components")
    assert got["model_size"] == "edge" and got["tier"] == "edge"  # the tier the config's models.tier names
    assert _gate_strip_roundtrip(tmp_path / "from_components") < 1e-4
    # an instance pack that does not say what its gate is: nothing to copy, nothing invented
    del doc["training"]["model_config"]
    doc["training"]["kind"] = "instances"
    (comp / "model.json").write_text(json.dumps(doc))
    assert kept_gate_config(comp) == {}


def test_flip_tta_averages_the_flipped_passes_and_keeps_the_plain_offset():
    from training.nets import FlipTTA

    torch.manual_seed(3)
    net = build_instance_model(2, config="test").eval()
    x = torch.randint(0, 256, (2, 1, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        plain = net(x)
        flipped = {d: net(torch.flip(x, dims=d)) for d in ((3,), (2,), (2, 3))}
        for name, dims in (("flip", ((3,),)), ("flip4", ((3,), (2,), (2, 3)))):
            tta = FlipTTA(net, name)
            got = tta(x)
            assert tta.passes == 1 + len(dims)
            for i in range(3):  # probs, heatmap, size: the mean of the plain pass and each pass flipped back
                want = (plain[i] + sum(torch.flip(flipped[d][i], dims=d) for d in dims)) / tta.passes
                assert torch.allclose(got[i], want, atol=1e-6), (name, i)
                assert not torch.allclose(got[i], plain[i], atol=1e-4), (name, i)  # the flips do count
            assert torch.equal(got[3], plain[3])  # the offset is the plain pass's
    # a frame symmetric left-right: the left-right mean is the plain pass (the flips are undone right)
    sym = torch.cat([x[..., :48], torch.flip(x[..., :48], dims=(3,))], dim=3)
    with torch.no_grad():
        a, b = net(sym), net(torch.flip(sym, dims=(3,)))
        assert torch.allclose(FlipTTA(net, "flip")(sym)[1], (a[1] + torch.flip(b[1], dims=(3,))) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="flips 'none'"):
        FlipTTA(net, "none")


def test_export_with_tta_puts_the_flips_in_the_graph_and_says_so(tmp_path):
    from training.nets import FlipTTA

    run = _fake_run(tmp_path / "run")
    frame = RealisticStripGenerator(seed=0).frame(1, defective=True).image[None, None]
    doc = export_instance_pack(run, tmp_path / "pack", gate_from=STEEL_PACK, tta="flip4", tier="line",
                               check_frames=[frame])
    assert all(v < 1e-3 for v in doc["max_abs_diff"].values()), doc["max_abs_diff"]
    raw = json.loads((tmp_path / "pack" / "model.json").read_text())
    assert raw["training"]["tta"]["flips"] == "flip4" and raw["training"]["tta"]["passes"] == 4
    assert raw["training"]["tier"] == "line"  # chosen, not the model size's (test: none)
    # ONNX Runtime runs the four passes: the graph's heatmap is FlipTTA's, not the plain net's
    _, model = load_instance_run(run)
    sess = ort.InferenceSession(str(tmp_path / "pack" / "seg.onnx"), providers=["CPUExecutionProvider"])
    heat = sess.run(["heatmap"], {"image": frame})[0]
    with torch.no_grad():
        want = FlipTTA(model, "flip4")(torch.from_numpy(frame))[1].numpy()
        plain = model(torch.from_numpy(frame))[1].numpy()
    assert np.abs(heat - want).max() < 1e-4 < np.abs(heat - plain).max()
    plain_doc = export_instance_pack(run, tmp_path / "plain", gate_from=STEEL_PACK)
    assert "tta" not in plain_doc["training"] and "tier" not in plain_doc["training"]
    with pytest.raises(ExportError, match="tta 'mirror'"):
        export_instance_pack(run, tmp_path / "x", tta="mirror")
    with pytest.raises(ExportError, match="tier 'cloud'"):
        export_instance_pack(run, tmp_path / "x", tier="cloud")
