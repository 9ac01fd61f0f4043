"""publish.fsync is observable: with it on, every event's journal record is made durable (fsync or
fdatasync of its segment, covering the record) before the event leaves on the PUB socket.

The durability calls are recorded through a wrapper around os.fsync / os.fdatasync that calls the
real one first; the sends through a zmq.Socket subclass that records each PUB message and sends
it. Both write to one ordered log. The journal's segments are then read back in the record
layout of agent/journal.py to know where each sequence number's record ends."""
from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import msgpack
import pytest
import zmq
from tests_support_events import record_ends, send_coil_collected
from tinypack import clean_frame, frame_with

from agent.journal import Journal
from agent.publish import Publisher


class Durability:
    """One ordered log of ("durable", path, size) and ("sent", topic, seq) entries."""

    def __init__(self, monkeypatch):
        self.log: list[tuple] = []
        self._lock = threading.Lock()
        for name in ("fsync", "fdatasync"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self._durable(real))
        log, lock = self.log, self._lock

        class RecordingSocket(zmq.Socket):
            def send_multipart(self, msg_parts, *args, **kwargs):
                if self.getsockopt(zmq.TYPE) == zmq.PUB:
                    topic, body = bytes(msg_parts[0]), bytes(msg_parts[1])
                    if topic != b"health":  # every durable topic: defect, track, periodic, summary
                        with lock:
                            log.append(("sent", topic, msgpack.unpackb(body, raw=False)["seq"]))
                return super().send_multipart(msg_parts, *args, **kwargs)

        monkeypatch.setattr(zmq.Context, "_socket_class", RecordingSocket)

    def _durable(self, real):
        def wrapper(fd):
            real(fd)  # durable once this returns
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                with self._lock:
                    self.log.append(("durable", os.readlink(f"/proc/self/fd/{fd}"), st.st_size))

        return wrapper

    def sent(self) -> list[int]:
        return [e[2] for e in self.log if e[0] == "sent"]

    def check(self, journal_dir: Path) -> int:
        """Assert each sent event's record was durable before it was sent; returns how many were checked."""
        ends = record_ends(journal_dir)
        durable: dict[str, int] = {}  # segment path -> bytes made durable so far
        checked = 0
        for entry in list(self.log):
            if entry[0] == "durable":
                durable[entry[1]] = max(durable.get(entry[1], 0), entry[2])
                continue
            seq = entry[2]
            path, end = ends[seq]
            assert durable.get(path, 0) >= end, (
                f"seq {seq} was sent before its record (ending at byte {end} of {Path(path).name}) was made "
                f"durable; durable so far: {durable.get(path, 0)} bytes")
            checked += 1
        return checked


def publish_all(journal: Journal, messages: list[tuple[str, dict]]) -> Publisher:
    """A real Publisher on loopback TCP over ``journal`` submits ``messages`` and is stopped (its
    queue drained); the journal is closed after it. Returns the stopped publisher."""
    ctx = zmq.Context()
    pub = Publisher(ctx, endpoint="tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*", journal=journal,
                    agent="t", heartbeat_s=0.2, sndhwm=10_000, linger_ms=0, max_replay=100)
    pub.start()
    try:
        assert pub.bound.wait(5)
        for topic, body in messages:
            pub.submit(topic, body)
    finally:
        pub.stop(10)
        journal.close()
        ctx.term()
    return pub


def test_publisher_makes_each_record_durable_before_sending_it(tmp_path, monkeypatch):
    rec = Durability(monkeypatch)
    journal = Journal(tmp_path / "journal", fsync=True, segment_bytes=4096)  # rotates: several segments
    pub = publish_all(journal, [("defect" if i % 4 else "summary", {"coil": "C", "index": i, "pad": "x" * 40})
                                for i in range(200)])
    assert pub.error is None
    assert rec.sent() == list(range(1, 201))
    assert len(list((tmp_path / "journal").glob("segment-*.log"))) > 1
    assert rec.check(tmp_path / "journal") == 200


def test_without_fsync_nothing_is_made_durable_and_the_check_says_so(tmp_path, monkeypatch):
    """The check itself can fail: fsync off, the same run trips it at the first event."""
    rec = Durability(monkeypatch)
    journal = Journal(tmp_path / "journal", fsync=False)
    publish_all(journal, [("defect", {"coil": "C", "index": 0})])
    with pytest.raises(AssertionError, match=r"seq 1 was sent before its record .* was made durable"):
        rec.check(tmp_path / "journal")


def test_agent_with_fsync_on_journals_durably_before_publishing(running_agent, monkeypatch):
    rec = Durability(monkeypatch)
    agent = running_agent(publish={"fsync": True})
    col = send_coil_collected(agent.cfg, "durable", [(frame_with("bright", 8 * (i % 20), 16) if i % 3 == 0
                                                      else clean_frame(), None) for i in range(30)])
    assert len(col.defects("durable")) == 10
    sent = rec.sent()
    # 10 defects, their tracks (the coil layer, docs/protocol.md 2.6) and the summary, each once, in seq order
    tracks = [m for t, m in col.msgs if t == "track" and m["coil"] == "durable"]
    assert 1 <= len(tracks) <= 10
    assert sent == list(range(1, 12 + len(tracks)))
    assert rec.check(agent.journal.dir) == 11 + len(tracks)
