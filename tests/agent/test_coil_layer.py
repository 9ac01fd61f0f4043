"""The coil layer's pure parts: stitching geometry and closing, periodic series on planted and
control coils, grade rules, crop retention, and its config."""
from __future__ import annotations

import math
import tomllib

import numpy as np
import pytest

from agent.config import ConfigError, config_dict, config_from_dict, dump_toml
from agent.crops import CropError, CropStore, coil_dir_name, read_crop
from agent.grade import grade_coil
from agent.periodic import Mark, PeriodicParams, find_series
from agent.tracks import Stitcher, boxes_touch


def ev(camera="cam0", index=0, cls="scratches", cid=5, across=100.0, along=50.0, w=10.0, h=20.0, conf=0.9,
       coil="C1", bbox=(0, 0, 10, 10)):
    return {"coil": coil, "camera": camera, "index": index, "class": cls, "class_id": cid, "confidence": conf,
            "across_mm": across, "along_mm": along, "width_mm": w, "length_mm": h, "area_mm2": w * h,
            "bbox_px": list(bbox)}


# -- stitching -----------------------------------------------------------------------------------
def test_boxes_touch_within_the_gap_only():
    assert boxes_touch((0, 0, 10, 10), (10, 0, 20, 10), 0.0)  # edge to edge
    assert boxes_touch((0, 0, 10, 10), (14, 0, 20, 10), 5.0)
    assert not boxes_touch((0, 0, 10, 10), (16, 0, 20, 10), 5.0)
    assert not boxes_touch((0, 0, 10, 10), (0, 16, 10, 20), 5.0)


def test_a_scratch_over_three_frames_is_one_track_closed_after_its_next_frame():
    st = Stitcher(gap_mm=5.0)
    # frames of 256 mm: the scratch ends frame 0, fills frame 1, starts frame 2
    assert st.add(ev(index=0, along=236.0, h=40.0), seq=1) == []
    st.add(ev(index=1, along=384.0, h=256.0, conf=0.95, bbox=(1, 1, 2, 2)), seq=2)
    st.add(ev(index=2, along=532.0, h=40.0), seq=3)
    assert st.frames_done("C1", "cam0", [0, 1, 2]) == []  # frame 3 not through: a part may come
    closed = st.frames_done("C1", "cam0", [3])
    assert len(closed) == 1 and st.open_count == 0
    t = closed[0]
    t.track_id = 1
    b = t.body()
    assert b["frames"] == {"cam0": [0, 2]} and b["event_seqs"] == [1, 2, 3] and b["event_count"] == 3
    assert b["bbox_mm"] == [95.0, 216.0, 105.0, 552.0] and b["length_mm"] == 336.0 and b["confidence"] == 0.95
    assert t.best == ("C1", "cam0", 1, (1, 1, 2, 2), 5)  # the surest part: its crop


def test_two_cameras_overlapping_across_make_one_track():
    st = Stitcher(gap_mm=2.0)
    st.add(ev(camera="cam0", across=795.0, w=20.0), seq=1)  # 785..805
    st.add(ev(camera="cam1", across=812.0, w=20.0), seq=2)  # 802..822: overlaps
    st.frames_done("C1", "cam0", [0, 1])
    closed = st.frames_done("C1", "cam1", [0, 1])
    assert len(closed) == 1
    b = closed[0].body()
    assert b["cameras"] == ["cam0", "cam1"] and b["frames"] == {"cam0": [0, 0], "cam1": [0, 0]}
    assert b["bbox_mm"][0] == 785.0 and b["bbox_mm"][2] == 822.0


def test_no_merge_across_classes_coils_or_gaps():
    st = Stitcher(gap_mm=5.0)
    st.add(ev(across=100.0), seq=1)
    st.add(ev(across=100.0, cls="inclusion", cid=1), seq=2)  # same place, other class
    st.add(ev(across=100.0, coil="C2"), seq=3)  # same place, other coil
    st.add(ev(across=116.0), seq=4)  # 6 mm gap (boxes 95..105 and 111..121)
    st.add(ev(index=2, along=50.0 + 256 * 2), seq=5)  # frame 2, far along: no contact
    assert st.open_count == 5
    assert len(st.close_coil("C1")) == 4 and len(st.close_coil("C2")) == 1


def test_a_part_touching_two_tracks_joins_them():
    st = Stitcher(gap_mm=0.0)
    st.add(ev(across=100.0, w=10.0), seq=1)  # 95..105
    st.add(ev(across=120.0, w=10.0), seq=2)  # 115..125
    assert st.open_count == 2
    st.add(ev(across=110.0, w=10.0), seq=3)  # 105..115 touches both
    assert st.open_count == 1
    (t,) = st.close_coil("C1")
    assert t.event_seqs == [1, 2, 3] and t.box[0] == 95.0 and t.box[2] == 125.0


def test_a_track_waits_for_a_line_camera_that_has_not_got_that_far():
    st = Stitcher()
    st.frames_done("C0", "cam1", [0])  # cam1 is one of the line's cameras
    st.add(ev(camera="cam0", index=0), seq=1)
    assert st.frames_done("C1", "cam0", [0, 1]) == []
    assert st.frames_done("C1", "cam1", [0]) == []  # cam1's frame 0 may still hold a part of it
    assert len(st.frames_done("C1", "cam1", [1])) == 1


def test_open_tracks_are_bounded_and_the_overflow_counted():
    st = Stitcher(max_open=3)
    for i in range(3):
        assert st.add(ev(across=100.0 + 50 * i), seq=i + 1) == []
    closed = st.add(ev(across=400.0), seq=4)
    assert [t.event_seqs for t in closed] == [[1]] and st.overflow == 1 and st.open_count == 3


def test_events_without_strip_geometry_are_not_stitched():
    st = Stitcher()
    assert st.add({"coil": "C1", "camera": "cam0", "index": 0, "class": "x", "class_id": 0}, seq=1) == []
    assert st.open_count == 0


# -- periodic ------------------------------------------------------------------------------------
def planted(rng, pitch, across, length, miss_p=0.2, jitter=0.003, cid=3, start_id=10_000):
    marks, k, tid = [], 0, start_id
    first = rng.uniform(0, pitch)
    while first + k * pitch < length:
        if rng.random() > miss_p or k == 0:
            marks.append(Mark(tid, cid, f"c{cid}", float(across + rng.normal(0, 2)),
                              float(first + k * pitch + rng.normal(0, jitter * pitch))))
            tid += 1
        k += 1
    return marks


def control_coil(seed: int) -> list[Mark]:
    """A coil without roll marks: clean (even seeds) or random defects of six classes (odd), a third
    of them at the strip edges, and every third coil a dense burst of one class at one place."""
    rng = np.random.default_rng(seed)
    length = rng.uniform(300e3, 1500e3)
    marks = []
    for t in range(int(rng.integers(0, 400)) if seed % 2 else 0):
        across = rng.uniform(0, 1600) if rng.random() < 0.7 else rng.choice([15.0, 1585.0]) + rng.normal(0, 3)
        marks.append(Mark(t + 1, int(rng.integers(6)), "c", float(across), float(rng.uniform(0, length))))
    if seed % 3 == 0:
        base, across = rng.uniform(0, length - 20e3), rng.uniform(0, 1600)
        marks += [Mark(1000 + t, 2, "c2", float(across + rng.normal(0, 4)), float(base + rng.uniform(0, 20e3)))
                  for t in range(60)]
    return marks


@pytest.mark.parametrize("seed", range(6))
def test_planted_roll_marks_are_found_with_the_pitch_within_one_percent(seed):
    rng = np.random.default_rng(100 + seed)
    pitch = rng.uniform(1200, 5000)  # work and backup rolls: 380-1600 mm diameter
    marks = control_coil(2 * seed + 1) + planted(rng, pitch, rng.uniform(50, 1550), 600e3)
    series = [s for s in find_series(marks) if s["class_id"] == 3]
    assert len(series) == 1, series
    s = series[0]
    assert abs(s["pitch_mm"] - pitch) / pitch <= 0.01
    assert s["roll_diameter_mm"] == pytest.approx(s["pitch_mm"] / math.pi, abs=0.1)
    assert s["count"] >= 0.7 * 600e3 / pitch and s["confidence"] > 0.7


def test_a_short_series_with_missed_repeats_on_a_clean_coil():
    ys = [1000.0 + 2500.0 * k for k in (0, 1, 3, 4, 5, 7)]  # repeats 2 and 6 missed
    marks = [Mark(i + 1, 0, "crazing", 400.0 + (i % 2), y + (-3 if i % 2 else 3)) for i, y in enumerate(ys)]
    (s,) = find_series(marks)
    assert s["count"] == 6 and s["pitch_mm"] == pytest.approx(2500.0, rel=0.002)
    assert s["first_along_mm"] == pytest.approx(1003.0) and s["track_ids"] == [1, 2, 3, 4, 5, 6]
    assert find_series(marks, PeriodicParams(min_repeats=7)) == []


def test_no_false_periodic_alarm_on_100_control_coils():
    alarms = [seed for seed in range(100) if find_series(control_coil(seed))]
    assert alarms == [], f"false periodic alarms on control coils {alarms}"


# -- grade ---------------------------------------------------------------------------------------
GRADES = ("pass", "downgrade", "fail")


def rule(**kw):
    from agent.config import GradeRuleSection

    return GradeRuleSection(**kw)


def test_grade_rules_pick_the_worst_and_name_it():
    tracks = [{"class": "scratches", "length_mm": 300.0, "track_id": 1}] * 6 + [
        {"class": "inclusion", "length_mm": 2500.0, "track_id": 7}]
    rules = (rule(class_name="scratches", max_per_100m=5.0), rule(class_name="inclusion", max_length_mm=2000.0,
                                                                   grade="fail"))
    g = grade_coil(tracks, [], 100_000.0, grades=GRADES, periodic_grade="fail", rules=rules)
    assert g == {"grade": "fail", "rule": "rules[1] inclusion max_length_mm",
                 "reason": "inclusion track 7 is 2500 mm long > 2000 mm"}
    g = grade_coil(tracks[:6], [], 100_000.0, grades=GRADES, periodic_grade="fail", rules=rules)
    assert g["grade"] == "downgrade" and g["rule"] == "rules[0] scratches max_per_100m"
    assert g["reason"] == "6 scratches tracks in 100.0 m: 6.00 per 100 m > 5"
    assert grade_coil(tracks[:5], [], 100_000.0, grades=GRADES, periodic_grade="fail", rules=rules) == {
        "grade": "pass", "rule": "none", "reason": "no rule broken"}
    per = [{"class": "scratches", "pitch_mm": 2513.3, "across_mm": 412.0, "count": 9}]
    g = grade_coil([], per, 100_000.0, grades=GRADES, periodic_grade="fail", rules=rules)
    assert g["grade"] == "fail" and g["rule"] == "periodic" and "every 2513 mm at 412 mm across, 9 repeats" in g["reason"]
    assert grade_coil([], per, 1e5, grades=GRADES, periodic_grade="", rules=())["grade"] == "pass"
    star = grade_coil(tracks, [], 100_000.0, grades=GRADES, periodic_grade="", rules=(rule(max_per_100m=6.5),))
    assert star["rule"] == "rules[0] * max_per_100m" and "7 defects tracks" in star["reason"]


def test_grade_config_is_checked_and_survives_the_toml_round_trip():
    data = {"coil": {"grade": {"rules": [{"class_name": "scratches", "max_per_100m": 4.0, "grade": "downgrade"}]}}}
    cfg = config_from_dict(data)
    back = config_from_dict(tomllib.loads(dump_toml(config_dict(cfg))))
    assert back.coil == cfg.coil and back.coil.grade.rules[0].max_per_100m == 4.0
    with pytest.raises(ConfigError, match=r"coil.grade.rules\[0\].grade: 'C' is not one of coil.grade.grades"):
        config_from_dict({"coil": {"grade": {"rules": [{"grade": "C"}]}}})
    with pytest.raises(ConfigError, match="coil.periodic.min_pitch_mm: must be < coil.periodic.max_pitch_mm"):
        config_from_dict({"coil": {"periodic": {"min_pitch_mm": 5000.0, "max_pitch_mm": 4000.0}}})
    with pytest.raises(ConfigError, match=r"coil.stitch.gap: unknown key"):
        config_from_dict({"coil": {"stitch": {"gap": 1.0}}})


# -- crops ---------------------------------------------------------------------------------------
def _crop_job(store: CropStore, coil: str, track_id: int, value: int = 255) -> str | None:
    img = np.full((1, 64, 256), 100, np.uint8)
    img[0, 16:32, 64:80] = value
    e = ev(coil=coil, index=track_id, bbox=(64, 16, 80, 32))
    assert store.offer(img, [e])
    from agent.tracks import part_key

    return store.request(coil, track_id, part_key(e))


def _drain(store: CropStore) -> None:
    import time

    deadline = time.monotonic() + 10
    while store._q.qsize() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)


def test_crops_are_written_read_and_bounded_by_coils_and_bytes(tmp_path):
    import cv2

    store = CropStore(tmp_path / "crops", size_px=32, margin_px=4, max_coils=3, max_bytes=1 << 20)
    store.start()
    try:
        assert _crop_job(store, "C/../1", 1) == "C/../1/1"
        _drain(store)
        png = store.read("C/../1", 1)
        img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
        assert img.shape == (24, 24) and img.max() == 255 and img.min() == 100  # 16 px + 4 px margin each side
        d = coil_dir_name("C/../1")
        assert "/" not in d and ".." not in d and (tmp_path / "crops" / d / "crops.pack").is_file()
        assert read_crop(tmp_path / "crops", "C/../1", 1) == png  # offline, from the folder alone
        _crop_job(store, "C/../1", 2, value=0)
        _drain(store)
        assert store.read("C/../1", 2) != png and store.read("C/../1", 1) == png
        for i in range(2, 6):
            _crop_job(store, f"C{i}", 1)
            _drain(store)
        assert store.stats()["coils"] == 3 and store.stats()["deleted_coils"] == 2
        assert sorted(p.name for p in (tmp_path / "crops").iterdir()) == sorted(
            coil_dir_name(f"C{i}") for i in (3, 4, 5))
        with pytest.raises(CropError, match="no crop for coil 'C/../1' track 1"):
            store.read("C/../1", 1)
        with pytest.raises(CropError, match="track_id"):
            store.read("C5", "1")
    finally:
        store.stop()
    # the byte bound: each crop is some 100 bytes; a 300-byte bound keeps the newest coils only
    small = CropStore(tmp_path / "crops", size_px=32, max_coils=100, max_bytes=1 << 16)
    assert small.stats()["coils"] == 3  # found again on disk at start
    assert read_crop(tmp_path / "crops", "C5", 1)[:8] == b"\x89PNG\r\n\x1a\n"
    small.max_bytes = sum(f.stat().st_size for f in (tmp_path / "crops").rglob("*") if f.is_file()) - 1
    small._enforce(keep=None)
    assert small.stats()["coils"] == 2 and small.stats()["bytes"] <= small.max_bytes


def test_a_full_crop_queue_drops_frames_and_never_waits(tmp_path):
    store = CropStore(tmp_path / "crops", queue_size=2)  # thread not started: nothing is taken
    img = np.zeros((1, 64, 256), np.uint8)
    assert store.offer(img, [ev()]) and store.offer(img, [ev(index=1)])
    assert not store.offer(img, [ev(index=2)])
    assert store.dropped == 1
    assert store.request("C1", 1, ("C1", "cam0", 9, (0, 0, 10, 10), 5)) is None  # its frame never offered


def test_subscribe_table_reads_the_new_topics():
    import json
    import re
    from pathlib import Path

    from agent.tools.views import format_event

    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    ex = {n: json.loads(b) for n, b in re.findall(r"```json example:(\w+)\n(.*?)```", doc, re.S)}
    line = format_event("track", ex["track"])
    assert "C240117-0042 track 7: scratches conf 0.91 at 79.96 m along, 428 mm across, 36x608 mm, 3 events " \
           "(frames cam0 311-313)" in line
    line = format_event("periodic", ex["periodic"])
    assert "pitted_surface every 2513 mm at 612 mm across, 9 repeats (roll diameter 800 mm)" in line


def test_frames_through_out_of_order_still_make_one_track():
    """Two workers: frame 8 (the defect's second half) is through before frame 7 (its first half)."""
    st = Stitcher(gap_mm=0.0)
    st.add(ev(index=8, along=8 * 256 + 20.0, h=40.0), seq=1)  # 2048..2088
    assert st.frames_done("C1", "cam0", [8, 9, 10]) == []  # frame 7 not through: its part may touch
    st.add(ev(index=7, along=7 * 256 + 236.0, h=40.0), seq=2)  # 2028..2048
    assert st.frames_done("C1", "cam0", [7]) == []  # and frame 6 may hold a part too
    (t,) = st.frames_done("C1", "cam0", [6])
    assert t.frames == {"cam0": [7, 8]} and t.event_seqs == [1, 2]
