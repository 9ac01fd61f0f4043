"""Memory an outsider can make the agent hold, per socket (issue 16, item 5), on a real agent process.

Each test reads the agent's peak RSS (VmHWM) before and after an attack on one socket and asserts
the growth is bounded. The bounds follow docs/deployment.md ("Limits"): a part is at most the
socket's ZMQ_MAXMSGSIZE, the agent keeps at most the parts a message may have and drops the rest as
it reads them, and a request/reply peer that does not read its replies holds at most a few of them.
"""
from __future__ import annotations

import threading
import time

import msgpack
import zmq
from harness import agent_process, figures  # noqa: F401 (agent_process: a fixture)
from hostile import Line, answer, header, replay_request, req, status_body
from tinypack import frame_with

from agent.protocol import encode_control, encode_frame

MIB = 1 << 20


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def push_all(endpoint: str, messages: int, make) -> None:
    """``messages`` messages from one PUSH socket, each ``make(i)``; waits until they are handed over."""
    s = zmq.Context.instance().socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 20_000)
    s.setsockopt(zmq.SNDHWM, 4)
    s.connect(endpoint)
    for i in range(messages):
        s.send_multipart(make(i), copy=False)
    s.close()


def test_ingest_many_part_messages_do_not_pile_up(agent_process):
    ap = agent_process()
    ap.start()
    line = Line(ap.cfg)
    try:
        line.check()
        base = peak_rss_mib(ap.proc.pid)
        head = msgpack.packb(header())
        # 1. parts over ZMQ_MAXMSGSIZE (here 256 x 64 x 1 channel x 1 byte + 64 KiB = 80 KiB): libzmq drops
        #    the connection at the first one; 20 messages of 300 x 100 KB (600 MB) never reach memory.
        big = b"\x00" * 100_000
        push_all(ap.cfg.ingest.endpoint, 20, lambda i: [head] + [big] * 300)
        line.check()
        after_big = peak_rss_mib(ap.proc.pid)
        # 2. parts under the limit: each 300-part message (18 MB) is whole in libzmq before the agent sees
        #    its first part (ZeroMQ delivers whole messages); the agent keeps 2 parts and drops the rest
        #    as it reads them, so only the few messages in flight are ever held.
        part = b"\x00" * 60_000
        push_all(ap.cfg.ingest.endpoint, 20, lambda i: [head] + [part] * 300)
        line.check()
        deadline = time.monotonic() + 20
        while line.status()["health"]["rejected"].get("malformed", 0) < 20 and time.monotonic() < deadline:
            time.sleep(0.1)  # the attacker's connection is read fairly beside the camera's: let it finish
        after_many = peak_rss_mib(ap.proc.pid)
        health = line.status()["health"]
    finally:
        line.close()
    assert ap.proc.poll() is None
    assert after_big - base < 40, f"oversized parts grew the peak RSS by {after_big - base:.0f} MiB"
    message_mib = 300 * 60_000 / MIB
    assert after_many - base < 4 * message_mib + 40, f"peak RSS grew {after_many - base:.0f} MiB"
    assert health["rejected"].get("malformed", 0) == 20  # each many-part message counted once
    figures("memory bound: ingest", base_peak_mib=round(base), after_oversized_parts_mib=round(after_big),
            after_many_parts_mib=round(after_many), message_mib=round(message_mib, 1),
            traffic_mib=round(20 * 300 * (100_000 + 60_000) / MIB))


def _fill_journal(line: Line, coils: int = 30) -> None:
    for k in range(coils):
        coil = f"J{k}"
        line.send(encode_control("coil_start", "cam0", coil, line.seq, ts_ns=time.time_ns()))
        for i in range(3):
            line.send(encode_frame("cam0", coil, line.seq, i, frame_with("bright", x=16 + 64 * i, y=16),
                                   ts_ns=time.time_ns(), pos_mm=128.0 * i))
        line.send(encode_control("coil_end", "cam0", coil, line.seq, ts_ns=time.time_ns(), frames=3))
    assert line.col.wait(lambda c: len(c.summaries()) >= coils, 60)


def _deaf_dealers(endpoint: str, peers: int, requests: int, body: bytes, hold_s: float) -> None:
    """``peers`` DEALERs that each send ``requests`` requests and never read a reply."""
    socks = []
    for _ in range(peers):
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVHWM, 1)
        s.setsockopt(zmq.RCVBUF, 4096)
        s.connect(endpoint)
        socks.append(s)
    for _ in range(requests):
        for s in socks:
            s.send_multipart([b"", body])
    time.sleep(hold_s)
    for s in socks:
        s.close()


def test_replay_replies_to_peers_that_never_read_are_dropped_not_held(agent_process):
    ap = agent_process()
    ap.start()
    line = Line(ap.cfg)
    try:
        line.check()
        _fill_journal(line)
        full = req(ap.cfg.publish.replay_endpoint, [replay_request(1, 10**6)])
        reply_mib = sum(len(p) for p in full) / MIB
        base = peak_rss_mib(ap.proc.pid)
        _deaf_dealers(ap.cfg.publish.replay_endpoint, peers=3, requests=400, body=replay_request(1, 10**6), hold_s=6.0)
        line.check()
        after = peak_rss_mib(ap.proc.pid)
        status = line.status()
        meta = answer(req(ap.cfg.publish.replay_endpoint, [replay_request(1, 10**6)]))
    finally:
        line.close()
    assert ap.proc.poll() is None and meta["count"] >= answer(full)["count"]
    dropped = status["metrics"]["replies_dropped"].get("replay", 0)
    assert dropped > 0, "no reply was dropped: the deaf peers' replies were queued somewhere"
    # held per deaf peer: ROUTER_SNDHWM (4) replies + the one being written; without the bound,
    # 1,200 replies (x reply_mib) would have been queued
    assert after - base < 3 * 6 * reply_mib + 30, f"peak RSS grew {after - base:.0f} MiB"
    figures("memory bound: replay", reply_mib=round(reply_mib, 2), requests=1200, replies_dropped=int(dropped),
            base_peak_mib=round(base), after_peak_mib=round(after),
            unbounded_would_hold_mib=round(1200 * reply_mib))


def test_control_floods_and_deaf_peers_are_bounded(agent_process):
    ap = agent_process()
    ap.start()
    line = Line(ap.cfg)
    try:
        line.check()
        ep = ap.cfg.control.endpoint
        base = peak_rss_mib(ap.proc.pid)
        # many-part requests: each part at most 4 KiB (ZMQ_MAXMSGSIZE), 3 kept, the rest dropped as read
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 2000)
        s.connect(ep)
        for _ in range(10):
            s.send_multipart([b""] + [b"\x00" * 4000] * 1000)
        s.close()
        t = threading.Thread(target=_deaf_dealers, args=(ep, 3, 200, status_body(), 3.0))
        t.start()
        t.join(60)
        line.check()
        after = peak_rss_mib(ap.proc.pid)
        status = line.status()
    finally:
        line.close()
    assert ap.proc.poll() is None and status["health"]["state"] == "ready"
    assert after - base < 60, f"peak RSS grew {after - base:.0f} MiB"
    figures("memory bound: control", base_peak_mib=round(base), after_peak_mib=round(after),
            replies_dropped=int(status["metrics"]["replies_dropped"].get("control", 0)))
