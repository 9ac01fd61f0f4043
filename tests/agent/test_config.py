from __future__ import annotations

import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from agent.config import ConfigError, config_from_dict, dump_toml, config_dict, load_config

REPO = Path(__file__).resolve().parents[2]


def test_shipped_configs_are_valid():
    for path in sorted((REPO / "configs").glob("*.toml")):
        cfg = load_config(path)
        assert cfg.agent.profile


@pytest.mark.parametrize(
    "data, message",
    [
        ({"ingest": {"bogus": 1}}, r"ingest\.bogus: unknown key"),
        ({"ingest": {"max_queue_frames": 0}}, r"ingest\.max_queue_frames: must be >= 1, got 0"),
        ({"models": {"threads": "two"}}, r"models\.threads: must be an integer, got 'two'"),
        ({"agent": {"log_format": "xml"}}, r"agent\.log_format: must be one of auto, json, console"),
        ({"cameras": [{"mm_per_px_x": 1.0}]}, r"cameras\[0\]\.id: required"),
        ({"cameras": [{"id": "a"}, {"id": "a"}]}, r"cameras\[0\]\.id: duplicate camera id 'a'"),
        ({"models": {"backends": ["tensorrt", "magic"]}}, r"models\.backends\[1\]: unknown backend 'magic'"),
        ({"models": {"opt_batch": 16, "max_batch": 8}}, r"models\.opt_batch: must be <= models\.max_batch"),
        ({"publish": {"endpoint": "tcp://127.0.0.1:5555"}}, r"endpoint tcp://127.0.0.1:5555 is used twice"),
        ({"publish": "yes"}, r"publish: must be a table"),
        ({"ingest": {"endpoint": "http://x"}}, r"ingest\.endpoint: must start with tcp://"),
        ({"coil": {"budget_s": True}}, r"coil\.budget_s: must be a number, got True"),
    ],
)
def test_bad_config_names_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data, "x.toml")


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"ingest": {"bogus": 1, "rcvhwm": -1}, "coil": {"budget_s": "x"}})
    assert len(exc.value.errors) == 3


def test_toml_round_trip(tmp_path):
    cfg = load_config(REPO / "configs" / "steel.toml")
    p = tmp_path / "c.toml"
    p.write_text(dump_toml(config_dict(cfg)))
    again = load_config(p)
    assert config_dict(again) == config_dict(cfg)


def test_check_config_cli_prints_every_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[ingest]\nmax_queue_frames = 0\nbogus = 1\n[coil]\nbudget_s = "soon"\n')
    r = subprocess.run([sys.executable, "-m", "agent.cli", "check-config", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "ingest.max_queue_frames: must be >= 1" in r.stdout
    assert "ingest.bogus: unknown key" in r.stdout
    assert "coil.budget_s: must be a number" in r.stdout
    assert "3 error(s)" in r.stdout
    broken = tmp_path / "broken.toml"
    broken.write_text("[ingest\n")
    r = subprocess.run([sys.executable, "-m", "agent.cli", "check-config", str(broken)], capture_output=True, text=True)
    assert r.returncode == 1 and "not valid TOML" in r.stdout


def test_run_with_bad_config_exits_2_with_one_clear_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[models]\nmax_batch = 0\n")
    r = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(bad)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert "config error:" in r.stderr and "models.max_batch: must be >= 1" in r.stderr


# --- issue 16, item 14: numbers, names, endpoints; item 9: control and roles -------------------
@pytest.mark.parametrize("section, key, value", [
    ("coil", "budget_s", float("nan")),
    ("agent", "tick_s", float("nan")),
    ("publish", "heartbeat_s", float("inf")),
    ("models", "max_wait_ms", float("-inf")),
    ("ingest", "coil_idle_timeout_s", float("inf")),
])
def test_nan_and_inf_fail_every_bound(section, key, value):
    with pytest.raises(ConfigError, match=rf"{section}\.{key}: must be a finite number, got {value}"):
        config_from_dict({section: {key: value}})


def test_nan_in_a_toml_file_and_in_a_camera(tmp_path):
    p = tmp_path / "nan.toml"
    p.write_text("[coil]\nprovisional_at = nan\n[[cameras]]\nid = \"cam0\"\nmm_per_px_x = inf\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert [e.split(": ", 1)[1] for e in exc.value.errors] == [
        "coil.provisional_at: must be a finite number, got nan",
        "cameras[0].mm_per_px_x: must be a finite number, got inf"]


@pytest.mark.parametrize("name", ["../../etc", "..", ".", "a/b", "", ".hidden", "x" * 65, "line 3", "-x"])
def test_agent_name_cannot_leave_the_state_dir(name):
    with pytest.raises(ConfigError, match=r"agent\.name: must be 1-64 characters .* \(it names the journal "
                                          r"directory under the state dir\), got "):
        config_from_dict({"agent": {"name": name}})


def test_agent_name_accepts_protocol_names():
    assert config_from_dict({"agent": {"name": "coilsight-line_3.a:b"}}).agent.name == "coilsight-line_3.a:b"


@pytest.mark.parametrize("key, value, why", [
    ("agent.tick_s", 5.0, r"must be <= 1.0, got 5.0 \(the main loop pings the systemd watchdog"),
    ("agent.tick_s", 0.001, r"must be >= 0.02, got 0.001 \(.*under 20 ms it spins a CPU core"),
    ("publish.heartbeat_s", 60.0, (r"must be <= 10.0, got 60.0 \(subscribers see a gap, and a silent agent, "
                                   r"only through heartbeats")),
    ("publish.heartbeat_s", 0.001, r"must be >= 0.05, got 0.001 \(.*crowd the publisher thread"),
    ("models.max_wait_ms", 10_000.0, r"must be <= 5000.0, got 10000.0 \(.*systemd watchdog's stall time"),
])
def test_timing_bounds_say_why(key, value, why):
    section, field = key.split(".")
    with pytest.raises(ConfigError, match=rf"{key}: {why}"):
        config_from_dict({section: {field: value}})


@pytest.mark.parametrize("key, endpoint, message", [
    ("ingest.endpoint", "tcp://127.0.0.1:63OO", r"port '63OO' in 'tcp://127.0.0.1:63OO' is not an integer 1-65535"),
    ("publish.endpoint", "tcp://127.0.0.1:0", r"port '0' in .* is not an integer 1-65535"),
    ("publish.replay_endpoint", "tcp://127.0.0.1:65536", r"port '65536' in .* is not an integer 1-65535"),
    ("control.endpoint", "tcp://127.0.0.1:*", r"port '\*' in .* is not an integer 1-65535"),
    ("ingest.endpoint", "tcp://127.0.0.1", r"must be tcp://HOST:PORT, got 'tcp://127.0.0.1'"),
    ("ingest.endpoint", "tcp://:5555", r"must be tcp://HOST:PORT, got 'tcp://:5555'"),
    ("ingest.endpoint", "tcp://256.0.0.1:5555", r"host '256.0.0.1' in .* is not an IPv4 address"),
    ("ingest.endpoint", "tcp://[::zz]:5555", r"host '\[::zz\]' in .* is not an IPv6 address"),
    ("ingest.endpoint", "tcp://bad_host!:5555", r"host 'bad_host!' in .* is not an IP address, host or interface"),
    ("ingest.endpoint", "ipc://", r"ipc:// needs a socket path"),
    ("ingest.endpoint", "ipc:///" + "d" * 120, r"ipc path in 'ipc:///d+' is 121 bytes, longer than the 107 a socket takes"),
    ("ingest.endpoint", "inproc://", r"inproc:// needs a name"),
    ("publish.endpoint", "udp://127.0.0.1:5556", r"must start with tcp://, ipc:// or inproc://"),
])
def test_every_endpoint_is_validated(key, endpoint, message):
    section, field = key.split(".")
    with pytest.raises(ConfigError, match=rf"x.toml: {re.escape(key)}: {message}"):
        config_from_dict({section: {field: endpoint}}, "x.toml")


@pytest.mark.parametrize("endpoint", ["tcp://*:5555", "tcp://0.0.0.0:5555", "tcp://[::1]:5555", "tcp://eth1:5555",
                                      "tcp://line-box.plant:5555", "ipc:///run/coilsight/ingest.sock",
                                      "inproc://ingest"])
def test_good_endpoints_pass(endpoint):
    assert config_from_dict({"ingest": {"endpoint": endpoint}}).ingest.endpoint == endpoint


ROLE_DIRS = {"cameras_dir": "/k/cameras", "subscribers_dir": "/k/subscribers", "operators_dir": "/k/operators"}


@pytest.mark.parametrize("control, auth, message", [
    ("tcp://0.0.0.0:5558", {}, r"control\.endpoint: tcp://0.0.0.0:5558 binds the control socket on every interface"),
    ("tcp://*:5558", {"enabled": True, **ROLE_DIRS}, (r"control\.endpoint: tcp://\*:5558 binds the control socket "
                                                     r"on every interface")),
    ("tcp://[::]:5558", {}, r"binds the control socket on every interface"),
    ("tcp://10.20.0.5:5558", {}, (r"control\.endpoint: tcp://10.20.0.5:5558 is not loopback and auth.enabled is "
                                  r"false: anyone on that network could reload models")),
    ("tcp://eth0:5558", {}, r"is not loopback and auth.enabled is false"),
    ("ipc://@coilsight", {}, r"control\.endpoint: ipc://@coilsight is an abstract socket"),
])
def test_control_endpoint_is_never_open_to_the_network(control, auth, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"control": {"endpoint": control}, "auth": auth})


@pytest.mark.parametrize("control, auth", [
    ("tcp://127.0.0.1:5558", {}),
    ("tcp://[::1]:5558", {}),
    ("tcp://localhost:5558", {}),
    ("tcp://10.20.0.5:5558", {"enabled": True, **ROLE_DIRS}),  # CURVE, operator keys
    ("ipc:///run/coilsight/control.sock", {"enabled": True, "cameras_dir": "/k/c", "subscribers_dir": "/k/s"}),
])
def test_control_endpoints_that_pass(control, auth):
    assert config_from_dict({"control": {"endpoint": control}, "auth": auth}).control.endpoint == control


@pytest.mark.parametrize("auth, message", [
    ({"enabled": True, "allow_dir": "/k/all", "cameras_dir": "/k/c"},
     (r"auth\.allow_dir: the deprecated list for every role cannot be combined with auth\.cameras_dir; move its "
      r"keys into the role directories")),
    ({"enabled": True, "cameras_dir": "/k/c", "operators_dir": "/k/o"},
     (r"auth\.subscribers_dir: required when auth.enabled with per-role lists \(the publish and replay sockets "
      r"admit only subscriber keys\)")),
    ({"enabled": True, "subscribers_dir": "/k/s", "operators_dir": "/k/o"}, r"auth\.cameras_dir: required"),
    ({"enabled": True, "cameras_dir": "/k/c", "subscribers_dir": "/k/s"},
     (r"auth\.operators_dir: required for a tcp:// control endpoint with auth.enabled .*or put control.endpoint "
      r"on ipc://")),
])
def test_role_lists_are_complete_and_not_mixed_with_the_old_one(auth, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"auth": auth})


def test_old_single_allow_list_maps_to_every_role_with_a_warning(tmp_path):
    from agent.config import config_warnings

    cfg = config_from_dict({"auth": {"enabled": True}})  # an old config relying on the old default directory
    assert cfg.auth.allow_lists() == "/etc/coilsight/curve/clients"
    assert cfg.auth.role_dirs() == {r: "/etc/coilsight/curve/clients" for r in ("camera", "subscriber", "operator")}
    cfg = config_from_dict({"auth": {"enabled": True, "allow_dir": "/k/all"}})
    assert cfg.auth.allow_lists() == "/k/all"
    [warning] = config_warnings(cfg)
    assert "auth.allow_dir: deprecated: the keys in /k/all are admitted for every role" in warning
    assert config_warnings(config_from_dict({"auth": {"enabled": True, **ROLE_DIRS}})) == []
    assert config_from_dict({"auth": {"enabled": True, **ROLE_DIRS}}).auth.allow_lists() == {
        "camera": "/k/cameras", "subscriber": "/k/subscribers", "operator": "/k/operators"}
    old = tmp_path / "old.toml"
    old.write_text('[auth]\nenabled = true\nallow_dir = "/k/all"\n')
    r = subprocess.run([sys.executable, "-m", "agent.cli", "check-config", str(old)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout
    # the verdict on stdout, the warning on stderr (stdout carries only the result)
    assert f"{old}: warning: auth.allow_dir: deprecated" in r.stderr and f"{old}: ok" in r.stdout


def test_status_command_asks_for_an_operator_key_when_control_uses_curve(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(dump_toml({"auth": {"enabled": True, **ROLE_DIRS}}))
    r = subprocess.run([sys.executable, "-m", "agent.cli", "status", "--config", str(p)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert "the control socket tcp://127.0.0.1:5558 uses CURVE (auth.enabled): pass --key OPERATOR.key_secret" in r.stderr


def test_journal_keep_segments_is_a_real_setting(running_agent):
    with pytest.raises(ConfigError, match=r"journal\.keep_segments: must be >= 1, got 0"):
        config_from_dict({"journal": {"keep_segments": 0}})
    assert config_from_dict({}).journal.keep_segments == 16
    agent = running_agent(journal={"keep_segments": 3})
    assert agent.journal.keep_segments == 3


def test_config_keys_named_in_the_docs_exist():
    """docs/protocol.md once promised `journal.keep_segments` when there was no such key."""
    import dataclasses

    from agent.config import Config

    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    named = set()
    for doc in ("protocol.md", "deployment.md"):
        text = (REPO / "docs" / doc).read_text()
        named |= set(re.findall(rf"`((?:{'|'.join(sections)})\.[a-z_]+)`", text))
    assert "journal.keep_segments" in named
    hints = typing.get_type_hints(Config)
    for key in sorted(named):
        section, field = key.split(".")
        fields = {f.name for f in dataclasses.fields(hints[section])}
        assert field in fields, f"docs name `{key}`, which the config does not have"
