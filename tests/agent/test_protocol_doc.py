"""docs/protocol.md is a contract: its examples must decode, and what the agent publishes must
carry every key the document lists."""
from __future__ import annotations

import json
import re
from pathlib import Path

import msgpack
import numpy as np
import pytest

from agent.protocol import Control, FrameHeader, decode_message, pixels_to_array

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def examples() -> dict[str, dict]:
    text = DOC.read_text()
    blocks = re.findall(r"```json example:(\w+)\n(.*?)```", text, re.S)
    return {name: json.loads(body) for name, body in blocks}


def table_keys(section_title: str) -> set[str]:
    """Keys listed in the first column of the table under a heading."""
    text = DOC.read_text()
    part = text.split(section_title, 1)[1].split("\n#", 1)[0]
    keys = set()
    for line in part.splitlines():
        if line.startswith("| `"):
            keys |= set(re.findall(r"`([a-z_0-9]+)`", line.split("|")[1]))
    return keys


def test_doc_has_every_example():
    assert set(examples()) >= {"frame", "coil_start", "coil_end", "defect", "summary", "health",
                               "replay_request", "replay_reply", "track", "periodic", "summary_coil_layer"}


def test_documented_frame_example_decodes():
    h = examples()["frame"]
    pixels = np.zeros(h["shape"], np.uint8).tobytes()
    header, buf = decode_message([msgpack.packb(h), pixels], max_width=1600, max_height=256)
    assert isinstance(header, FrameHeader)
    assert (header.camera, header.coil, header.index, header.seq) == ("cam0", "C240117-0042", 311, 1207)
    assert pixels_to_array(header, buf).shape == (256, 1600)


@pytest.mark.parametrize("name", ["coil_start", "coil_end"])
def test_documented_control_examples_decode(name):
    msg, buf = decode_message([msgpack.packb(examples()[name])], max_width=1600, max_height=256)
    assert isinstance(msg, Control) and msg.type == name and buf is None
    if name == "coil_end":
        assert msg.frames == 5000 and msg.length_mm == 1280000.0


def test_documented_examples_list_every_documented_key():
    ex = examples()
    common = {"v", "type", "agent", "seq", "ts_ns"}
    assert table_keys("### 2.1 `defect`") | common <= set(ex["defect"])
    assert table_keys("### 2.2 `summary`") | common <= set(ex["summary"])
    assert table_keys("### 2.3 `health`") <= set(ex["health"])
    s = ex["summary"]["frames"]
    assert s["received"] == sum(s[k] for k in ("inspected", "gated_out", "rejected", "shed", "pending", "lost"))
    assert s["sent"] == s["received"] + s["missing"]


def test_published_messages_carry_every_documented_key(running_agent):
    from tinypack import clean_frame, frame_with

    from tests_support_events import Collector

    from agent.tools.camera_sim import CameraSim

    agent = running_agent()
    cfg = agent.cfg
    col = Collector(cfg, timeout_s=60.0)
    cam = CameraSim(cfg.ingest.endpoint)
    cam.send_coil("doc-coil", [(frame_with("bright", 8, 8), None), (clean_frame(), None)])
    cam.close()
    try:
        assert col.wait(lambda c: c.summaries("doc-coil") and c.health is not None, 20), "no summary or heartbeat"
    finally:
        col.close()
    seen = {"defect": col.defects("doc-coil")[0], "summary": col.summaries("doc-coil")[0], "health": col.health}
    common = {"v", "type", "agent", "seq", "ts_ns"}
    assert table_keys("### 2.1 `defect`") | common <= set(seen["defect"])
    assert table_keys("### 2.2 `summary`") | common <= set(seen["summary"])
    assert table_keys("### 2.3 `health`") <= set(seen["health"])
    assert set(seen["summary"]["frames"]) == set(examples()["summary"]["frames"])


def test_documented_instance_event_is_a_defect_with_the_optional_keys():
    """The instance example (docs/protocol.md 2.1) is a v1 `defect`: every required key, plus `instance`,
    and it survives the wire (MessagePack) unchanged."""
    ex = examples()["defect_instance"]
    common = {"v", "type", "agent", "seq", "ts_ns"}
    assert ex["v"] == 1 and ex["type"] == "defect"
    assert table_keys("### 2.1 `defect`") | common <= set(ex)
    optional = table_keys("#### Instance events")
    assert optional == {"instance"} and optional <= set(ex)
    assert set(ex) - set(examples()["defect"]) == optional  # nothing but the optional keys is new
    assert ex["confidence"] == ex["instance"]
    x0, y0, x1, y1 = ex["bbox_px"]
    assert 0 <= x0 < x1 and 0 <= y0 < y1
    assert msgpack.unpackb(msgpack.packb(ex)) == ex


def test_an_instance_pack_publishes_the_documented_instance_keys(running_agent, tmp_path):
    from tinyinstances import frame_with_squares, make_instance_pack

    from agent.tools.camera_sim import CameraSim
    from agent.subscriber import Subscriber

    agent = running_agent(models={"dir": str(make_instance_pack(tmp_path / "inst"))})
    cfg = agent.cfg
    sub = Subscriber(cfg.publish.endpoint, cfg.publish.replay_endpoint, topics=("defect",), from_seq=1)
    import time

    time.sleep(0.3)
    cam = CameraSim(cfg.ingest.endpoint)
    cam.send_coil("doc-inst", [(frame_with_squares([("bright", 8, 8)]), None)])
    cam.close()
    event = None
    for topic, msg in sub.messages(timeout_s=20):
        if topic == "defect":
            event = msg
            break
    sub.close()
    assert event is not None, "no defect event"
    common = {"v", "type", "agent", "seq", "ts_ns"}
    assert table_keys("### 2.1 `defect`") | common | table_keys("#### Instance events") <= set(event)
    assert set(event) == set(examples()["defect_instance"])


def test_documented_coil_layer_examples_list_every_documented_key():
    """docs/protocol.md 2.6: the `track` and `periodic` examples carry every key of their tables, the
    summary's coil-layer keys are in their example, and they survive MessagePack unchanged."""
    ex = examples()
    common = {"v", "type", "agent", "seq", "ts_ns"}
    assert table_keys("#### `track`") | common <= set(ex["track"]) and ex["track"]["type"] == "track"
    assert table_keys("#### `periodic`") | common <= set(ex["periodic"]) and ex["periodic"]["type"] == "periodic"
    assert table_keys("#### The summary's coil-layer keys") == set(ex["summary_coil_layer"])
    t = ex["track"]
    x0, y0, x1, y1 = t["bbox_mm"]
    assert (t["across_mm"], t["along_mm"], t["width_mm"], t["length_mm"]) == ((x0 + x1) / 2, (y0 + y1) / 2,
                                                                              x1 - x0, y1 - y0)
    assert t["event_count"] == len(t["event_seqs"]) and t["crop"] == f"{t['coil']}/{t['track_id']}"
    p = ex["periodic"]
    assert abs(p["roll_diameter_mm"] - p["pitch_mm"] / 3.141592653589793) < 0.1 and p["count"] == len(p["track_ids"])
    layer = ex["summary_coil_layer"]
    assert layer["track_count"] == sum(layer["tracks"].values())
    assert layer["periodic"][0] == {k: v for k, v in p.items() if k not in common}
    for name in ("track", "periodic", "summary_coil_layer"):
        assert msgpack.unpackb(msgpack.packb(ex[name])) == ex[name]


def test_published_tracks_carry_every_documented_key(running_agent):
    from tinypack import clean_frame, frame_with

    from tests_support_events import Collector

    from agent.tools.camera_sim import CameraSim

    agent = running_agent()
    cfg = agent.cfg
    col = Collector(cfg, timeout_s=60.0)
    col.sub.topics |= {"track"}
    cam = CameraSim(cfg.ingest.endpoint)
    cam.send_coil("doc-track", [(frame_with("bright", 8, 8), None), (clean_frame(), None)])
    cam.close()
    try:
        assert col.wait(lambda c: c.summaries("doc-track"), 20), "no summary"
    finally:
        col.close()
    track = next(m for t, m in col.msgs if t == "track")
    common = {"v", "type", "agent", "seq", "ts_ns"}
    assert table_keys("#### `track`") | common <= set(track)
    assert set(track) == set(examples()["track"])
    summary = col.summaries("doc-track")[0]
    assert table_keys("#### The summary's coil-layer keys") <= set(summary)
