from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ConfigError, config_from_dict, dump_toml, config_dict, load_config

REPO = Path(__file__).resolve().parents[2]


def test_shipped_configs_are_valid():
    for path in sorted((REPO / "configs").glob("*.toml")):
        cfg = load_config(path)
        assert cfg.agent.profile


@pytest.mark.parametrize(
    "data, message",
    [
        ({"ingest": {"bogus": 1}}, r"ingest\.bogus: unknown key"),
        ({"ingest": {"max_queue_frames": 0}}, r"ingest\.max_queue_frames: must be >= 1, got 0"),
        ({"models": {"threads": "two"}}, r"models\.threads: must be an integer, got 'two'"),
        ({"agent": {"log_format": "xml"}}, r"agent\.log_format: must be one of auto, json, console"),
        ({"cameras": [{"mm_per_px_x": 1.0}]}, r"cameras\[0\]\.id: required"),
        ({"cameras": [{"id": "a"}, {"id": "a"}]}, r"cameras\[0\]\.id: duplicate camera id 'a'"),
        ({"models": {"backends": ["tensorrt", "magic"]}}, r"models\.backends\[1\]: unknown backend 'magic'"),
        ({"models": {"opt_batch": 16, "max_batch": 8}}, r"models\.opt_batch: must be <= models\.max_batch"),
        ({"publish": {"endpoint": "tcp://127.0.0.1:5555"}}, r"endpoint tcp://127.0.0.1:5555 is used twice"),
        ({"publish": "yes"}, r"publish: must be a table"),
        ({"ingest": {"endpoint": "http://x"}}, r"ingest\.endpoint: must start with tcp://"),
        ({"coil": {"budget_s": True}}, r"coil\.budget_s: must be a number, got True"),
    ],
)
def test_bad_config_names_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data, "x.toml")


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"ingest": {"bogus": 1, "rcvhwm": -1}, "coil": {"budget_s": "x"}})
    assert len(exc.value.errors) == 3


def test_toml_round_trip(tmp_path):
    cfg = load_config(REPO / "configs" / "steel.toml")
    p = tmp_path / "c.toml"
    p.write_text(dump_toml(config_dict(cfg)))
    again = load_config(p)
    assert config_dict(again) == config_dict(cfg)


def test_check_config_cli_prints_every_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[ingest]\nmax_queue_frames = 0\nbogus = 1\n[coil]\nbudget_s = "soon"\n')
    r = subprocess.run([sys.executable, "-m", "agent.cli", "check-config", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "ingest.max_queue_frames: must be >= 1" in r.stdout
    assert "ingest.bogus: unknown key" in r.stdout
    assert "coil.budget_s: must be a number" in r.stdout
    assert "3 error(s)" in r.stdout
    broken = tmp_path / "broken.toml"
    broken.write_text("[ingest\n")
    r = subprocess.run([sys.executable, "-m", "agent.cli", "check-config", str(broken)], capture_output=True, text=True)
    assert r.returncode == 1 and "not valid TOML" in r.stdout


def test_run_with_bad_config_exits_2_with_one_clear_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[models]\nmax_batch = 0\n")
    r = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(bad)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert "config error:" in r.stderr and "models.max_batch: must be >= 1" in r.stderr
