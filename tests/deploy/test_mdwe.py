"""coilsight.service sets MemoryDenyWriteExecute=yes. This proves the CPU runtime stack works
under the same rule: the kernel's PR_SET_MDWE (Linux >= 6.3) refuses writable+executable
memory exactly as the unit's seccomp filter does, so a dependency that starts JIT-compiling
host code (a oneDNN provider, a cffi callback) fails here before it fails on a line box.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import ctypes, mmap, sys
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        print("NO_MDWE errno", ctypes.get_errno()); sys.exit(0)
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        sys.exit("a writable+executable mapping was allowed: MDWE is not in force")
    except PermissionError:
        pass

    import numpy as np, onnx, onnxruntime as ort, zmq
    from onnx import TensorProto, helper
    import agent.auth, agent.metrics, agent.sdnotify  # the agent's own imports under the rule

    # Contract-shaped model: uint8 NCHW in, normalisation first, sigmoid out.
    x = helper.make_tensor_value_info("image", TensorProto.UINT8, [None, 1, 256, 1600])
    y = helper.make_tensor_value_info("probs", TensorProto.FLOAT, None)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 1, 3, 3], np.full(36, 0.1, "float32"))
    nodes = [helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Conv", ["f", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c"], ["probs"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"image": np.zeros((2, 1, 256, 1600), np.uint8)})[0]
    if out.shape != (2, 4, 256, 1600):
        sys.exit(f"unexpected output shape {out.shape}")

    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.curve_server = True
    s.curve_secretkey = zmq.curve_keypair()[1]
    s.bind("tcp://127.0.0.1:*")
    s.close(0)
    ctx.term()
    print("MDWE_OK", ort.__version__)
    """
)


def test_cpu_stack_runs_without_writable_executable_memory():
    result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    if result.stdout.startswith("NO_MDWE"):
        pytest.skip(f"kernel lacks PR_SET_MDWE (Linux >= 6.3): {result.stdout.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MDWE_OK" in result.stdout
