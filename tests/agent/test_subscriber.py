"""Subscriber gap repair against the real Publisher and Journal on loopback sockets."""
from __future__ import annotations

import threading
import time

import pytest
import zmq
from conftest import free_port

from agent.journal import Journal
from agent.publish import Publisher
from agent.subscriber import ReplayError, Subscriber


def endpoints(directory=None) -> tuple[str, str]:
    if directory is not None:  # IPC: a restarted publisher rebinds the same path at once (a TCP port may linger)
        return f"ipc://{directory}/pub.sock", f"ipc://{directory}/replay.sock"
    return f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"


def publisher(journal: Journal, eps, *, max_replay: int = 1000, republish_from: int | None = None) -> Publisher:
    p = Publisher(zmq.Context.instance(), endpoint=eps[0], replay_endpoint=eps[1], journal=journal, agent="t",
                  heartbeat_s=0.1, sndhwm=1000, linger_ms=0, max_replay=max_replay)
    if republish_from is not None:
        p.republish_from(republish_from)
    p.start()
    assert p.bound.wait(5)
    return p


def publish(p: Publisher, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        p.submit("defect" if i % 4 else "summary", {"n": i})


def wait_published(p: Publisher, seq: int) -> None:
    deadline = time.monotonic() + 10
    while p.last_published_seq < seq:
        assert time.monotonic() < deadline, "publisher did not get there"
        time.sleep(0.01)


def collect(sub: Subscriber, until_seq: int, timeout_s: float = 10.0) -> list[tuple[str, dict]]:
    out = []
    for topic, msg in sub.messages(timeout_s=timeout_s):
        out.append((topic, msg))
        if msg["seq"] >= until_seq:
            break
    return out


def test_late_subscriber_replays_in_chunks_exactly_once(tmp_path):
    eps = endpoints()
    p = publisher(Journal(tmp_path, fsync=False), eps, max_replay=7)
    publish(p, 30)  # nobody listens yet
    wait_published(p, 30)
    sub = Subscriber(*eps, from_seq=1)
    got = []

    def run():
        got.extend(collect(sub, 40))

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.3)  # the heartbeat alone shows the gap 1..30
    publish(p, 10, start=30)
    t.join(15)
    assert [m["seq"] for _, m in got] == list(range(1, 41))
    assert [m["n"] for _, m in got] == list(range(40))
    assert sub.replayed >= 30 and sub.gaps >= 1 and sub.unrecoverable == 0
    assert {t for t, _ in got} == {"defect", "summary"}
    sub.close()
    p.stop()


class LossyLink(threading.Thread):
    """A SUB -> PUB hop between the publisher and a subscriber that loses what it is told to, as a
    flaky network does: the subscriber's live stream has real holes. ``drop_health``: no heartbeat
    gets through, so only the data messages can show the subscriber a gap."""

    def __init__(self, upstream: str, drop: set[int], drop_health: bool = True):
        super().__init__(daemon=True)
        ctx = zmq.Context.instance()
        self.up = ctx.socket(zmq.SUB)
        self.up.setsockopt(zmq.SUBSCRIBE, b"")
        self.up.setsockopt(zmq.LINGER, 0)
        self.up.connect(upstream)
        self.down = ctx.socket(zmq.PUB)
        self.down.setsockopt(zmq.LINGER, 0)
        self.down.bind("tcp://127.0.0.1:*")
        self.endpoint = self.down.getsockopt_string(zmq.LAST_ENDPOINT)
        self.drop, self.drop_health = drop, drop_health
        self.dropped: list[int] = []
        self.forwarded: list[int] = []
        self._halt = threading.Event()

    def run(self) -> None:
        from agent.protocol import unpack_body

        poller = zmq.Poller()
        poller.register(self.up, zmq.POLLIN)
        while not self._halt.is_set():
            if not poller.poll(50):
                continue
            topic, body = self.up.recv_multipart()
            seq = unpack_body(body)["seq"]
            if topic == b"health" and self.drop_health:
                continue
            if topic != b"health" and seq in self.drop:
                self.dropped.append(seq)
                continue
            self.forwarded.append(seq)
            self.down.send_multipart([topic, body])

    def close(self) -> None:
        self._halt.set()
        self.join(2)
        self.up.close()
        self.down.close()


def test_a_gap_in_the_live_stream_is_filled_from_the_replay_socket(tmp_path):
    """Messages 4..6 lost on the way and no heartbeat at all: message 7 shows the gap, and the
    subscriber asks the replay socket for 4..6 before it hands 7 on."""
    eps = endpoints()
    p = publisher(Journal(tmp_path, fsync=False), eps)
    link = LossyLink(eps[0], drop={4, 5, 6})
    link.start()
    sub = Subscriber(link.endpoint, eps[1], from_seq=None, include_health=True)  # live only: no late-join replay
    got = []
    t = threading.Thread(target=lambda: got.extend(collect(sub, 10)))
    t.start()
    time.sleep(0.5)  # both hops connected before anything is published
    publish(p, 10)
    t.join(15)
    link.close()
    assert link.dropped == [4, 5, 6] and link.forwarded == [1, 2, 3, 7, 8, 9, 10]
    assert [m["seq"] for _, m in got] == list(range(1, 11)), "in order, exactly once"
    assert [m["n"] for _, m in got] == list(range(10))
    assert all(t != "health" for t, _ in got), "no heartbeat reached the subscriber"
    assert (sub.gaps, sub.replayed, sub.unrecoverable) == (1, 3, 0)
    sub.close()
    p.stop()


def test_topics_filter_what_comes_out_but_not_the_tracking(tmp_path):
    eps = endpoints()
    p = publisher(Journal(tmp_path, fsync=False), eps)
    publish(p, 8)
    wait_published(p, 8)
    sub = Subscriber(*eps, from_seq=1, topics=("summary",))
    got = []
    for topic, msg in sub.messages(timeout_s=3):
        got.append(msg["n"])
        if msg["n"] == 4:
            break
    assert got == [0, 4]
    sub.close()
    p.stop()


def test_republished_messages_after_restart_are_dropped(tmp_path):
    eps = endpoints(tmp_path)
    j = Journal(tmp_path, fsync=False)
    p = publisher(j, eps)
    sub = Subscriber(*eps, from_seq=1)
    time.sleep(0.3)
    publish(p, 5)
    first = collect(sub, 5)
    p.stop()
    j.close()
    # A restart republishes 1..5 (it cannot know what was delivered), then goes on at 6.
    j2 = Journal(tmp_path, fsync=False)
    p2 = publisher(j2, eps, republish_from=1)
    time.sleep(0.3)
    publish(p2, 3, start=5)
    second = collect(sub, 8)
    assert [m["seq"] for _, m in first + second] == list(range(1, 9))
    sub.close()
    p2.stop()


def test_a_damaged_record_is_counted_and_skipped_not_asked_for_again(tmp_path):
    j = Journal(tmp_path, fsync=False)
    p = publisher(j, endpoints())
    publish(p, 10)
    wait_published(p, 10)
    p.stop()
    off, ln = j._segments[-1].index[4]
    j.close()
    seg = next(tmp_path.glob("segment-*.log"))
    data = bytearray(seg.read_bytes())
    data[off + ln - 2] ^= 0xFF
    seg.write_bytes(bytes(data))
    j2 = Journal(tmp_path, fsync=False)
    assert len(j2.damage) == 1
    eps = endpoints()
    p2 = publisher(j2, eps)
    sub = Subscriber(*eps, from_seq=1)
    got = collect(sub, 10)
    publish(p2, 2, start=10)
    got += collect(sub, 12)
    assert [m["seq"] for _, m in got] == [1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12]
    assert sub.unrecoverable == 1
    sub.close()
    p2.stop()


def test_range_rotated_away_is_counted_and_the_rest_delivered(tmp_path):
    j = Journal(tmp_path, fsync=False, segment_bytes=200, keep_segments=2)
    eps = endpoints()
    p = publisher(j, eps)
    for i in range(40):  # one group each: the journal rotates between groups
        publish(p, 1, start=i)
        wait_published(p, i + 1)
    first = j.first_seq
    assert first > 1
    sub = Subscriber(*eps, from_seq=1)
    got = collect(sub, 40)
    assert [m["seq"] for _, m in got] == list(range(first, 41))
    assert sub.unrecoverable == first - 1
    sub.close()
    p.stop()


def test_refused_and_unanswered_replays_raise(tmp_path):
    eps = endpoints()
    p = publisher(Journal(tmp_path, fsync=False), eps)
    publish(p, 2)
    wait_published(p, 2)
    sub = Subscriber(*eps, from_seq=0)
    with pytest.raises(ReplayError, match=r"replay 0\.\.\d+ refused: from and to must be integers with 1 <= from <= to"):
        collect(sub, 2)
    sub.close()
    p.stop()
    nobody = f"tcp://127.0.0.1:{free_port()}"
    sub = Subscriber(eps[0], nobody, replay_timeout_ms=300)
    with pytest.raises(ReplayError, match=f"replay 1..3: no answer from {nobody}"):
        sub._replay(1, 3)
    sub.close()


def test_a_replay_reply_stops_at_16_mib_and_the_rest_is_asked_for_again(tmp_path):
    """Issue 16, item 5: one reply is at most publish.max_replay messages and REPLAY_MAX_BYTES."""
    import msgpack

    from agent.publish import REPLAY_MAX_BYTES
    from agent.protocol import encode_replay_request

    j = Journal(tmp_path / "j", fsync=False)
    eps = endpoints()
    p = publisher(j, eps)
    try:
        blob = "x" * (3 << 20)  # 3 MiB bodies: six of them pass 16 MiB
        for i in range(8):
            p.submit("summary", {"n": i, "blob": blob})
        wait_published(p, 8)
        s = zmq.Context.instance().socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 5000)
        s.connect(eps[1])
        s.send(encode_replay_request(1, 8))
        meta, *pairs = s.recv_multipart()
        meta = msgpack.unpackb(meta)
        assert meta["count"] == 5 and len(pairs) == 10  # 5 x 3 MiB <= 16 MiB < 6 x 3 MiB
        assert sum(len(b) for b in pairs) <= REPLAY_MAX_BYTES
        s.send(encode_replay_request(6, 8))  # the rest, asked for again from the last seq + 1
        meta, *pairs = s.recv_multipart()
        assert msgpack.unpackb(meta)["count"] == 3
        s.close()
    finally:
        p.stop()
        j.close()
