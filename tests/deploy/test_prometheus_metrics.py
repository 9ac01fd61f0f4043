"""Metrics scraped from the real HTTP endpoint and parsed as Prometheus text."""
from __future__ import annotations

import json
import socket
import urllib.request

import pytest
import structlog
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import FRAME_STATES, STAGES, Metrics, RateLimitedLog, RateLimiter, scrape_snapshot


@pytest.fixture
def served():
    m = Metrics()
    port = m.serve("127.0.0.1", 0)
    yield m, port
    m.close()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_scrape_shows_what_was_recorded(served):
    m, port = served
    assert port > 0
    m.count_frames("cam0", "inspected", 7)
    m.count_frames("cam0", "gated_out", 5)
    m.count_frames("cam1", "lost")
    m.count_rejected("bad_size")
    m.count_rejected("bad_size")
    m.observe_stage("gate", 0.004)
    m.observe_stage("gate", 0.006)
    with m.time_stage("seg"):
        pass
    m.set_gate_pass_rate(0.25)
    m.set_queue_depth("ingest", 3)
    m.set_backend("gate", "tensorrt")
    m.set_backend("seg", "onnxruntime")
    m.set_deadline_slack(212.5)
    m.set_journal_bytes(4096)
    m.count_published("defect", 4)

    s = scrape(port)
    assert s[("coilsight_frames_total", (("camera", "cam0"), ("state", "inspected")))] == 7
    assert s[("coilsight_frames_total", (("camera", "cam0"), ("state", "gated_out")))] == 5
    assert s[("coilsight_frames_total", (("camera", "cam1"), ("state", "lost")))] == 1
    assert s[("coilsight_rejected_total", (("reason", "bad_size"),))] == 2
    assert s[("coilsight_stage_seconds_count", (("stage", "gate"),))] == 2
    assert s[("coilsight_stage_seconds_sum", (("stage", "gate"),))] == pytest.approx(0.010)
    assert s[("coilsight_stage_seconds_bucket", (("le", "0.005"), ("stage", "gate")))] == 1
    assert s[("coilsight_stage_seconds_count", (("stage", "seg"),))] == 1
    assert s[("coilsight_gate_pass_rate", ())] == 0.25
    assert s[("coilsight_queue_depth", (("queue", "ingest"),))] == 3
    assert s[("coilsight_backend_info", (("backend", "tensorrt"), ("model", "gate")))] == 1
    assert s[("coilsight_coil_deadline_slack_seconds", ())] == 212.5
    assert s[("coilsight_journal_bytes", ())] == 4096
    assert s[("coilsight_events_published_total", (("topic", "defect"),))] == 4

    snap = m.snapshot()
    json.dumps(snap)  # `coilsight status` prints it
    assert snap["frames"] == {"cam0": {"inspected": 7, "gated_out": 5}, "cam1": {"lost": 1}}
    assert snap["rejected"] == {"bad_size": 2}
    assert snap["stages"]["gate"]["count"] == 2
    assert snap["stages"]["gate"]["mean_s"] == pytest.approx(0.005)
    assert snap["queue_depth"] == {"ingest": 3}
    assert snap["backends"] == {"gate": "tensorrt", "seg": "onnxruntime"}
    assert snap["gate_pass_rate"] == 0.25
    assert snap["coil_deadline_slack_seconds"] == 212.5
    assert snap["journal_bytes"] == 4096
    assert snap["events_published"] == {"defect": 4}
    # `coilsight status` in another process sees the same figures through the endpoint.
    assert scrape_snapshot("127.0.0.1", port) == snap


def test_scrape_snapshot_of_a_dead_agent_is_a_clear_error():
    m = Metrics()
    port = m.serve("127.0.0.1", 0)
    m.close()
    with pytest.raises(ConnectionError, match=rf"cannot read agent metrics from http://127.0.0.1:{port}/metrics"):
        scrape_snapshot("127.0.0.1", port)


def test_backend_swap_drops_the_old_series(served):
    m, port = served
    m.set_backend("seg", "tensorrt")
    m.set_backend("seg", "onnxruntime")  # engine failed to load, fell back
    s = scrape(port)
    assert ("coilsight_backend_info", (("backend", "tensorrt"), ("model", "seg"))) not in s
    assert s[("coilsight_backend_info", (("backend", "onnxruntime"), ("model", "seg")))] == 1


def test_registries_are_separate():
    a, b = Metrics(), Metrics()
    a.count_frames("cam0", "shed", 3)
    assert b.snapshot()["frames"] == {}
    assert REGISTRY.get_sample_value("coilsight_frames_total", {"camera": "cam0", "state": "shed"}) is None


def test_label_values_are_checked():
    m = Metrics()
    with pytest.raises(ValueError, match=r"frame state 'inspectd' is not one of inspected, gated_out"):
        m.count_frames("cam0", "inspectd")
    with pytest.raises(ValueError, match=r"stage 'segment' is not one of receive, decode"):
        m.observe_stage("segment", 0.1)
    with pytest.raises(ValueError, match=r"stage 'x' is not one of"):
        with m.time_stage("x"):
            pass
    assert set(FRAME_STATES) == {"inspected", "gated_out", "rejected", "shed", "missing", "lost"}
    assert set(STAGES) == {"receive", "decode", "gate", "seg", "postprocess", "publish"}


def test_port_in_use_is_a_clear_error(served):
    m, port = served
    with pytest.raises(RuntimeError, match=rf"metrics server already serving on port {port}"):
        m.serve("127.0.0.1", 0)
    with pytest.raises(OSError, match=rf"cannot serve metrics on 127.0.0.1:{port}: Address already in use"):
        Metrics().serve("127.0.0.1", port)


def test_close_stops_serving():
    m = Metrics()
    port = m.serve("127.0.0.1", 0)
    m.close()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_rate_limiter_bursts_then_refills():
    clock = Clock()
    rl = RateLimiter(per_s=2, burst=3, clock=clock)
    assert [rl.allow() for _ in range(5)] == [True, True, True, False, False]
    clock.t += 0.5  # one token back
    assert rl.allow() and rl.suppressed == 2
    assert not rl.allow()
    clock.t += 100  # refills to burst, not beyond
    assert [rl.allow() for _ in range(4)] == [True, True, True, False]
    with pytest.raises(ValueError, match=r"per_s=0 must be positive"):
        RateLimiter(0)
    with pytest.raises(ValueError, match=r"burst=0 must be at least 1"):
        RateLimiter(1, burst=0)


def test_rate_limited_log_reports_suppressed_count():
    clock = Clock()
    limited = RateLimitedLog(structlog.get_logger("test"), per_s=1, burst=2, clock=clock)
    with structlog.testing.capture_logs() as logs:
        results = [limited.warning("frame_rejected", reason="bad_size") for _ in range(5)]
        clock.t += 1.0
        assert limited.error("frame_rejected", reason="bad_size")
    assert results == [True, True, False, False, False]
    assert logs == [
        {"event": "frame_rejected", "reason": "bad_size", "log_level": "warning"},
        {"event": "frame_rejected", "reason": "bad_size", "log_level": "warning"},
        {"event": "frame_rejected", "reason": "bad_size", "suppressed": 3, "log_level": "error"},
    ]
