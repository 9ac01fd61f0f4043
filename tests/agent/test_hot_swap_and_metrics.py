"""Hot swap under a stream of frames loses nothing; the metrics endpoint matches the summary."""
from __future__ import annotations

import pytest

import threading
import time
import urllib.request

from tests_support_events import Collector, check_accounting
from tinypack import clean_frame, frame_with

from agent.tools.camera_sim import CameraSim
from agent.service import status_request


def stream(agent, coil, n, rate_hz):
    frames = [(frame_with("bright", 4 * (i % 50), 8), None) if i % 3 == 0 else (clean_frame(), None) for i in range(n)]
    cam = CameraSim(agent.cfg.ingest.endpoint)
    sent = cam.send_coil(coil, frames, rate_hz=rate_hz)
    cam.close()
    return sent



@pytest.mark.parametrize("workers", [1, 2])
def test_hot_swap_under_stream_loses_nothing(running_agent, tiny_pack, workers):
    agent = running_agent(models={"workers": workers, "threads": 1})
    cfg = agent.cfg
    col = Collector(cfg, timeout_s=90.0)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("sent", stream(agent, "swap-coil", 150, 100.0)))
    t.start()
    time.sleep(0.4)
    old_gate = agent.inference.models.gate
    ok = status_request(cfg.control.endpoint, "reload")
    assert ok["ok"], ok
    # A failed load keeps the running models.
    cal = tiny_pack / "calibration.json"
    good = cal.read_text()
    cal.write_text("{broken")
    bad = status_request(cfg.control.endpoint, "reload")
    cal.write_text(good)
    assert not bad["ok"] and "old models kept" in bad["detail"]
    t.join(30)
    try:
        assert col.wait(lambda c: c.summaries("swap-coil"), 30), "no final summary"
    finally:
        col.close()
    events, summary = col.defects("swap-coil"), col.summaries("swap-coil")[0]
    check_accounting(summary)
    assert agent.inference.swapped.is_set() and agent.inference.models.gate is not old_gate
    f = summary["frames"]
    assert f["sent"] == 150 and f["received"] == 150 and f["missing"] == 0
    assert f["inspected"] + f["gated_out"] == 150 and f["shed"] == f["lost"] == 0
    assert sorted(e["index"] for e in events) == list(range(0, 150, 3))  # each defect once: none lost, none twice


def test_metrics_endpoint_matches_summary(running_agent, tmp_path):
    from tests_support_metrics import scrape

    agent = running_agent(control={"metrics_port": 0})
    assert agent.metrics_port is None  # 0 = off
    # its own state directory: two agents on one are refused (statefiles.StateLock)
    agent2 = running_agent(control={"metrics_port": free_port()}, agent={"state_dir": str(tmp_path / "state2")})
    cfg = agent2.cfg
    col = Collector(cfg, timeout_s=60.0)
    try:
        stream(agent2, "metrics-coil", 30, 0.0)
        assert col.wait(lambda c: c.summaries("metrics-coil"), 20), "no final summary"
    finally:
        col.close()
    summary = col.summaries("metrics-coil")[0]
    time.sleep(0.3)
    text = urllib.request.urlopen(f"http://127.0.0.1:{agent2.metrics_port}/metrics", timeout=5).read().decode()
    values = scrape(text)
    f = summary["frames"]
    assert values[("coilsight_frames_total", (("camera", "cam0"), ("state", "inspected")))] == f["inspected"] == 10
    assert values[("coilsight_frames_total", (("camera", "cam0"), ("state", "gated_out")))] == f["gated_out"] == 20
    assert values[("coilsight_events_published_total", (("topic", "defect"),))] == summary["defect_count"] == 10
    st = status_request(cfg.control.endpoint)
    assert st["health"]["inferred"] == 30


def free_port():
    from conftest import free_port as fp

    return fp()


def test_engines_reload_command(running_agent):
    import subprocess
    import sys

    agent = running_agent()
    r = subprocess.run([sys.executable, "-m", "agent.cli", "engines", "reload", "--endpoint", agent.cfg.control.endpoint],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "take over at the next batch" in r.stdout
    deadline = time.monotonic() + 5
    while not agent.inference.swapped.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agent.inference.swapped.is_set()
