"""Test support shared by the bridge and reliability suites: a real `coilsight` process with its
stderr (structlog JSON, one event per line) appended to a log file, stopped gently (SIGTERM) then
firmly (SIGKILL), and its log events read back. One wrapper instead of a copy in each suite
(tests/bridge/mqtt_support.py Proc, tests/reliability/harness.py AgentProcess); stopping is the
tools' own ``agent.tools.demo.stop_process``."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from agent.tools.demo import stop_process


class LoggedProcess:
    """One process at a time (``proc``) started by ``spawn``; restarts append to the same log."""

    grace_s = 15.0  # stop(): how long SIGTERM gets before SIGKILL
    kill_wait_s = 5.0

    def __init__(self, log_path: Path):
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def spawn(self, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``cmd`` (stdout dropped, stderr to the log, unbuffered); it becomes ``proc``."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        return self.proc

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout_s: float = 20.0) -> int:
        """SIGTERM and the exit status (TimeoutExpired when it does not exit in time)."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def stop(self) -> None:
        stop_process(self.proc, self.grace_s, self.kill_wait_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, name: str) -> list[dict]:
        """The JSON log lines whose event is ``name``, in order (other lines, and any line that is
        not JSON, are passed over)."""
        out = []
        for line in self.log().splitlines():
            if f'"{name}"' not in line:
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and doc.get("event") == name:
                out.append(doc)
        return out
