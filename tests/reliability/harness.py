"""Helpers for the fault-injection suite: agent processes, collectors, figures.

Not a conftest.py: tests/conftest.py is imported as module `conftest` by tests elsewhere, and a
second conftest.py here would shadow it. Test modules import the `agent_process` fixture from here."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.config import config_dict, dump_toml
from agent.tools.demo import wait_ready
from agent.subscriber import Subscriber

def figures(name: str, **values) -> None:
    """One line of figures per test, printed (run pytest -s to see them)."""
    print(f"\n[figures] {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()), flush=True)


def agent_cmd(cfg_path: Path) -> list[str]:
    """The real `coilsight run` process."""
    return [sys.executable, "-m", "agent.cli", "run", "--config", str(cfg_path)]


class AgentProcess:
    """A real agent process on a fixed config (its ports survive restarts)."""

    def __init__(self, tmp_path: Path, cfg):
        self.cfg = cfg
        self.cfg_path = tmp_path / "agent.toml"
        self.cfg_path.write_text(dump_toml(config_dict(cfg)))
        self.log_path = tmp_path / "agent.log"
        self.proc: subprocess.Popen | None = None
        self.ready_s: list[float] = []

    def start(self, timeout_s: float = 60.0) -> dict:
        t0 = time.monotonic()
        self.proc = subprocess.Popen(agent_cmd(self.cfg_path), stdout=subprocess.DEVNULL,
                                     stderr=open(self.log_path, "ab"), env={**os.environ, "PYTHONUNBUFFERED": "1"})
        reply = wait_ready(self.proc, self.cfg.control.endpoint, timeout_s=timeout_s)
        self.ready_s.append(time.monotonic() - t0)
        return reply

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout_s: float = 20.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def agent_process(tmp_path, agent_config):
    procs: list[AgentProcess] = []

    def make(**overrides) -> AgentProcess:
        ap = AgentProcess(tmp_path, agent_config(**overrides))
        procs.append(ap)
        return ap

    yield make
    for ap in procs:
        ap.stop()


class Collector:
    """A gap-repairing subscriber on a thread: everything durable, in order, exactly once."""

    def __init__(self, cfg, *, from_seq: int | None = 1, slow_s: float = 0.0, timeout_s: float = 120.0,
                 rcvhwm: int | None = None, stall_s: float = 0.0):
        setup = None
        if rcvhwm is not None:  # a small receive queue: a slow subscriber then really drops messages
            import zmq

            def setup(sock):
                sock.setsockopt(zmq.RCVHWM, rcvhwm)
                sock.setsockopt(zmq.RCVBUF, 4096)
        self.sub = Subscriber(cfg.publish.endpoint, cfg.publish.replay_endpoint, from_seq=from_seq,
                              include_health=True, socket_setup=setup)
        self.msgs: list[tuple[str, dict]] = []
        self.health: dict | None = None
        self.slow_s = slow_s
        self.stall_s = stall_s  # once, at the first durable message: a subscriber that stops reading
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.t = threading.Thread(target=self._run, args=(timeout_s,), daemon=True)
        self.t.start()

    def _run(self, timeout_s: float) -> None:
        try:
            for topic, msg in self.sub.messages(timeout_s=timeout_s):
                if topic == "health":
                    self.health = msg
                else:
                    self.msgs.append((topic, msg))
                    if self.stall_s:
                        time.sleep(self.stall_s)
                        self.stall_s = 0.0
                    if self.slow_s:
                        time.sleep(self.slow_s)
                if self._stop.is_set():
                    return
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    def summaries(self, coil: str | None = None, final: bool | None = True) -> list[dict]:
        return [m for t, m in self.msgs if t == "summary" and (coil is None or m["coil"] == coil)
                and (final is None or m["final"] == final)]

    def defects(self, coil: str | None = None) -> list[dict]:
        return [m for t, m in self.msgs if t == "defect" and (coil is None or m["coil"] == coil)]

    def wait(self, pred, timeout_s: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if pred(self):
                return True
            if self.error is not None:
                raise self.error
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self._stop.set()
        self.t.join(2)
        self.sub.close()


def check_accounting(s: dict) -> None:
    """The two invariants of docs/protocol.md 2.2, for the totals and every camera."""
    parts = [s["frames"], *s["cameras"].values()]
    for f in parts:
        assert f["received"] == (f["inspected"] + f["gated_out"] + f["rejected"] + f["shed"] + f["pending"]
                                 + f["lost"]), f
    f = s["frames"]
    assert f["sent"] == f["received"] + f["missing"], f
