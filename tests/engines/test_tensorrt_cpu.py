"""TensorRTBackend's own logic on a box without a GPU: the `tensorrt` and `pycuda.driver` modules
are replaced by small fakes of the hardware-bound calls (the only fakes the project allows).

What this proves: the manifest is checked before any plan is deserialized; a None from
deserialize_cuda_engine becomes a BackendError carrying the logger's errors; TensorRT messages
reach structlog; buffers are sized once for the max batch and sliced per batch; input shapes
outside the profile are refused; the CUDA context is pushed/popped around every call; output
dtype comes from the engine (FP16 here) and results are float32; everything is freed.
What it cannot prove: that real TensorRT/pycuda behave like the fakes (test_tensorrt_gpu.py).
"""
from __future__ import annotations

import enum
import importlib
import sys
import types

import numpy as np
import pytest
import structlog
from _tiny_onnx import save_model

from engines import manifest
from engines.backends import BackendError

K, PROFILE_MIN, PROFILE_MAX = 3, (1, 1, 8, 8), (4, 1, 16, 16)


class FakeCuda:
    """pycuda.driver: device memory is a dict of numpy byte arrays keyed by pointer."""

    class Error(Exception):
        pass

    def __init__(self):
        self.memory: dict[int, np.ndarray] = {}
        self.stack: list[str] = []
        self.events: list[str] = []
        self.host_freed = 0
        self._next = 0x1000
        cuda = self

        class Ctx:
            def push(self):
                cuda.stack.append("primary")

            def pop(self):
                cuda.stack.pop()

            def detach(self):
                cuda.events.append("detach")

        class Device:
            def __init__(self, i):
                self.i = i

            @staticmethod
            def count():
                return 1

            def name(self):
                return "Fake GPU 9000"

            def compute_capability(self):
                return (8, 9)

            def retain_primary_context(self):
                return Ctx()

        class HostAllocation:  # like pycuda's: the .base of the array pagelocked_empty returns
            def __init__(self, count, dtype):
                self._array = np.zeros(count, dtype)
                self.__array_interface__ = self._array.__array_interface__

            def free(self):
                cuda.host_freed += 1

        class DeviceAllocation:
            def __init__(self, ptr):
                self.ptr = ptr

            def __int__(self):
                return self.ptr

            def free(self):
                cuda.events.append(f"free {self.ptr:#x}")
                del cuda.memory[self.ptr]

        class Stream:
            handle = 77

            def synchronize(self):
                cuda.events.append("sync")

        self.Device, self.Stream = Device, Stream
        self._host_cls, self._dev_cls = HostAllocation, DeviceAllocation

    def init(self):
        self.events.append("init")

    def get_version(self):
        return (12, 9, 0)

    def get_driver_version(self):
        return 13000

    def pagelocked_empty(self, count, dtype):
        return np.asarray(self._host_cls(count, dtype))

    def mem_alloc(self, nbytes):
        ptr, self._next = self._next, self._next + 0x1000
        self.memory[ptr] = np.zeros(nbytes, np.uint8)
        return self._dev_cls(ptr)

    def memcpy_htod_async(self, dest, src, stream):
        assert self.stack, "CUDA call without a current context"
        self.memory[int(dest)][: src.nbytes] = src.view(np.uint8)

    def memcpy_dtoh_async(self, dest, src, stream):
        assert self.stack, "CUDA call without a current context"
        dest.view(np.uint8)[:] = self.memory[int(src)][: dest.nbytes]


def make_fake_trt(cuda: FakeCuda, calls: list[str]) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.13.9.9"

    class Severity(enum.IntEnum):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    class ILogger:
        def __init__(self):
            pass

    ILogger.Severity = Severity
    TensorIOMode = enum.Enum("TensorIOMode", "INPUT OUTPUT")
    DataType = enum.Enum("DataType", "UINT8 HALF FLOAT")

    class Context:
        def __init__(self):
            self.shape, self.addr = None, {}

        def set_input_shape(self, name, shape):
            ok = all(lo <= s <= hi for lo, s, hi in zip(PROFILE_MIN, shape, PROFILE_MAX))
            self.shape = tuple(shape) if ok else self.shape
            return ok

        def get_tensor_shape(self, name):
            return (self.shape[0], K)

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr
            return True

        def execute_async_v3(self, stream_handle):
            assert cuda.stack and stream_handle == 77
            n = int(np.prod(self.shape))
            x = cuda.memory[self.addr["image"]][:n].reshape(self.shape).astype(np.float32)
            out = (x.mean(axis=(1, 2, 3))[:, None] / 255 + np.arange(K)).astype(np.float16)
            cuda.memory[self.addr["scores"]][: out.nbytes] = out.view(np.uint8).reshape(-1)
            calls.append(f"execute {self.shape}")
            return True

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i):
            return ["image", "scores"][i]

        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if name == "image" else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return DataType.UINT8 if name == "image" else DataType.HALF

        def get_tensor_shape(self, name):
            return (-1, 1, -1, -1) if name == "image" else (-1, K)

        def get_tensor_profile_shape(self, name, idx):
            return [PROFILE_MIN, (2, 1, 16, 16), PROFILE_MAX]

        def create_execution_context(self):
            return Context()

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, plan):
            calls.append("deserialize")
            if not plan.startswith(b"FAKEPLAN"):
                self.logger.log(Severity.ERROR, "1: [runtime.cpp::parsePlan] magic tag does not match")
                return None
            return Engine()

    trt.ILogger, trt.TensorIOMode, trt.DataType, trt.Runtime = ILogger, TensorIOMode, DataType, Runtime
    trt.nptype = lambda dt: {DataType.UINT8: np.uint8, DataType.HALF: np.float16, DataType.FLOAT: np.float32}[dt]
    trt.init_libnvinfer_plugins = lambda logger, ns: calls.append("plugins") or True
    return trt


@pytest.fixture()
def fake(monkeypatch):
    cuda, calls = FakeCuda(), []
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = cuda
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(cuda, calls))
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", cuda)
    monkeypatch.setitem(sys.modules, "cuda", None)  # no cuda-python: facts come from (fake) pycuda
    monkeypatch.delitem(sys.modules, "engines.backends.tensorrt", raising=False)
    module = importlib.import_module("engines.backends.tensorrt")
    yield module, cuda, calls
    sys.modules.pop("engines.backends.tensorrt", None)


@pytest.fixture()
def engine_dir(tmp_path, fake):
    src = save_model("gate", tmp_path / "gate.onnx")
    d = tmp_path / "engines"
    d.mkdir()
    (d / "gate.engine").write_bytes(b"FAKEPLAN" + bytes(100))
    facts = manifest.machine_facts()
    entry = manifest.engine_entry(role="gate", engine_path=d / "gate.engine", onnx_fp32=src, onnx_fp16=src,
                                  facts=facts, profile_shapes={}, workspace_bytes=1 << 30, build_seconds=1.0,
                                  built_at="2026-11-22T00:00:00+00:00", fp16_recipe={}, parity=None)
    manifest.record_engine(d, "gate", entry)
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
