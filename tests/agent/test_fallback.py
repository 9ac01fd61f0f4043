"""The agent starts on the best backend that loads, says why the others did not, and reports it."""
from __future__ import annotations

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


def test_strict_mode_refuses_instead_of_falling_back(agent_config):
    cfg = agent_config(models={"backends": ["tensorrt", "onnxruntime"], "strict": True})
    with pytest.raises(BackendError, match="tensorrt"):
        Agent(cfg, install_signals=False).run()
