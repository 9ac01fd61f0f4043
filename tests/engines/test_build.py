"""`coilsight engines build|list|check` on a CPU box: step (a) (FP16 ONNX + ONNX Runtime parity)
runs for real on tiny model packs; step (b) needs TensorRT and is covered by test_tensorrt_gpu.py."""
from __future__ import annotations

import argparse
import importlib.util
import json

import cv2
import numpy as np
import pytest
from _tiny_onnx import make_pack

from agent import engine_commands as build_cmd
from engines import build, manifest, trt_build
from engines.modelpack import load_model_pack
from engines.parity import synthetic_frames

NO_TRT = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="describes a box without TensorRT")


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="coilsight")
    build_cmd.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.fixture()
def setup(tmp_path):
    pack = make_pack(tmp_path / "pack")
    state = tmp_path / "state"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\nprofile = "tiny"\nstate_dir = "{state}"\n[models]\ndir = "{pack}"\n'
                   "max_batch = 4\nopt_batch = 2\n")
    return pack, state, cfg


@NO_TRT
def test_build_without_tensorrt_does_step_a_then_exits_3(setup, capsys):
    pack, state, cfg = setup
    assert run("engines", "build", "--config", str(cfg)) == build_cmd.EXIT_NO_TENSORRT
    # the command's own message; its structured log events (JSON lines) share stderr
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("{")]
    assert len(err) == 1
    assert err[0].startswith("coilsight engines build: TensorRT is not installed")
    assert "FP16 ONNX and the ONNX Runtime parity gate are done" in err[0]
    fp16_dir = state / "engines" / "tiny" / "fp16"
    for role in ("gate", "seg"):
        record = json.loads((fp16_dir / f"{role}.fp16.json").read_text())
        assert record["sha256"] == manifest.sha256_file(fp16_dir / f"{role}.fp16.onnx")
        assert record["parity"]["frames"] == 16
        assert record["parity"]["outputs"][("scores" if role == "gate" else "probs")]["max_abs_diff"] < 0.01
    assert json.loads((fp16_dir / "gate.fp16.json").read_text())["parity"]["decision_agreement"] == 1.0


@NO_TRT
def test_parity_failure_stops_the_build(setup, capsys):
    pack, state, cfg = setup
    code = run("engines", "build", "--config", str(cfg), "--model", "seg", "--max-abs-diff", "1e-9")
    assert code == build_cmd.EXIT_FAILED
    err = capsys.readouterr().err
    assert "parity seg.onnx [seg]: onnxruntime-cpu:seg.fp16.onnx vs onnxruntime-cpu:seg.onnx" in err
    assert "coilsight engines build: FP16 parity failed for seg.onnx" in err
    fp16_dir = state / "engines" / "tiny" / "fp16"
    assert not (fp16_dir / "seg.fp16.json").exists() and not (fp16_dir / "seg.fp16.onnx").exists()


@NO_TRT
def test_dry_run_reports_and_writes_nothing(setup, capsys):
    pack, state, cfg = setup
    assert run("engines", "build", "--config", str(cfg), "--dry-run") == 0
    out = capsys.readouterr().out
    assert "profile tiny: pack" in out and "engine dir: none here (TensorRT is not installed" in out
    assert '"max": [4, 1, 32, 48]' in out and '"opt": [2, 1, 32, 48]' in out
    assert "gate: would build: cannot build here: TensorRT is not installed" in out
    assert not state.exists()


def test_int8_is_refused(setup, capsys):
    _, _, cfg = setup
    assert run("engines", "build", "--config", str(cfg), "--int8") == build_cmd.EXIT_USAGE
    assert "--int8 is not supported yet" in capsys.readouterr().err


@NO_TRT
def test_check_fails_with_reasons(setup, capsys):
    _, _, cfg = setup
    assert run("engines", "check", "--config", str(cfg), "--model", "gate") == build_cmd.EXIT_FAILED
    assert capsys.readouterr().out.startswith("tiny/gate: cannot build here: TensorRT is not installed")


def test_bad_config_and_missing_profile_are_usage_errors(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[models]\nmax_batch = 0\n")
    assert run("engines", "build", "--config", str(cfg)) == build_cmd.EXIT_USAGE
    assert "models.max_batch" in capsys.readouterr().err
    assert run("engines", "check", "--profile", "no-such-profile") == build_cmd.EXIT_USAGE
    assert "no model.json in" in capsys.readouterr().err


def test_list_shows_manifest_entries(tmp_path, capsys):
    d = tmp_path / "engines" / "steel" / "nvidia-l4-sm89-trt10.13.3.9"
    d.mkdir(parents=True)
    manifest.record_engine(d, "gate", {"machine": {"tensorrt": "10.13.3.9", "gpu_name": "NVIDIA L4"},
                                       "built_at": "2026-11-22T00:00:00+00:00", "engine": {"size": 123},
                                       "profile_shapes": {"image": {"max": [8, 1, 256, 1600]}}})
    bad = tmp_path / "engines" / "steel" / "broken"
    bad.mkdir()
    (bad / "manifest.json").write_text("{")
    assert run("engines", "list", "--state-dir", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "steel/gate: TensorRT 10.13.3.9 on NVIDIA L4, built 2026-11-22T00:00:00+00:00, 123 bytes, max [8, 1, 256, 1600]" in out
    assert "broken: corrupt:" in out
    assert run("engines", "list", "--state-dir", str(tmp_path / "empty")) == 0
    assert "no engines under" in capsys.readouterr().out


def test_spec_validation(setup):
    pack = load_model_pack(setup[0])
    with pytest.raises(build.BuildError, match=r"1 <= min \(1\) <= opt \(8\) <= max \(4\)"):
        build.BuildSpec(pack=pack, state=setup[1], opt_batch=8, max_batch=4)
    with pytest.raises(build.BuildError, match=r"model\(s\) \['cls'\] not in the tiny pack"):
        build.BuildSpec(pack=pack, state=setup[1], roles=("cls",))
    with pytest.raises(build.BuildError, match=r"workspace 1024 bytes is below 64 MiB"):
        build.BuildSpec(pack=pack, state=setup[1], workspace_bytes=1024)
    spec = build.BuildSpec(pack=pack, state=setup[1], min_batch=1, opt_batch=2, max_batch=4)
    assert spec.profile_shapes("gate") == spec.profile_shapes("seg") == {"image": {"min": [1, 1, 32, 48], "opt": [2, 1, 32, 48], "max": [4, 1, 32, 48]}}


def test_frames_from_npy_and_image_folder(setup, tmp_path):
    pack = load_model_pack(setup[0])
    frames = synthetic_frames(3, 1, 32, 48, seed=9)
    npy = tmp_path / "f.npy"
    np.save(npy, frames[:, 0])
    spec = build.BuildSpec(pack=pack, state=setup[1], frames_path=npy)
    assert np.array_equal(build.load_frames(spec), frames)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"{i}.png"), f[0])
    assert np.array_equal(build.load_frames(build.BuildSpec(pack=pack, state=setup[1], frames_path=folder)), frames)
    np.save(npy, synthetic_frames(2, 1, 16, 16))
    with pytest.raises(build.BuildError, match=r"f.npy: frames are uint8 \(1, 16, 16\), the tiny profile needs uint8 \(1, 32, 48\)"):
        build.load_frames(spec)
    with pytest.raises(build.BuildError, match=r"expected a folder of images or a .npy file"):
        build.load_frames(build.BuildSpec(pack=pack, state=setup[1], frames_path=tmp_path / "x.txt"))


@NO_TRT
def test_build_child_process_reports_its_error(tmp_path):
    """Step (b) runs in a spawned process; whatever stops it comes back as a BuildError."""
    with pytest.raises(build.BuildError, match=r"ModuleNotFoundError: No module named 'tensorrt'"):
        trt_build.build_in_child(tmp_path / "gate.fp16.onnx", tmp_path / "gate.engine", shapes={},
                             workspace_bytes=1 << 30, timing_cache=tmp_path / "timing.cache", timeout_s=120)
    assert not (tmp_path / "gate.engine").exists()


@NO_TRT
def test_a_gate_with_an_input_pool_is_built_and_checked_on_pooled_frames(tmp_path, capsys):
    """The gate of a format-2 pack takes frames pooled by the agent: its engine's optimisation profile
    and its parity frames are pooled the same way. Its graph has a fixed pooled input size, so
    whole frames would fail the parity run."""
    from tinypack import make_pack as make_agent_pack

    pack_dir = make_agent_pack(tmp_path / "pack", height=64, width=256, gate_input_pool=4)
    state = tmp_path / "state"
    spec = build.BuildSpec(pack=load_model_pack(pack_dir), state=state, min_batch=1, opt_batch=2, max_batch=4)
    assert spec.profile_shapes("gate")["image"]["max"] == [4, 1, 16, 64]
    assert spec.profile_shapes("seg")["image"]["max"] == [4, 1, 64, 256]
    with pytest.raises(build.TensorRTMissing):
        build.build(spec)
    fp16_dir = state / "engines" / "tiny" / "fp16"
    gate = json.loads((fp16_dir / "gate.fp16.json").read_text())["parity"]
    assert gate["frames"] == 16 and gate["decision_agreement"] == 1.0
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\nprofile = "tiny"\nstate_dir = "{state}"\n[models]\ndir = "{pack_dir}"\n'
                   "max_batch = 4\nopt_batch = 2\n")
    assert run("engines", "build", "--config", str(cfg), "--dry-run") == 0
    out = capsys.readouterr().out
    assert 'gate: profile shapes {"image": {"min": [1, 1, 16, 64], "opt": [2, 1, 16, 64], "max": [4, 1, 16, 64]}}' in out


@NO_TRT
@pytest.mark.parametrize("tier", ["edge", "line"])
def test_the_shipped_steel_packs_pass_step_a(tmp_path, capsys, tier):
    """The shipped steel instance packs, both tiers (the line pack's graph runs four flipped passes):
    their FP16 graphs pass the parity gate on ONNX Runtime, boxes included. Until the gate let a box
    scored on its threshold fall either way, the edge pack failed here (157 of 158 boxes paired)."""
    state = tmp_path / "state"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\nprofile = "steel"\nstate_dir = "{state}"\n[models]\ntier = "{tier}"\n')
    assert run("engines", "build", "--config", str(cfg), "--model", "seg") == build_cmd.EXIT_NO_TENSORRT
    record = json.loads((state / "engines" / "steel" / "fp16" / "seg.fp16.json").read_text())
    boxes = record["parity"]["boxes"]
    assert boxes["reference"] > 50 and abs(boxes["reference"] - boxes["candidate"]) <= 3
    unpaired = boxes["unpaired_over_threshold"]
    assert all(v < 0.02 for v in unpaired["reference"] + unpaired["candidate"])
