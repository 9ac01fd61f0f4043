"""TensorRT on a real GPU: build engines (tiny models, and the shipped steel pack when present),
run them, parity against ONNX Runtime FP32, throughput at batch 1/8/32, staleness and
corruption handling, worker threads. Skips cleanly without CUDA/TensorRT/pycuda.

Run on a GPU box (docs/engines.md):
    .venv/bin/pytest -m gpu tests/engines/test_tensorrt_gpu.py -s
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _tiny_onnx import make_pack

pytestmark = pytest.mark.gpu

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed")
pytest.importorskip("pycuda.driver", reason="pycuda is not installed")

from engines import build, manifest  # noqa: E402
from engines.backends.onnxrt import OnnxRuntimeBackend  # noqa: E402
from engines.modelpack import load_model_pack  # noqa: E402
from engines.parity import ParityBar, compare, synthetic_frames  # noqa: E402

STEEL = Path(__file__).resolve().parents[2] / "engines" / "models" / "steel"


@pytest.fixture(scope="module")
def facts():
    try:
        return manifest.machine_facts()
    except manifest.ManifestError as exc:
        pytest.skip(f"no CUDA device: {exc}")


def _build(pack_dir: Path, state: Path, max_batch: int = 32) -> build.BuildSpec:
    spec = build.BuildSpec(pack=load_model_pack(pack_dir), state=state, min_batch=1, opt_batch=8,
                           max_batch=max_batch, workspace_bytes=2 << 30, parity_frames=8)
    outcomes = build.build(spec)
    assert {o.role: o.status for o in outcomes} == {r: "built" for r in spec.selected}
    return spec


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, facts):
    root = tmp_path_factory.mktemp("trt")
    spec = _build(make_pack(root / "pack", height=64, width=96), root / "state")
    return spec, manifest.engine_dir(spec.pack.profile, facts, spec.state)


def _trt(engine_dir: Path, spec: build.BuildSpec, role: str, max_batch: int = 32, **kw):
    from engines.backends.tensorrt import TensorRTBackend

    return TensorRTBackend(engine_dir / f"{role}.engine", max_batch=max_batch,
                           onnx_path=spec.pack.models[role].path, role=role, **kw)


def _throughput(backend, c: int, h: int, w: int, label: str) -> dict[int, float]:
    """Frames per second at batch 1, 8 and 32 (each shape warmed up, then ~1 s of calls)."""
    fps = {}
    for batch in (1, 8, 32):
        x = synthetic_frames(batch, c, h, w, seed=batch)
        backend.infer(x)  # warm up this shape
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < 1.0:
            backend.infer(x)
            n += 1
        seconds = time.perf_counter() - start
        fps[batch] = n * batch / seconds
        print(f"\n{label} batch {batch}: {fps[batch]:.0f} frames/s, {1000 * seconds / n:.2f} ms/batch")
    return fps


def test_manifest_fresh_after_build(tiny, facts):
    spec, d = tiny
    for role in ("gate", "seg"):
        assert manifest.check_engine(d, spec.pack.models[role].path, facts, role=role,
                                     profile_shapes=spec.profile_shapes(role)) == []
    entry = manifest.read_manifest(d)["engines"]["gate"]
    assert entry["precision"] == "fp16-from-onnx" and entry["machine"]["tensorrt"] == trt.__version__
    assert entry["parity"]["tensorrt"]["outputs"]["scores"]["candidate_nonfinite"] == 0
    assert {o.status for o in build.build(spec)} == {"up-to-date"}


@pytest.mark.parametrize("role", ["gate", "seg"])
def test_engine_matches_ort_and_throughput(tiny, role):
    spec, d = tiny
    frames = synthetic_frames(32, 1, 64, 96, seed=5)
    with OnnxRuntimeBackend(spec.pack.models[role].path, max_batch=32) as ref, _trt(d, spec, role) as eng:
        out = eng.infer(frames[:3])
        assert all(v.dtype == np.float32 for v in out.values())
        report = compare(ref, eng, [frames[:1], frames[:8], frames], role=role, gate_threshold=0.5,
                         pixel_thresholds=0.5).check(ParityBar())
        print("\n" + report.text())
        fps = _throughput(eng, 1, 64, 96, f"tiny {role}")
    # The engine's batch profile is used: a batch of 32 is one call, not 32 calls of one, so frames/s
    # grow with the batch. Relative, on this GPU in this run: no absolute frames/s limit.
    assert fps[1] < fps[8] < fps[32], fps


def test_worker_threads_share_one_backend(tiny):
    spec, d = tiny
    frames = synthetic_frames(8, 1, 64, 96, seed=2)
    results, errors = [], []
    with _trt(d, spec, "gate") as eng:
        expected = eng.infer(frames)["scores"]

        def work():
            try:
                for _ in range(5):
                    results.append(eng.infer(frames)["scores"])
            except Exception as exc:  # surfaced by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and len(results) == 15
    assert all(np.array_equal(r, expected) for r in results)


def test_stale_engine_refused_and_fallback(tiny):
    from engines.backends import BackendError
    from engines.backends.select import open_backend
    from engines.manifest import StaleEngineError

    spec, d = tiny
    mpath = d / "manifest.json"
    original = mpath.read_text()
    data = json.loads(original)
    data["engines"]["gate"]["machine"]["tensorrt"] = "0.0.0.0"
    mpath.write_text(json.dumps(data))
    try:
        with pytest.raises(StaleEngineError, match=r"stale: TensorRT version is .*, the engine was built for 0.0.0.0"):
            _trt(d, spec, "gate").activate()
        backend, skipped = open_backend(["tensorrt", "onnxruntime"], spec.pack.models["gate"], max_batch=8,
                                        threads=1, strict=False, engine_dir=d)
        assert backend.name == "onnxruntime-cpu" and "stale: TensorRT version" in skipped[0]["reason"]
        backend.deactivate()
        with pytest.raises(BackendError, match=r"strict mode and tensorrt cannot load: .*stale"):
            open_backend(["tensorrt", "onnxruntime"], spec.pack.models["gate"], max_batch=8, threads=1,
                         strict=True, engine_dir=d)
    finally:
        mpath.write_text(original)


def test_truncated_plan_without_manifest_check_gives_logger_errors(tiny, tmp_path):
    from engines.backends import BackendError

    spec, d = tiny
    plan = (d / "gate.engine").read_bytes()
    (tmp_path / "gate.engine").write_bytes(plan[: len(plan) // 2])  # truncated: TensorRT must say so, not crash
    with pytest.raises(BackendError, match=r"tensorrt: cannot deserialize .*gate.engine: "):
        _trt(tmp_path, spec, "gate", verify_manifest=False).activate()


def test_out_of_device_memory_falls_back_to_onnxruntime(tiny):
    """Issue 16 item 8 on real hardware: with the GPU's memory taken, opening the engine fails
    (pycuda's MemoryError from mem_alloc, or TensorRT's out-of-memory while deserializing); the
    failure is a BackendError, open_backend falls back to ONNX Runtime and says why, and nothing
    is left current on this thread."""
    import pycuda.driver as cuda

    from engines.backends.select import open_backend

    spec, d = tiny
    cuda.init()
    ctx = cuda.Device(0).retain_primary_context()
    ctx.push()
    hog, chunk = [], 1 << 30
    try:
        while chunk >= 1 << 20:  # take everything, in ever smaller pieces
            try:
                hog.append(cuda.mem_alloc(chunk))
            except cuda.MemoryError:
                chunk //= 2
        backend, skipped = open_backend(["tensorrt", "onnxruntime"], spec.pack.models["gate"], max_batch=32,
                                        threads=1, strict=False, engine_dir=d,
                                        profile_shapes=spec.profile_shapes("gate"))
        backend.deactivate()
        print(f"\nfell back after taking {len(hog)} blocks: {skipped}")
        assert backend.name == "onnxruntime-cpu"
        assert [s["backend"] for s in skipped] == ["tensorrt"] and skipped[0]["reason"].startswith("tensorrt: ")
    finally:
        for block in hog:
            block.free()
        ctx.pop()
        ctx.detach()
    with _trt(d, spec, "gate") as eng:  # memory back: the same engine loads again
        assert eng.infer(synthetic_frames(2, 1, 64, 96))["scores"].shape[0] == 2


def test_steel_pack_if_shipped(tmp_path, facts):
    if not (STEEL / "model.json").is_file():
        pytest.skip("engines/models/steel is not in this checkout")
    spec = _build(STEEL, tmp_path / "state")
    d = manifest.engine_dir(spec.pack.profile, facts, spec.state)
    frames = synthetic_frames(32, spec.pack.channels, spec.pack.height, spec.pack.width, seed=1)
    for role in spec.selected:
        with OnnxRuntimeBackend(spec.pack.models[role].path, max_batch=32) as ref, _trt(d, spec, role) as eng:
            report = compare(ref, eng, [frames[:8]], role=role, gate_threshold=0.5, pixel_thresholds=0.5)
            print("\n" + report.check(ParityBar()).text())
            _throughput(eng, spec.pack.channels, spec.pack.height, spec.pack.width, f"steel {role}")
