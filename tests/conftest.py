from __future__ import annotations

import errno
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="run long soaks marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow soak: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback TCP port the kernel just gave out as free (bind to port 0, read it back), never
    the same one twice in a test run. Another process may still take it before the agent binds it
    (other suites run on the same machine): the fixtures that start agents pick fresh ports and try
    again when a bind fails that way (``address_in_use``)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("the kernel keeps handing out ports this test run already used")


def address_in_use(error: BaseException | str | None) -> bool:
    """A bind that failed because someone else holds the port (zmq.ZMQError, or the agent's
    StartupError / log line quoting it)."""
    return error is not None and (getattr(error, "errno", None) == errno.EADDRINUSE
                                  or "Address already in use" in str(error))


@pytest.fixture
def tiny_pack(tmp_path):
    from tinypack import make_pack

    return make_pack(tmp_path / "pack")


@pytest.fixture
def agent_config(tmp_path, tiny_pack):
    """A config for the tiny pack on real loopback TCP ports and a temp state dir."""
    from agent.config import config_from_dict

    def make(**overrides):
        data = {
            "agent": {"name": "test-agent", "profile": "tiny", "state_dir": str(tmp_path / "state"), "tick_s": 0.05},
            "ingest": {"endpoint": f"tcp://127.0.0.1:{free_port()}", "max_width": 256, "max_height": 64,
                       "coil_idle_timeout_s": 30.0, "max_queue_frames": 64},
            "publish": {"endpoint": f"tcp://127.0.0.1:{free_port()}",
                        "replay_endpoint": f"tcp://127.0.0.1:{free_port()}", "heartbeat_s": 0.2, "fsync": False},
            "control": {"endpoint": f"tcp://127.0.0.1:{free_port()}"},
            "models": {"dir": str(tiny_pack), "backends": ["onnxruntime"], "threads": 1, "max_batch": 4,
                       "opt_batch": 4, "max_wait_ms": 5.0},
            "coil": {"budget_s": 300.0},
            "cameras": [{"id": "cam0", "mm_per_px_x": 0.5, "mm_per_px_y": 2.0, "offset_x_mm": 100.0},
                        {"id": "cam1", "mm_per_px_x": 0.5, "mm_per_px_y": 2.0, "offset_x_mm": 228.0}],
        }
        for section, values in overrides.items():
            data.setdefault(section, {}).update(values)
        return config_from_dict(data, "test")

    return make


@pytest.fixture
def running_agent(agent_config):
    """Start an in-process agent (no signal handlers) and stop it after the test."""
    import threading

    from agent.service import Agent

    started = []

    def start(**overrides):
        for attempt in range(3):
            cfg = agent_config(**overrides)  # fresh ports each attempt
            agent = Agent(cfg, install_signals=False)
            failed: list[BaseException] = []

            def run(agent=agent, failed=failed):
                try:
                    agent.run()
                except BaseException as exc:  # start-up failed: surfaced below
                    failed.append(exc)

            t = threading.Thread(target=run, name="agent-main", daemon=True)
            t.start()
            while not agent.ready.wait(0.1):
                if not t.is_alive():
                    break
            if agent.ready.is_set():
                started.append((agent, t))
                return agent
            t.join(5)
            if not (failed and address_in_use(failed[0]) and attempt < 2):
                raise RuntimeError(f"agent did not start: {failed[0] if failed else 'not ready'}")
        raise AssertionError("unreachable")

    yield start
    for agent, t in started:
        agent.request_stop()
        t.join(20)


@pytest.fixture(autouse=True)
def _structlog_defaults():
    """Each test starts with structlog's defaults: a command run in process (agent.cli.main) points
    the log at that test's stderr, and the next test must not inherit it."""
    yield
    import structlog

    structlog.reset_defaults()
