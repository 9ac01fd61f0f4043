"""agent/journal.py on a real full disk (a tiny tmpfs): records held in memory, none lost, none
half-written, written with their own seqs when space returns (issue 16, item 11)."""
from __future__ import annotations

import time

import pytest
from tinyfs import mount_tiny_fs

from agent.journal import Journal, JournalFull


@pytest.fixture
def tiny_fs(tmp_path):
    yield from mount_tiny_fs(tmp_path / "fs", 256)


def rec(i: int) -> tuple[bytes, bytes]:
    return b"defect", b"event-%06d-" % i + b"x" * 300


def fill_until_held(j: Journal, start: int, most: int = 500) -> int:
    """Append one record at a time until the journal holds one in memory; returns the next index."""
    i = start
    while j.alarm() is None:
        assert i - start < most, "the full disk never refused a write"
        j.append_many([rec(i)])
        i += 1
    return i


def test_full_disk_holds_records_in_memory_then_writes_them_with_their_seqs(tiny_fs):
    j = Journal(tiny_fs.path / "journal", fsync=True, retry_s=0.05)
    assert j.append_many([rec(0), rec(1)]) == [1, 2]
    tiny_fs.fill()
    i = fill_until_held(j, 2)
    seqs = j.append_many([rec(k) for k in range(i, i + 20)])  # never an exception on a full disk
    assert seqs == list(range(i + 1, i + 21))
    alarm = j.alarm()
    assert alarm["path"] == str(j.dir / "segment-0000000000000001.log")
    assert alarm["error"] == "No space left on device" and alarm["held_records"] >= 20
    # Replay meanwhile: served from memory, every seq in order.
    got = j.read(1, j.last_seq, limit=10_000)
    assert [s for s, _, _ in got] == list(range(1, i + 21))
    assert [b for _, _, b in got] == [rec(k)[1] for k in range(i + 20)]
    # On disk the segment ends on a record boundary: a reader sees no torn record.
    peek = Journal(tiny_fs.path / "journal", fsync=False)
    assert peek.damage == [] and peek.last_seq < i + 20
    peek.close()
    tiny_fs.free()
    time.sleep(0.06)
    assert j.flush_held() and j.alarm() is None
    assert j.append_many([rec(i + 20)]) == [i + 21]
    j.close()
    again = Journal(tiny_fs.path / "journal", fsync=False)
    assert again.damage == [] and again.last_seq == i + 21
    got = again.read(1, again.last_seq, limit=10_000)
    assert [s for s, _, _ in got] == list(range(1, i + 22)), "no seq lost"
    assert [b for _, _, b in got] == [rec(k)[1] for k in range(i + 21)]


def test_past_its_bound_the_journal_refuses_and_assigns_no_seq(tiny_fs):
    j = Journal(tiny_fs.path / "journal", fsync=False, max_held_bytes=4096, retry_s=0.05)
    j.append_many([rec(0)])
    tiny_fs.fill()
    i = fill_until_held(j, 1)
    while j.alarm()["held_bytes"] + 350 <= 4096:
        j.append_many([rec(i)])
        i += 1
    last = j.last_seq
    with pytest.raises(JournalFull, match=r"journal .*segment-0000000000000001.log not writable \(No space left on "
                                          r"device\) and \d+ bytes held in memory, the most allowed"):
        j.append_many([rec(i)])
    assert j.last_seq == last, "a refused append takes no seq"
    tiny_fs.free()
    time.sleep(0.06)
    assert j.append_many([rec(i)]) == [last + 1]
    assert j.alarm() is None
    assert [s for s, _, _ in j.read(1, j.last_seq, limit=10_000)] == list(range(1, last + 2))
    j.close()


def test_a_journal_opened_on_a_full_disk_starts_and_holds(tiny_fs):
    j = Journal(tiny_fs.path / "journal", fsync=False, retry_s=0.05)
    j.append_many([rec(0)])
    j.close()
    tiny_fs.fill()
    j = Journal(tiny_fs.path / "journal", fsync=False, retry_s=0.05)
    i = fill_until_held(j, 1)
    assert j.alarm()["held_records"] >= 1
    tiny_fs.free()
    time.sleep(0.06)
    j.close()  # close writes what is held
    again = Journal(tiny_fs.path / "journal", fsync=False)
    assert [s for s, _, _ in again.read(1, again.last_seq)] == list(range(1, i + 1))


def test_past_the_bound_the_publisher_waits_and_drops_nothing(tiny_fs):
    """A real Publisher on loopback: held records go out live up to the bound, then the publisher
    holds the rest unnumbered; space returns and every message is published and journaled in seq order."""
    import msgpack
    import zmq

    from conftest import free_port

    from agent.publish import Publisher

    j = Journal(tiny_fs.path / "journal", fsync=False, max_held_bytes=3000, retry_s=0.05)
    ctx = zmq.Context()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    pub = Publisher(ctx, endpoint=endpoint, replay_endpoint=f"tcp://127.0.0.1:{free_port()}", journal=j,
                    agent="t", heartbeat_s=10.0, sndhwm=10_000, linger_ms=0, max_replay=1000)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVTIMEO, 200)
    sub.setsockopt(zmq.SUBSCRIBE, b"defect")
    sub.connect(endpoint)
    pub.start()
    assert pub.bound.wait(5)
    time.sleep(0.3)  # the SUB connection is up

    def drain() -> list[int]:
        got = []
        while True:
            try:
                got.append(msgpack.unpackb(sub.recv_multipart()[1])["seq"])
            except zmq.Again:
                return got

    try:
        tiny_fs.fill()
        n = 60
        for i in range(n):  # paced: the publisher takes them a few at a time
            pub.submit("defect", {"coil": "B", "camera": "cam0", "index": i, "pad": "x" * 200})
            time.sleep(0.01)
        time.sleep(0.5)
        live = drain()
        alarm = j.alarm()
        assert alarm is not None and alarm["held_bytes"] <= 3000
        assert live == list(range(1, len(live) + 1)) and len(live) < n, "past the bound nothing more goes out"
        assert j.last_seq == len(live), "the messages waiting have no seq yet"
        tiny_fs.free()
        deadline = time.monotonic() + 10
        while len(live) < n and time.monotonic() < deadline:
            live += drain()
        assert live == list(range(1, n + 1)), "every message published once, in seq order"
        assert j.alarm() is None
        assert [s for s, _, _ in j.read(1, n, limit=1000)] == list(range(1, n + 1)), "and journaled"
    finally:
        pub.stop(5)
        sub.close(linger=0)
        j.close()
        ctx.term()
