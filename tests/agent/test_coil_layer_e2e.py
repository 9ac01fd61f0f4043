"""The coil layer through a real agent on loopback (tiny pack, real ONNX Runtime, real ZeroMQ):
tracks across frames and across two cameras, the summary's new keys, periodic series, replay of the
new topics, and crops fetched through the control socket."""
from __future__ import annotations

import threading
import time

import msgpack
import numpy as np
import zmq

from tinypack import clean_frame, frame_with

from tests_support_events import Collector, check_accounting

from agent.protocol import encode_replay_request, unpack_body
from agent.tools.camera_sim import CameraSim

MM_Y = 2.0  # the fixture's cameras: 2 mm per px along, 64 px frames = 128 mm; 0.5 mm per px across


def _send(cfg, camera: str, coil: str, frames) -> None:
    cam = CameraSim(cfg.ingest.endpoint, camera=camera)
    cam.send_coil(coil, [(f, None) for f in frames], mm_per_px_y=MM_Y)
    cam.close()


def _both(*squares) -> np.ndarray:
    img = clean_frame()
    for kind, x, y, w, h in squares:  # boxes of w x h px at (x, y)
        img[y:y + h, x:x + w] = 255 if kind == "bright" else 0
    return img


def _collector(cfg) -> Collector:
    col = Collector(cfg, timeout_s=60)
    col.sub.topics |= {"track", "periodic"}  # before the coil is sent: nothing has come yet
    return col


def _wait_summary(col: Collector, coil: str) -> dict:
    assert col.wait(lambda c: c.summaries(coil), 30), "no final summary"
    return col.summaries(coil)[0]


def _tracks(col: Collector, coil: str) -> list[dict]:
    return [m for t, m in col.msgs if t == "track" and m["coil"] == coil]


def test_a_defect_across_three_frames_is_one_track_and_other_classes_and_gaps_are_not(running_agent):
    agent = running_agent()
    cfg = agent.cfg
    col = _collector(cfg)
    try:
        frames = [
            # a bright scratch over frames 0-2 at x 40..56; a dark square beside it (another class)
            _both(("bright", 40, 48, 16, 16)),
            _both(("bright", 40, 0, 16, 64), ("dark", 60, 20, 16, 16)),
            _both(("bright", 40, 0, 16, 16), ("bright", 120, 0, 16, 16)),  # x 120: 32 mm away, its own track
            clean_frame(),
            clean_frame(),
        ]
        _send(cfg, "cam0", "c-frames", frames)
        s = _wait_summary(col, "c-frames")
        check_accounting(s)
        tracks = _tracks(col, "c-frames")
        defects = col.defects("c-frames")
        assert len(defects) == 5, defects
        by_class = {}
        for t in tracks:
            by_class.setdefault(t["class"], []).append(t)
        scratch = [t for t in by_class["bright"] if t["frames"]["cam0"] == [0, 2]]
        assert len(scratch) == 1, tracks
        t = scratch[0]
        assert t["event_count"] == 3 and t["cameras"] == ["cam0"]
        # along: frame 0 row 48 (96 mm) to frame 2 row 16 (256 + 32 = 288 mm); across 100 + 40 * 0.5
        assert t["bbox_mm"] == [120.0, 96.0, 128.0, 288.0]
        assert t["length_mm"] == 192.0 and t["width_mm"] == 8.0
        seqs = {d["seq"] for d in defects if d["class"] == "bright" and d["across_mm"] == 124.0}
        assert sorted(t["event_seqs"]) == sorted(seqs) and len(seqs) == 3
        # the track comes after its events, with its own seq in the same sequence
        assert t["seq"] > max(seqs)
        assert len(by_class["dark"]) == 1 and by_class["dark"][0]["frames"] == {"cam0": [1, 1]}
        assert len(by_class["bright"]) == 2
        assert sorted(x["track_id"] for x in tracks) == [1, 2, 3]
        assert s["track_count"] == 3 and s["tracks"] == {"bright": 2, "dark": 1}
        assert s["periodic"] == [] and s["grade"] == {"grade": "pass", "rule": "none", "reason": "no rule broken"}
        # the tracks closed when their next frame came without a part: before the summary
        assert all(x["seq"] < s["seq"] for x in tracks)
    finally:
        col.close()


def test_a_defect_in_the_overlap_of_two_cameras_is_one_track(running_agent):
    agent = running_agent()
    cfg = agent.cfg
    col = _collector(cfg)
    try:
        # both cameras are the line's: each sent a coil lately (a track waits for the line's cameras)
        for cam in ("cam0", "cam1"):
            _send(cfg, cam, f"c-warm-{cam}", [clean_frame()])
            _wait_summary(col, f"c-warm-{cam}")
        # cam0 sees across 100..228 mm, cam1 228..356 mm: a defect at its right edge and at cam1's
        # left edge in the same frame is one defect
        cam0 = [_both(("bright", 240, 16, 16, 16)), clean_frame(), clean_frame()]
        cam1 = [_both(("bright", 0, 16, 16, 16), ("bright", 200, 16, 16, 16)), clean_frame(), clean_frame()]
        # both cameras open the coil first: else one could end it before the other's first frame
        cams = {name: CameraSim(cfg.ingest.endpoint, camera=name) for name in ("cam0", "cam1")}
        for cam in cams.values():
            cam.send_coil("c-cams", [], send_end=False, mm_per_px_y=MM_Y)
        time.sleep(0.3)
        t0 = threading.Thread(target=cams["cam0"].send_coil, args=("c-cams", [(f, None) for f in cam0]),
                              kwargs={"mm_per_px_y": MM_Y})
        t0.start()
        cams["cam1"].send_coil("c-cams", [(f, None) for f in cam1], mm_per_px_y=MM_Y)
        t0.join()
        for cam in cams.values():
            cam.close()
        s = _wait_summary(col, "c-cams")
        tracks = _tracks(col, "c-cams")
        joint = [t for t in tracks if t["cameras"] == ["cam0", "cam1"]]
        assert len(joint) == 1, [(t["cameras"], t["bbox_mm"], t["frames"]) for t in tracks]
        assert joint[0]["frames"] == {"cam0": [0, 0], "cam1": [0, 0]}
        assert joint[0]["bbox_mm"] == [220.0, 32.0, 236.0, 64.0] and joint[0]["event_count"] == 2
        alone = [t for t in tracks if t["cameras"] == ["cam1"]]
        assert len(alone) == 1 and alone[0]["across_mm"] == 332.0
        assert s["track_count"] == 2
    finally:
        col.close()


def _roll_mark_frames(n: int, pitch_mm: float, x: int, start_mm: float, missed: set[int], jitter_mm: float,
                      seed: int = 0) -> list[np.ndarray]:
    """n clean frames with an 8 px dark mark every pitch_mm (some repeats missed): frames of 128 mm."""
    rng = np.random.default_rng(seed)
    frames = [clean_frame() for _ in range(n)]
    k = 0
    while (pos := start_mm + k * pitch_mm) < n * 128 - 32:
        pos += rng.uniform(-jitter_mm, jitter_mm)
        i, y = int(pos // 128), int((pos % 128) // MM_Y) // 4 * 4
        y = min(y, 64 - 8)
        if k not in missed:
            frames[i][y:y + 8, x:x + 8] = 0
        k += 1
    return frames


def test_planted_roll_marks_come_out_as_a_periodic_series_and_fail_the_coil(running_agent):
    agent = running_agent(ingest={"overload": "backpressure"})  # 80 frames at once: none shed
    cfg = agent.cfg
    col = _collector(cfg)
    try:
        pitch = 1000.0
        frames = _roll_mark_frames(80, pitch, 160, 300.0, missed={3, 4}, jitter_mm=4.0)
        _send(cfg, "cam0", "c-roll", frames)
        s = _wait_summary(col, "c-roll")
        check_accounting(s)
        per = [m for t, m in col.msgs if t == "periodic" and m["coil"] == "c-roll"]
        assert len(per) == 1, (per, [(t["along_mm"], t["across_mm"]) for t in _tracks(col, "c-roll")])
        p = per[0]
        assert p["class"] == "dark" and abs(p["pitch_mm"] - pitch) / pitch <= 0.01, p
        assert p["count"] == 8 and p["across_mm"] == 182.0, (p, [(t["along_mm"], t["across_mm"]) for t in _tracks(col, "c-roll")])
        assert abs(p["roll_diameter_mm"] - p["pitch_mm"] / np.pi) < 0.1
        assert s["periodic"] and s["periodic"][0]["pitch_mm"] == p["pitch_mm"]
        assert s["periodic"][0] == {k: v for k, v in p.items() if k not in ("v", "type", "agent", "seq", "ts_ns")}
        assert s["grade"]["grade"] == "fail" and s["grade"]["rule"] == "periodic"
        assert "dark every" in s["grade"]["reason"]
        ids = {t["track_id"] for t in _tracks(col, "c-roll")}
        assert set(p["track_ids"]) <= ids
    finally:
        col.close()


def _replay(cfg, first: int, last: int) -> list[tuple[str, dict]]:
    s = zmq.Context.instance().socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 5000)
    s.connect(cfg.publish.replay_endpoint)
    try:
        s.send(encode_replay_request(first, last))
        frames = s.recv_multipart()
    finally:
        s.close()
    return [(t.decode(), unpack_body(b)) for t, b in zip(frames[1::2], frames[2::2])]


def _control(cfg, req: dict) -> dict:
    s = zmq.Context.instance().socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 5000)
    s.connect(cfg.control.endpoint)
    try:
        s.send(msgpack.packb(req))
        return msgpack.unpackb(s.recv(), raw=False)
    finally:
        s.close()


def test_replay_returns_tracks_and_the_control_socket_serves_their_crops(running_agent):
    import cv2

    agent = running_agent()
    cfg = agent.cfg
    col = _collector(cfg)
    try:
        _send(cfg, "cam0", "c-crop", [frame_with("bright", 64, 16), clean_frame()])
        s = _wait_summary(col, "c-crop")
    finally:
        col.close()
    got = _replay(cfg, 1, s["seq"])
    topics = [t for t, _ in got]
    assert topics == ["defect", "track", "summary"], topics
    track = got[1][1]
    assert track["crop"] == "c-crop/1"
    deadline = time.monotonic() + 10
    while True:  # the crop thread writes it off the inference path: soon, not at once
        reply = _control(cfg, {"cmd": "crop", "coil": "c-crop", "track_id": 1})
        if reply["ok"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert reply["ok"], reply
    img = cv2.imdecode(np.frombuffer(reply["png"], np.uint8), cv2.IMREAD_UNCHANGED)
    assert img is not None and img.ndim == 2 and img.max() == 255 and img.min() == 100  # the square and its margin
    bad = _control(cfg, {"cmd": "crop", "coil": "c-crop", "track_id": 99})
    assert not bad["ok"] and "no crop for coil 'c-crop' track 99" in bad["error"]
    bad = _control(cfg, {"cmd": "crop", "coil": "../etc", "track_id": "1"})
    assert not bad["ok"] and "track_id (an integer >= 1)" in bad["error"]
    status = _control(cfg, {"cmd": "status"})
    assert status["coil_layer"]["tracks_published"] == 1 and status["coil_layer"]["errors"] == 0


def test_the_layer_switched_off_publishes_what_it_did_before(running_agent):
    agent = running_agent(coil={"stitch": {"enabled": False}})
    cfg = agent.cfg
    col = _collector(cfg)
    try:
        _send(cfg, "cam0", "c-off", [frame_with("bright", 64, 16), clean_frame()])
        s = _wait_summary(col, "c-off")
    finally:
        col.close()
    assert [t for t, _ in col.msgs] == ["defect", "summary"]
    assert not {"grade", "tracks", "track_count", "periodic"} & set(s)
    assert agent.intel is None and agent.crops is None


def test_clean_and_random_defect_coils_raise_no_periodic_alarm(running_agent):
    agent = running_agent(ingest={"overload": "backpressure"})
    cfg = agent.cfg
    col = _collector(cfg)
    rng = np.random.default_rng(7)
    try:
        randoms = []
        for _ in range(60):
            img = clean_frame()
            for _ in range(int(rng.integers(0, 3))):
                kind = "bright" if rng.random() < 0.5 else "dark"
                x, y = int(rng.integers(0, 60)) * 4, int(rng.integers(0, 14)) * 4
                img[y:y + 8, x:x + 8] = 255 if kind == "bright" else 0
            randoms.append(img)
        _send(cfg, "cam0", "c-random", randoms)
        _send(cfg, "cam0", "c-clean", [clean_frame() for _ in range(30)])
        for coil in ("c-random", "c-clean"):
            s = _wait_summary(col, coil)
            assert s["periodic"] == [] and s["grade"]["grade"] == "pass", (coil, s["periodic"])
        assert not [m for t, m in col.msgs if t == "periodic"]
        assert _wait_summary(col, "c-random")["track_count"] > 20
    finally:
        col.close()
