"""Issue 16 item 8: a failed (re)build never costs the line its working engine, and `engines build`
ends in one line and a non-zero exit, never a traceback.

The build's own logic runs for real on a CPU box: step (a) (FP16 ONNX, ONNX Runtime parity), the
temporary plan name, the parity run on that plan, the rename and the manifest. Only the steps that
need TensorRT and a GPU (engines.build.GpuSteps) are replaced: the "plan" a CPU build writes is
the FP16 ONNX itself, which ONNX Runtime runs as the candidate, so the parity run compares real
numbers; failures are injected there (a plan builder that raises, pycuda out of memory in the
real TensorRTBackend over fake tensorrt/pycuda modules, a plan of another model).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os

import onnx
import pytest
from _fake_gpu import PYCUDA_ERRORS, install, uninstall
from _tiny_onnx import make_model, make_pack

from agent import engine_commands as build_cmd
from engines import build, manifest, trt_build
from engines.backends.onnxrt import OnnxRuntimeBackend
from engines.modelpack import load_model_pack
from engines.parity import ParityError

FACTS = manifest.MachineFacts(tensorrt="10.13.9.9", cuda_runtime="12.9", cuda_driver="13.0",
                              gpu_name="CPU Test Box", compute_capability="8.9")
OOM = "cuMemAlloc failed: out of memory"


class PlanWriter:
    """build_plan for a CPU box: writes the FP16 ONNX (or ``other``, another model) as the plan and
    records where it was asked to write it."""

    def __init__(self, other: bytes | None = None):
        self.other = other
        self.paths = []

    def __call__(self, onnx_path, engine_path, *, shapes, workspace_bytes, timing_cache):
        self.paths.append(engine_path)
        engine_path.write_bytes(self.other if self.other is not None else onnx_path.read_bytes())
        return {"seconds": 0.5, "tensorrt": FACTS.tensorrt}


def ort_plan(engine_path, *, role, max_batch, device):
    return OnnxRuntimeBackend(engine_path, max_batch=max_batch)


def gpu(build_plan=None, open_plan=ort_plan) -> build.GpuSteps:
    return build.GpuSteps(facts=lambda device: FACTS, build_plan=build_plan or PlanWriter(), open_plan=open_plan)


@pytest.fixture()
def built(tmp_path):
    """A pack whose gate engine was built once (the working engine a rebuild must not lose)."""
    spec = build.BuildSpec(pack=load_model_pack(make_pack(tmp_path / "pack")), state=tmp_path / "state",
                           roles=("gate",), min_batch=1, opt_batch=2, max_batch=4, parity_frames=8)
    writer = PlanWriter()
    (outcome,) = build.build(spec, gpu(writer))
    assert outcome.status == "built"
    d = manifest.engine_dir("tiny", FACTS, spec.state)
    return spec, d, writer


def snapshot(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def test_the_plan_is_built_under_a_temporary_name_then_installed(built):
    spec, d, writer = built
    (tmp,) = writer.paths
    assert tmp.parent == d  # same folder, so the rename is atomic; named per process (two builds at once)
    assert tmp.name == f".gate.engine.{os.getpid()}.new"
    assert sorted(snapshot(d)) == ["gate.engine", "gate.fp16.onnx", "manifest.json"]  # nothing temporary left
    fp16 = manifest.fp16_dir("tiny", spec.state) / "gate.fp16.onnx"
    assert (d / "gate.engine").read_bytes() == fp16.read_bytes()
    assert manifest.check_engine(d, spec.pack.models["gate"].path, FACTS, role="gate",
                                 profile_shapes=spec.profile_shapes("gate")) == []
    entry = manifest.read_manifest(d)["engines"]["gate"]
    assert entry["engine"]["file"] == "gate.engine"
    assert entry["parity"]["tensorrt"]["candidate"] == "onnxruntime-cpu:gate.engine"  # the name it is used under


def _rebuild(spec, **changes):
    return dataclasses.replace(spec, force=True, **changes)


def _failing_build_plan(onnx_path, engine_path, *, shapes, workspace_bytes, timing_cache):
    engine_path.write_bytes(b"half a plan")  # what a build killed mid-write might leave
    raise PYCUDA_ERRORS["MemoryError"](OOM)


def _unwrapped_plan(engine_path, *, role, max_batch, device):
    from _fake_gpu import UnwrappedGpuBackend

    return UnwrappedGpuBackend(engine_path, max_batch=max_batch)


FAILURES = {
    "build-raises": (dict(build_plan=_failing_build_plan), build.BuildError,
                     rf"^gate: the TensorRT build failed: pycuda\._driver\.MemoryError: {OOM}$"),
    "build-process-died": (dict(build_plan=lambda *a, **k: (_ for _ in ()).throw(
        build.BuildError("gate.engine: build process died with exit code -9 and no message"))),
        build.BuildError, r"^gate.engine: build process died with exit code -9"),
    "build-wrote-nothing": (dict(build_plan=lambda *a, **k: {"seconds": 1.0}), build.BuildError,
                            r"^gate: the TensorRT build reported success but wrote no plan at .*\.new$"),
    "parity-run-raises": (dict(open_plan=_unwrapped_plan), build.BuildError,
                          r"^gate: the parity run of the new engine failed: pycuda\._driver\.LaunchError: "
                          r"cuCtxSynchronize failed: unspecified launch failure; the previous engine, if any, is kept$"),
    "parity-fails": (dict(build_plan=PlanWriter(other=make_model("gate", seed=7).SerializeToString())),
                     ParityError, r"^FP16 parity failed for gate.onnx \(onnxruntime-cpu:\.gate\.engine\.\d+\.new\)"),
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_failed_rebuild_keeps_the_working_engine_and_manifest(built, failure):
    spec, d, _ = built
    steps, error, match = FAILURES[failure]
    before = snapshot(d)
    with pytest.raises(error, match=match):
        build.build(_rebuild(spec), gpu(**steps))
    assert snapshot(d) == before  # same files, same bytes: no temporary plan left either
    assert manifest.check_engine(d, spec.pack.models["gate"].path, FACTS, role="gate",
                                 profile_shapes=spec.profile_shapes("gate")) == []


def test_pycuda_out_of_memory_in_the_real_tensorrt_parity_run_keeps_the_engine(built, monkeypatch):
    """The default open_plan (the real TensorRTBackend, over fake tensorrt/pycuda modules) runs out
    of device memory: a BuildError naming the cause, the working engine untouched."""
    spec, d, _ = built
    _, cuda, _ = install(monkeypatch)
    try:
        cuda.fail_on("mem_alloc", PYCUDA_ERRORS["MemoryError"](OOM))
        before = snapshot(d)
        steps = build.GpuSteps(facts=lambda device: FACTS, build_plan=PlanWriter(other=b"FAKEPLAN" + bytes(64)))
        with pytest.raises(build.BuildError, match=r"^gate: the parity run of the new engine failed: tensorrt: "
                                                   r"allocating \d+ bytes of device memory for 'image' failed for "
                                                   rf"\.gate\.engine\.\d+\.new: pycuda\._driver\.MemoryError: {OOM}"):
            build.build(_rebuild(spec), steps)
        assert snapshot(d) == before and cuda.memory == {} and cuda.stack == []
    finally:
        uninstall()


def test_a_successful_rebuild_replaces_engine_and_manifest_together(built):
    spec, d, _ = built
    old = manifest.read_manifest(d)["engines"]["gate"]
    # a new FP16 recipe gives a different plan (the CPU "plan" is the FP16 ONNX itself)
    (outcome,) = build.build(_rebuild(spec, recipe=build.FP16Recipe(keep_fp32=("Conv",))), gpu())
    assert outcome.status == "built"
    new = manifest.read_manifest(d)["engines"]["gate"]
    assert new["engine"]["sha256"] != old["engine"]["sha256"]
    assert new["engine"]["sha256"] == manifest.sha256_file(d / "gate.engine")
    assert sorted(snapshot(d)) == ["gate.engine", "gate.fp16.onnx", "manifest.json"]


# -- manifest.install_engine: the rename + manifest step itself -------------------------------------

@pytest.fixture()
def installed(tmp_path):
    d = tmp_path / "engines"
    d.mkdir()
    (d / "gate.engine").write_bytes(b"old plan")
    (d / "gate.fp16.onnx").write_bytes(b"old fp16")
    manifest.record_engine(d, "gate", {"engine": {"file": "gate.engine", "sha256": "old"}})
    return d


def test_install_rolls_back_when_the_manifest_cannot_be_written(installed):
    d = installed
    before = snapshot(d)
    (d / "new.engine").write_bytes(b"new plan")
    (d / "new.fp16").write_bytes(b"new fp16")

    def entry():
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left on device"):
        manifest.install_engine(d, "gate", [(d / "new.engine", d / "gate.engine"), (d / "new.fp16", d / "gate.fp16.onnx")],
                                entry)
    assert snapshot(d) == before  # the new files were renamed into place, then the old ones put back
    assert not [p for p in d.iterdir() if p.name.endswith(".previous")]


def test_install_rolls_back_when_a_rename_fails(installed):
    """The engine was renamed into place, then the second file is missing: the old engine comes back."""
    d = installed
    before = snapshot(d)
    (d / "new.engine").write_bytes(b"new plan")
    with pytest.raises(FileNotFoundError):
        manifest.install_engine(d, "gate", [(d / "new.engine", d / "gate.engine"), (d / "gone", d / "gate.fp16.onnx")],
                                lambda: {"engine": {"file": "gate.engine"}})
    assert (d / "gate.engine").read_bytes() == b"old plan" and snapshot(d) == before


def test_first_install_that_fails_leaves_no_engine_without_an_entry(tmp_path):
    d = tmp_path / "engines"
    d.mkdir()
    (d / "new.engine").write_bytes(b"new plan")
    with pytest.raises(OSError):
        manifest.install_engine(d, "gate", [(d / "new.engine", d / "gate.engine")],
                                lambda: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    assert sorted(p.name for p in d.iterdir()) == []


# -- the command line: one line, non-zero exit ----------------------------------------------------------

def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="coilsight")
    build_cmd.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def _config(tmp_path, pack):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\nprofile = "tiny"\nstate_dir = "{tmp_path / "state"}"\n[models]\ndir = "{pack}"\n'
                   "max_batch = 4\nopt_batch = 2\n")
    return cfg


def test_cli_fp16_conversion_failure_is_one_line(tmp_path, capsys):
    """A model the FP16 converter refuses (a float32 input breaks the model contract) used to end
    the command in a FP16Error traceback."""
    from tinypack import write_pack_files

    pack = make_pack(tmp_path / "pack")
    model = onnx.load(str(pack / "seg.onnx"))
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    onnx.save(model, str(pack / "seg.onnx"))
    write_pack_files(pack, {"gate": {"file": "gate.onnx", "output": "scores"},
                            "seg": {"file": "seg.onnx", "output": "probs", "output_stride": 2}},
                     ("a", "b", "c"), profile="tiny", channels=1, height=32, width=48, gate_threshold=0.5,
                     min_area_px=4)
    code = run("engines", "build", "--config", str(_config(tmp_path, pack)), "--model", "seg")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == build_cmd.EXIT_FAILED
    assert err == [f"coilsight engines build: seg: FP16 conversion failed: {pack / 'seg.onnx'}: input 'image' is "
                   "FLOAT, the model contract wants uint8 with normalisation inside the graph"]


def test_cli_parity_run_out_of_gpu_memory_is_one_line_and_keeps_the_engine(tmp_path, capsys, monkeypatch):
    """`engines build --force` on a box whose GPU runs out of memory in the parity run of the new
    plan: one line naming the cause, exit 1, the engine built before still there and fresh."""
    pack = make_pack(tmp_path / "pack")
    cfg = _config(tmp_path, pack)
    _, cuda, _ = install(monkeypatch)  # machine facts and TensorRTBackend run on the fake modules
    try:
        facts = manifest.machine_facts()
        # the working engine: built as the CLI would (same spec), checked on ONNX Runtime
        spec = build.BuildSpec(pack=load_model_pack(pack), state=tmp_path / "state", roles=("gate",),
                               min_batch=1, opt_batch=2, max_batch=4)
        build.build(spec, build.GpuSteps(facts=lambda device: facts, build_plan=PlanWriter(), open_plan=ort_plan))
        assert run("engines", "check", "--config", str(cfg), "--model", "gate") == 0
        d = manifest.engine_dir("tiny", facts, tmp_path / "state")
        # the hardware step that builds a plan, in this process (no child: the fakes live here)
        monkeypatch.setattr(trt_build, "build_in_child", PlanWriter(other=b"FAKEPLAN" + bytes(64)))
        before = snapshot(d)
        capsys.readouterr()
        cuda.fail_on("mem_alloc", PYCUDA_ERRORS["MemoryError"](OOM))
        code = run("engines", "build", "--config", str(cfg), "--model", "gate", "--force")
        err = capsys.readouterr().err.strip().splitlines()
        assert code == build_cmd.EXIT_FAILED
        assert len(err) == 1 and err[0].startswith("coilsight engines build: gate: the parity run of the new "
                                                   "engine failed: tensorrt: allocating ")
        assert f"pycuda._driver.MemoryError: {OOM}; the previous engine, if any, is kept" in err[0]
        assert snapshot(d) == before
        assert run("engines", "check", "--config", str(cfg), "--model", "gate") == 0
    finally:
        uninstall()


def test_cli_build_failure_is_one_line(tmp_path, capsys, monkeypatch):
    pack = make_pack(tmp_path / "pack")
    install(monkeypatch)
    try:
        monkeypatch.setattr(trt_build, "build_in_child", _failing_build_plan)
        code = run("engines", "build", "--config", str(_config(tmp_path, pack)), "--model", "gate")
        err = capsys.readouterr().err.strip().splitlines()
        assert code == build_cmd.EXIT_FAILED
        assert err == [f"coilsight engines build: gate: the TensorRT build failed: pycuda._driver.MemoryError: {OOM}"]
        d = manifest.engine_dir("tiny", manifest.machine_facts(), tmp_path / "state")
        assert sorted(p.name for p in d.iterdir()) == []  # no half plan, no engine without an entry
    finally:
        uninstall()

