"""ONNX Runtime backend: CPU by default, CUDA provider when asked for and present."""
from __future__ import annotations

import numpy as np

from engines.backends.base import Backend, BackendError, BackendUnavailable, TensorSpec

_ORT_DTYPES = {
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int64)": np.dtype(np.int64),
}


def _spec(node) -> TensorSpec:
    try:
        dtype = _ORT_DTYPES[node.type]
    except KeyError:
        raise BackendError(f"tensor {node.name!r} has unsupported type {node.type}") from None
    shape = tuple(d if isinstance(d, int) else None for d in node.shape)
    return TensorSpec(node.name, dtype, shape)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime-cpu"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    on_cpu = True

    def activate_impl(self) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        missing = [p for p in self.providers if p not in available]
        if missing:
            raise BackendUnavailable(f"{self.name}: provider(s) {', '.join(missing)} not available "
                                     f"(have {', '.join(available)})")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads > 0:
            # Set deliberately: the agent runs receive, inference and publish on 2 cores.
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        # Idle intra-op threads spin by default. On a 2-core line box that burns the core the
        # receive and publish threads need: `coilsight bench` measured the heavy coil 1.65x and
        # the clean coil 1.85x faster end to end with spinning off (docs/performance.md).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(self.model_path), sess_options=opts, providers=list(self.providers))
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise BackendError(f"{self.name}: cannot load {self.model_path}: {exc}") from exc
        self.inputs = [_spec(n) for n in self._session.get_inputs()]
        self.outputs = [_spec(n) for n in self._session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]

    def infer_impl(self, image: np.ndarray) -> dict[str, np.ndarray]:
        results = self._session.run(self._output_names, {self.inputs[0].name: image})
        return {name: np.asarray(value, dtype=np.float32) for name, value in zip(self._output_names, results)}

    def deactivate_impl(self) -> None:
        del self._session

    def describe(self) -> dict:
        return {**super().describe(), "providers": list(self.providers), "threads": self.threads}


class OnnxRuntimeCudaBackend(OnnxRuntimeBackend):
    name = "onnxruntime-cuda"
    providers = ("CUDAExecutionProvider", "CPUExecutionProvider")
    on_cpu = False
