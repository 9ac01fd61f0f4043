"""The bridge's config file, topic mapping, payloads and state file (no broker needed)."""
from __future__ import annotations

import json

import msgpack
import pytest

from agent.bridge.config import bridge_config_from_dict, load_bridge_config
from agent.bridge.mqtt import encode_payload, topics_for
from agent.bridge.state import AckState, StateBusy
from agent.cli import main as cli_main
from agent.config import ConfigError


def test_defaults_need_only_the_line():
    cfg = bridge_config_from_dict({"bridge": {"line": "L7"}})
    assert cfg.bridge.window == 1000 and cfg.mqtt.port == 1883 and cfg.mqtt.payload == "json"
    assert cfg.mqtt.retain == ("summary",)


@pytest.mark.parametrize("data, message", [
    ({}, r"bridge\.line: required"),
    ({"bridge": {"line": "a/b"}}, r"bridge\.line: must be 1-64 characters"),
    ({"bridge": {"line": "L", "window": 0}}, r"bridge\.window: must be >= 1"),
    ({"bridge": {"line": "L", "windw": 5}}, r"bridge\.windw: unknown key"),
    ({"bridge": {"line": "L"}, "mqtt": {"cert_file": "c.pem", "tls": True}}, r"mqtt\.cert_file, mqtt\.key_file"),
    ({"bridge": {"line": "L"}, "mqtt": {"ca_file": "ca.pem"}}, r"mqtt\.tls: must be true"),
    ({"bridge": {"line": "L"}, "mqtt": {"password_file": "p"}}, r"mqtt\.username: required"),
    ({"bridge": {"line": "L"}, "mqtt": {"payload": "xml"}}, r"mqtt\.payload: must be one of json, msgpack"),
    ({"bridge": {"line": "L"}, "mqtt": {"topic_prefix": "a/#"}}, r"mqtt\.topic_prefix"),
    ({"bridge": {"line": "L"}, "stream": {"endpoint": "tcp://host"}}, r"stream\.endpoint: must be tcp://HOST:PORT"),
    ({"bridge": {"line": "L"}, "stream": {"server_key": "s.key"}}, r"CURVE needs both"),
    ({"bridge": {"line": "L"}, "boxes": [{"endpoint": "tcp://a:1"}]}, r"boxes\[0\]\.name: required"),
    ({"bridge": {"line": "L"}, "boxes": [{"name": "a"}, {"name": "a"}]}, r"boxes\[1\]\.name: duplicate"),
])
def test_bad_configs_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        bridge_config_from_dict(data, "bridge.toml")


def test_check_config_cli(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text('[bridge]\nline = "L1"\n[mqtt]\nhost = "broker.plant"\n')
    assert cli_main(["bridge", "--config", str(good), "--check"]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('[bridge]\nline = "L1"\n[mqtt]\nport = 0\n')
    assert cli_main(["aggregate", "--config", str(bad), "--check"]) == 2
    assert "mqtt.port: must be >= 1" in capsys.readouterr().err
    assert load_bridge_config(good).mqtt.host == "broker.plant"


def test_topics_by_camera_and_generic_by_type():
    defect = {"camera": "cam0", "seq": 3}
    assert topics_for("coilsight", "L1", "box", "defect", defect) == ["coilsight/L1/cam0/defect"]
    summary = {"cameras": {"cam1": {}, "cam0": {}}, "seq": 4}
    assert topics_for("coilsight", "L1", "box", "summary", summary) == ["coilsight/L1/cam0/summary",
                                                                        "coilsight/L1/cam1/summary"]
    # A topic this bridge has never heard of is forwarded under its own name; without a camera, the agent's.
    assert topics_for("p/q", "L1", "box", "track", {"camera": "cam2"}) == ["p/q/L1/cam2/track"]
    assert topics_for("coilsight", "L1", "box", "periodic", {"coil": "c"}) == ["coilsight/L1/box/periodic"]
    # Names that could break a topic (wildcards, levels) never reach one.
    assert topics_for("coilsight", "L1", "a/b", "x/#", {"camera": "+"}) == ["coilsight/L1/agent/unknown"]


def test_payloads_json_and_msgpack():
    msg = {"v": 1, "type": "defect", "seq": 2**62, "ts_ns": 1763771523041000000, "bbox_px": [1, 2, 3, 4]}
    assert json.loads(encode_payload(msg, "json")) == msg  # 64-bit integers stay exact in JSON text
    assert msgpack.unpackb(encode_payload(msg, "msgpack")) == msg


def test_state_file_roundtrip_bad_file_and_lock(tmp_path):
    st = AckState(tmp_path, "bridge-L1-a", endpoint="tcp://x:1").lock()
    assert st.load() is None
    st.save(41)
    assert AckState(tmp_path, "bridge-L1-a", endpoint="tcp://x:1").load() == 41
    with pytest.raises(StateBusy, match="held by another bridge"):
        AckState(tmp_path, "bridge-L1-a", endpoint="tcp://x:1").lock()
    st.unlock()
    for bad in ('{"v": 1, "acked_seq": -1}', "not json", '{"v": 1, "acked_seq": true}', "x" * 5000):
        st.path.write_text(bad)
        fresh = AckState(tmp_path, "bridge-L1-a", endpoint="tcp://x:1")
        assert fresh.load() is None
        assert fresh.moved_aside is not None and fresh.moved_aside.exists() and not st.path.exists()
        fresh.moved_aside.unlink()


def test_relative_secret_names_come_from_the_credentials_directory(tmp_path, monkeypatch):
    from agent.bridge.config import credential_path, read_secret

    (tmp_path / "mqtt.password").write_text("from-systemd\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_secret("mqtt.password") == "from-systemd"
    assert credential_path("other.key") == "other.key"  # not there: taken as it is
    (tmp_path / "empty").write_text("")
    with pytest.raises(ConfigError, match="mqtt.password_file: .*empty is empty"):
        read_secret("empty")


def test_protocol_doc_coil_summary_example_matches_the_aggregator():
    """docs/protocol.md section 5: the example has exactly the keys merge_coil writes, per box too, and adds up."""
    import re
    from pathlib import Path

    from tests_support_events import check_accounting

    from agent.bridge.aggregate import merge_coil

    text = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    example = json.loads(re.search(r"```json example:coil_summary\n(.*?)```", text, re.S).group(1))
    box_a = {"agent": "coilsight-a", "seq": 412, "complete": True, "end_reason": "coil_end", "coil": "C",
             "final": True, "frames": example["frames"], "defect_count": 2, "defects": {"scratches": 2},
             "cameras": {"cam0": {k: v for k, v in example["cameras"]["cam0"].items() if k != "box"}},
             "length_mm": 25600.0, "end_reasons": ["coil_end"], "rejected_by_reason": {}, "missing_ranges": {}}
    merged = merge_coil("C240117-0042", {"box-a": box_a, "box-b": None}, line="L1", deadline_s=60.0,
                        merged_by="deadline", now_ns=example["ts_ns"])
    assert merged == example
    check_accounting(example)
    section = text.split("## 5. MQTT mapping", 1)[1].split("\n## ", 1)[0]
    for topic in ("P/<line>/<camera>/defect", "P/<line>/<camera>/summary", "P/<line>/all/summary", "P/<line>/status"):
        assert f"`{topic}`" in section
