"""Test support for the bridge: a real mosquitto on a free port, a checking MQTT consumer, and the
bridge / aggregator as real `coilsight` processes.

Not a conftest.py (tests/conftest.py is imported as module `conftest` elsewhere); test modules import
the fixtures from here."""
from __future__ import annotations

import getpass
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import free_port
from tests_support_procs import LoggedProcess

from agent.config import dump_toml
from agent.tools.demo import stop_process

MOSQUITTO = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if os.path.exists(p)), None)
needs_mosquitto = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto not installed (Debian package "
                                     "'mosquitto'; scripts/ensure-system-tools.sh installs it)")
ROOT = Path(__file__).resolve().parents[2]


class Broker:
    """mosquitto with its own config file and persistence in a temp dir; restarts keep port and data."""

    def __init__(self, workdir: Path, *, extra: str = "", tls: bool = False):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = self.dir / "mosquitto.conf"
        self.log_path = self.dir / "mosquitto.log"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "persistence true", f"persistence_location {self.dir}/",
            "autosave_interval 1", "autosave_on_changes false",
            # Room for everything a consumer misses while away (the default, 1000, drops the rest).
            "max_queued_messages 1000000", "max_inflight_messages 100",
            f"log_dest file {self.log_path}", "log_type error", "log_type warning", "log_type notice",
            "log_type information",
            # Started as root (CI containers), mosquitto drops to user 'mosquitto', which cannot write
            # this temp dir: stay the user that started it (ignored when not root).
            f"user {getpass.getuser()}",
        ]
        if not extra:
            lines.append("allow_anonymous true")
        self.conf.write_text("\n".join(lines) + "\n" + extra)
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout_s: float = 10.0) -> Broker:
        import socket

        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited ({self.proc.returncode}): {self.log()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    self.starts += 1
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}: {self.log()[-2000:]}")

    def stop(self) -> None:
        """Graceful (SIGTERM): mosquitto saves its persistence file, as at a service restart."""
        stop_process(self.proc, grace_s=10.0)

    def restart(self, down_s: float = 0.5) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def broker(tmp_path):
    if MOSQUITTO is None:
        pytest.skip("mosquitto not installed (Debian package 'mosquitto'; scripts/ensure-system-tools.sh)")
    brokers: list[Broker] = []

    def make(**kw) -> Broker:
        b = Broker(tmp_path / f"broker{len(brokers)}", **kw).start()
        brokers.append(b)
        return b

    yield make
    for b in brokers:
        b.stop()


class Consumer:
    """A plant consumer: persistent session (clean_session false), QoS 1; records every arrival.

    ``check()`` is the consumer's promise: every seq 1..N arrived at least once, and per camera the
    first arrival of each seq comes in increasing seq order (a consumer that drops seqs it holds sees
    each camera's messages in order, without a hole filled later)."""

    def __init__(self, port: int, topic: str = "coilsight/#", *, client_id: str = "consumer", tls=None,
                 username: str | None = None, password: str | None = None):
        import paho.mqtt.client as mqtt

        self.arrivals: list[tuple[str, dict | bytes, bool]] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.refused: list[str] = []
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        if tls:
            c.tls_set_context(tls)
        if username:
            c.username_pw_set(username, password)

        def on_connect(client, _u, _f, rc, _p):
            if rc.is_failure:
                self.refused.append(str(rc))
                return
            client.subscribe(topic, qos=1)
            self.connected.set()

        def on_message(_c, _u, m):
            try:
                body: dict | bytes = json.loads(m.payload)
            except ValueError:
                body = m.payload
            with self.lock:
                self.arrivals.append((m.topic, body, m.retain))

        c.on_connect = on_connect
        c.on_message = on_message
        c.reconnect_delay_set(0.1, 1)
        c.connect_async("127.0.0.1", port, keepalive=10)
        c.loop_start()
        self.client = c

    def messages(self, kind: str | None = None) -> list[tuple[str, dict]]:
        with self.lock:
            return [(t, b) for t, b, _ in self.arrivals if isinstance(b, dict)
                    and (kind is None or t.endswith("/" + kind))]

    def seqs(self) -> set[int]:
        return {b["seq"] for t, b in self.messages() if "seq" in b and not t.endswith("/all/summary")}

    def check(self, last_seq: int) -> dict:
        msgs = [(t, b) for t, b in self.messages() if "seq" in b and not t.endswith("/all/summary")]
        got = {b["seq"] for _, b in msgs}
        lost = sorted(set(range(1, last_seq + 1)) - got)
        assert not lost, f"{len(lost)} seqs never arrived, first {lost[:10]}"
        last: dict[str, int] = {}
        seen: dict[str, set[int]] = {}
        for t, b in msgs:
            cam = t.split("/")[2]
            s = b["seq"]
            if s in seen.setdefault(cam, set()):
                continue  # a duplicate: same seq, dropped by the consumer
            assert s > last.get(cam, 0), f"camera {cam}: seq {s} arrived first after seq {last[cam]}"
            seen[cam].add(s)
            last[cam] = s
        # A summary goes once to each of its cameras' topics: a duplicate is the same seq again on one topic.
        copies = {(t, b["seq"]) for t, b in msgs}
        return {"arrivals": len(msgs), "unique": len(got), "duplicates": len(msgs) - len(copies)}

    def wait(self, pred, timeout_s: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if pred(self):
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def write_bridge_config(path: Path, *, line: str = "L1", agent_cfg=None, port: int, state_dir: Path,
                        boxes: list[tuple[str, object]] = (), mqtt: dict | None = None, **sections) -> Path:
    data: dict = {"bridge": {"line": line, "state_dir": str(state_dir), "state_interval_s": 0.1,
                             "log_format": "json"},
                  "mqtt": {"host": "127.0.0.1", "port": port, "reconnect_max_s": 0.5, **(mqtt or {})}}
    if agent_cfg is not None:
        data["stream"] = {"endpoint": agent_cfg.publish.endpoint, "replay_endpoint": agent_cfg.publish.replay_endpoint}
    if boxes:
        data["boxes"] = [{"name": n, "endpoint": c.publish.endpoint, "replay_endpoint": c.publish.replay_endpoint}
                         for n, c in boxes]
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    path.write_text(dump_toml(data))
    return path


class Proc(LoggedProcess):
    """`coilsight bridge` / `coilsight aggregate` as a real process, its log in a file."""

    def __init__(self, command: str, config: Path, log_path: Path):
        super().__init__(log_path)
        self.command, self.config = command, config

    def start(self) -> Proc:
        self.spawn([sys.executable, "-m", "agent.cli", self.command, "--config", str(self.config)],
                   env={"PYTHONPATH": str(ROOT)})
        return self


@pytest.fixture
def procs():
    started: list[Proc] = []

    def make(command: str, config: Path, log_path: Path) -> Proc:
        p = Proc(command, config, log_path).start()
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()
