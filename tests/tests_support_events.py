"""Test support shared by the agent and reliability suites: one subscriber collector, one coil sent
and collected to its summary, and one accounting check (docs/protocol.md 2.2), instead of a copy in
every test file."""
from __future__ import annotations

import os
import struct
import threading
import time
from pathlib import Path

from agent.subscriber import Subscriber


class Collector:
    """A gap-repairing subscriber on a thread: everything durable, in order, exactly once (defect,
    summary, track, periodic)."""

    def __init__(self, cfg, *, from_seq: int | None = 1, slow_s: float = 0.0, timeout_s: float = 120.0,
                 rcvhwm: int | None = None, stall_s: float = 0.0):
        setup = None
        if rcvhwm is not None:  # a small receive queue: a slow subscriber then really drops messages
            import zmq

            def setup(sock):
                sock.setsockopt(zmq.RCVHWM, rcvhwm)
                sock.setsockopt(zmq.RCVBUF, 4096)
        # every durable topic (the coil layer's track and periodic too): msgs is the journal's sequence
        self.sub = Subscriber(cfg.publish.endpoint, cfg.publish.replay_endpoint, from_seq=from_seq,
                              topics=("defect", "summary", "track", "periodic"), include_health=True,
                              socket_setup=setup)
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


def send_coil_collected(cfg, coil: str, frames, *, camera: str = "cam0", from_seq: int | None = 1,
                        wait_s: float = 30.0, **send_kw) -> Collector:
    """One whole coil (coil_end included) from ``camera`` to the agent at ``cfg``, through a Collector
    started first (``from_seq`` None: live only, given 0.3 s to subscribe); returns it closed, once the
    coil's final summary came, holding everything published (an AssertionError when no summary came
    within ``wait_s``). ``send_kw``: CameraSim.send_coil's (rate_hz, mm_per_px_y, ...)."""
    from agent.tools.camera_sim import CameraSim

    col = Collector(cfg, from_seq=from_seq, timeout_s=60.0)
    try:
        if from_seq is None:
            time.sleep(0.3)
        cam = CameraSim(cfg.ingest.endpoint, camera=camera)
        try:
            cam.send_coil(coil, frames, **send_kw)
        finally:
            cam.close()
        assert col.wait(lambda c: c.summaries(coil), wait_s), f"no final summary of {coil}"
    finally:
        col.close()
    return col


def check_accounting(s: dict) -> None:
    """The two invariants of docs/protocol.md 2.2, for the totals and every camera."""
    parts = [s["frames"], *s["cameras"].values()]
    for f in parts:
        assert f["received"] == (f["inspected"] + f["gated_out"] + f["rejected"] + f["shed"] + f["pending"]
                                 + f["lost"]), f
    f = s["frames"]
    assert f["sent"] == f["received"] + f["missing"], f


def record_ends(journal_dir: Path) -> dict[int, tuple[str, int]]:
    """seq -> (segment path, offset just past its record), from the segment files themselves:
    magic b"CSJ1" | length u32 | crc32 u32 | seq u64 | ... (agent/journal.py)."""
    out = {}
    for seg in sorted(Path(journal_dir).glob("segment-*.log")):
        data = seg.read_bytes()
        pos = 0
        while pos + 20 <= len(data):
            magic, length, _crc, seq = struct.unpack_from("<4sIIQ", data, pos)
            assert magic == b"CSJ1", f"{seg.name}: no record at {pos}"
            pos += 12 + length
            out[seq] = (os.path.realpath(seg), pos)
    return out


def collect(agent, stop_when, timeout: float = 30.0):
    """A plain subscriber on a thread from seq 1 (defects and summaries) until ``stop_when(topic, msg)``:
    returns (messages, the thread, the subscriber); join the thread, then close the subscriber."""
    cfg = agent.cfg
    sub = Subscriber(cfg.publish.endpoint, cfg.publish.replay_endpoint, topics=("defect", "summary"), from_seq=1)
    out: list = []

    def run() -> None:
        for topic, msg in sub.messages(timeout_s=timeout):
            out.append((topic, msg))
            if stop_when(topic, msg):
                return

    t = threading.Thread(target=run, daemon=True)
    t.start()
    time.sleep(0.3)
    return out, t, sub
