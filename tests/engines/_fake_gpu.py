"""Fakes of the hardware boundary for TensorRT code on a box without a GPU: ``tensorrt`` and
``pycuda.driver`` modules small enough to read, and pycuda's exception hierarchy as pycuda
declares it (``PyErr_NewException("pycuda._driver.<Name>", Error)`` in src/wrapper/wrap_cudadrv.cpp:
``Error`` derives from Exception, and MemoryError, LogicError, LaunchError and RuntimeError from
``Error``, so none of them is a BackendError or a builtin RuntimeError).

``FakeCuda.fail_on(call, exc, nth=1)`` makes the nth call of a pycuda entry point (``init``,
``retain_primary_context``, ``push``, ``pop``, ``detach``, ``Stream``, ``pagelocked_empty``,
``mem_alloc``, ``memcpy_htod_async``, ``memcpy_dtoh_async``, ``free``) raise, as real pycuda does
when the device runs out of memory or its context breaks. Only these modules are fake: the code
under test (engines.backends.tensorrt, select, the agent's start-up) is the real one.
"""
from __future__ import annotations

import enum
import importlib
import sys
import types

import numpy as np

from engines.backends.base import Backend

# pycuda._driver's exceptions, built the way PyErr_NewException builds them.
_PycudaError = type("Error", (Exception,), {"__module__": "pycuda._driver"})
PYCUDA_ERRORS: dict[str, type[Exception]] = {"Error": _PycudaError}
for _name in ("MemoryError", "LogicError", "LaunchError", "RuntimeError"):
    PYCUDA_ERRORS[_name] = type(_name, (_PycudaError,), {"__module__": "pycuda._driver"})


K, PROFILE_MIN, PROFILE_MAX = 3, (1, 1, 8, 8), (4, 1, 16, 16)


class FakeCuda:
    """pycuda.driver: device memory is a dict of numpy byte arrays keyed by pointer."""

    Error = PYCUDA_ERRORS["Error"]
    MemoryError = PYCUDA_ERRORS["MemoryError"]
    LogicError = PYCUDA_ERRORS["LogicError"]
    LaunchError = PYCUDA_ERRORS["LaunchError"]
    RuntimeError = PYCUDA_ERRORS["RuntimeError"]

    def fail_on(self, call: str, exc: Exception, nth: int = 1) -> None:
        """The ``nth`` call of ``call`` from now on raises ``exc`` (and only that one)."""
        self._failures[call] = (self._calls.get(call, 0) + nth, exc)

    def _call(self, name: str) -> None:
        self._calls[name] = self._calls.get(name, 0) + 1
        nth, exc = self._failures.get(name, (None, None))
        if nth == self._calls[name]:
            raise exc

    def __init__(self):
        self._calls: dict[str, int] = {}
        self._failures: dict[str, tuple[int, Exception]] = {}
        self.memory: dict[int, np.ndarray] = {}
        self.stack: list[str] = []
        self.events: list[str] = []
        self.host_freed = 0
        self._next = 0x1000
        cuda = self

        class Ctx:
            def push(self):
                cuda._call("push")
                cuda.stack.append("primary")

            def pop(self):
                cuda._call("pop")
                cuda.stack.pop()

            def detach(self):
                cuda._call("detach")
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
                cuda._call("retain_primary_context")
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
                cuda._call("free")
                cuda.events.append(f"free {self.ptr:#x}")
                del cuda.memory[self.ptr]

        class Stream:
            handle = 77

            def __init__(self):
                cuda._call("Stream")
                cuda.events.append("stream")

            def synchronize(self):
                cuda.events.append("sync")

        self.Device, self.Stream = Device, Stream
        self._host_cls, self._dev_cls = HostAllocation, DeviceAllocation

    def init(self):
        self._call("init")
        self.events.append("init")

    def get_version(self):
        return (12, 9, 0)

    def get_driver_version(self):
        return 13000

    def pagelocked_empty(self, count, dtype):
        self._call("pagelocked_empty")
        return np.asarray(self._host_cls(count, dtype))

    def mem_alloc(self, nbytes):
        self._call("mem_alloc")
        ptr, self._next = self._next, self._next + 0x1000
        self.memory[ptr] = np.zeros(nbytes, np.uint8)
        return self._dev_cls(ptr)

    def memcpy_htod_async(self, dest, src, stream):
        self._call("memcpy_htod_async")
        assert self.stack, "CUDA call without a current context"
        self.memory[int(dest)][: src.nbytes] = src.view(np.uint8)

    def memcpy_dtoh_async(self, dest, src, stream):
        self._call("memcpy_dtoh_async")
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



def install(monkeypatch) -> tuple[types.ModuleType, FakeCuda, list[str]]:
    """Put fake ``tensorrt``/``pycuda.driver`` in sys.modules (no cuda-python, so machine facts come
    from the fake pycuda) and import engines.backends.tensorrt against them. Call ``uninstall``
    after the test so the next import sees the real (absent) modules."""
    cuda, calls = FakeCuda(), []
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = cuda
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(cuda, calls))
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", cuda)
    monkeypatch.setitem(sys.modules, "cuda", None)  # no cuda-python: facts come from (fake) pycuda
    monkeypatch.delitem(sys.modules, "engines.backends.tensorrt", raising=False)
    module = importlib.import_module("engines.backends.tensorrt")
    return module, cuda, calls


def uninstall() -> None:
    sys.modules.pop("engines.backends.tensorrt", None)


def write_engine(d, src, role: str = "gate", profile_shapes: dict | None = None):
    """A fake plan the fake runtime deserializes, with its manifest entry for this (fake) machine."""
    from engines import manifest

    d.mkdir(parents=True, exist_ok=True)
    engine = d / f"{role}.engine"
    engine.write_bytes(b"FAKEPLAN" + bytes(100))
    entry = manifest.engine_entry(role=role, engine_path=engine, onnx_fp32=src, onnx_fp16=src,
                                  facts=manifest.machine_facts(), profile_shapes=profile_shapes or {},
                                  workspace_bytes=1 << 30, build_seconds=1.0, built_at="2026-11-22T00:00:00+00:00",
                                  fp16_recipe={}, parity=None)
    manifest.record_engine(d, role, entry)
    return engine



class UnwrappedGpuBackend(Backend):
    """A GPU backend that lets pycuda's own error through, as TensorRTBackend did before issue 16:
    its activate raises pycuda._driver.LaunchError. Registered in engines.backends.BACKENDS by the
    tests that need it, as "_fake_gpu:UnwrappedGpuBackend"."""

    name = "unwrapped-gpu"

    def activate_impl(self) -> None:
        raise PYCUDA_ERRORS["LaunchError"]("cuCtxSynchronize failed: unspecified launch failure")

    def infer_impl(self, image):
        raise AssertionError("never active")

    def deactivate_impl(self) -> None:
        raise AssertionError("never active")
