"""Helpers for the hostile-input suite (issue 16): what each socket gets, and proof the agent still works.

Not a conftest.py (see harness.py). Every check here talks to a real agent over its real sockets."""
from __future__ import annotations

import time

import cv2
import msgpack
import zmq
from harness import Collector
from tinypack import clean_frame, frame_with

from agent.protocol import encode_control, encode_frame, encode_replay_request
from agent.service import status_request


def header(**kw) -> dict:
    h = {"v": 1, "type": "frame", "camera": "camX", "coil": "hostile", "seq": 1, "index": 0, "ts_ns": 1,
         "shape": [64, 256], "dtype": "uint8", "encoding": "raw", "pos_mm": 0.0}
    h.update(kw)
    return h


PIX = clean_frame().tobytes()


def deep(n: int) -> bytes:
    """n nested one-element arrays: a stack bomb for a recursive decoder."""
    return b"\x91" * n + b"\x00"


def req(endpoint: str, parts: list[bytes], timeout_ms: int = 3000) -> list[bytes] | None:
    """A REQ round trip; None when no answer came."""
    s = zmq.Context.instance().socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, timeout_ms)
    s.connect(endpoint)
    try:
        s.send_multipart(parts)
        return s.recv_multipart()
    except zmq.Again:
        return None
    finally:
        s.close()


def dealer_send(endpoint: str, parts: list[bytes], wait_reply_ms: int = 0) -> list[bytes] | None:
    """Raw parts from a DEALER (no REQ envelope rules); optionally wait for an answer."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 1000)
    s.setsockopt(zmq.RCVTIMEO, max(1, wait_reply_ms))
    s.connect(endpoint)
    try:
        s.send_multipart(parts)
        if wait_reply_ms:
            try:
                return s.recv_multipart()
            except zmq.Again:
                return None
        time.sleep(0.05)
        return None
    finally:
        s.close()


def push(endpoint: str, parts: list[bytes], *, linger_ms: int = 2000) -> None:
    s = zmq.Context.instance().socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, linger_ms)
    s.connect(endpoint)
    s.send_multipart(parts)
    s.close()


class Line:
    """A camera and a gap-repairing subscriber on one agent; ``check()`` proves a valid coil is inspected."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.col = Collector(cfg, timeout_s=1800.0)  # long fuzz runs (--run-slow) outlast the 120 s default
        self.cam = zmq.Context.instance().socket(zmq.PUSH)
        self.cam.setsockopt(zmq.LINGER, 2000)
        self.cam.setsockopt(zmq.SNDTIMEO, 5000)
        self.cam.connect(cfg.ingest.endpoint)
        self.seq = 0
        self.n = 0
        time.sleep(0.3)

    def send(self, parts) -> None:
        self.cam.send_multipart(parts)
        self.seq += 1

    def check(self, timeout_s: float = 30.0) -> dict:
        """A 3-frame coil with one defect: inspected, complete, its defect published."""
        self.n += 1
        coil = f"valid-{self.n}"
        self.send(encode_control("coil_start", "cam0", coil, self.seq, ts_ns=time.time_ns()))
        for i in range(3):
            img = frame_with("bright", x=64, y=16) if i == 0 else clean_frame()
            self.send(encode_frame("cam0", coil, self.seq, i, img, ts_ns=time.time_ns(), pos_mm=128.0 * i))
        self.send(encode_control("coil_end", "cam0", coil, self.seq, ts_ns=time.time_ns(), frames=3))
        assert self.col.wait(lambda c: c.summaries(coil), timeout_s), f"no summary for {coil}: agent stopped inspecting"
        (s,) = self.col.summaries(coil)
        f = s["frames"]
        assert (f["received"], f["inspected"], f["gated_out"], s["complete"]) == (3, 1, 2, True), s
        return s

    def status(self) -> dict:
        return status_request(self.cfg.control.endpoint)

    def close(self) -> None:
        self.cam.close()
        self.col.close()


def progressive_jpeg() -> bytes:
    return cv2.imencode(".jpg", clean_frame(), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()


def png_bomb() -> bytes:
    png = bytearray(cv2.imencode(".png", clean_frame())[1].tobytes())
    png[16:24] = (30000).to_bytes(4, "big") * 2
    return bytes(png)


def replay_request(first: int = 1, last: int = 10) -> bytes:
    return encode_replay_request(first, last)


def status_body() -> bytes:
    return msgpack.packb({"cmd": "status"})


def answer(reply: list[bytes] | None) -> dict | None:
    """The map a reply starts with (replay meta or control answer); the empty delimiter skipped."""
    if not reply:
        return None
    first = reply[1] if reply[0] == b"" and len(reply) > 1 else reply[0]
    return msgpack.unpackb(first, raw=False)
