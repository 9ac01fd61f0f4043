"""TensorRTBackend's own logic on a box without a GPU: the `tensorrt` and `pycuda.driver` modules
are replaced by small fakes of the hardware-bound calls (the only fakes the project allows).

What this proves: the manifest is checked before any plan is deserialized; a None from
deserialize_cuda_engine becomes a BackendError carrying the logger's errors; TensorRT messages
reach structlog; buffers are sized once for the max batch and sliced per batch; input shapes
outside the profile are refused; the CUDA context is pushed/popped around every call; output
dtype comes from the engine (FP16 here) and results are float32; everything is freed.
What it cannot prove: that real TensorRT/pycuda behave like the fakes (test_tensorrt_gpu.py).
The fakes live in _fake_gpu.py; test_tensorrt_fallback.py makes them fail.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import structlog
from _fake_gpu import K, install, uninstall, write_engine
from _tiny_onnx import save_model

from engines import manifest
from engines.backends import BackendError


@pytest.fixture()
def fake(monkeypatch):
    yield install(monkeypatch)
    uninstall()


@pytest.fixture()
def engine_dir(tmp_path, fake):
    src = save_model("gate", tmp_path / "gate.onnx")
    d = tmp_path / "engines"
    write_engine(d, src)
    return d, src


def test_facts_from_pycuda(fake):
    facts = manifest.machine_facts()
    assert facts == manifest.MachineFacts(tensorrt="10.13.9.9", cuda_runtime="12.9", cuda_driver="13.0",
                                          gpu_name="Fake GPU 9000", compute_capability="8.9", gpu_uuid=None)


def test_infer_batches_push_pop_and_free(fake, engine_dir):
    module, cuda, calls = fake
    d, src = engine_dir
    backend = module.TensorRTBackend(d / "gate.engine", max_batch=4, onnx_path=src)
    with backend:
        assert cuda.stack == [] and backend.inputs[0].dtype == np.uint8
        for n in (1, 3, 4):
            x = np.random.default_rng(n).integers(0, 256, (n, 1, 12, 16), dtype=np.uint8)
            out = backend.infer(x)["scores"]
            expected = (x.astype(np.float32).mean(axis=(1, 2, 3))[:, None] / 255 + np.arange(K)).astype(np.float16)
            assert out.dtype == np.float32 and out.shape == (n, K)
            np.testing.assert_array_equal(out, expected.astype(np.float32))
            assert cuda.stack == []
        with pytest.raises(BackendError, match=r"tensorrt: input 'image' axis 2 is 20, the engine takes 8..16"):
            backend.infer(np.zeros((1, 1, 20, 16), np.uint8))
    assert calls[:2] == ["plugins", "deserialize"] and "execute (3, 1, 12, 16)" in calls
    assert cuda.memory == {} and cuda.host_freed == 2 and cuda.events[-1] == "detach"


def test_manifest_checked_before_deserialize(fake, engine_dir):
    module, cuda, calls = fake
    d, src = engine_dir
    (d / "gate.engine").write_bytes(b"FAKEPLAN" + bytes(50))
    with pytest.raises(manifest.StaleEngineError, match=r"tensorrt: refusing .*gate.engine: truncated: .* is 58 bytes"):
        module.TensorRTBackend(d / "gate.engine", max_batch=4, onnx_path=src).activate()
    assert "deserialize" not in calls
    with pytest.raises(BackendError, match=r"option onnx_path \(the source ONNX\) is needed"):
        module.TensorRTBackend(d / "gate.engine", max_batch=4).activate()


def test_deserialize_none_carries_logger_errors(fake, tmp_path):
    module, cuda, calls = fake
    bad = tmp_path / "gate.engine"
    bad.write_bytes(b"garbage")
    with pytest.raises(BackendError, match=r"cannot deserialize .*gate.engine: 1: \[runtime.cpp::parsePlan\] magic tag"):
        module.TensorRTBackend(bad, max_batch=4, verify_manifest=False).activate()
    assert cuda.stack == [] and cuda.events[-1] == "detach"


def test_max_batch_beyond_profile_refused(fake, engine_dir):
    module, cuda, _ = fake
    d, src = engine_dir
    with pytest.raises(BackendError, match=r"was built for batches up to 4, max_batch 8 asked"):
        module.TensorRTBackend(d / "gate.engine", max_batch=8, onnx_path=src).activate()
    assert cuda.memory == {} and cuda.stack == []


def test_logger_routes_into_structlog(fake):
    module, _, _ = fake
    logger = module.TrtLogger()
    sev = sys.modules["tensorrt"].ILogger.Severity
    with structlog.testing.capture_logs() as logs:
        logger.log(sev.WARNING, "tactic skipped")
        logger.log(sev.VERBOSE, "noise")
        logger.log(sev.ERROR, "out of memory")
    assert [(e["log_level"], e["message"]) for e in logs] == [("warning", "tactic skipped"), ("error", "out of memory")]
    assert logs[0]["event"] == "tensorrt_message"
    assert logger.take_errors() == ["out of memory"] and logger.take_errors() == []


def test_worker_threads_get_their_own_results(fake, engine_dir):
    import threading

    module, cuda, _ = fake
    d, src = engine_dir
    errors: list[str] = []
    with module.TensorRTBackend(d / "gate.engine", max_batch=4, onnx_path=src) as backend:

        def work(seed: int) -> None:
            rng = np.random.default_rng(seed)
            for _ in range(20):
                x = rng.integers(0, 256, (2, 1, 8, 8), dtype=np.uint8)
                want = (x.astype(np.float32).mean(axis=(1, 2, 3))[:, None] / 255 + np.arange(K)).astype(np.float16)
                got = backend.infer(x)["scores"]
                if not np.array_equal(got, want.astype(np.float32)):
                    errors.append(f"thread {seed}: got another call's result")

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == [] and cuda.stack == []
