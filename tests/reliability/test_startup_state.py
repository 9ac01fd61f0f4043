"""Start-up against what the box throws at it (issue 16, items 13 and 15), real agent processes:
a port already in use, a second agent on the same state directory, state files damaged between runs."""
from __future__ import annotations

import json
import socket
import subprocess
import time
from datetime import datetime

import pytest
from harness import (  # noqa: F401 (agent_process: a fixture)
    AgentProcess,
    Collector,
    agent_cmd,
    agent_process,
    figures,
    send_coil_collected,
)
from tinypack import clean_frame, frame_with

from agent.service import status_request


def frames(n: int):
    for i in range(n):
        yield (frame_with("bright", x=8, y=16) if i % 4 == 0 else clean_frame()), None


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


@pytest.mark.parametrize("role, key", [("ingest", ("ingest", "endpoint")), ("publish", ("publish", "endpoint")),
                                       ("replay", ("publish", "replay_endpoint")),
                                       ("control", ("control", "endpoint"))])
def test_a_port_in_use_exits_non_zero_at_once_naming_the_endpoint(tmp_path, agent_config, role, key):
    cfg = agent_config()
    endpoint = getattr(getattr(cfg, key[0]), key[1])
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", _port(endpoint)))
    squatter.listen()
    ap = AgentProcess(tmp_path, lambda: cfg)
    t0 = time.monotonic()
    proc = subprocess.Popen(agent_cmd(ap.cfg_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=60)  # before the fix: waited forever
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
        pytest.fail(f"the agent still runs 60 s after the {role} port was found in use")
    finally:
        squatter.close()
    exit_s = time.monotonic() - t0
    exited_wall = time.time()
    assert proc.returncode != 0
    assert f"cannot start: cannot bind the {role} socket to {endpoint}: Address already in use" in err, err[-2000:]
    failed = [json.loads(line) for line in err.splitlines() if '"agent_start_failed"' in line]
    first_failure = min(datetime.fromisoformat(json.loads(line)["timestamp"]).timestamp()
                        for line in err.splitlines() if line.startswith("{") and '_failed"' in line)
    figures(f"port in use ({role})", exit_code=proc.returncode, process_wall_s=round(exit_s, 2),
            start_failed_logged=len(failed), exit_after_bind_failure_s=round(exited_wall - first_failure, 3))


def test_a_second_agent_on_the_same_state_dir_is_refused(tmp_path, agent_process, agent_config):
    first = agent_process()
    first.start()
    (tmp_path / "b").mkdir()
    second_cfg = agent_config()  # its own ports, the same state directory
    assert second_cfg.state_path() == first.cfg.state_path()
    second = AgentProcess(tmp_path / "b", lambda: second_cfg)
    proc = subprocess.Popen(agent_cmd(second.cfg_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    lock = first.cfg.state_path() / "coilsight.lock"
    assert (f"cannot start: state directory {first.cfg.state_path()} is in use by another agent "
            f"(pid {first.proc.pid} holds {lock})") in err, err[-2000:]
    # The first agent is untouched: still ready, its journal still its own.
    assert status_request(first.cfg.control.endpoint)["health"]["state"] == "ready"
    assert first.terminate() == 0
    second.start()  # the lock went with the first agent
    assert second.terminate() == 0


BAD_FILES = {
    "huge published.seq": ("published.seq", b"99999999999"),  # today: start-up hangs at 100 % CPU
    "published.seq past u64": ("published.seq", b"184467440737095516150"),
    "checkpoint of the wrong shape": ("coils.checkpoint.json", json.dumps(
        {"format": 1, "wall_ns": 1, "last_seq": 0, "coils": {"K": {"cameras": []}}, "current": {}, "closed": [],
         "recent": []}).encode()),
    "checkpoint of garbage bytes": ("coils.checkpoint.json", bytes(range(256)) * 8),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_damaged_state_file_is_moved_aside_reported_and_never_fatal(agent_process, case):
    name, content = BAD_FILES[case]
    ap = agent_process()
    ap.start()
    c = send_coil_collected(ap.cfg, "S1", frames(8), wait_s=20)
    last_seq = max(m["seq"] for _, m in c.msgs)
    assert ap.terminate() == 0
    path = ap.cfg.state_path() / "journal" / ap.cfg.agent.name / name
    path.write_bytes(content)
    reply = ap.start(timeout_s=60)  # before the fix: a hang, or a crash loop with an opaque error
    (moved,) = reply["health"]["state_files_moved_aside"]
    assert moved["path"] == str(path) and moved["moved_to"].startswith(f"{path}.bad-")
    with open(moved["moved_to"], "rb") as f:
        assert f.read() == content
    assert not path.exists() or path.read_bytes() != content  # the agent may have written a fresh one since
    assert reply["last_seq"] == last_seq, "a file moved aside raises no seq floor"
    # The agent inspects as before, and its seqs go on from the journal.
    c = send_coil_collected(ap.cfg, "S2", frames(8), from_seq=None, wait_s=20)
    assert min(m["seq"] for _, m in c.msgs) == last_seq + 1
    logged = [json.loads(line) for line in ap.log().splitlines() if '"state_file_moved_aside"' in line]
    assert [e["path"] for e in logged] == [str(path)]
    figures(f"bad state file: {case}", reason=moved["reason"][:80], ready_s=round(ap.ready_s[-1], 2))
