"""Backend fallback chain on this CPU box: real ONNX Runtime, TensorRT and CUDA absent."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from _tiny_onnx import save_model

from engines.backends import BackendError
from engines.backends.select import open_backend
from engines.modelpack import ModelEntry, sha256_file
from engines.parity import synthetic_frames

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                                reason="these tests describe a box without TensorRT")


@pytest.fixture()
def gate(tmp_path):
    path = save_model("gate", tmp_path / "gate.onnx")
    return ModelEntry(role="gate", path=path, sha256=sha256_file(path), output="scores")


def test_cpu_box_picks_ort_cpu_and_says_why(gate, tmp_path):
    backend, skipped = open_backend(["tensorrt", "onnxruntime-cuda", "onnxruntime"], gate, max_batch=4,
                                    threads=1, strict=False, engine_dir=tmp_path / "engines")
    try:
        assert backend.name == "onnxruntime-cpu" and backend.is_active
        out = backend.infer(synthetic_frames(2, 1, 32, 48))
        assert out["scores"].shape == (2, 3) and out["scores"].dtype == np.float32
    finally:
        backend.deactivate()
    assert [s["backend"] for s in skipped] == ["tensorrt", "onnxruntime-cuda"]
    assert "backend 'tensorrt' is not installed here" in skipped[0]["reason"]
    assert "tensorrt" in skipped[0]["reason"]
    assert "CUDAExecutionProvider" in skipped[1]["reason"] and "not available" in skipped[1]["reason"]


def test_strict_refuses_when_first_backend_cannot_load(gate, tmp_path):
    with pytest.raises(BackendError, match=r"gate: strict mode and tensorrt cannot load: backend 'tensorrt' is not installed"):
        open_backend(["tensorrt", "onnxruntime"], gate, max_batch=4, threads=1, strict=True, engine_dir=tmp_path)


def test_nothing_loads(gate, tmp_path):
    with pytest.raises(BackendError, match=r"gate: no backend could load the model: tensorrt: .*; onnxruntime-cuda: "):
        open_backend(["tensorrt", "onnxruntime-cuda"], gate, max_batch=4, threads=1, strict=False, engine_dir=None)


def test_unknown_backend_and_empty_chain(gate):
    with pytest.raises(BackendError, match=r"unknown backend 'tpu'"):
        open_backend(["tpu"], gate, max_batch=1, threads=1, strict=True, engine_dir=None)
    with pytest.raises(BackendError, match=r"gate: the backend chain is empty"):
        open_backend([], gate, max_batch=1, threads=1, strict=False, engine_dir=None)


def test_missing_model_file_falls_through_to_error(tmp_path):
    entry = ModelEntry(role="seg", path=tmp_path / "nope.onnx", sha256="0" * 64, output="probs")
    with pytest.raises(BackendError, match=r"seg: no backend could load the model: onnxruntime: .*model file not found"):
        open_backend(["onnxruntime"], entry, max_batch=1, threads=1, strict=False, engine_dir=None)
