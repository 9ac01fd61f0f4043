"""The MQTT side: topic names, payloads, and one paho client with QoS 1 acknowledgements.

Topics (docs/protocol.md, "MQTT mapping"), with P = ``mqtt.topic_prefix`` (default ``coilsight``):

* ``P/<line>/<camera>/<type>`` for every durable message the agent publishes, ``<type>`` being its
  topic name (``defect``, ``summary``, and any topic a later v1 agent adds, e.g. ``periodic``,
  ``track``): forwarded generically by name. ``<camera>`` is the message's ``camera``; a message
  that names several cameras (a ``summary``: its ``cameras`` map) goes to each of them, the same
  body and seq each time, so one camera's topics carry every message about that camera in seq
  order; a message naming no camera goes to ``P/<line>/<agent>/<type>``.
* ``P/<line>/all/summary``: the aggregator's coil summary across boxes (retained).
* ``P/<line>/status``: ``online`` (retained) on connect, ``offline`` (retained) as the last will
  and at a clean stop.

paho's network thread calls ``on_publish`` while it holds paho's own lock, so the callback only
puts the message id on a queue; the bridge's thread takes acknowledgements from there.
"""
from __future__ import annotations

import json
import queue
import ssl
from typing import Any

import msgpack
import structlog

from agent.bridge.config import NAME_RE, BridgeConfig, MqttSection, credential_path, read_secret

log = structlog.get_logger(__name__)


class MqttSetupError(RuntimeError):
    """The broker connection cannot be set up as configured (a TLS or credential file)."""


def topics_for(prefix: str, line: str, agent: str, topic: str, msg: dict) -> list[str]:
    """The MQTT topics one agent message goes to (see the module docstring)."""
    cam = msg.get("camera")
    if isinstance(cam, str) and NAME_RE.fullmatch(cam):
        levels = [cam]
    elif isinstance(msg.get("cameras"), dict) and msg["cameras"]:
        levels = sorted(c for c in msg["cameras"] if isinstance(c, str) and NAME_RE.fullmatch(c))
    else:
        levels = []
    if not levels:
        levels = [agent if isinstance(agent, str) and NAME_RE.fullmatch(agent) else "agent"]
    kind = topic if NAME_RE.fullmatch(topic) else "unknown"
    return [f"{prefix}/{line}/{level}/{kind}" for level in levels]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray)):
        return obj.hex()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def encode_payload(msg: dict, kind: str) -> bytes:
    """The message body as JSON (UTF-8, compact; 64-bit integers as JSON numbers) or MessagePack."""
    if kind == "msgpack":
        return msgpack.packb(msg, use_bin_type=True)
    return json.dumps(msg, separators=(",", ":"), ensure_ascii=False, default=_json_default).encode()


class MqttLink:
    """One paho-mqtt (v2 callback API) client: QoS 1, status topic with a last will, TLS, credentials."""

    def __init__(self, m: MqttSection, *, client_id: str, status_topic: str):
        import paho.mqtt.client as mqtt

        self.m = m
        self.status_topic = status_topic
        self.acks: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.connected = False
        self.connects = 0
        self.disconnects = 0
        self.refused: str | None = None
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
                        protocol=mqtt.MQTTv311)
        c.max_inflight_messages_set(0)  # the bridge bounds what is in flight (bridge.window)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(min_delay=0.1, max_delay=max(0.1, m.reconnect_max_s))
        c.will_set(status_topic, b"offline", qos=1, retain=True)
        if m.username:
            c.username_pw_set(m.username, read_secret(m.password_file) if m.password_file else None)
        if m.tls:
            try:
                ctx = ssl.create_default_context(cafile=credential_path(m.ca_file) or None)
                if m.cert_file:
                    ctx.load_cert_chain(credential_path(m.cert_file), credential_path(m.key_file))
            except (OSError, ssl.SSLError) as exc:
                raise MqttSetupError(f"mqtt TLS files (ca_file={m.ca_file!r}, cert_file={m.cert_file!r}, "
                                     f"key_file={m.key_file!r}): {exc}") from None
            c.tls_set_context(ctx)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        self.client = c

    def start(self) -> None:
        """Connect in the background; paho's thread reconnects after every loss."""
        self.client.connect_async(self.m.host, self.m.port, keepalive=self.m.keepalive_s)
        self.client.loop_start()

    def _on_connect(self, client, _userdata, _flags, reason_code, _props) -> None:
        if reason_code.is_failure:
            self.refused = str(reason_code)
            log.error("mqtt_connect_refused", host=self.m.host, port=self.m.port, reason=str(reason_code))
            return
        self.connected = True
        self.connects += 1
        self.refused = None
        client.publish(self.status_topic, b"online", qos=1, retain=True)
        log.info("mqtt_connected", host=self.m.host, port=self.m.port, connects=self.connects)

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _props) -> None:
        if self.connected:
            self.disconnects += 1
            log.warning("mqtt_disconnected", reason=str(reason_code), disconnects=self.disconnects)
        self.connected = False

    def _on_publish(self, _client, _userdata, mid, _reason_code, _props) -> None:
        self.acks.put(mid)

    def publish(self, topic: str, payload: bytes, *, retain: bool) -> int:
        """Queue one QoS 1 message (sent now, or after the next connect); returns its message id.
        Raises ValueError for a message paho refuses outright."""
        import paho.mqtt.client as mqtt

        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise ValueError(f"paho refused the message: {mqtt.error_string(info.rc)}")
        return info.mid

    def stop(self, timeout_s: float = 2.0) -> None:
        """Say ``offline`` (retained), then disconnect (no last will is sent after a clean disconnect)."""
        try:
            if self.connected:
                info = self.client.publish(self.status_topic, b"offline", qos=1, retain=True)
                info.wait_for_publish(timeout=timeout_s)
        except (RuntimeError, ValueError):
            pass
        self.client.disconnect()
        self.client.loop_stop()


def client_id(cfg: BridgeConfig, role: str) -> str:
    if cfg.mqtt.client_id:
        return cfg.mqtt.client_id
    port = cfg.stream.endpoint.rpartition(":")[2] if role == "bridge" else "agg"
    return f"coilsight-{role}-{cfg.bridge.line}-{cfg.stream.name or port}"[:128]
