"""Duplicates, reordering, a missing coil end and a camera process killed mid-coil: the summary's
accounting equals the ground truth the test camera recorded, exactly."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import zmq
from harness import Collector, check_accounting, figures
from tinypack import clean_frame, frame_with

from agent.protocol import encode_control, encode_frame


class Camera:
    """A PUSH socket that records what it sent: the ground truth."""

    def __init__(self, endpoint: str, camera: str):
        self.sock = zmq.Context.instance().socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 5000)
        self.sock.connect(endpoint)
        self.camera, self.seq = camera, 0
        self.sent: dict[str, list[int]] = {}

    def frame(self, coil: str, index: int, defect: bool = False) -> None:
        img = frame_with("bright", x=64, y=16) if defect else clean_frame()
        self.sock.send_multipart(encode_frame(self.camera, coil, self.seq, index, img, ts_ns=time.time_ns(),
                                              pos_mm=128.0 * index))
        self.seq += 1
        self.sent.setdefault(coil, []).append(index)

    def control(self, kind: str, coil: str, frames: int | None = None) -> None:
        self.sock.send_multipart(encode_control(kind, self.camera, coil, self.seq, ts_ns=time.time_ns(),
                                                frames=frames))
        self.seq += 1

    def close(self) -> None:
        self.sock.close()


def test_duplicates_reordering_and_missing_coil_end(running_agent):
    agent = running_agent(ingest={"coil_idle_timeout_s": 1.0, "max_queue_frames": 1000})
    col = Collector(agent.cfg)
    time.sleep(0.3)
    cam = Camera(agent.cfg.ingest.endpoint, "cam0")
    cam1 = Camera(agent.cfg.ingest.endpoint, "cam1")
    # Coil D1, cam0: 0..59 with 10..14 never sent (missing), 20..24 sent twice, 30..39 sent reversed
    # after 59.
    order = [i for i in range(60) if not 10 <= i < 15]
    order = [i for i in order if not 30 <= i < 40] + list(range(39, 29, -1))
    cam.control("coil_start", "D1")
    for i in order:
        cam.frame("D1", i, defect=i % 6 == 0)
        if 20 <= i < 25:
            cam.frame("D1", i)  # duplicate: never inspected twice
    # cam1 on the same coil, ends it cleanly.
    for i in range(20):
        cam1.frame("D1", i)
    cam1.control("coil_end", "D1", frames=20)
    cam.control("coil_end", "D1", frames=60)
    # Coil D2, cam0, without a coil end; cam1 sends D3 without an end either: idle timeout for both.
    for i in range(15):
        cam.frame("D2", i)
    for i in range(5):
        cam1.frame("D3", i)
    assert col.wait(lambda c: len(c.summaries()) >= 3, 30), [m["coil"] for m in col.summaries()]
    col.close()
    cam.close()
    cam1.close()
    d1, d2, d3 = (col.summaries(c)[0] for c in ("D1", "D2", "D3"))
    for s in (d1, d2, d3):
        check_accounting(s)
    c0, c1 = d1["cameras"]["cam0"], d1["cameras"]["cam1"]
    truth0 = set(cam.sent["D1"])
    assert (c0["sent"], c0["received"], c0["missing"], c0["duplicates"]) == (60, len(truth0), 5, 5)
    assert d1["missing_ranges"] == {"cam0": [[10, 14]]}
    assert sorted(d["index"] for d in col.defects("D1")) == sorted(i for i in truth0 if i % 6 == 0), col.defects("D1")
    assert c0["inspected"] == sum(1 for i in truth0 if i % 6 == 0) and c0["inspected"] + c0["gated_out"] == len(truth0)
    assert (c1["sent"], c1["received"], c1["missing"], c1["duplicates"]) == (20, 20, 0, 0)
    assert d1["end_reason"] == "coil_end" and d1["complete"] is False  # frames were missing
    assert d1["defect_count"] == len(col.defects("D1")) == c0["inspected"]
    assert d2["end_reason"] == "idle_timeout" and d2["cameras"]["cam0"]["sent"] is None
    assert (d2["frames"]["received"], d2["frames"]["inspected"] + d2["frames"]["gated_out"]) == (15, 15)
    assert d3["frames"]["received"] == 5 and d3["end_reason"] == "idle_timeout"
    figures("duplicates/reorder/missing end", D1=d1["frames"], D1_missing_ranges=d1["missing_ranges"],
            D2=(d2["end_reason"], d2["frames"]["received"]), D3=(d3["end_reason"], d3["frames"]["received"]))


CAMERA_PROCESS = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {tests!r})
    import zmq
    from tinypack import clean_frame
    from agent.protocol import encode_control, encode_frame
    endpoint, coil, first, last, end = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    s = zmq.Context().socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 5000)
    s.connect(endpoint)
    seq = 0
    for i in range(first, last):
        s.send_multipart(encode_frame("cam0", coil, seq, i, clean_frame(), ts_ns=time.time_ns(), pos_mm=128.0 * i))
        seq += 1
        print(json.dumps({{"sent": i}}), flush=True)
        time.sleep(0.002)
    if end == "end":
        s.send_multipart(encode_control("coil_end", "cam0", coil, seq, ts_ns=time.time_ns(), frames=last))
        print(json.dumps({{"end": last}}), flush=True)
        s.close()
    else:
        time.sleep(60)  # waits to be killed
""")


def test_camera_process_killed_and_restarted_mid_coil(running_agent, tmp_path):
    from pathlib import Path

    agent = running_agent(ingest={"coil_idle_timeout_s": 30.0, "max_queue_frames": 1000})
    col = Collector(agent.cfg)
    time.sleep(0.3)
    script = tmp_path / "camera.py"
    script.write_text(CAMERA_PROCESS.format(tests=str(Path(__file__).resolve().parents[1])))
    ep = agent.cfg.ingest.endpoint
    first = subprocess.Popen([sys.executable, str(script), ep, "P1", "0", "80", "hang"], stdout=subprocess.PIPE,
                             text=True)
    sent: list[int] = []
    for line in first.stdout:
        sent.append(json.loads(line)["sent"])
        if len(sent) == 80:
            break
    # Wait until the agent has all 80 (they are in flight otherwise), then kill the camera hard.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        snap = agent.coils.snapshot().get("P1")
        if snap and snap["frames"]["received"] == 80:
            break
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    # The restarted camera lost its place: it goes on at 90 (80..89 were never sent), seq from 0 again.
    second = subprocess.run([sys.executable, str(script), ep, "P1", "90", "130", "end"], capture_output=True,
                            text=True, timeout=60)
    sent += [json.loads(line)["sent"] for line in second.stdout.splitlines() if "sent" in line]
    assert col.wait(lambda c: c.summaries("P1"), 30)
    col.close()
    s = col.summaries("P1")[0]
    check_accounting(s)
    f = s["frames"]
    assert (f["sent"], f["received"], f["missing"], f["duplicates"]) == (130, len(sent), 10, 0)
    assert s["missing_ranges"] == {"cam0": [[80, 89]]}
    assert f["inspected"] + f["gated_out"] == len(sent) and f["lost"] == f["shed"] == f["rejected"] == 0
    assert agent.ingest.seq_gaps.get("cam0", 0) == 0  # a restart (seq back to 0) is not a gap
    figures("camera killed and restarted", sent=f["sent"], received=f["received"], missing=f["missing"],
            missing_ranges=s["missing_ranges"], end_reason=s["end_reason"], complete=s["complete"])
