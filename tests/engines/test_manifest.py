"""manifest.json and check_engine with fake machine facts (no GPU here): every field's staleness,
missing, truncated and corrupt engines, state dir and engine dir naming."""
from __future__ import annotations

import dataclasses
import json

import pytest
from _tiny_onnx import save_model

from engines import manifest
from engines.manifest import MachineFacts, ManifestError, check_engine, engine_entry, record_engine

FACTS = MachineFacts(tensorrt="10.13.3.9", cuda_runtime="12.9", cuda_driver="13.0", gpu_name="NVIDIA RTX A4000",
                     compute_capability="8.6", gpu_uuid="GPU-0123abcd")
SHAPES = {"image": {"min": [1, 1, 32, 48], "opt": [8, 1, 32, 48], "max": [16, 1, 32, 48]}}


@pytest.fixture()
def built(tmp_path):
    """An engine dir as build.py leaves it: a (fake, byte-blob) engine + FP16 ONNX + manifest."""
    src = save_model("gate", tmp_path / "pack" / "gate.onnx")
    d = tmp_path / "engines"
    d.mkdir()
    engine = d / "gate.engine"
    engine.write_bytes(bytes(range(256)) * 40)
    fp16 = d / "gate.fp16.onnx"
    fp16.write_bytes(src.read_bytes())
    entry = engine_entry(role="gate", engine_path=engine, onnx_fp32=src, onnx_fp16=fp16, facts=FACTS,
                         profile_shapes=SHAPES, workspace_bytes=1 << 30, build_seconds=12.3,
                         built_at="2026-11-22T00:00:00+00:00", fp16_recipe={"keep_fp32": []}, parity={"frames": 8})
    record_engine(d, "gate", entry)
    return d, src, engine


def test_fresh_engine_has_no_reasons(built):
    d, src, _ = built
    assert check_engine(d, src, FACTS) == []
    assert check_engine(d, src, FACTS, profile_shapes=SHAPES) == []


def test_manifest_records_every_field(built):
    d, src, engine = built
    entry = json.loads((d / "manifest.json").read_text())["engines"]["gate"]
    assert entry["precision"] == "fp16-from-onnx"
    assert entry["engine"] == {"file": "gate.engine", "size": engine.stat().st_size,
                               "sha256": manifest.sha256_file(engine)}
    assert entry["source"]["onnx_fp32"]["sha256"] == manifest.sha256_file(src)
    assert entry["source"]["onnx_fp16"]["file"] == "gate.fp16.onnx"
    assert entry["machine"] == FACTS.to_dict()
    assert entry["profile_shapes"] == SHAPES and entry["workspace_bytes"] == 1 << 30
    assert entry["built_at"] and entry["build_seconds"] == 12.3 and entry["coilsight_version"]


@pytest.mark.parametrize("field,value,label", [
    ("tensorrt", "11.4.0.106", "TensorRT version"),
    ("cuda_runtime", "13.0", "CUDA runtime"),
    ("cuda_driver", "12.8", "CUDA driver"),
    ("gpu_name", "NVIDIA L4", "GPU"),
    ("compute_capability", "8.9", "compute capability"),
    ("gpu_uuid", "GPU-ffff", "GPU UUID"),
])
def test_each_machine_fact_makes_it_stale(built, field, value, label):
    d, src, _ = built
    reasons = check_engine(d, src, dataclasses.replace(FACTS, **{field: value}))
    assert len(reasons) == 1
    assert reasons[0].startswith(f"stale: {label} is {value}, the engine was built for ")


def test_unknown_uuid_is_not_compared(built):
    d, src, _ = built
    assert check_engine(d, src, dataclasses.replace(FACTS, gpu_uuid=None)) == []


def test_changed_source_model_is_stale(built):
    d, src, _ = built
    save_model("gate", src, seed=5)
    [reason] = check_engine(d, src, FACTS)
    assert reason.startswith("stale: source model gate.onnx is now ")


def test_every_difference_is_reported(built):
    d, src, _ = built
    other = dataclasses.replace(FACTS, tensorrt="11.0.0.114", gpu_name="NVIDIA L4")
    assert len(check_engine(d, src, other)) == 2


def test_profile_shape_change_is_stale(built):
    d, src, _ = built
    wanted = {"image": {**SHAPES["image"], "max": [32, 1, 32, 48]}}
    [reason] = check_engine(d, src, FACTS, profile_shapes=wanted)
    assert reason.startswith("stale: profile shapes wanted")


def test_truncated_engine_rejected(built):
    d, src, engine = built
    engine.write_bytes(engine.read_bytes()[:1000])
    [reason] = check_engine(d, src, FACTS)
    assert reason == f"truncated: {engine} is 1000 bytes, the manifest records 10240"


def test_corrupt_engine_same_size_rejected(built):
    d, src, engine = built
    data = bytearray(engine.read_bytes())
    data[5000] ^= 0xFF
    engine.write_bytes(bytes(data))
    [reason] = check_engine(d, src, FACTS)
    assert reason.startswith(f"corrupt: sha256 of {engine} is ")


def test_missing_engine_file_and_manifest(built, tmp_path):
    d, src, engine = built
    engine.unlink()
    assert check_engine(d, src, FACTS) == [f"missing: engine file {engine} not found"]
    empty = tmp_path / "nothing"
    empty.mkdir()
    [reason] = check_engine(empty, src, FACTS)
    assert reason == f"missing: no manifest.json in {empty}; run `coilsight engines build`"


def test_missing_role_entry(built):
    d, src, _ = built
    seg = save_model("seg", src.parent / "seg.onnx")
    assert check_engine(d, seg, FACTS) == [f"missing: {d / 'manifest.json'} has no entry for the seg engine; "
                                           "run `coilsight engines build`"]


@pytest.mark.parametrize("content,match", [
    (b"{not json", r"corrupt: .*manifest.json is not valid JSON"),
    (b'{"format": 99, "engines": {}}', r"corrupt: .*manifest.json has format 99, expected 1"),
    (b'{"format": 1}', r"corrupt: .*manifest.json has no 'engines' table"),
])
def test_corrupt_manifest(built, content, match):
    d, src, _ = built
    (d / "manifest.json").write_bytes(content)
    with pytest.raises(ManifestError, match=match):
        manifest.read_manifest(d)
    [reason] = check_engine(d, src, FACTS)
    assert reason.startswith("corrupt: ")


def test_malformed_entry(built):
    d, src, _ = built
    data = json.loads((d / "manifest.json").read_text())
    del data["engines"]["gate"]["engine"]["sha256"]
    (d / "manifest.json").write_text(json.dumps(data))
    [reason] = check_engine(d, src, FACTS)
    assert reason.startswith(f"corrupt: {d / 'manifest.json'} entry 'gate' is malformed")


def test_record_engine_keeps_other_roles(built):
    d, _, _ = built
    record_engine(d, "seg", {"role": "seg"})
    data = manifest.read_manifest(d)
    assert set(data["engines"]) == {"gate", "seg"}
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]


def test_state_dir_rules(monkeypatch, tmp_path):
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/a:{tmp_path}/b")
    assert manifest.state_dir() == tmp_path / "a"
    monkeypatch.delenv("STATE_DIRECTORY")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert manifest.state_dir() == tmp_path / "xdg" / "coilsight"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert manifest.state_dir() == tmp_path / "home" / ".local" / "state" / "coilsight"


def test_engine_dir_slug(tmp_path):
    assert FACTS.slug == "nvidia-rtx-a4000-sm86-trt10.13.3.9"
    assert manifest.engine_dir("steel", FACTS, tmp_path) == tmp_path / "engines" / "steel" / FACTS.slug


def test_machine_facts_without_tensorrt_says_so():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(ManifestError, match=r"TensorRT is not installed .*pip install the 'gpu' extra"):
            manifest.machine_facts()
    else:
        pytest.skip("TensorRT is installed here")


def test_facts_round_trip_and_missing_key():
    assert MachineFacts.from_dict(FACTS.to_dict(), "x") == FACTS
    d = FACTS.to_dict()
    del d["gpu_name"]
    with pytest.raises(ManifestError, match=r"m.json: machine facts lack key 'gpu_name'"):
        MachineFacts.from_dict(d, "m.json")
