"""A newcomer's first hour (issue 20): every command says what happened, with real agents, sockets
and processes. camera-sim learns the agent's verdict; nothing silent, nothing that hangs."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import free_port
from tinypack import clean_frame, frame_with

from agent.cli import main
from agent.config import config_dict, dump_toml
from agent.service import status_request


@pytest.fixture(autouse=True)
def logs_on_stderr():
    """As `coilsight` sets it up, whatever an earlier test configured: stdout carries only results."""
    import structlog

    from agent.logs import configure_logging

    saved = structlog.get_config()
    configure_logging(stream=sys.stderr)
    yield
    structlog.configure(**saved)


def write_config(agent, path: Path) -> Path:
    path.write_text(dump_toml(config_dict(agent.cfg)))
    return path


def frames_folder(path: Path, n: int = 3, colour: bool = False) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = frame_with("bright", 64, 16) if i == 1 else clean_frame()
        if colour:
            img = np.dstack([img, img, img])
        cv2.imwrite(str(path / f"f{i:03d}.png"), img)
    return path


def camera_sim(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = main(["camera-sim", *argv])
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.strip()]
    return code, (json.loads(lines[-1]) if lines else None), err


def test_camera_sim_twice_with_defaults_inspects_both_coils(running_agent, tmp_path, capsys):
    agent = running_agent()
    cfg = write_config(agent, tmp_path / "agent.toml")
    folder = frames_folder(tmp_path / "frames")
    first = camera_sim(capsys, "--config", str(cfg), "--folder", str(folder))
    second = camera_sim(capsys, "--config", str(cfg), "--folder", str(folder))
    for code, result, err in (first, second):
        assert code == 0, err
        assert result["verdict"] == "inspected" and result["complete"] is True
        assert result["received"] == result["sent"] == 3 and result["rejected"] == 0
        assert result["inspected"] + result["gated_out"] == 3
        assert "\r" not in err  # no progress line when stderr is not a terminal
    assert first[1]["coil"] != second[1]["coil"] and first[1]["coil"].startswith("sim-")
    # the camera continued its seq where the agent last saw it: no gap, no restart
    cam = status_request(agent.cfg.control.endpoint)["health"]["cameras"]["cam0"]
    assert cam == {"last_seq": 9, "seq_gaps": 0, "rejected": {}}  # 2 coils x (start + 3 frames + end)


def test_camera_sim_same_coil_twice_reports_the_rejection(running_agent, tmp_path, capsys):
    agent = running_agent()
    cfg = write_config(agent, tmp_path / "agent.toml")
    folder = frames_folder(tmp_path / "frames")
    code, result, err = camera_sim(capsys, "--config", str(cfg), "--folder", str(folder), "--coil", "C1")
    assert code == 0, err
    code, result, err = camera_sim(capsys, "--config", str(cfg), "--folder", str(folder), "--coil", "C1")
    assert code == 1
    assert result["verdict"] == "rejected" and result["rejected_by_reason"] == {"stale_coil": 3}
    assert "the agent rejected 3 of 3 frames (stale_coil: 3) and published no summary: coil C1 was already " \
           "summarised" in err


def test_camera_sim_frames_of_the_wrong_shape_are_reported(running_agent, tmp_path, capsys):
    agent = running_agent()
    cfg = write_config(agent, tmp_path / "agent.toml")
    folder = frames_folder(tmp_path / "rgb", colour=True)  # the tiny pack takes 1 channel
    code, result, err = camera_sim(capsys, "--config", str(cfg), "--folder", str(folder))
    assert code == 1
    assert result["verdict"] == "incomplete" and result["rejected_by_reason"] == {"bad_shape": 3}
    assert f"the agent rejected 3 of 3 frames (bad_shape: 3) of coil {result['coil']}" in err
    # docs/protocol.md 2.2: rejected_by_reason sums to frames.rejected
    summary = status_request(agent.cfg.control.endpoint)["recent_summaries"][-1]
    assert sum(summary["rejected_by_reason"].values()) == summary["frames"]["rejected"] == 3


def test_a_replay_request_without_from_gets_a_sentence(running_agent):
    import msgpack
    import zmq

    agent = running_agent()
    req = zmq.Context.instance().socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.RCVTIMEO, 5000)
    req.connect(agent.cfg.publish.replay_endpoint)
    try:
        req.send(msgpack.packb({"v": 1, "type": "replay", "to": 3}))
        reply = msgpack.unpackb(req.recv_multipart()[0], raw=False)
    finally:
        req.close()
    assert reply["error"] == ("the replay request has no 'from' key; send {v: 1, type: replay, from: FIRST, "
                              "to: LAST} (both inclusive)")


def test_camera_sim_pointed_at_nothing_says_so(tmp_path, capsys):
    folder = frames_folder(tmp_path / "frames")
    ingest, events = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    for extra in (["--no-verdict"], ["--events", events]):
        code, result, err = camera_sim(capsys, "--endpoint", ingest, *extra, "--connect-timeout", "1",
                                       "--folder", str(folder))
        assert (code, result) == (2, None)
        assert f"coilsight camera-sim: no agent at {ingest}: nothing took the connection within 1 s" in err


def test_camera_sim_without_the_agents_heartbeat_sends_nothing(running_agent, tmp_path, capsys):
    agent = running_agent()
    events = f"tcp://127.0.0.1:{free_port()}"  # a wrong event endpoint: the verdict could not be learnt
    code, result, err = camera_sim(capsys, "--endpoint", agent.cfg.ingest.endpoint, "--events", events,
                                   "--connect-timeout", "1", "--folder", str(frames_folder(tmp_path / "f")))
    assert (code, result) == (2, None)
    assert f"no heartbeat from {events} within 1 s: cannot learn what the agent does with the coil" in err
    assert "cameras" not in status_request(agent.cfg.control.endpoint)["health"] or \
        status_request(agent.cfg.control.endpoint)["health"]["cameras"] == {}  # nothing was sent


def test_heartbeat_counts_a_cameras_seq_gaps(running_agent):
    from agent.tools.camera_sim import CameraSim

    agent = running_agent()
    cam = CameraSim(agent.cfg.ingest.endpoint, camera="cam1")
    cam.send_coil("G1", [(clean_frame(), None)] * 2)
    cam.seq += 5  # five messages lost in transport
    cam.send_coil("G2", [(clean_frame(), None)] * 2)
    cam.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        c = status_request(agent.cfg.control.endpoint)["health"].get("cameras", {}).get("cam1")
        if c and c["last_seq"] == cam.seq - 1:
            break
        time.sleep(0.1)
    assert c == {"last_seq": 12, "seq_gaps": 5, "rejected": {}}


def test_status_is_short_for_people_and_full_with_json(running_agent, tmp_path, capsys):
    agent = running_agent()
    cfg = write_config(agent, tmp_path / "agent.toml")
    folder = frames_folder(tmp_path / "frames")
    code, result, _ = camera_sim(capsys, "--config", str(cfg), "--folder", str(folder))
    assert code == 0
    assert main(["status", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) <= 15
    assert lines[0].split()[:2] == ["agent", "ready"] and "profile" in out and "tiny" in out
    assert "gate onnxruntime" not in out and "on onnxruntime-cpu" in out
    (last,) = [line for line in lines if line.startswith("last coils")]
    assert f"{result['coil']}: complete (coil_end); 3 of 3 frames:" in last
    assert "3 inferred since start" in out and "3.0" not in out and "e-0" not in out  # counts are integers
    assert main(["status", "--config", str(cfg), "--json"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["health"]["state"] == "ready" and reply["recent_summaries"][-1]["coil"] == result["coil"]


def test_status_and_reload_give_up_when_nothing_listens():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    for argv, expected in ((["status", "--endpoint", endpoint], f"coilsight status: no agent at {endpoint}"),
                           (["engines", "reload", "--endpoint", endpoint],
                            f"coilsight engines reload: no agent at {endpoint} (no answer within 3 s)")):
        r = subprocess.run([sys.executable, "-m", "agent.cli", *argv], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and expected in r.stderr, r.stderr


def test_subscribe_table_view_and_silence(running_agent, tmp_path, capsys):
    agent = running_agent()
    cfg = write_config(agent, tmp_path / "agent.toml")
    folder = frames_folder(tmp_path / "frames")
    code, result, _ = camera_sim(capsys, "--config", str(cfg), "--folder", str(folder))
    assert code == 0
    assert main(["subscribe", "--config", str(cfg), "--from-seq", "1", "--format", "table", "--count", "2",
                 "--timeout", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert " defect  " in lines[0] and f"{result['coil']} cam0 frame 1: bright conf" in lines[0]
    assert " summary " in lines[1] and f"final: {result['coil']}: complete (coil_end)" in lines[1]
    silent = f"tcp://127.0.0.1:{free_port()}"
    assert main(["subscribe", "--endpoint", silent, "--timeout", "1.5", "--heartbeat-timeout", "0.5"]) == 1
    assert f"coilsight subscribe: no heartbeat from {silent} for 0.5 s" in capsys.readouterr().err


def test_commands_name_the_extra_they_need(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # as in the runtime venv `make demo` builds
    assert main(["train", "--profile", "steel", "--out", str(tmp_path / "run")]) == 2
    assert "coilsight train: needs torch, which this install leaves out; install the 'train' extra: " \
           "pip install 'coilsight[train]'" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path), "--profile", "steel", "--out", str(tmp_path / "p")]) == 2
    assert "coilsight export: needs torch" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    assert main(["evaluate", "--profile", "steel"]) == 2
    assert "coilsight evaluate: needs pycocotools" in capsys.readouterr().err


def test_engines_build_without_onnx_stops_at_the_first_reason(monkeypatch, tmp_path, tiny_pack, capsys):
    pytest.importorskip("onnx")  # the fixture pack is written with onnx; then the build is made to lack it
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\nprofile = "tiny"\nstate_dir = "{tmp_path / "state"}"\n[models]\ndir = "{tiny_pack}"\n')
    monkeypatch.setitem(sys.modules, "onnx", None)
    code = main(["engines", "build", "--config", str(cfg)])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("{")]
    assert code in (2, 3) and len(err) == 1
    assert err[0].startswith("coilsight engines build: ") and "the FP16 step needs onnx: install the 'gpu' extra" in err[0]
    assert not (tmp_path / "state" / "engines").exists()  # stopped before any work


def test_camera_sim_names_a_bad_folder_before_looking_for_an_agent(tmp_path, capsys):
    """No agent is running: a missing folder, or one without images, is what it says (exit 2) and it
    says so at once, not 'no agent' after the connect wait."""
    (tmp_path / "empty").mkdir()
    for folder, what in ((tmp_path / "absent", "no folder"), (tmp_path / "empty", "no images (png, jpg, bmp)")):
        code, result, err = camera_sim(capsys, "--folder", str(folder), "--connect-timeout", "30",
                                       "--endpoint", "tcp://127.0.0.1:9")
        assert (code, result) == (2, None) and f"coilsight camera-sim: {what}" in err and "no agent" not in err
