"""The bridge's and the aggregator's config file: its own TOML, checked like the agent's.

Strict in the same way as agent/config.py (whose field helper and checker it reuses): unknown keys
are errors, every number has bounds, every error names its key path. A separate file, not a section
of the agent's config, because the bridge is a separate process with its own unit and user and may
run on another host than the agent it reads.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import F, ConfigError, _build, endpoint_problem, read_toml

NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
# MQTT topic levels: no wildcards, no '/', no NUL (the protocol's name rule already keeps them out).
RESERVED_LEVELS = ("all", "status")


@dataclass(frozen=True)
class BridgeSection:
    line: str = F(doc="the plant line this box serves: <line> in every topic (1-64 of A-Z a-z 0-9 _ . : -)")
    state_dir: str = F("", doc="where the acknowledged-seq state file lives; empty = $STATE_DIRECTORY or "
                               "~/.local/state/coilsight-bridge")
    window: int = F(1000, lo=1, hi=20_000, doc="messages handed to the broker and not yet acknowledged (PUBACK); "
                                              "at the limit the bridge stops reading (the agent's journal holds the rest)",
                    why="paho numbers messages with 16-bit ids and a summary goes out once per camera")
    state_interval_s: float = F(0.5, lo=0.01, hi=60.0, doc="how often the acknowledged seq is written (fsynced); "
                                                         "a crash resends at most this long's messages")
    start: str = F("journal", choices=("journal", "now"),
                   doc="with no state file: forward everything the agent's journal still holds, or start now")
    log_format: str = F("auto", choices=("auto", "json", "console"))
    log_level: str = F("info", choices=("debug", "info", "warning", "error"))


@dataclass(frozen=True)
class SourceSection:
    """One agent's event stream (docs/protocol.md section 2)."""
    endpoint: str = F("tcp://127.0.0.1:5556", doc="the agent's PUB socket (publish.endpoint)")
    replay_endpoint: str = F("tcp://127.0.0.1:5557", doc="the agent's replay socket (publish.replay_endpoint)")
    name: str = F("", doc="the box's name in the aggregator's accounting; empty = the agent's name")
    server_key: str = F("", doc="CURVE: the agent's public key file (server.key); empty = CURVE off")
    client_key: str = F("", doc="CURVE: this subscriber's secret key file (role subscriber)")
    replay_timeout_s: float = F(3.0, lo=0.1, hi=60.0, doc="wait for a replay answer")


@dataclass(frozen=True)
class MqttSection:
    host: str = F("127.0.0.1", doc="the plant broker")
    port: int = F(1883, lo=1, hi=65_535)
    client_id: str = F("", doc="empty = coilsight-bridge-<line>-<source name or agent endpoint port>")
    keepalive_s: int = F(30, lo=5, hi=3600)
    topic_prefix: str = F("coilsight", doc="first topic level")
    payload: str = F("json", choices=("json", "msgpack"), doc="message bodies as JSON or as MessagePack")
    retain: tuple[str, ...] = F(("summary",), factory=None, doc="message types published retained")
    username: str = F("", doc="broker user name; empty = none")
    password_file: str = F("", doc="file holding the broker password (first line); $CREDENTIALS_DIRECTORY "
                                   "is searched for a relative name")
    tls: bool = F(False, doc="TLS to the broker")
    ca_file: str = F("", doc="CA certificate(s) that signed the broker's certificate; empty = the system's")
    cert_file: str = F("", doc="client certificate (PEM), when the broker requires one")
    key_file: str = F("", doc="client certificate's private key (PEM)")
    status_topic: str = F("", doc="where online/offline go; empty = <prefix>/<line>/status for the bridge, "
                                  "<prefix>/<line>/all/status for the aggregator (several boxes on one line: "
                                  "give each bridge its own, e.g. coilsight/<line>/<box>/status)")
    reconnect_max_s: float = F(5.0, lo=0.1, hi=300.0, doc="longest wait between reconnect attempts")


@dataclass(frozen=True)
class AggregateSection:
    deadline_s: float = F(60.0, lo=0.1, hi=86_400.0, doc="after the first box's final summary of a coil, the "
                                                        "other boxes have this long; then the coil is merged with "
                                                        "those that did not report shown as missing")
    late: str = F("republish", choices=("republish", "ignore"),
                  doc="a box's summary after its coil was merged: merge again and republish, or only log it")
    max_open_coils: int = F(1000, lo=1, hi=1_000_000, doc="coils waiting for boxes; the oldest is merged early")


@dataclass(frozen=True)
class BridgeConfig:
    bridge: BridgeSection = F(factory=lambda: BridgeSection(line=""))
    stream: SourceSection = F(factory=SourceSection, doc="the agent (its event stream) the bridge forwards")
    mqtt: MqttSection = F(factory=MqttSection)
    aggregate: AggregateSection = F(factory=AggregateSection)
    boxes: tuple[SourceSection, ...] = F(factory=tuple, doc="the aggregator's agents, one per camera group")
    source: str = field(default="<defaults>", compare=False)

    def state_path(self) -> Path:
        if self.bridge.state_dir:
            return Path(self.bridge.state_dir)
        env = os.environ.get("STATE_DIRECTORY", "").strip()
        if env:
            return Path(env.split(":")[0])
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "coilsight-bridge"


def _check_source(prefix: str, s: SourceSection, errors: list[str]) -> None:
    for key in ("endpoint", "replay_endpoint"):
        problem = endpoint_problem(getattr(s, key))
        if problem:
            errors.append(f"{prefix}.{key}: {problem}")
    if s.name and not NAME_RE.fullmatch(s.name):
        errors.append(f"{prefix}.name: must be 1-64 characters from A-Z a-z 0-9 _ . : -, got {s.name!r}")
    if bool(s.server_key) != bool(s.client_key):
        errors.append(f"{prefix}.server_key, {prefix}.client_key: CURVE needs both (the agent's public key and "
                      f"this subscriber's secret key), or neither")


def _cross_checks(cfg: BridgeConfig, errors: list[str]) -> None:
    if not cfg.bridge.line:
        errors.append("bridge.line: required (the <line> level of every topic)")
    elif not NAME_RE.fullmatch(cfg.bridge.line):
        errors.append(f"bridge.line: must be 1-64 characters from A-Z a-z 0-9 _ . : - (an MQTT topic level without "
                      f"wildcards), got {cfg.bridge.line!r}")
    m = cfg.mqtt
    if not re.fullmatch(r"[A-Za-z0-9_.:-]+(/[A-Za-z0-9_.:-]+)*", m.topic_prefix):
        errors.append(f"mqtt.topic_prefix: must be topic levels of A-Z a-z 0-9 _ . : - joined by '/', "
                      f"got {m.topic_prefix!r}")
    if m.status_topic and not re.fullmatch(r"[^#+\x00]{1,256}", m.status_topic):
        errors.append(f"mqtt.status_topic: must be a topic name without wildcards, got {m.status_topic!r}")
    if bool(m.cert_file) != bool(m.key_file):
        errors.append("mqtt.cert_file, mqtt.key_file: a client certificate needs both")
    if (m.ca_file or m.cert_file) and not m.tls:
        errors.append("mqtt.tls: must be true when mqtt.ca_file or mqtt.cert_file is set")
    if m.password_file and not m.username:
        errors.append("mqtt.username: required with mqtt.password_file")
    _check_source("stream", cfg.stream, errors)
    names = []
    for i, box in enumerate(cfg.boxes):
        _check_source(f"boxes[{i}]", box, errors)
        if not box.name:
            errors.append(f"boxes[{i}].name: required (the box's name in the coil summary's accounting)")
        elif box.name in names:
            errors.append(f"boxes[{i}].name: duplicate box name {box.name!r}")
        names.append(box.name)


def bridge_config_from_dict(data: dict, source: str = "<dict>") -> BridgeConfig:
    errors: list[str] = []
    raw_bridge = data.get("bridge")
    if isinstance(raw_bridge, dict) and "line" not in raw_bridge:
        data = {**data, "bridge": {**raw_bridge, "line": ""}}  # reported below with the reason
    cfg = _build(BridgeConfig, data, "", errors)
    if cfg is not None and not errors:
        _cross_checks(cfg, errors)
    if errors:
        raise ConfigError([f"{source}: {e}" for e in errors])
    return dataclasses.replace(cfg, source=source)


def load_bridge_config(path: str | Path) -> BridgeConfig:
    return bridge_config_from_dict(read_toml(path), str(path))


def credential_path(path: str) -> str:
    """A file the config names: a relative name is looked up in $CREDENTIALS_DIRECTORY (systemd's
    LoadCredential=, coilsight-bridge.service) first, then taken as it is."""
    if not path:
        return path
    p = Path(path)
    cred = os.environ.get("CREDENTIALS_DIRECTORY", "")
    if not p.is_absolute() and cred and (Path(cred) / p).exists():
        return str(Path(cred) / p)
    return path


def read_secret(path: str) -> str:
    """The first line of a secret file (credential_path). Raises ConfigError naming the file."""
    p = Path(credential_path(path))
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"mqtt.password_file: cannot read {p}: {getattr(exc, 'strerror', None) or exc}"]) from exc
    line = text.splitlines()[0] if text.splitlines() else ""
    if not line:
        raise ConfigError([f"mqtt.password_file: {p} is empty"])
    return line
