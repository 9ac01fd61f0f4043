"""Issue 16 item 8: a TensorRT/CUDA failure makes the agent fall back to ONNX Runtime, never stop.

pycuda raises its own exceptions (pycuda._driver.MemoryError, LogicError, LaunchError: none is a
BackendError), from mem_alloc, Stream(), the context push. Only the hardware boundary is fake
here (_fake_gpu: fake `tensorrt` and `pycuda.driver` modules raising pycuda's real exception
hierarchy); TensorRTBackend, open_backend, close_backends and the agent's open_models are real,
and ONNX Runtime really loads the model it falls back to.

Also issue 22's "engine check at start-up ignores profile shapes": open_models must refuse an
engine whose manifest records another batch or frame shape than the config asks for.
"""
from __future__ import annotations

import numpy as np
import pytest
import structlog
from _fake_gpu import PYCUDA_ERRORS, install, uninstall, write_engine
from _tiny_onnx import save_model

from engines import manifest
from engines.backends import BACKENDS, BackendError
from engines.backends.onnxrt import OnnxRuntimeBackend
from engines.backends.select import close_backends, open_backend
from engines.modelpack import ModelEntry, sha256_file

OOM = "cuMemAlloc failed: out of memory"


@pytest.fixture()
def fake(monkeypatch):
    yield install(monkeypatch)
    uninstall()


@pytest.fixture()
def gate(tmp_path, fake):
    src = save_model("gate", tmp_path / "gate.onnx")
    write_engine(tmp_path / "engines", src)
    return ModelEntry(role="gate", path=src, sha256=sha256_file(src), output="scores"), tmp_path / "engines"


# Where pycuda raises while an engine is opened, what it raises, and the step the message must name.
STEPS = [
    ("init", "LogicError", "cuInit failed: no CUDA-capable device is detected", r"opening CUDA device 0"),
    ("retain_primary_context", "LogicError", "cuDevicePrimaryCtxRetain failed: invalid device ordinal",
     r"opening CUDA device 0"),
    ("push", "LogicError", "cuCtxPushCurrent failed: invalid context", r"making the CUDA context current \(push\)"),
    ("Stream", "MemoryError", "cuStreamCreate failed: out of memory", r"creating a CUDA stream"),
    ("pagelocked_empty", "MemoryError", "cuMemHostAlloc failed: out of memory",
     r"allocating \d+ bytes of page-locked host memory for 'image'"),
    ("mem_alloc", "MemoryError", OOM, r"allocating \d+ bytes of device memory for 'image'"),
]


@pytest.mark.parametrize(("call", "kind", "message", "step"), STEPS, ids=[s[0] for s in STEPS])
def test_pycuda_errors_while_opening_become_backend_errors(fake, gate, call, kind, message, step):
    module, cuda, _ = fake
    entry, d = gate
    # cuInit: the 2nd call; the 1st reads the machine facts for the manifest check (its failure is a ManifestError)
    cuda.fail_on(call, PYCUDA_ERRORS[kind](message), nth=2 if call == "init" else 1)
    backend = module.TensorRTBackend(d / "gate.engine", max_batch=4, onnx_path=entry.path)
    with pytest.raises(BackendError, match=rf"^tensorrt: {step} failed for gate.engine: "
                                           rf"pycuda\._driver\.{kind}: {message}$") as info:
        backend.activate()
    assert isinstance(info.value.__cause__, PYCUDA_ERRORS["Error"])
    assert not backend.is_active
    assert cuda.memory == {} and cuda.stack == []  # whatever it took is released, no context left current


def test_a_failed_open_frees_what_it_had_taken(fake, gate):
    """Out of memory on the output buffer: the input's device and host buffers are freed again."""
    module, cuda, _ = fake
    entry, d = gate
    cuda.fail_on("mem_alloc", PYCUDA_ERRORS["MemoryError"](OOM), nth=2)
    with pytest.raises(BackendError, match=rf"allocating \d+ bytes of device memory for 'scores' failed .*{OOM}"):
        module.TensorRTBackend(d / "gate.engine", max_batch=4, onnx_path=entry.path).activate()
    assert cuda.memory == {} and cuda.host_freed == 2 and cuda.stack == [] and cuda.events[-1] == "detach"
    assert sum(e.startswith("free ") for e in cuda.events) == 1


def test_out_of_memory_falls_back_to_onnxruntime_and_says_why_once(fake, gate):
    _, cuda, _ = fake
    entry, d = gate
    cuda.fail_on("mem_alloc", PYCUDA_ERRORS["MemoryError"](OOM))
    with structlog.testing.capture_logs() as logs:
        backend, skipped = open_backend(["tensorrt", "onnxruntime"], entry, max_batch=4, threads=1, strict=False,
                                        engine_dir=d)
    try:
        assert backend.name == "onnxruntime-cpu" and backend.is_active
        assert backend.infer(np.zeros((2, 1, 16, 16), np.uint8))["scores"].shape == (2, 3)
    finally:
        backend.deactivate()
    assert [s["backend"] for s in skipped] == ["tensorrt"]
    assert f"pycuda._driver.MemoryError: {OOM}" in skipped[0]["reason"]
    not_loaded = [e for e in logs if e["event"] == "backend_not_loaded"]
    assert len(not_loaded) == 1 and not_loaded[0]["reason"] == skipped[0]["reason"]
    assert [e["backend"] for e in logs if e["event"] == "backend_selected"] == ["onnxruntime"]
    assert cuda.memory == {} and cuda.stack == []


def test_strict_mode_refuses_with_the_pycuda_cause(fake, gate):
    _, cuda, _ = fake
    entry, d = gate
    cuda.fail_on("Stream", PYCUDA_ERRORS["MemoryError"]("cuStreamCreate failed: out of memory"))
    with pytest.raises(BackendError, match=r"gate: strict mode and tensorrt cannot load: tensorrt: creating a CUDA "
                                           r"stream failed .*pycuda\._driver\.MemoryError"):
        open_backend(["tensorrt", "onnxruntime"], entry, max_batch=4, threads=1, strict=True, engine_dir=d)


def test_any_error_a_backend_lets_through_still_falls_back(tmp_path, monkeypatch):
    """A backend that does not wrap its library's errors (here: a raw pycuda LaunchError) must not
    stop the chain: open_backend names the type, logs the traceback once, and moves on."""
    monkeypatch.setitem(BACKENDS, "unwrapped-gpu", "_fake_gpu:UnwrappedGpuBackend")
    src = save_model("gate", tmp_path / "gate.onnx")
    entry = ModelEntry(role="gate", path=src, sha256=sha256_file(src), output="scores")
    with structlog.testing.capture_logs() as logs:
        backend, skipped = open_backend(["unwrapped-gpu", "onnxruntime"], entry, max_batch=2, threads=1,
                                        strict=False, engine_dir=None)
    backend.deactivate()
    assert backend.name == "onnxruntime-cpu"
    assert skipped == [{"backend": "unwrapped-gpu", "reason": "unwrapped-gpu: unexpected error loading gate.onnx: "
                        "pycuda._driver.LaunchError: cuCtxSynchronize failed: unspecified launch failure"}]
    (line,) = [e for e in logs if e["event"] == "backend_not_loaded"]
    assert line["exc_info"] is True  # the traceback goes with it: this is a bug to fix in that backend
    with pytest.raises(BackendError, match=r"strict mode and unwrapped-gpu cannot load: .*LaunchError"):
        open_backend(["unwrapped-gpu", "onnxruntime"], entry, max_batch=2, threads=1, strict=True, engine_dir=None)


def test_a_failed_inference_is_a_backend_error_and_the_next_one_runs(fake, gate):
    module, cuda, _ = fake
    entry, d = gate
    x = np.full((2, 1, 8, 8), 51, np.uint8)
    with module.TensorRTBackend(d / "gate.engine", max_batch=4, onnx_path=entry.path) as backend:
        cuda.fail_on("memcpy_dtoh_async", PYCUDA_ERRORS["LaunchError"]("cuMemcpyDtoHAsync failed: launch failed"))
        with pytest.raises(BackendError, match=r"tensorrt: inference on a batch of shape \(2, 1, 8, 8\) failed for "
                                               r"gate.engine: pycuda\._driver\.LaunchError: cuMemcpyDtoHAsync"):
            backend.infer(x)
        assert cuda.stack == []  # popped on the error path, the lock released
        np.testing.assert_allclose(backend.infer(x)["scores"][0], 0.2 + np.arange(3), atol=1e-3)
        cuda.fail_on("push", PYCUDA_ERRORS["LogicError"]("cuCtxPushCurrent failed: context is destroyed"))
        with pytest.raises(BackendError, match=r"making the CUDA context current \(push\) failed .*context is destroyed"):
            backend.infer(x)


def test_release_failures_are_reported_after_releasing_the_rest(fake, gate):
    module, cuda, _ = fake
    entry, d = gate
    backend = module.TensorRTBackend(d / "gate.engine", max_batch=4, onnx_path=entry.path).activate()
    cuda.fail_on("free", PYCUDA_ERRORS["LogicError"]("cuMemFree failed: an illegal memory access was encountered"))
    with structlog.testing.capture_logs() as logs:
        with pytest.raises(BackendError, match=r"tensorrt: releasing gate.engine failed: device memory 'scores': "
                                               r"pycuda\._driver\.LogicError: cuMemFree failed"):
            backend.deactivate()
    assert not backend.is_active
    assert len(cuda.memory) == 1 and cuda.host_freed == 2  # the other buffers were still freed
    assert cuda.stack == [] and cuda.events[-1] == "detach"
    assert [e["what"] for e in logs if e["event"] == "tensorrt_release_failed"] == ["device memory 'scores'"]


def test_close_backends_closes_the_others_when_one_fails(fake, gate, tmp_path):
    """Models.close and open_models' clean-up use it: one broken GPU backend must not keep the
    others open nor raise into the thread that closes them."""
    module, cuda, _ = fake
    entry, d = gate
    trt_backend = module.TensorRTBackend(d / "gate.engine", max_batch=4, onnx_path=entry.path).activate()
    ort_backend = OnnxRuntimeBackend(entry.path, max_batch=2).activate()
    cuda.fail_on("pop", PYCUDA_ERRORS["LogicError"]("cuCtxPopCurrent failed: invalid context"))
    with structlog.testing.capture_logs() as logs:
        failures = close_backends([trt_backend, None, ort_backend])
    assert len(failures) == 1 and "CUDA context pop: pycuda._driver.LogicError" in failures[0]
    assert not trt_backend.is_active and not ort_backend.is_active
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["tensorrt_release_failed",
                                                                       "backend_release_failed"]


# -- start-up: agent.inference.open_models with fake GPU modules, real ONNX Runtime ---------------------

def _engines_for(cfg, shapes_for) -> None:
    """Engines for both models of the agent's tiny pack where the agent looks for them, their
    manifests recording ``shapes_for(role)`` as the optimisation profile."""
    from engines.modelpack import load_model_pack

    pack = load_model_pack(cfg.models_dir())
    d = manifest.engine_dir(pack.profile, manifest.machine_facts(), cfg.state_path())
    for role, entry in pack.models.items():
        write_engine(d, entry.path, role=role, profile_shapes=shapes_for(role))


def _shapes(max_batch: int = 4, height: int = 64, width: int = 256, opt_batch: int = 4) -> dict:
    return manifest.profile_shapes(1, height, width, min_batch=1, opt_batch=opt_batch, max_batch=max_batch)


def test_startup_uses_an_engine_built_for_the_configured_shapes(fake, agent_config):
    from agent.inference import open_models

    cfg = agent_config(models={"backends": ["tensorrt", "onnxruntime"], "max_batch": 4, "opt_batch": 4})
    _engines_for(cfg, lambda role: _shapes())
    models = open_models(cfg)
    try:
        assert {r: d["backend"] for r, d in models.describe().items()} == {"gate": "tensorrt", "seg": "tensorrt"}
        assert models.fallbacks == []
    finally:
        models.close()


@pytest.mark.parametrize("built_for", [
    pytest.param(dict(max_batch=8, opt_batch=8), id="built-for-another-batch"),
    pytest.param(dict(width=128), id="built-for-another-frame-width"),
    pytest.param(dict(height=32), id="built-for-another-frame-height"),
])
def test_startup_refuses_an_engine_built_for_other_shapes(fake, agent_config, built_for):
    """Issue 22: the profile shapes in the manifest are checked against models.max_batch/opt_batch
    and the pack's frame at start-up; a mismatch is stale and the agent falls back, saying why."""
    from agent.inference import open_models

    cfg = agent_config(models={"backends": ["tensorrt", "onnxruntime"], "max_batch": 4, "opt_batch": 4})
    _engines_for(cfg, lambda role: _shapes(**built_for))
    models = open_models(cfg)
    try:
        assert {r: d["backend"] for r, d in models.describe().items()} == {"gate": "onnxruntime-cpu",
                                                                         "seg": "onnxruntime-cpu"}
    finally:
        models.close()
    assert [(f["model"], f["backend"]) for f in models.fallbacks] == [("gate", "tensorrt"), ("seg", "tensorrt")]
    for f in models.fallbacks:
        assert "stale: profile shapes wanted" in f["reason"]
        assert str(_shapes()["image"]["max"]) in f["reason"]
