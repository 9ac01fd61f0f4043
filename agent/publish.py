"""The outbound stream: PUB socket, replay socket, heartbeat; journal before publish.

One thread owns the PUB and REP sockets and the journal. Producers call ``submit()``; the
thread takes what is queued, gives each message the next sequence number, writes the group to
the journal (fsync), then publishes it. A heartbeat on topic ``health`` carries the last
sequence number so a subscriber can see a gap even when no event follows (the ZeroMQ guide's
Clone pattern); the REP socket serves missed ranges from the journal, byte-identical.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

import msgpack
import structlog
import zmq

from agent.journal import Journal
from agent.protocol import PROTOCOL_VERSION, TOPICS, pack_body
from agent.threadnames import name_this_thread

log = structlog.get_logger(__name__)


class PublishError(RuntimeError):
    pass


class Publisher(threading.Thread):
    def __init__(self, ctx: zmq.Context, *, endpoint: str, replay_endpoint: str, journal: Journal, agent: str,
                 heartbeat_s: float, sndhwm: int, linger_ms: int, max_replay: int,
                 health: Callable[[], dict] | None = None, on_published: Callable[[str, dict], None] | None = None,
                 socket_setup: Callable[[zmq.Socket, str], Any] | None = None, queue_size: int = 10_000):
        super().__init__(name="publisher", daemon=True)
        self.ctx = ctx
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.journal = journal
        self.agent = agent
        self.heartbeat_s = heartbeat_s
        self.sndhwm = sndhwm
        self.linger_ms = linger_ms
        self.max_replay = max_replay
        self.health = health or (lambda: {})
        self.on_published = on_published
        self.socket_setup = socket_setup
        # (topic, body, wall ns at submit): the stamp says how far back the crash checkpoint must
        # reach to hold everything not yet journaled (oldest_unjournaled_ns)
        self._q: queue.Queue[tuple[str, dict, int]] = queue.Queue(maxsize=queue_size)
        self._taken_oldest_ns: int | None = None  # the group being journaled: its oldest submit stamp
        self._halt = threading.Event()
        self.bound = threading.Event()
        self.error: BaseException | None = None
        self.published = 0
        self.last_published_seq = journal.last_seq
        self.pub_endpoint_bound: str | None = None
        self.replay_endpoint_bound: str | None = None
        self._republish: list[tuple[int, bytes, bytes]] = []

    # -- producer side ----------------------------------------------------------------------
    def submit(self, topic: str, body: dict, timeout: float = 5.0) -> None:
        """Queue a durable message (defect or summary). Blocks while the queue is full: an
        event is never dropped here; the caller's own bounded queues apply back-pressure."""
        if topic not in ("defect", "summary"):
            raise ValueError(f"topic {topic!r} is not durable; use defect or summary")
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._q.put((topic, body, time.time_ns()), timeout=0.2)
                return
            except queue.Full:
                if self._halt.is_set() or not self.is_alive():
                    raise PublishError("publisher stopped; message not queued") from None
                if time.monotonic() > deadline:
                    log.warning("publish_queue_full_waiting", depth=self._q.qsize())
                    deadline = time.monotonic() + timeout

    def republish_from(self, first_seq: int) -> int:
        """After a restart: send again what was journaled but maybe not delivered (same seq)."""
        # Newest first matters: a lost watermark must not replay the whole journal into memory.
        first_seq = max(first_seq, self.journal.last_seq - 10_000 + 1)
        records = self.journal.read(first_seq, self.journal.last_seq, limit=10_000)
        self._republish = records
        return len(records)

    def queue_depth(self) -> int:
        return self._q.qsize()

    def oldest_unjournaled_ns(self) -> int | None:
        """Wall time (ns) at which the oldest message not yet in the journal was submitted; None
        when everything submitted is journaled. A stalled disk (fsync) can hold messages here far
        longer than the checkpoint's usual window, and a crash must not lose them (agent/recovery.py)."""
        # The queue's head first, then the group in flight: _take stamps the group before it takes
        # the head off the queue, so reading in this order cannot miss a message between the two.
        with self._q.mutex:
            head = self._q.queue[0][2] if self._q.queue else None
        taken = self._taken_oldest_ns
        stamps = [t for t in (head, taken) if t is not None]
        return min(stamps) if stamps else None

    def stop(self, timeout: float = 5.0) -> None:
        self._halt.set()
        self.join(timeout)

    # -- thread -----------------------------------------------------------------------------
    def run(self) -> None:
        name_this_thread()
        try:
            self._run()
        except BaseException as exc:  # surfaced to the main loop, which exits non-zero
            self.error = exc
            log.exception("publisher_failed")

    def _run(self) -> None:
        pub = self.ctx.socket(zmq.PUB)
        rep = self.ctx.socket(zmq.REP)
        for s in (pub, rep):
            s.setsockopt(zmq.LINGER, self.linger_ms)
            s.setsockopt(zmq.SNDTIMEO, 1000)
        pub.setsockopt(zmq.SNDHWM, self.sndhwm)
        rep.setsockopt(zmq.MAXMSGSIZE, 4096)
        watches = []  # agent.auth.HandshakeWatch per socket when CURVE is on: refused peers are logged
        if self.socket_setup:
            watches = [w for w in (self.socket_setup(pub, "publish"), self.socket_setup(rep, "replay")) if w]
        pub.bind(self.endpoint)
        rep.bind(self.replay_endpoint)
        self.pub_endpoint_bound = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.replay_endpoint_bound = rep.getsockopt_string(zmq.LAST_ENDPOINT)
        self.bound.set()
        poller = zmq.Poller()
        poller.register(rep, zmq.POLLIN)
        next_hb = 0.0
        try:
            for seq, topic, body in self._republish:
                pub.send_multipart([topic, body], copy=False)
                self.last_published_seq = max(self.last_published_seq, seq)
            if self._republish:
                log.info("journal_republished", count=len(self._republish))
            self._republish = []
            while True:
                items = self._take(wait=0.02)
                if items:
                    self._publish(pub, items)
                for w in watches:
                    w.drain()
                if dict(poller.poll(0)).get(rep):
                    self._serve_replay(rep)
                now = time.monotonic()
                if now >= next_hb:
                    self._heartbeat(pub)
                    next_hb = now + self.heartbeat_s
                if self._halt.is_set() and self._q.empty():
                    self._heartbeat(pub)
                    break
        finally:
            for w in watches:
                w.close()
            pub.close(linger=self.linger_ms)
            rep.close(linger=0)

    def _take(self, wait: float) -> list[tuple[str, dict, int]]:
        with self._q.mutex:  # stamp the group before its head leaves the queue
            if self._q.queue:
                self._taken_oldest_ns = self._q.queue[0][2]
        try:
            items = [self._q.get(timeout=wait)]
        except queue.Empty:
            return []
        if self._taken_oldest_ns is None:  # came in while waiting: it is fresh
            self._taken_oldest_ns = items[0][2]
        while len(items) < 512:
            try:
                items.append(self._q.get_nowait())
            except queue.Empty:
                break
        return items

    def _publish(self, pub: zmq.Socket, items: list[tuple[str, dict, int]]) -> None:
        first = self.journal.last_seq + 1
        now_ns = time.time_ns()
        packed = []
        for i, (topic, body, _) in enumerate(items):
            full = {"v": PROTOCOL_VERSION, "type": topic, "agent": self.agent, "seq": first + i, "ts_ns": now_ns,
                    **body}
            packed.append((TOPICS[topic], pack_body(full)))
        seqs = self.journal.append_many(packed)
        self._taken_oldest_ns = None  # journaled: a restart finds them there
        if seqs[0] != first:
            raise PublishError(f"journal handed out seq {seqs[0]}, expected {first}")
        for (topic_b, body_b), (topic, body, _) in zip(packed, items):
            pub.send_multipart([topic_b, body_b], copy=False)
            if self.on_published:
                self.on_published(topic, body)
        self.published += len(items)
        self.last_published_seq = seqs[-1]

    def _heartbeat(self, pub: zmq.Socket) -> None:
        body = {"v": PROTOCOL_VERSION, "type": "health", "agent": self.agent, "seq": self.journal.last_seq,
                "ts_ns": time.time_ns(), "first_seq": self.journal.first_seq, **self.health()}
        try:
            pub.send_multipart([TOPICS["health"], pack_body(body)], flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("heartbeat_not_sent")

    def _serve_replay(self, rep: zmq.Socket) -> None:
        raw = rep.recv()
        try:
            req = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_str_len=64, max_bin_len=0,
                                  max_array_len=0, max_map_len=8, max_ext_len=0)
            if not isinstance(req, dict) or req.get("v") != PROTOCOL_VERSION or req.get("type") != "replay":
                raise ValueError("expected {v: 1, type: replay, from, to}")
            absent = [k for k in ("from", "to") if k not in req]
            if absent:
                raise ValueError(f"the replay request has no {' and no '.join(repr(k) for k in absent)} key; "
                                 "send {v: 1, type: replay, from: FIRST, to: LAST} (both inclusive)")
            first, last = req["from"], req["to"]
            if not (isinstance(first, int) and isinstance(last, int)) or first < 1 or last < first:
                raise ValueError("from and to must be integers with 1 <= from <= to")
        except (ValueError, KeyError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            rep.send(pack_body({"v": PROTOCOL_VERSION, "type": "replay", "error": str(exc)[:200]}))
            log.warning("replay_request_rejected", error=str(exc)[:200])
            return
        records = self.journal.read(first, last, limit=self.max_replay)
        meta = {"v": PROTOCOL_VERSION, "type": "replay", "from": first, "to": last, "count": len(records),
                "first_seq": self.journal.first_seq, "last_seq": self.journal.last_seq}
        frames: list[Any] = [pack_body(meta)]
        for _, topic, body in records:
            frames += [topic, body]
        rep.send_multipart(frames)
        log.info("replay_served", first=first, last=last, count=len(records))
