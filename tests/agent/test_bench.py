"""The bench in fast mode: it runs the real agent end to end and its accounting holds (not its speed)."""
from __future__ import annotations

import json
import subprocess
import sys

from agent.config import config_dict, dump_toml


def test_bench_fast_mode_accounts_for_every_frame(tmp_path, agent_config):
    cfg_path = tmp_path / "bench.toml"
    cfg_path.write_text(dump_toml(config_dict(agent_config())))
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "agent.cli", "bench", "--fast", "--config", str(cfg_path),
                        "--json", str(out), "--rate", "20"], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert set(res["scenarios"]) == {"clean", "typical", "heavy"}
    for name, s in res["scenarios"].items():
        f = s["accounting"]
        assert s["accounted"] and f["sent"] == f["received"] == 40 == f["inspected"] + f["gated_out"], name
        assert s["wall_s"] > 0 and s["peak_rss_mb"] > 0 and s["efficiency"] > 0
    assert res["latency"]["accounting"]["received"] == res["latency"]["frames"]
    assert "bare model throughput" in r.stdout and "x gate" in r.stdout
