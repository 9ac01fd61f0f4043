"""`coilsight report COIL`: from a journal the real agent wrote (camera-sim coil on loopback) and
from a hand-written journal with the coil-intelligence records (track, periodic, grade), through
the journal's own writer. The page parses, its plots exist and are not blank, the JSON holds the
summary, and an unknown coil or a missing journal is a clear error with a non-zero exit."""
from __future__ import annotations

import json
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
from tinypack import clean_frame, frame_with

from agent.cli import main
from agent.crops import CropStore
from agent.journal import Journal, read_journal
from agent.protocol import pack_body
from agent.tracks import part_key

COIL = "C-REPORT-1"
CLASSES = ["bright", "dark"]


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(page: Path) -> Page:
    p = Page()
    p.feed(page.read_text())
    p.close()
    return p


def check_plots(out: Path) -> None:
    for name in ("strip_map.png", "histogram.png", "timing.png"):
        img = cv2.imread(str(out / name))
        assert img is not None and img.shape[0] > 50, name
        assert float(img.std()) > 0, f"{name} is blank"


def test_report_from_the_real_agent_journal(running_agent, tmp_path, capsys):
    from tests_support_events import send_coil_collected

    agent = running_agent()
    frames = [(frame_with("bright", 32 + 8 * i, 16) if i % 3 == 0 else clean_frame(), None) for i in range(12)]
    col = send_coil_collected(agent.cfg, COIL, frames, mm_per_px_y=2.0)
    published = col.summaries(COIL)[-1]
    # the journal as copied off a line box, while the agent still runs
    copy = tmp_path / "box" / "journal" / agent.cfg.agent.name
    shutil.copytree(agent.cfg.state_path() / "journal" / agent.cfg.agent.name, copy)
    out = tmp_path / "report"
    rc = main(["report", COIL, "--journal", str(copy), "--out", str(out)])
    text = capsys.readouterr()
    assert rc == 0, text.err
    # four separate marks (frames 0, 3, 6, 9): the coil layer stitches none together; the default rules pass it
    assert f"coil {COIL}: 4 tracks, 0 periodic, grade pass" in text.out
    page = parse(out / "index.html")
    imgs = [a for t, a in page.tags if t == "img"]
    assert len(imgs) == 3 and all(a["src"].startswith("data:image/png;base64,") for a in imgs)
    body = " ".join(page.text)
    assert f"Coil {COIL}" in body and "Grade pass" in body and "within budget" in body
    check_plots(out)
    # JSON: the journal's summary is the one the agent published
    rc = main(["report", "latest", "--journal", str(copy), "--format", "json"])
    rep = json.loads(capsys.readouterr().out)
    assert rc == 0 and rep["coil"] == COIL
    assert rep["summary"] == published and rep["counts"] == {"bright": 4, "dark": 0}
    assert rep["defect_events"] == 4 and rep["items"] == "tracks" and rep["track_count"] == 4
    assert rep["final"] and rep["complete"] and rep["grade"]["grade"] == "pass"
    assert rep["timing"]["verdict"].startswith("within budget")
    # the same through the agent's config (its state dir)
    cfg_file = tmp_path / "agent.toml"
    cfg_file.write_text(f'[agent]\nname = "{agent.cfg.agent.name}"\nprofile = "tiny"\n'
                        f'state_dir = "{agent.cfg.state_path()}"\n')
    rc = main(["report", COIL, "--config", str(cfg_file), "--format", "json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["summary"] == published


def envelope(topic: str, body: dict, seq: int) -> tuple[bytes, bytes]:
    return topic.encode(), pack_body({"v": 1, "type": topic, "agent": "line-7", "seq": seq,
                                      "ts_ns": time.time_ns(), **body})


def write_coil_journal(directory: Path) -> dict:
    """A 250 m coil: 6 stitched tracks (3 of them a roll mark every 1,000 mm), their defect events,
    a provisional and a final summary with a grade; and another coil before it."""
    j = Journal(directory, fsync=False)
    recs: list[tuple[str, dict]] = [("summary", {"coil": "C-OLD", "final": True, "defects": {}, "defect_count": 0})]
    tracks = []
    places = [(12_000.0, 300.0, "bright"), (13_000.0, 300.0, "bright"), (14_000.0, 300.0, "bright"),
              (120_000.0, 900.0, "dark"), (180_500.0, 150.0, "bright"), (240_000.0, 700.0, "dark")]
    for n, (along, across, cls) in enumerate(places):
        t = {"coil": COIL, "track_id": n + 1, "class": cls, "class_id": CLASSES.index(cls),
             "cameras": ["cam0"], "frames": {"cam0": [n * 10, n * 10 + 1]}, "event_seqs": [], "event_count": 2,
             "bbox_mm": [across - 10, along - 40, across + 10, along + 40], "across_mm": across, "along_mm": along,
             "width_mm": 20.0, "length_mm": 80.0 + 100 * n, "area_mm2": 1600.0 * (n + 1), "confidence": 0.9}
        if n == 5:
            t["crop"] = f"{COIL}/6"
        tracks.append(t)
        for part in range(2):
            recs.append(("defect", {"coil": COIL, "camera": "cam0", "index": n * 10 + part, "class": cls,
                                    "class_id": t["class_id"], "confidence": 0.9, "across_mm": across,
                                    "along_mm": along + part * 40, "width_mm": 20.0, "length_mm": 40.0,
                                    "area_mm2": 800.0, "bbox_px": [0, 0, 1, 1], "area_px": 1}))
        recs.append(("track", t))
    periodic = {"coil": COIL, "class": "bright", "class_id": 0, "across_mm": 300.0, "pitch_mm": 1000.0,
                "roll_diameter_mm": 318.3, "count": 3, "first_along_mm": 12_000.0, "last_along_mm": 14_000.0,
                "confidence": 0.8, "track_ids": [1, 2, 3]}
    recs.append(("periodic", periodic))
    base = {"coil": COIL, "complete": True, "end_reason": "coil_end", "defects": {"bright": 4, "dark": 2},
            "defect_count": 12, "length_mm": 250_000.0, "profile": "tiny",
            "frames": {"sent": 1000, "received": 1000, "inspected": 60, "gated_out": 940},
            "timing": {"started_ns": 1, "wall_s": 71.5, "budget_s": 60.0, "slack_s": -11.5}}
    recs.append(("summary", {**base, "final": False, "end_reason": "deadline"}))
    final = {**base, "final": True, "tracks": 6, "track_count": 6, "periodic": [periodic],
             "grade": {"grade": "C", "rule": "periodic", "reason": "a periodic bright mark every 1000 mm (roll 318 mm)"}}
    recs.append(("summary", final))
    recs.append(("summary", {"coil": "C-AFTER", "final": False, "defects": {}}))  # a coil still running
    j.append_many([envelope(topic, body, i + 1) for i, (topic, body) in enumerate(recs)])
    j.close()
    return {"final": final, "periodic": periodic, "tracks": tracks}


def test_report_with_tracks_periodic_grade_and_crops(tmp_path, capsys):
    state = tmp_path / "state"
    truth = write_coil_journal(state / "journal" / "line-7")
    # the crops as the agent keeps them: its own crop thread writes tracks 6 and 4 (agent/crops.py)
    store = CropStore(state / "crops")
    store.start()
    frame = np.random.default_rng(0).integers(0, 255, (256, 400), np.uint8)
    parts = {6: {"coil": COIL, "camera": "cam0", "index": 50, "bbox_px": [10, 10, 70, 50], "class_id": 1},
             4: {"coil": COIL, "camera": "cam0", "index": 30, "bbox_px": [100, 20, 160, 90], "class_id": 1}}
    assert store.offer(frame, list(parts.values()))
    assert all(store.request(COIL, tid, part_key(ev)) == f"{COIL}/{tid}" for tid, ev in parts.items())
    store.coil_done(COIL)
    store.stop()
    assert store.written == 2
    out = tmp_path / "out"
    rc = main(["report", COIL, "--journal", str(state / "journal" / "line-7"), "--out", str(out), "--worst", "4"])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "6 tracks, 1 periodic, grade C" in text.out
    rep = json.loads((out / "report.json").read_text())
    assert rep["summary"] == json.loads(json.dumps(truth["final"])) | {k: rep["summary"][k] for k in
                                                                         ("v", "type", "agent", "seq", "ts_ns")}
    assert rep["grade"]["grade"] == "C" and rep["grade"]["rule"] == "periodic"
    assert rep["items"] == "tracks" and rep["track_count"] == 6 and rep["defect_events"] == 12
    assert rep["counts"] == {"bright": 4, "dark": 2} and rep["provisional_summaries"] == 1
    assert [b["from_m"] for b in rep["per_100m"]] == [0.0, 100.0, 200.0]
    assert [sum(b["counts"].values()) for b in rep["per_100m"]] == [3, 2, 1]
    assert rep["periodic"][0]["pitch_mm"] == 1000.0
    assert [w["track_id"] for w in rep["worst"]] == [6, 5, 4, 3]
    assert [w["crop"] for w in rep["worst"]] == [f"{COIL}/6", None, f"{COIL}/4", None]
    assert rep["timing"]["verdict"] == "over budget by 11.5 s (71.5 s of 60.0 s)"
    page = parse(out / "index.html")
    body = " ".join(page.text)
    assert "Grade C" in body and "roll 318 mm" in body and "over budget by 11.5 s" in body
    assert "no crop" in body and "1000.0" in body  # placeholders for tracks without crops; the periodic table
    imgs = [a for t, a in page.tags if t == "img"]
    assert len(imgs) == 3 + 2  # three plots, two crops
    thumb = next(a for a in imgs if a["alt"] == "crop of 6")
    assert thumb["src"].startswith("data:image/png;base64,")
    check_plots(out)


def test_unknown_coil_missing_journal_and_usage_errors(tmp_path, capsys):
    journal = tmp_path / "j"
    write_coil_journal(journal)
    assert main(["report", "NOPE", "--journal", str(journal)]) == 1
    err = capsys.readouterr().err
    assert "coil 'NOPE' is not in the journal" in err and "C-OLD" in err and COIL in err
    assert main(["report", COIL, "--journal", str(tmp_path / "nothing")]) == 1
    assert "no journal directory at" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", COIL, "--journal", str(tmp_path / "empty")]) == 1
    assert "holds no journal segments" in capsys.readouterr().err
    assert main(["report", COIL]) == 2
    assert "--journal DIR" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent]\nnope = 1\n")
    assert main(["report", COIL, "--config", str(bad)]) == 2
    assert "config error" in capsys.readouterr().err


def test_a_missing_report_extra_is_named(tmp_path, capsys, monkeypatch):
    journal = tmp_path / "j"
    write_coil_journal(journal)
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # as if not installed
    assert main(["report", COIL, "--journal", str(journal), "--out", str(tmp_path / "o")]) == 1
    assert "install the report extra: pip install -e '.[report]'" in capsys.readouterr().err
    assert main(["report", COIL, "--journal", str(journal), "--format", "json"]) == 0  # JSON needs no matplotlib


def test_the_reader_changes_nothing_and_reports_a_torn_tail(tmp_path):
    journal = tmp_path / "j"
    write_coil_journal(journal)
    seg = next(journal.glob("segment-*.log"))
    with open(seg, "ab") as f:
        f.write(b"CSJ1\x40\x00")  # a record the agent is writing right now
    before = seg.read_bytes()
    damage: list = []
    recs = list(read_journal(journal, damage))
    assert [d.kind for d in damage] == ["torn_tail"]
    assert seg.read_bytes() == before and not list(journal.glob("*.damaged"))
    assert [r[0] for r in recs] == list(range(1, len(recs) + 1))


def test_periodic_and_tracks_from_the_summary_alone(tmp_path, capsys):
    """An agent that puts its tracks and periodic series only in the summary: the report uses them."""
    j = Journal(tmp_path / "j", fsync=False)
    track = {"track_id": "t0", "class": "dark", "class_id": 1, "across_mm": 50.0, "along_mm": 2_000.0,
             "width_mm": 10.0, "length_mm": 30.0, "area_mm2": 300.0, "confidence": 0.7}
    periodic = {"class": "dark", "across_mm": 50.0, "pitch_mm": 900.0, "roll_diameter_mm": 286.5, "count": 4,
                "first_along_mm": 2_000.0, "last_along_mm": 4_700.0, "confidence": 0.9, "track_ids": []}
    j.append_many([envelope("summary", {"coil": "S1", "final": True, "defects": {"bright": 0, "dark": 1},
                                        "defect_count": 0, "length_mm": 5_000.0, "tracks": [track],
                                        "periodic": [periodic]}, 1)])
    j.close()
    out = tmp_path / "o"
    assert main(["report", "S1", "--journal", str(tmp_path / "j"), "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["items"] == "tracks" and rep["counts"] == {"bright": 0, "dark": 1}
    assert rep["periodic"][0]["pitch_mm"] == 900.0 and rep["grade"] is None
    check_plots(out)
    capsys.readouterr()
