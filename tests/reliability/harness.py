"""Helpers for the fault-injection suite: agent processes, collectors, figures.

Not a conftest.py: tests/conftest.py is imported as module `conftest` by tests elsewhere, and a
second conftest.py here would shadow it. Test modules import the `agent_process` fixture from here."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from conftest import address_in_use
from tests_support_events import Collector, check_accounting, send_coil_collected  # noqa: F401  (re-exported for the suite)
from tests_support_procs import LoggedProcess

from agent.config import config_dict, dump_toml
from agent.tools.demo import wait_ready


def figures(name: str, **values) -> None:
    """One line of figures per test, printed (run pytest -s to see them)."""
    print(f"\n[figures] {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()), flush=True)


def agent_cmd(cfg_path: Path, slow_fsync_s: float = 0.0) -> list[str]:
    """The real `coilsight run` process; slow_fsync_s > 0: on a stalled disk (slow_disk.py)."""
    if slow_fsync_s:
        return [sys.executable, str(Path(__file__).with_name("slow_disk.py")), str(slow_fsync_s), "run", "--config",
                str(cfg_path)]
    return [sys.executable, "-m", "agent.cli", "run", "--config", str(cfg_path)]


class AgentProcess(LoggedProcess):
    """A real agent process on a fixed config (its ports survive restarts)."""

    grace_s, kill_wait_s = 20.0, 10.0  # stop(): a draining agent gets longer than the bridge

    def __init__(self, tmp_path: Path, make_cfg, slow_fsync_s: float = 0.0):
        super().__init__(tmp_path / "agent.log")
        self.make_cfg = make_cfg  # a fresh config (fresh ports) each call
        self.cfg_path = tmp_path / "agent.toml"
        self._write(make_cfg())
        self.slow_fsync_s = slow_fsync_s
        self.ready_s: list[float] = []

    def _write(self, cfg) -> None:
        self.cfg = cfg
        self.cfg_path.write_text(dump_toml(config_dict(cfg)))

    def start(self, timeout_s: float = 60.0) -> dict:
        for attempt in range(3):
            t0 = time.monotonic()
            logged = self.log_path.stat().st_size if self.log_path.exists() else 0
            self.spawn(agent_cmd(self.cfg_path, self.slow_fsync_s))
            try:
                reply = wait_ready(self.proc, self.cfg.control.endpoint, timeout_s=timeout_s)
            except RuntimeError:  # exited before ready
                # Someone took a port between free_port() and the bind: on the first start only (a
                # restart must keep its ports), pick fresh ones and try again.
                if self.ready_s or attempt == 2 or not address_in_use(self.log()[logged:]):
                    raise
                self._write(self.make_cfg())
                continue
            self.ready_s.append(time.monotonic() - t0)
            return reply
        raise AssertionError("unreachable")


@pytest.fixture
def agent_process(tmp_path, agent_config):
    procs: list[AgentProcess] = []

    def make(slow_fsync_s: float = 0.0, **overrides) -> AgentProcess:
        ap = AgentProcess(tmp_path, lambda: agent_config(**overrides), slow_fsync_s)
        procs.append(ap)
        return ap

    yield make
    for ap in procs:
        ap.stop()
