"""Issue 16: single messages that used to stop the agent, and frames no summary counted.

A real in-process agent on loopback sockets and the tiny ONNX pack; each test sends what the
independent tester sent, then proves the agent still inspects a valid coil and counts exactly.
"""
from __future__ import annotations

import time

import cv2
import msgpack
import numpy as np
import pytest
import zmq
from tinypack import clean_frame, frame_with, make_pack

from agent.protocol import encode_control, encode_frame, encode_replay_request, unpack_body
from agent.service import status_request
from agent.subscriber import Subscriber


class Cam:
    def __init__(self, endpoint: str, camera: str = "cam0"):
        self.sock = zmq.Context.instance().socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.SNDTIMEO, 5000)
        self.sock.connect(endpoint)
        self.camera, self.seq = camera, 0

    def send(self, parts: list) -> None:
        self.sock.send_multipart(parts)
        self.seq += 1

    def frame(self, coil: str, index: int, img: np.ndarray | None = None, encoding: str = "raw") -> None:
        img = clean_frame() if img is None else img
        self.send(encode_frame(self.camera, coil, self.seq, index, img, ts_ns=time.time_ns(), pos_mm=128.0 * index,
                               encoding=encoding))

    def control(self, kind: str, coil: str, frames: int | None = None) -> None:
        self.send(encode_control(kind, self.camera, coil, self.seq, ts_ns=time.time_ns(), frames=frames))

    def coil(self, coil: str, n: int = 3, defect_at: int | None = 0) -> None:
        self.control("coil_start", coil)
        for i in range(n):
            self.frame(coil, i, frame_with("bright", x=64, y=16) if i == defect_at else None)
        self.control("coil_end", coil, n)

    def close(self) -> None:
        self.sock.close()


def summaries(sub: Subscriber, coil: str, timeout_s: float = 20.0, n: int = 1) -> list[dict]:
    out = []
    for topic, msg in sub.messages(timeout_s=timeout_s):
        if topic == "summary" and msg["coil"] == coil and msg["final"]:
            out.append(msg)
            if len(out) == n:
                break
    return out


def assert_alive_and_inspecting(agent, cam: Cam, sub: Subscriber, coil: str) -> dict:
    """Every thread alive, and a clean 3-frame coil (one defect) comes out inspected and complete."""
    cam.coil(coil)
    (s,) = summaries(sub, coil)
    f = s["frames"]
    assert (f["received"], f["inspected"] + f["gated_out"], f["inspected"], s["complete"]) == (3, 3, 1, True), s
    assert agent.ingest.is_alive() and agent.inference.is_alive() and agent.publisher.is_alive()
    assert agent.exit_code == 0 and not agent._stop.is_set()
    return s


def check_sums(s: dict) -> None:
    """frames.rejected is the sum of rejected_by_reason, for the coil and for every camera (item 16)."""
    assert s["frames"]["rejected"] == sum(s["rejected_by_reason"].values()), s
    for c in s["cameras"].values():
        assert c["rejected"] == sum(c["rejected_by_reason"].values()), c
    for f in (s["frames"], *s["cameras"].values()):
        assert f["received"] == f["inspected"] + f["gated_out"] + f["rejected"] + f["shed"] + f["pending"] + f["lost"]
    assert s["frames"]["sent"] == s["frames"]["received"] + s["frames"]["missing"]


@pytest.fixture
def line(running_agent):
    """(agent, camera, subscriber) for one test."""
    made = []

    def make(**overrides):
        agent = running_agent(**overrides)
        cam = Cam(agent.cfg.ingest.endpoint)
        sub = Subscriber(agent.cfg.publish.endpoint, agent.cfg.publish.replay_endpoint, from_seq=1)
        made.append((cam, sub))
        time.sleep(0.2)
        return agent, cam, sub

    yield make
    for cam, sub in made:
        cam.close()
        sub.close()


def test_item1_a_bin_key_beside_str_keys_is_rejected_and_ingest_goes_on(line):
    agent, cam, sub = line()
    head = {"v": 1, "type": "frame", "camera": "cam0", "coil": "X", "seq": 0, "index": 0, "ts_ns": 1,
            "shape": [64, 256], "dtype": "uint8", "encoding": "raw", "pos_mm": 0.0, b"": 1}
    cam.send([msgpack.packb(head, use_bin_type=True), clean_frame().tobytes()])
    assert_alive_and_inspecting(agent, cam, sub, "A")
    assert agent.ingest.rejected["malformed"] == 1


def test_item2_a_shape_the_models_cannot_take_is_rejected_at_ingest(line):
    agent, cam, sub = line()
    cam.control("coil_start", "S")
    cam.frame("S", 0, np.full((63, 256), 100, np.uint8))  # legal in the protocol; the models take multiples of 8
    cam.frame("S", 1, np.full((1, 1), 100, np.uint8))
    cam.frame("S", 2)
    cam.control("coil_end", "S", 3)
    (s,) = summaries(sub, "S")
    check_sums(s)
    assert s["rejected_by_reason"] == {"bad_shape": 2} and s["frames"]["gated_out"] + s["frames"]["inspected"] == 1
    assert_alive_and_inspecting(agent, cam, sub, "A")


def test_item2_a_frame_the_models_fail_on_costs_only_itself(line, tmp_path):
    # A gate made for pooled 64x256 frames (fixed input) cannot take a 32x256 frame, which passes every
    # ingest check: the worker used to die. The batch is retried frame by frame; the bad one is counted.
    pooled = make_pack(tmp_path / "pooled", gate_input_pool=2)
    agent, cam, sub = line(models={"dir": str(pooled), "max_batch": 4, "opt_batch": 4, "max_wait_ms": 50.0})
    cam.control("coil_start", "P")
    for i in range(8):
        cam.frame("P", i, np.full((32, 256), 100, np.uint8) if i in (2, 5) else None)
    cam.control("coil_end", "P", 8)
    (s,) = summaries(sub, "P")
    check_sums(s)
    assert s["rejected_by_reason"] == {"inference_failed": 2}
    assert s["frames"]["inspected"] + s["frames"]["gated_out"] == 6 and s["frames"]["missing"] == 0
    health = status_request(agent.cfg.control.endpoint)["health"]
    assert health["rejected"]["inference_failed"] == 2 and health["loop_errors"]["inference"] >= 1
    assert_alive_and_inspecting(agent, cam, sub, "A")


def _req(endpoint: str, parts: list[bytes], timeout_ms: int = 3000) -> list[bytes]:
    s = zmq.Context.instance().socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, timeout_ms)
    s.connect(endpoint)
    try:
        s.send_multipart(parts)
        return s.recv_multipart()
    finally:
        s.close()


def test_item3_a_two_part_replay_request_gets_an_error_and_the_publisher_goes_on(line):
    agent, cam, sub = line()
    ep = agent.cfg.publish.replay_endpoint
    reply = _req(ep, [encode_replay_request(1, 5), b"second part"])
    assert len(reply) == 1
    assert unpack_body(reply[0])["error"] == "a request is one ZeroMQ frame (after the envelope), got 2"
    reply = _req(ep, [msgpack.packb({b"": 1, "v": 1}, use_bin_type=True)])
    assert "error" in unpack_body(reply[0])
    assert agent.publisher.replay_rejected == 2
    assert_alive_and_inspecting(agent, cam, sub, "A")
    meta, *pairs = _req(ep, [encode_replay_request(1, 100)])  # replay still serves REQ peers, byte-identical
    assert unpack_body(meta)["count"] >= 1 and len(pairs) == 2 * unpack_body(meta)["count"]


def test_item4_a_two_part_control_request_gets_an_error_and_the_agent_goes_on(line):
    agent, cam, sub = line()
    reply = _req(agent.cfg.control.endpoint, [msgpack.packb({"cmd": "status"}), b"x"])
    assert msgpack.unpackb(reply[0]) == {"ok": False,
                                         "error": "a request is one ZeroMQ frame (after the envelope), got 2"}
    assert status_request(agent.cfg.control.endpoint)["health"]["state"] == "ready"
    assert_alive_and_inspecting(agent, cam, sub, "A")


def test_item5_many_part_messages_are_rejected_by_count_without_keeping_parts(line):
    agent, cam, sub = line()
    cam.send([b"\x80"] * 600)  # 600 parts: rejected by its count, the parts dropped as read
    cam.send([msgpack.packb({"v": 1})] + [b"p" * 1000] * 50)
    assert_alive_and_inspecting(agent, cam, sub, "A")
    assert agent.ingest.rejected["malformed"] == 2


def test_item10_a_progressive_jpeg_is_refused_and_counted_as_its_frame(line):
    _, cam, sub = line()
    prog = cv2.imencode(".jpg", clean_frame(), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    cam.control("coil_start", "J")
    cam.frame("J", 0, encoding="jpeg")  # baseline: decoded and inspected
    head = encode_frame("cam0", "J", cam.seq, 1, clean_frame(), ts_ns=1, pos_mm=0.0, encoding="jpeg")[0]
    cam.send([head, prog])
    cam.control("coil_end", "J", 2)
    (s,) = summaries(sub, "J")
    check_sums(s)
    assert s["rejected_by_reason"] == {"bad_encoding": 1} and s["frames"]["received"] == 2


def test_item12_messages_without_a_readable_index_open_no_coil(line):
    agent, cam, sub = line()
    for i in range(200):
        bad = {"v": 1, "type": "frame", "camera": "cam0", "coil": f"junk-{i}", "seq": i, "index": "x",
               "ts_ns": 1, "shape": [64, 256], "dtype": "uint8", "encoding": "raw", "pos_mm": 0.0}
        cam.send([msgpack.packb(bad), clean_frame().tobytes()])
    s = assert_alive_and_inspecting(agent, cam, sub, "A")
    assert agent.ingest.rejected["schema"] == 200
    assert agent.coils.open_coils() == [] and s["seq"] < 10, "junk messages opened coils or published summaries"


def test_item12_interleaved_and_after_end_frames_are_counted_in_their_coil(line):
    agent, cam, sub = line()
    cam.control("coil_start", "A")
    for i in range(10):  # A and B interleaved: B's first frame ends A (next_coil), A goes on
        cam.frame("A", i)
        cam.frame("B", i)
    cam.control("coil_end", "B", 10)
    (a,) = summaries(sub, "A")
    check_sums(a)
    assert (a["frames"]["sent"], a["frames"]["received"], a["end_reason"]) == (10, 10, "next_coil")
    assert a["frames"]["after_end"] == 9  # every A frame after B's first
    cam.control("coil_start", "E")
    cam.frame("E", 0)
    cam.frame("E", 1)
    cam.control("coil_end", "E", 2)  # an early coil_end: the camera goes on with E
    for i in range(2, 20):
        cam.frame("E", i)
    (e,) = summaries(sub, "E")
    check_sums(e)
    late = status_request(agent.cfg.control.endpoint)["late_frames"].get("E", 0)
    # counted in E's summary (after_end) unless E had closed before they came; then per closed coil
    assert e["frames"]["received"] + late == 20 and e["frames"]["after_end"] == e["frames"]["received"] - 2


def test_item16_a_frame_rejected_for_an_unknown_key_is_rejected_not_missing(line):
    _, cam, sub = line()
    cam.control("coil_start", "K")
    cam.frame("K", 0)
    head = encode_frame("cam0", "K", cam.seq, 1, clean_frame(), ts_ns=1, pos_mm=0.0)
    h = msgpack.unpackb(head[0])
    h["extra"] = 1
    cam.send([msgpack.packb(h), head[1]])
    cam.frame("K", 2)
    cam.control("coil_end", "K", 3)
    (s,) = summaries(sub, "K")
    check_sums(s)
    f = s["frames"]
    assert (f["received"], f["rejected"], f["missing"], s["rejected_by_reason"]) == (3, 1, 0, {"schema": 1})
