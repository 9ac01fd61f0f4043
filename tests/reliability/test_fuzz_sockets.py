"""Property (issue 16): arbitrary MessagePack in arbitrary part counts, at each socket the agent binds
(ingest PULL, replay ROUTER, control ROUTER), never ends a thread or an unforeseen failure, and a
valid frame sent afterwards is still inspected.

Hypothesis draws the messages; a real agent takes them over loopback. Bounded examples in CI;
``--run-slow`` runs many more.
"""
from __future__ import annotations

import time

import msgpack
import pytest
import zmq
from hostile import Line, header
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SCALARS = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=30)
           | st.binary(max_size=30))
KEYS = st.text(max_size=8) | st.binary(max_size=4) | st.integers(-5, 5)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
                      max_leaves=12)
# a valid frame header with keys replaced or added: reaches deeper than random maps
NEAR_HEADERS = st.dictionaries(st.sampled_from(sorted(header())) | KEYS | st.sampled_from(["x", b"", b"y"]), VALUES,
                               max_size=4).map(lambda d: {**header(), **d})


def packed(value) -> bytes | None:
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return None


PART = st.one_of(VALUES.map(packed), NEAR_HEADERS.map(packed), st.binary(max_size=300),
                 st.sampled_from([b"", b"\x00" * (64 * 256), b"\xc1", b"\x91" * 3000 + b"\x00"])).filter(
    lambda p: p is not None)
MESSAGES = st.one_of(st.lists(PART, min_size=1, max_size=6),
                     st.tuples(PART, st.integers(7, 700)).map(lambda t: [t[0]] * t[1]))


def n_examples(request, ci: int, slow: int) -> int:
    return slow if request.config.getoption("--run-slow") else ci


def _run(n: int, send) -> int:
    count = [0]

    @settings(max_examples=n, database=None, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(MESSAGES)
    def prop(parts):
        send(parts)
        count[0] += 1

    prop()
    return count[0]


def _healthy(agent, line: Line) -> dict:
    line.check()
    health = line.status()["health"]
    assert agent.ingest.is_alive() and agent.inference.is_alive() and agent.publisher.is_alive()
    assert health["state"] == "ready" and not agent._stop.is_set()
    assert not health.get("loop_errors"), f"unforeseen failures: {health['loop_errors']}"
    assert "internal" not in health["rejected"]
    return health


@pytest.mark.parametrize("socket", ["ingest", "replay", "control"])
def test_arbitrary_messages_at_each_socket_end_nothing(running_agent, request, socket):
    agent = running_agent(ingest={"rcvhwm": 100_000, "max_queue_frames": 64})
    line = Line(agent.cfg)
    ctx = zmq.Context.instance()
    try:
        line.check()
        n = n_examples(request, ci=120, slow=3000)
        if socket == "ingest":
            s = ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 5000)
            s.setsockopt(zmq.SNDHWM, 100_000)
            s.connect(agent.cfg.ingest.endpoint)
            before = agent.ingest.received_messages
            sent = _run(n, s.send_multipart)
            s.close()
            deadline = time.monotonic() + 60
            while agent.ingest.received_messages < before + sent and time.monotonic() < deadline:
                time.sleep(0.05)
            assert agent.ingest.received_messages >= before + sent  # every message was read and handled
        else:
            ep = agent.cfg.publish.replay_endpoint if socket == "replay" else agent.cfg.control.endpoint
            def dealer() -> zmq.Socket:
                d = ctx.socket(zmq.DEALER)
                d.setsockopt(zmq.LINGER, 0)
                d.setsockopt(zmq.RCVTIMEO, 3000)
                d.connect(ep)
                return d

            sock = [dealer()]
            unanswered = []

            def ask(parts):
                s = sock[0]
                s.send_multipart(parts)
                if max(len(p) for p in parts) > 4096:
                    # over ZMQ_MAXMSGSIZE: libzmq drops the connection, no answer is owed, and what this
                    # peer wrote behind it on that connection is lost too: start a new peer
                    time.sleep(0.05)
                    s.close()
                    sock[0] = dealer()
                    return
                try:
                    reply = s.recv_multipart()
                except zmq.Again:
                    unanswered.append(parts[:3])
                    return
                body = reply[1] if reply[0] == b"" and len(reply) > 1 else reply[0]
                assert isinstance(msgpack.unpackb(body, raw=False), dict)

            sent = _run(n, ask)
            sock[0].close()
            assert not unanswered, f"requests without an answer: {unanswered[:3]}"
        health = _healthy(agent, line)
    finally:
        line.close()
    print(f"\n[figures] fuzz {socket}: examples={sent}, rejected={health['rejected']}", flush=True)
