"""sd_notify against a real AF_UNIX datagram socket standing in for systemd."""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import structlog

from agent.sdnotify import Notifier, Watchdog, watchdog_interval


@pytest.fixture
def systemd_socket(tmp_path):
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    yield str(path), sock
    sock.close()


def drain(sock: socket.socket) -> list[str]:
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2.0)
    return out


def test_lifecycle_datagrams_reach_the_socket(systemd_socket):
    path, sock = systemd_socket
    n = Notifier(environ={"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready(status="warm: gate+seg on onnxruntime")
    assert sock.recv(4096).decode() == "READY=1\nSTATUS=warm: gate+seg on onnxruntime"
    assert n.status("coil C123: 40 frames")
    assert sock.recv(4096).decode() == "STATUS=coil C123: 40 frames"
    assert n.watchdog()
    assert sock.recv(4096).decode() == "WATCHDOG=1"
    assert n.reloading()
    reload_msg = sock.recv(4096).decode().split("\n")
    assert reload_msg[0] == "RELOADING=1" and reload_msg[1].startswith("MONOTONIC_USEC=")
    assert n.extend_timeout(2.5)
    assert sock.recv(4096).decode() == "EXTEND_TIMEOUT_USEC=2500000"
    assert n.stopping()
    assert sock.recv(4096).decode() == "STOPPING=1"
    n.close()


def test_abstract_socket_name():
    name = f"coilsight-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        assert Notifier(environ={"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_no_socket_is_a_noop():
    n = Notifier(environ={})
    assert not n.enabled
    assert n.ready() is False
    assert Watchdog(n, interval_s=0.1).maybe_ping() is False


def test_send_failure_is_logged_not_raised(tmp_path):
    n = Notifier(environ={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    with structlog.testing.capture_logs() as logs:
        assert n.ready() is False
    assert logs[0]["event"] == "sd_notify_failed"
    assert logs[0]["socket"].endswith("nobody-listens")
    assert "No such file" in logs[0]["error"]


def test_watchdog_interval_from_environment():
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "10000000"}) == 5.0
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}) == 5.0
    # Variables inherited from a parent are not ours to honour.
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}) is None
    with pytest.raises(ValueError, match=r"WATCHDOG_USEC='ten' is not an integer"):
        watchdog_interval({"WATCHDOG_USEC": "ten"})
    with pytest.raises(ValueError, match=r"WATCHDOG_USEC='0' must be positive"):
        watchdog_interval({"WATCHDOG_USEC": "0"})


def test_watchdog_bad_arguments():
    n = Notifier(environ={})
    with pytest.raises(ValueError, match=r"interval_s=-1 must be positive"):
        Watchdog(n, interval_s=-1)
    with pytest.raises(ValueError, match=r"stall_s=0 must be positive"):
        Watchdog(n, interval_s=1.0, stall_s=0)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_watchdog_pings_only_while_inference_marks_alive(systemd_socket):
    """Deterministic clock: the rule itself, datagrams on the real socket."""
    path, sock = systemd_socket
    clock = FakeClock()
    wd = Watchdog(Notifier(environ={"NOTIFY_SOCKET": path}), interval_s=1.0, stall_s=3.0, clock=clock)
    assert wd.maybe_ping()  # first tick after READY pings at once
    assert not wd.maybe_ping()  # not due yet
    clock.t += 1.0
    wd.mark_alive()
    assert wd.maybe_ping()
    clock.t += 3.5  # no mark for longer than stall_s: the loop is hung
    with structlog.testing.capture_logs() as logs:
        assert not wd.maybe_ping()
        clock.t += 5
        assert not wd.maybe_ping()
    assert wd.stalled
    assert [entry["event"] for entry in logs] == ["watchdog_withheld"]  # logged once, not per tick
    assert drain(sock) == ["WATCHDOG=1", "WATCHDOG=1"]
    wd.mark_alive()  # loop recovered before systemd acted
    with structlog.testing.capture_logs() as logs:
        assert wd.maybe_ping()
    assert logs[0]["event"] == "watchdog_resumed"
    assert drain(sock) == ["WATCHDOG=1"]


def test_beat_counts_progress_or_idle(systemd_socket):
    path, sock = systemd_socket
    clock = FakeClock()
    wd = Watchdog(Notifier(environ={"NOTIFY_SOCKET": path}), interval_s=1.0, stall_s=2.0, clock=clock)
    assert wd.beat(progress_token=10)
    clock.t += 2.5
    assert not wd.beat(progress_token=10)  # frames queued, none inferred: stuck
    assert wd.beat(progress_token=10, idle=True)  # nothing queued: idle is fine
    clock.t += 2.5
    assert wd.beat(progress_token=11)  # frames moved
    assert drain(sock) == ["WATCHDOG=1"] * 3


def test_pings_stop_when_a_real_inference_thread_hangs(systemd_socket):
    """Real threads and time: once the worker stops marking, no WATCHDOG=1 arrives any more."""
    path, sock = systemd_socket
    wd = Watchdog(Notifier(environ={"NOTIFY_SOCKET": path}), interval_s=0.02, stall_s=0.2)
    hang = threading.Event()
    stop = threading.Event()

    def inference_loop():
        while not stop.is_set():
            if not hang.is_set():
                wd.mark_alive()
            time.sleep(0.01)

    worker = threading.Thread(target=inference_loop, daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 10
        pinged = 0
        while pinged < 3 and time.monotonic() < deadline:
            pinged += wd.maybe_ping()
            time.sleep(0.01)
        assert pinged >= 3
        assert drain(sock).count("WATCHDOG=1") == pinged

        hang.set()
        while not wd.stalled and time.monotonic() < deadline:
            wd.maybe_ping()
            time.sleep(0.01)
        assert wd.stalled, "the watchdog never noticed the hung loop"
        drain(sock)
        for _ in range(50):  # the main loop keeps ticking for a while
            assert not wd.maybe_ping()
            time.sleep(0.01)
        assert drain(sock) == []
    finally:
        stop.set()
        worker.join(timeout=2)
