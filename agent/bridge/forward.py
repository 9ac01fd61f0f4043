"""`coilsight bridge`: one agent's event stream into the plant's MQTT broker, at least once.

A plain subscriber of the agent (docs/protocol.md section 2): it connects a SUB socket and asks the
replay socket for what it missed, exactly like any other subscriber, so it adds no work to the
agent's inference path (the agent publishes each message once, whoever listens).

Delivery, in seq order from one thread:

1. a durable message (any topic but ``health``) is published QoS 1 to its topics (agent.bridge.mqtt);
2. its seq counts as delivered when the broker acknowledged (PUBACK) every copy of it; the highest
   seq below which everything is acknowledged (``acked_seq``) is written to the state file
   (agent.bridge.state) at most every ``bridge.state_interval_s``;
3. at most ``bridge.window`` messages are unacknowledged: at the limit the bridge stops reading the
   agent, whose journal keeps everything; what the SUB socket drops meanwhile comes back through
   the replay socket (gap repair, agent.subscriber), in chunks of at most 1,000 messages;
4. while the broker is away paho keeps the unacknowledged messages and sends them again, in order,
   after it reconnects; after a restart of the bridge (SIGKILL included) it resumes at
   ``acked_seq + 1`` from the agent's journal. A consumer may see a message twice, always with its
   original ``seq``: it drops any seq it already holds.

No input ends the loop: a message that cannot be read or published is counted and logged (at a
bounded rate), a replay that fails is retried.
"""
from __future__ import annotations

import collections
import queue
import threading
import time
from typing import Iterator

import structlog
import zmq

from agent.bridge.config import BridgeConfig, SourceSection, credential_path
from agent.bridge.mqtt import MqttLink, client_id, encode_payload, topics_for
from agent.bridge.state import AckState
from agent.metrics import RateLimitedLog
from agent.protocol import unpack_body
from agent.subscriber import Subscriber

log = structlog.get_logger(__name__)
_err_log = RateLimitedLog(log, per_s=0.5, burst=5)
REPLAY_CHUNK = 1000


def curve_setup(src: SourceSection):
    """A socket_setup that makes each socket a CURVE client (role subscriber), or None."""
    if not src.server_key:
        return None
    from agent.auth import make_curve_client

    def setup(sock: zmq.Socket) -> None:
        make_curve_client(sock, credential_path(src.client_key), credential_path(src.server_key))

    return setup


class StreamSubscriber(Subscriber):
    """agent.subscriber.Subscriber for every topic, yielding None when idle so its caller stays in
    charge (stop flag, acknowledgements), and repairing a gap in chunks pulled lazily."""

    def __init__(self, src: SourceSection, *, from_seq: int | None, clamp_to_journal: bool,
                 ctx: zmq.Context | None = None):
        super().__init__(src.endpoint, src.replay_endpoint, topics=(), from_seq=from_seq, ctx=ctx,
                         socket_setup=curve_setup(src), replay_timeout_ms=int(src.replay_timeout_s * 1000))
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")  # any topic a v1 agent adds (periodic, track, ...)
        self.clamp_to_journal = clamp_to_journal  # no state file: begin at the journal's first seq
        self.health: dict | None = None
        self.bad = 0
        self.seen_max: int | None = None  # the highest seq seen: a failed repair is retried up to it

    def _emit(self, items: list[tuple[str, dict]]) -> Iterator[tuple[str, dict]]:
        for topic, msg in items:
            if self.next_seq is not None and msg["seq"] < self.next_seq:
                continue
            self.next_seq = msg["seq"] + 1
            yield topic, msg

    def _chunked_fill(self, first: int, last: int) -> Iterator[tuple[str, dict]]:
        for a in range(first, last + 1, REPLAY_CHUNK):
            yield from self._fill(max(a, self.next_seq or a), min(last, a + REPLAY_CHUNK - 1))

    def polled(self, poll_ms: int = 100) -> Iterator[tuple[str, dict] | None]:
        """(topic, body) in seq order without gaps, or None after poll_ms idle. After a failure (a
        replay without answer) call again: it first repairs the gap it knows of, without waiting
        for the next message or heartbeat to show it."""
        if self.seen_max is not None and self.next_seq is not None and self.seen_max >= self.next_seq:
            yield from self._chunked_fill(self.next_seq, self.seen_max)
        poller = zmq.Poller()
        poller.register(self.sub, zmq.POLLIN)
        while True:
            if not poller.poll(poll_ms):
                yield None
                continue
            parts = self.sub.recv_multipart()
            try:
                if len(parts) != 2:
                    raise ValueError(f"{len(parts)} parts, not [topic, body]")
                topic = parts[0].decode()
                msg = unpack_body(parts[1])
                seq = msg.get("seq")
                if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
                    raise ValueError(f"seq {seq!r} is not a non-negative integer")
            except Exception as exc:  # noqa: BLE001 - hostile or garbled input: count, log, go on
                self.bad += 1
                _err_log.warning("bridge_bad_message", error=str(exc)[:200], bad=self.bad)
                continue
            if topic != "health" or self.next_seq is not None:
                self.seen_max = seq if self.seen_max is None else max(self.seen_max, seq)
            if topic == "health":
                self._on_health(msg)
                if self.next_seq is not None and seq >= self.next_seq:
                    yield from self._chunked_fill(self.next_seq, seq)
                continue
            if self.clamp_to_journal and self.health is None:
                continue  # first start: the heartbeat says where the journal begins; the gap is filled then
            if self.next_seq is None:
                self.next_seq = seq
            if seq < self.next_seq:
                continue
            if seq > self.next_seq:
                yield from self._chunked_fill(self.next_seq, seq - 1)
            yield from self._emit([(topic, msg)])

    def _on_health(self, msg: dict) -> None:
        first = self.health is None
        self.health = msg
        if not first:
            return
        seq, journal_first = msg.get("seq"), msg.get("first_seq")
        if self.next_seq is None and isinstance(seq, int):
            self.next_seq = seq + 1  # bridge.start = "now"
            log.info("bridge_starting_now", next_seq=self.next_seq)
        elif self.clamp_to_journal and isinstance(journal_first, int) and journal_first > (self.next_seq or 0):
            log.info("bridge_starting_at_journal", first_seq=journal_first)
            self.next_seq = journal_first
        elif isinstance(seq, int) and self.next_seq is not None and seq + 1 < self.next_seq:
            log.warning("bridge_state_ahead_of_agent", agent_seq=seq, next_seq=self.next_seq,
                        note="the agent's journal was reset or this is another agent: messages up to next_seq "
                             "are skipped; remove the state file to forward them")


class Bridge:
    def __init__(self, cfg: BridgeConfig, *, stop: threading.Event | None = None):
        self.cfg = cfg
        self.stop = stop or threading.Event()
        b = cfg.bridge
        name = cfg.stream.name or cfg.stream.endpoint.rpartition(":")[2].replace("/", "_")
        self.state = AckState(cfg.state_path(), f"bridge-{b.line}-{name}", endpoint=cfg.stream.endpoint)
        self.pending: collections.OrderedDict[int, int] = collections.OrderedDict()  # seq -> copies unacked
        self.mids: dict[int, int] = {}  # paho message id -> seq
        self.acked: int | None = None
        self.stats = collections.Counter()
        self.link: MqttLink | None = None

    def status_topic(self) -> str:
        m = self.cfg.mqtt
        return m.status_topic or f"{m.topic_prefix}/{self.cfg.bridge.line}/status"

    # -- acknowledgements --------------------------------------------------------------------
    def _take_acks(self, wait_s: float = 0.0) -> None:
        try:
            mid = self.link.acks.get(timeout=wait_s) if wait_s else self.link.acks.get_nowait()
        except queue.Empty:
            return
        while True:
            seq = self.mids.pop(mid, None)
            if seq is not None and seq in self.pending:
                self.pending[seq] -= 1
                self.stats["acks"] += 1
            try:
                mid = self.link.acks.get_nowait()
            except queue.Empty:
                break
        self._advance()

    def _advance(self) -> None:
        while self.pending:
            seq, left = next(iter(self.pending.items()))
            if left > 0:
                return
            self.pending.popitem(last=False)
            self.acked = seq

    # -- forwarding ----------------------------------------------------------------------------
    def forward(self, topic: str, msg: dict) -> None:
        m = self.cfg.mqtt
        seq = msg["seq"]
        self.pending[seq] = 0
        try:
            payload = encode_payload(msg, m.payload)
        except (TypeError, ValueError) as exc:
            self.stats["unencodable"] += 1
            _err_log.error("bridge_message_unencodable", seq=seq, topic=topic, error=str(exc)[:200])
            payload = None
        if payload is not None:
            agent = msg.get("agent", "")
            for t in topics_for(m.topic_prefix, self.cfg.bridge.line, agent, topic, msg):
                try:
                    mid = self.link.publish(t, payload, retain=topic in m.retain)
                except (ValueError, TypeError) as exc:
                    self.stats["unpublishable"] += 1
                    _err_log.error("bridge_message_unpublishable", seq=seq, topic=t, error=str(exc)[:200])
                    continue
                self.mids[mid] = seq
                self.pending[seq] += 1
                self.stats["published"] += 1
        self.stats["forwarded"] += 1
        self._advance()

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> int:
        cfg = self.cfg
        self.state.lock()
        try:
            saved = self.state.load()
            self.acked = saved
            from_seq = saved + 1 if saved is not None else (1 if cfg.bridge.start == "journal" else None)
            log.info("bridge_starting", line=cfg.bridge.line, agent=cfg.stream.endpoint, broker=cfg.mqtt.host,
                     port=cfg.mqtt.port, state=str(self.state.path), resume_from=from_seq)
            self.link = MqttLink(cfg.mqtt, client_id=client_id(cfg, "bridge"), status_topic=self.status_topic())
            self.link.start()
            sub = StreamSubscriber(cfg.stream, from_seq=from_seq, clamp_to_journal=saved is None)
            try:
                self._loop(sub)
            finally:
                self._drain(timeout_s=3.0)
                self._save(force=True)
                self.link.stop()
                sub.close()
                log.info("bridge_stopped", acked_seq=self.acked, **self.stats, gaps=sub.gaps,
                         replayed=sub.replayed, unrecoverable=sub.unrecoverable, bad_messages=sub.bad,
                         mqtt_disconnects=self.link.disconnects)
        finally:
            self.state.unlock()
        return 0

    def _save(self, force: bool = False) -> None:
        if self.acked is None:
            return
        try:
            self.state.save(self.acked)
        except OSError as exc:  # a full disk: keep forwarding; a restart resends more
            _err_log.error("bridge_state_not_saved", path=str(self.state.path), error=exc.strerror)

    def _loop(self, sub: StreamSubscriber) -> None:
        it = sub.polled()
        window = self.cfg.bridge.window
        next_save = next_stats = time.monotonic()
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= next_save:
                self._save()
                next_save = now + self.cfg.bridge.state_interval_s
            if now >= next_stats:
                if self.stats:
                    log.info("bridge_stats", acked_seq=self.acked, in_flight=len(self.pending),
                             connected=self.link.connected, gaps=sub.gaps, **self.stats)
                next_stats = now + 30.0
            if len(self.pending) >= window:
                self._take_acks(wait_s=0.1)
                continue
            self._take_acks()
            try:
                item = next(it)
            except Exception as exc:  # noqa: BLE001 - a replay that failed (agent away), a garbled reply
                self.stats["loop_errors"] += 1
                _err_log.warning("bridge_read_failed", error=str(exc)[:300], next_seq=sub.next_seq)
                self.stop.wait(0.5)
                it = sub.polled()
                continue
            if item is not None:
                self.forward(*item)

    def _drain(self, timeout_s: float) -> None:
        """At a clean stop, give the broker a moment to acknowledge what is in flight."""
        deadline = time.monotonic() + timeout_s
        while self.pending and time.monotonic() < deadline and self.link.connected:
            self._take_acks(wait_s=0.1)
