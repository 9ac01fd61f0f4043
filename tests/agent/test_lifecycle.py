"""The agent as systemd sees it: a real process, a real AF_UNIX datagram socket for sd_notify,
real signals."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


from agent.config import config_dict, dump_toml


def notify_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(0.2)
    return s, path


def read_until(sock: socket.socket, want: str, timeout: float) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got += sock.recv(4096).decode().split("\n")
        except socket.timeout:
            continue
        if any(line.startswith(want) for line in got):
            return got
    raise AssertionError(f"{want!r} not received within {timeout} s; got {got}")


def write_config(tmp_path, agent_config, **overrides) -> tuple[Path, object]:
    cfg = agent_config(**overrides)
    path = tmp_path / "agent.toml"
    path.write_text(dump_toml(config_dict(cfg)))
    return path, cfg


def test_ready_after_warm_up_and_stopping_on_sigterm(tmp_path, agent_config):
    sock, path = notify_socket(tmp_path)
    cfg_path, cfg = write_config(tmp_path, agent_config)
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg_path)],
                            env={**os.environ, "NOTIFY_SOCKET": path}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = read_until(sock, "READY=1", 60)
        statuses = [line for line in lines if line.startswith(("STATUS=", "READY="))]
        # READY comes only after the models were loaded and warmed up.
        assert statuses.index("STATUS=warming up") < next(i for i, s in enumerate(statuses) if s == "READY=1")
        from agent.service import status_request

        assert status_request(cfg.control.endpoint)["health"]["state"] == "ready"
        proc.send_signal(signal.SIGTERM)
        read_until(sock, "STOPPING=1", 10)
        assert proc.wait(timeout=15) == 0  # a drain that hangs fails here (how long it took is the bench's)
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()


def test_missing_model_fails_loudly(tmp_path, agent_config):
    cfg_path, _ = write_config(tmp_path, agent_config, models={"dir": str(tmp_path / "nowhere")})
    r = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg_path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1
    assert "cannot start: no model.json in" in r.stderr


def test_a_port_in_use_fails_loudly_and_exits(tmp_path, agent_config):
    """The agent exits non-zero with the reason; it does not hang in shutdown on the sockets a
    failed start left open (systemd would wait for READY until its start timeout)."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        cfg_path, _ = write_config(tmp_path, agent_config, publish={"replay_endpoint": f"tcp://127.0.0.1:{port}"})
        r = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg_path)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"cannot start: cannot bind the replay socket to tcp://127.0.0.1:{port}: Address already in use" in r.stderr


def test_calibration_for_other_models_is_refused(tmp_path, agent_config, tiny_pack):
    import json

    cal = json.loads((tiny_pack / "calibration.json").read_text())
    cal["models"]["seg"] = "0" * 64
    (tiny_pack / "calibration.json").write_text(json.dumps(cal))
    cfg_path, _ = write_config(tmp_path, agent_config)
    r = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg_path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1
    assert "calibration was made for seg model 000000000000" in r.stderr


def test_watchdog_pings_stop_when_inference_hangs(tmp_path, agent_config, monkeypatch):
    """WATCHDOG=1 comes from the main loop only while inference makes progress."""
    from agent.tools.camera_sim import CameraSim
    from agent.service import Agent
    from tinypack import clean_frame

    sock, path = notify_socket(tmp_path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # ping every 0.1 s, withhold after 0.2 s without progress
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    agent = Agent(agent_config(), install_signals=False)
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    try:
        assert agent.ready.wait(30)
        read_until(sock, "WATCHDOG=1", 5)  # idle line: pings flow
        # Hang the real gate model: its next batch blocks until released.
        release = threading.Event()
        real_infer = agent.inference.models.gate.infer
        agent.inference.models.gate.infer = lambda x: (release.wait(30), real_infer(x))[1]
        cam = CameraSim(agent.cfg.ingest.endpoint)
        cam.send_coil("hang", [(clean_frame(), None)])
        cam.close()
        time.sleep(0.5)  # the batch is now stuck in infer()
        while True:  # drain what was sent before the hang took effect
            try:
                sock.recv(4096)
            except socket.timeout:
                break
        t_hang = time.monotonic()
        pings = []
        while time.monotonic() - t_hang < 1.5:
            try:
                if b"WATCHDOG=1" in sock.recv(4096):
                    pings.append(time.monotonic() - t_hang)
            except socket.timeout:
                pass
        assert pings == [], f"watchdog kept pinging while inference hung: {pings}"
        release.set()
        read_until(sock, "WATCHDOG=1", 3)  # progress again -> pings resume
    finally:
        agent.request_stop()
        t.join(20)
        sock.close()


def test_sighup_reloads_models_in_a_real_process(tmp_path, agent_config):
    from agent.service import status_request

    sock, path = notify_socket(tmp_path)
    cfg_path, cfg = write_config(tmp_path, agent_config)
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg_path)],
                            env={**os.environ, "NOTIFY_SOCKET": path}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        read_until(sock, "READY=1", 60)
        proc.send_signal(signal.SIGHUP)
        read_until(sock, "RELOADING=1", 10)
        read_until(sock, "READY=1", 30)  # raises unless READY follows the reload
        health = status_request(cfg.control.endpoint)["health"]
        assert (health["reloads"], health["state"]) == (1, "ready")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
