"""No input ends the bridge's loop: garbage on the agent's stream (a hostile or broken publisher on
the PUB endpoint, a real ZeroMQ socket) is counted and logged, and the good messages around it are
forwarded in order; a replay socket that does not answer is retried, never waited on forever."""
from __future__ import annotations

import threading
import time

import msgpack
import zmq
from conftest import free_port
from mqtt_support import Consumer, broker, needs_mosquitto  # noqa: F401

from agent.bridge.config import bridge_config_from_dict
from agent.bridge.forward import Bridge

pytestmark = needs_mosquitto


def body(seq: int, **kw) -> bytes:
    return msgpack.packb({"v": 1, "type": "defect", "agent": "fake", "seq": seq, "ts_ns": 1, "camera": "cam0",
                          "coil": "c", **kw}, use_bin_type=True)


def fake_agent(ctx: zmq.Context) -> tuple[zmq.Socket, dict]:
    """A PUB socket on a free port standing in for the agent's event stream, and the bridge's
    ``stream`` section for it (its replay endpoint: a port nobody answers)."""
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    port = free_port()
    pub.bind(f"tcp://127.0.0.1:{port}")
    return pub, {"endpoint": f"tcp://127.0.0.1:{port}", "replay_endpoint": f"tcp://127.0.0.1:{free_port()}"}


def run_bridge(cfg, consumer: Consumer) -> tuple[Bridge, threading.Thread]:
    """The bridge on a thread, once the consumer saw it online on its status topic."""
    bridge = Bridge(cfg)
    t = threading.Thread(target=bridge.run, daemon=True)
    t.start()
    topic = bridge.status_topic()
    assert consumer.wait(lambda c: any(tp == topic and p == b"online" for tp, p, _ in c.arrivals), 10)
    time.sleep(0.3)  # the SUB socket's subscription reaches the PUB socket
    return bridge, t


def test_garbage_on_the_stream_is_counted_and_the_rest_forwarded(broker, tmp_path):
    b = broker()
    ctx = zmq.Context()
    pub, stream = fake_agent(ctx)
    cfg = bridge_config_from_dict({
        "bridge": {"line": "H", "state_dir": str(tmp_path / "s"), "state_interval_s": 0.05},
        "stream": {**stream, "replay_timeout_s": 0.2}, "mqtt": {"port": b.port, "reconnect_max_s": 0.5}})
    consumer = Consumer(b.port)
    assert consumer.connected.wait(10)
    bridge, t = run_bridge(cfg, consumer)

    garbage = [
        [b"defect"],                                              # one part
        [b"defect", b"\xc1 not msgpack"],                         # not MessagePack
        [b"defect", msgpack.packb([1, 2, 3])],                    # not a map
        [b"defect", msgpack.packb({"v": 2, "seq": 1})],           # another version
        [b"defect", msgpack.packb({"v": 1, "seq": "one"})],       # seq not an integer
        [b"defect", msgpack.packb({"v": 1, "seq": -5})],          # negative seq
        [b"\xff\xfe", body(1)],                                   # topic not UTF-8
        [b"defect", body(1), b"third part"],                      # three parts
    ]
    pub.send_multipart([b"health", msgpack.packb({"v": 1, "type": "health", "seq": 0, "first_seq": 1})])
    for parts in garbage:
        pub.send_multipart(parts)
    pub.send_multipart([b"defect", body(1)])
    pub.send_multipart([b"defect", body(2, extra=b"\x00\x01")])  # a bin value: hex in JSON
    pub.send_multipart([b"track", msgpack.packb({"v": 1, "type": "track", "seq": 3, "camera": "cam0"})])
    assert consumer.wait(lambda c: c.seqs() >= {1, 2, 3}, 10)
    consumer.check(3)
    assert [t for t, _ in consumer.messages()] == ["coilsight/H/cam0/defect", "coilsight/H/cam0/defect",
                                                   "coilsight/H/cam0/track"]
    assert consumer.messages()[1][1]["extra"] == "0001"

    # A gap (seq 5 without 4) and a replay socket that never answers: the bridge keeps asking
    # (counted), does not skip seq 4, and still stops when told to.
    pub.send_multipart([b"defect", body(5)])
    deadline = time.monotonic() + 10
    while bridge.stats["loop_errors"] < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert bridge.stats["loop_errors"] >= 2
    assert 5 not in consumer.seqs() and bridge.acked == 3
    bridge.stop.set()
    t.join(10)
    assert not t.is_alive()
    assert bridge.state.load() == 3  # saved at the stop
    consumer.close()
    pub.close()
    ctx.term()


def test_start_now_and_start_at_the_journals_first_seq(broker, tmp_path):
    """With no state file: `bridge.start = "now"` begins after the heartbeat's seq; "journal" begins at
    the heartbeat's first_seq (what the journal still holds), without asking for what it rotated away."""
    b = broker()
    ctx = zmq.Context()
    consumer = Consumer(b.port)
    assert consumer.connected.wait(10)
    for line, start, health, sent, want in (("N", "now", {"seq": 10, "first_seq": 1}, [11, 12], {11, 12}),
                                            ("J", "journal", {"seq": 2, "first_seq": 3}, [3, 4], {3, 4})):
        pub, stream = fake_agent(ctx)
        cfg = bridge_config_from_dict({
            "bridge": {"line": line, "state_dir": str(tmp_path / line), "start": start},
            "stream": {**stream, "replay_timeout_s": 0.2},
            "mqtt": {"port": b.port, "reconnect_max_s": 0.5, "status_topic": f"coilsight/{line}/status"}})
        bridge, t = run_bridge(cfg, consumer)
        pub.send_multipart([b"health", msgpack.packb({"v": 1, "type": "health", **health})])
        time.sleep(0.2)
        for seq in sent:
            pub.send_multipart([b"defect", body(seq)])
        assert consumer.wait(lambda c, line=line, want=want: {m["seq"] for tp, m in c.messages()
                                                              if tp.startswith(f"coilsight/{line}/")} == want, 10)
        assert bridge.stats["loop_errors"] == 0  # nothing asked of the (absent) replay socket
        bridge.stop.set()
        t.join(10)
        pub.close()
    consumer.close()
    ctx.term()


def test_msgpack_payload_is_the_v1_map(broker, tmp_path):
    b = broker()
    ctx = zmq.Context()
    pub, stream = fake_agent(ctx)
    cfg = bridge_config_from_dict({
        "bridge": {"line": "M", "state_dir": str(tmp_path / "s")}, "stream": stream,
        "mqtt": {"port": b.port, "payload": "msgpack", "retain": ["defect"]}})
    consumer = Consumer(b.port)
    assert consumer.connected.wait(10)
    bridge, t = run_bridge(cfg, consumer)
    pub.send_multipart([b"health", msgpack.packb({"v": 1, "type": "health", "seq": 0, "first_seq": 1})])
    pub.send_multipart([b"defect", body(1, ts_ns=2**62)])
    assert consumer.wait(lambda c: any(t == "coilsight/M/cam0/defect" for t, _, _ in c.arrivals), 10)
    raw = next(p for t, p, _ in consumer.arrivals if t == "coilsight/M/cam0/defect")
    assert msgpack.unpackb(raw) == msgpack.unpackb(body(1, ts_ns=2**62))
    bridge.stop.set()
    t.join(10)
    # mqtt.retain: the defect topic was published retained; a new subscriber gets it.
    late = Consumer(b.port, "coilsight/M/cam0/defect", client_id="late")
    assert late.wait(lambda c: any(r for *_, r in c.arrivals), 10)
    late.close()
    consumer.close()
    pub.close()
    ctx.term()
