"""The agent starts on the best backend that loads, says why the others did not, and reports it."""
from __future__ import annotations

import types

import pytest

from agent.service import Agent, status_request
from engines.backends import BackendError


def test_falls_back_to_onnxruntime_cpu_and_says_why(running_agent):
    agent = running_agent(models={"backends": ["tensorrt", "onnxruntime-cuda", "onnxruntime"]})
    health = status_request(agent.cfg.control.endpoint)["health"]
    assert health["backend"] == {"gate": "onnxruntime-cpu", "seg": "onnxruntime-cpu"}
    tried = {(f["model"], f["backend"]) for f in agent.models.fallbacks}
    assert {("gate", "tensorrt"), ("gate", "onnxruntime-cuda"), ("seg", "tensorrt")} <= tried
    reasons = " ".join(f["reason"] for f in agent.models.fallbacks)
    assert "tensorrt" in reasons.lower() and "CUDAExecutionProvider" in reasons
    # counted once per skipped backend and model (coilsight_backend_fallbacks_total)
    assert agent.metrics.snapshot()["backend_fallbacks"] == {
        "gate": {"tensorrt": 1.0, "onnxruntime-cuda": 1.0}, "seg": {"tensorrt": 1.0, "onnxruntime-cuda": 1.0}}


def test_strict_mode_refuses_instead_of_falling_back(agent_config):
    cfg = agent_config(models={"backends": ["tensorrt", "onnxruntime"], "strict": True})
    with pytest.raises(BackendError, match="tensorrt"):
        Agent(cfg, install_signals=False).run()


def test_frames_do_not_wait_for_a_batch_to_fill_at_one_frame_per_call(running_agent):
    """At one frame per model call (the CPU) a lone frame is inspected at once, not after
    models.max_wait_ms waiting for company; with stacked batches the wait applies."""
    import time

    from tests_support_events import Collector
    from tinypack import clean_frame

    from agent.tools.camera_sim import CameraSim

    agent = running_agent(models={"max_batch": 8, "opt_batch": 8, "cpu_max_batch": 1, "workers": 1,
                                  "max_wait_ms": 5_000.0})
    assert agent.inference.fill_wait_s(agent.models) == 0.0
    col = Collector(agent.cfg, timeout_s=60.0)
    cam = CameraSim(agent.cfg.ingest.endpoint)
    t0 = time.monotonic()
    cam.send_coil("lone-coil", [(clean_frame(), None)])
    cam.close()
    try:
        assert col.wait(lambda c: c.summaries("lone-coil"), 30), "no final summary"
    finally:
        col.close()
    waited = time.monotonic() - t0
    summary = col.summaries("lone-coil")[0]
    assert summary["frames"]["inspected"] + summary["frames"]["gated_out"] == 1
    # Not a speed limit: the bound is the configured wait itself (the largest allowed, 5 s), which
    # the frame would have sat out had it waited for company.
    assert waited < 5.0, f"a lone frame took {waited:.1f} s: it waited for a batch of 8 (max_wait_ms 5000)"
    stacked = types.SimpleNamespace(batch=8)
    assert agent.inference.fill_wait_s(stacked) == 5.0


@pytest.mark.parametrize("cpu_max_batch, expected", [(1, 1), (2, 2), (16, 8)])
def test_model_calls_are_capped_while_the_models_run_on_the_cpu(running_agent, cpu_max_batch, expected):
    """On the CPU a batch is no faster and multiplies activation memory (docs/performance.md): each
    model call carries at most models.cpu_max_batch frames, never more than models.max_batch."""
    from tests_support_events import Collector
    from tinypack import clean_frame

    from agent.tools.camera_sim import CameraSim

    agent = running_agent(models={"max_batch": 8, "opt_batch": 8, "cpu_max_batch": cpu_max_batch, "workers": 1})
    assert agent.models.batch == expected and agent.models.describe()["gate"]["batch"] == expected
    col = Collector(agent.cfg, timeout_s=60.0)
    before = agent.inference.model_calls
    cam = CameraSim(agent.cfg.ingest.endpoint)
    cam.send_coil("cap-coil", [(clean_frame(), None)] * 24)
    cam.close()
    try:
        assert col.wait(lambda c: c.summaries("cap-coil"), 30), "no final summary"
    finally:
        col.close()
    summary = col.summaries("cap-coil")[0]
    assert summary["frames"]["inspected"] + summary["frames"]["gated_out"] == 24
    calls = agent.inference.model_calls - before  # clean frames: the gate only
    assert calls >= 24 // expected  # no call carried more than `expected` frames
    if expected == 1:
        assert calls == 24


@pytest.mark.parametrize("threads", [1, 2])
def test_opencv_pooling_gets_the_workers_thread_budget(agent_config, threads):
    """Frames are pooled with OpenCV inside each inference worker; OpenCV must not bring a thread
    pool of its own (one per core) to a box whose threads are counted out."""
    import cv2

    from agent.inference import open_models

    before = cv2.getNumThreads()
    cv2.setNumThreads(8)
    try:
        models = open_models(agent_config(models={"threads": threads}))
        models.close()
        assert cv2.getNumThreads() == threads
    finally:
        cv2.setNumThreads(before)
