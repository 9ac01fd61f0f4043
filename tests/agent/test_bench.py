"""The bench in fast mode: it runs the real agent end to end and its accounting holds (not its speed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from agent.config import config_dict, dump_toml
from agent.metrics import STAGES


def test_bench_fast_mode_accounts_for_every_frame(tmp_path, agent_config, tiny_pack):
    cfg_path = tmp_path / "bench.toml"
    # the config names no pack that exists: --models is the pack benched (a candidate, one command)
    cfg_path.write_text(dump_toml(config_dict(agent_config(models={"dir": str(tmp_path / "no-such-pack")}))))
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "agent.cli", "bench", "--fast", "--config", str(cfg_path),
                        "--models", str(tiny_pack), "--out", str(out), "--rate", "20", "--bridge"],
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    def no_nan(const):
        raise AssertionError(f"{const} in the bench JSON: not JSON, other languages cannot read it")

    res = json.loads(out.read_text(), parse_constant=no_nan)
    from engines.modelpack import load_model_pack

    pack = load_model_pack(tiny_pack)
    assert res["models"] == {"dir": str(tiny_pack.resolve()), "profile": pack.profile,
                             "gate_sha256": pack.gate.sha256, "seg_sha256": pack.seg.sha256}
    assert f"models: {tiny_pack.resolve()} (profile {pack.profile}; gate {pack.gate.sha256[:12]}" in r.stdout
    assert set(res["scenarios"]) == {"clean", "typical", "heavy"}
    for name, s in res["scenarios"].items():
        f = s["accounting"]
        assert s["accounted"] and f["sent"] == f["received"] == 40 == f["inspected"] + f["gated_out"], name
        # the inference stage alone, in process, on the same frames: the same decisions and events
        p = s["pipeline"]
        assert p["inspected"] + p["gated_out"] == 40, name
        assert (p["inspected"], p["events"]) == (f["inspected"], s["events"]), name
        # every stage the issue names, receive and decode timed apart
        assert set(s["stage_s"]) == set(STAGES), name
        # every event scored against the defects camera-sim painted (clean frames: no defects)
        inst = s["instances"]
        assert inst["events"] == s["events"] and inst["unscored_events"] == 0, name
        assert (inst["true_defects"] == 0) == (name == "clean"), name
        n = s["stage_count"]
        assert n["receive"] == n["decode"] == 40 and n["gate"] >= 40 // 8, name  # every frame; gate per batch
        # a latency exactly when there were events to time
        assert (s["latency_p50_s"] is None) == (s["events"] == 0) == (s["latency_p99_s"] is None), name
        if s["agent_cpu_s"]:
            assert s["agent_cpu_overhead"] == pytest.approx(s["agent_cpu_s"] / s["model_cpu_s"] - 1, rel=0.05, abs=0.01)
        if sys.platform.startswith("linux"):  # the agent's threads carry their names down to the OS
            assert {"inference", "ingest", "publisher"} <= set(s["agent_thread_cpu_s"]), name
            # each thread's absolute CPU, read once at the end (not a difference of two readings of
            # 10 ms ticks, which read 0.0 for a --fast coil in CI): the models ran on the thread named so
            total = s["agent_thread_cpu_total_s"]
            assert set(total) == set(s["agent_thread_cpu_s"]) and total["inference"] > 0, name
            for thread, cpu in s["agent_thread_cpu_s"].items():  # the coil's part is within the total
                assert 0 <= cpu <= total[thread] + 0.01, (name, thread)
    assert res["latency"]["accounting"]["received"] == res["latency"]["frames"]
    bare = res["bare"]
    assert len(bare["gate_fps_passes"]) == 2 and bare["gate_fps"] == max(bare["gate_fps_passes"])  # before, after
    assert "bare model throughput" in r.stdout and "x gate" in r.stdout and "x limit" in r.stdout and "in-proc" in r.stdout
    assert "events per defect" in r.stdout
    if sys.platform.startswith("linux"):
        assert "agent CPU seconds by thread since the agent started: clean: " in r.stdout
    # the coil layer's cost: the heavy coil again with the layer off, in the same run
    c = res["coil_layer"]
    assert c["scenario"] == "heavy" and c["wall_ratio"] == pytest.approx(c["on_wall_s"] / c["off_wall_s"], rel=1e-3)
    assert "coil layer (tracks, periodic" in r.stdout
    # where the layer's CPU lands, thread by thread: the crop thread only runs with the layer on
    assert c["thread_cpu_delta_s"]["crops"] == pytest.approx(c["on_thread_cpu_s"]["crops"], abs=1e-3)
    assert c["thread_cpu_delta_s"]["publisher"] == pytest.approx(
        c["on_thread_cpu_s"]["publisher"] - c["off_thread_cpu_s"]["publisher"], abs=2e-3)
    # four fresh agents, on, off, off, on: each pair's ratio is of its own two runs
    assert c["order"] == ["on", "off", "off", "on"] and min(c["wall_s_runs"]["on"]) == c["on_wall_s"]
    assert c["pair_ratios"] == [round(c["wall_s_runs"]["on"][0] / c["wall_s_runs"]["off"][0], 4),
                                round(c["wall_s_runs"]["on"][1] / c["wall_s_runs"]["off"][1], 4)]
    # the plant bridge's cost: the heavy coil again with mosquitto and `coilsight bridge` attached
    from agent.tools.bench_bridge import find_mosquitto

    b = res["bridge"]
    if find_mosquitto() is None:
        assert "skipped" in b and "plant bridge: skipped" in r.stdout
    else:
        # every durable message of the coil reached the broker: the bridge's acked seq is the agent's last seq
        assert b["all_forwarded"] and b["forwarded"] == b["agent_last_seq"] > 0, b
        assert b["scenario"] == "heavy" and b["wall_ratio"] == pytest.approx(b["on_wall_s"] / b["off_wall_s"], rel=1e-3)
        assert b["within_2_percent"] == (b["median_pair_ratio"] <= 1.02)
        assert len(b["wall_s_runs"]["on"]) == len(b["wall_s_runs"]["off"]) == 2
        assert min(b["wall_s_runs"]["on"]) == b["on_wall_s"] and min(b["wall_s_runs"]["off"]) == b["off_wall_s"]
        assert "plant bridge (mosquitto + coilsight bridge attached)" in r.stdout
        # the bridge ran as its unit runs it, below the agent (which runs at this process's niceness and
        # policy), as the bench says; and it had caught up with each "on" coil within the wait
        from agent.tools.bench_bridge import BRIDGE_NICE, BRIDGE_POLICY

        assert b["bridge_nice_seen"] == [min(19, os.nice(0) + BRIDGE_NICE)] and b["order"] == ["on", "off", "off", "on"]
        assert b["bridge_policy_seen"] == [BRIDGE_POLICY] == ["idle"] and os.sched_getscheduler(0) == os.SCHED_OTHER
        assert len(b["catch_up_s_runs"]) == 2 and all(0 <= s < 120 for s in b["catch_up_s_runs"])
        assert b["pair_ratios"] == [round(b["wall_s_runs"]["on"][0] / b["wall_s_runs"]["off"][0], 4),
                                    round(b["wall_s_runs"]["on"][1] / b["wall_s_runs"]["off"][1], 4)]
    import onnxruntime

    assert res["machine"]["onnxruntime"] == onnxruntime.__version__


def test_the_bare_reference_is_the_fastest_pass_before_and_after():
    from agent.tools.bench import best_bare

    before = {"gate_fps": 900.0, "gate_fps_passes": [700.0, 900.0], "seg_fps": 80.0, "seg_fps_passes": [80.0],
              "workers": 2, "threads": 1}
    after = {"gate_fps": 850.0, "gate_fps_passes": [850.0], "seg_fps": 95.0, "seg_fps_passes": [95.0],
             "workers": 2, "threads": 1}
    best = best_bare(before, after)
    assert (best["gate_fps"], best["seg_fps"]) == (900.0, 95.0)
    assert best["gate_fps_passes"] == [700.0, 900.0, 850.0] and best["workers"] == 2


def test_reference_figures_follow_from_the_bare_models():
    from agent.tools.bench import derive_reference_figures

    bare = {"gate_fps": 3000.0, "seg_fps": 200.0, "threads": 1, "workers": 2}
    # 2 % of frames segmented: a frame costs 1/3000 + 0.02/200 s = 1/2307.69 s at bare speed
    r = derive_reference_figures({"pass_rate": 0.02, "fps": 1600.0, "wall_s": 2.5, "agent_cpu_s": 5.2}, bare, 4000)
    assert r["bare_fps"] == pytest.approx(2307.7, abs=0.1)
    assert r["efficiency"] == pytest.approx(1600 / 2307.69, abs=1e-3)
    assert r["model_cpu_s"] == pytest.approx(4000 * 2 / 2307.69, abs=1e-3)
    assert r["agent_cpu_overhead"] == pytest.approx(5.2 / (4000 * 2 / 2307.69) - 1, abs=1e-3)
    assert r["ungated_baseline_s"] == 20.0 and r["speedup_vs_ungated"] == 8.0
    # the models alone: 20 s ungated against 4000 / 2307.69 s gated
    assert r["models_limit_speedup"] == pytest.approx(11.54, abs=0.01)
    # every frame segmented: the gate can only cost, the limit falls below 1
    r = derive_reference_figures({"pass_rate": 1.0, "fps": 150.0, "wall_s": 26.7}, bare, 4000)
    assert r["models_limit_speedup"] < 1.0 and "agent_cpu_overhead" not in r


def test_a_coil_without_events_has_no_latency_rather_than_nan():
    from agent.tools.bench import latency_percentiles

    assert latency_percentiles([]) == (None, None)
    assert json.loads(json.dumps({"p99": latency_percentiles([])[1]})) == {"p99": None}
    p50, p99 = latency_percentiles([0.01 * i for i in range(1, 101)])
    assert p50 == pytest.approx(0.505) and p99 == pytest.approx(0.9901)


def test_threads_are_named_for_the_os():
    import threading
    from pathlib import Path

    from agent.threadnames import name_this_thread

    seen = {}

    def body():
        seen["set"] = name_this_thread()
        seen["comm"] = Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip() \
            if sys.platform.startswith("linux") else None

    t = threading.Thread(target=body, name="inference-7-with-a-long-name")
    t.start()
    t.join()
    if sys.platform.startswith("linux"):
        assert seen["set"] and seen["comm"] == "inference-7-wit"  # the kernel keeps 15 bytes


def test_bridge_pair_ratios_pair_each_on_with_its_neighbouring_off():
    from agent.tools.bench import pair_ratios

    order = ["on", "off", "off", "on", "on", "off", "off", "on"]
    walls = [11.0, 10.0, 10.0, 10.5, 20.0, 20.0, 9.0, 9.9]
    assert pair_ratios(order, walls) == [1.1, 1.05, 1.0, 1.1]
    with pytest.raises(ValueError, match="not one on and one off"):
        pair_ratios(["on", "on"], [1.0, 1.0])


def test_bench_refuses_a_pack_it_cannot_load_before_building_anything(tmp_path, agent_config):
    cfg_path = tmp_path / "bench.toml"
    cfg_path.write_text(dump_toml(config_dict(agent_config())))
    broken = tmp_path / "candidate"
    broken.mkdir()
    (broken / "model.json").write_text("{not json")
    for models, what in ((tmp_path / "absent", "no model.json"), (broken, "model.json")):
        r = subprocess.run([sys.executable, "-m", "agent.cli", "bench", "--fast", "--config", str(cfg_path),
                            "--models", str(models)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
        assert f"coilsight bench: cannot bench the model pack {models.resolve()}" in r.stderr and what in r.stderr
        assert "frame pools" not in r.stderr and "Traceback" not in r.stderr


def test_textured_strip_pools_carry_their_painted_defects_and_refuse_a_data_root(tmp_path, agent_config):
    from agent.tools.bench import POOL, _pool
    from training.strip import RealisticStripGenerator

    truth: list = []
    frames = _pool(True, 1600, 256, 2, truth=truth, strip="textured")
    assert len(frames) == len(truth) == POOL
    gen = RealisticStripGenerator(width=1600, height=256, seed=2)
    for i in (0, POOL - 1):  # the realistic generator's frames, with its boxes as camera-sim truth
        f = gen.frame(i, True)
        assert np.array_equal(frames[i], f.image)
        assert truth[i] == [(b.cls, int(b.x0), int(b.y0), int(b.x1), int(b.y1)) for b in f.boxes] != []
    plain_truth: list = []
    plain = _pool(True, 1600, 256, 2, truth=plain_truth)
    assert not np.array_equal(plain[0], frames[0]) and plain_truth != truth
    clean_truth: list = []
    _pool(False, 1600, 256, 1, truth=clean_truth, strip="textured")
    assert clean_truth == [[]] * POOL  # stains are not defects
    with pytest.raises(ValueError, match="strip 'wavy'"):
        _pool(False, 1600, 256, 1, strip="wavy")
    cfg_path = tmp_path / "bench.toml"
    cfg_path.write_text(dump_toml(config_dict(agent_config())))
    r = subprocess.run([sys.executable, "-m", "agent.cli", "bench", "--fast", "--config", str(cfg_path),
                        "--strip", "textured", "--data-root", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "choose one" in r.stderr and r.stdout == "", r.stdout + r.stderr
    # the tiny pack's 256x64 frames are too small for the realistic generator: said, not a traceback
    r = subprocess.run([sys.executable, "-m", "agent.cli", "bench", "--fast", "--config", str(cfg_path),
                        "--strip", "textured"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "coilsight bench: cannot make 256x64 frames for profile tiny" in r.stderr and "at least 96x96" in r.stderr


def test_a_generated_line_is_refused_with_a_pointer_to_its_demo():
    """The bench paints strip frames; wafer maps (52x52 codes), chip dies and part photos are generated
    per line. It said so with a traceback (StripGenerator: frame must be at least 64x64)."""
    from pathlib import Path

    configs = Path(__file__).resolve().parents[2] / "configs"
    for profile in ("wafer", "chip"):
        r = subprocess.run([sys.executable, "-m", "agent.cli", "bench", "--fast", "--config",
                            str(configs / f"{profile}.toml")], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
        assert f"coilsight demo --profile {profile}" in r.stderr and "Traceback" not in r.stderr
