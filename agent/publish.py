"""The outbound stream: PUB socket, replay socket, heartbeat; journal before publish.

One thread owns the PUB and replay sockets and the journal. Producers call ``submit()``; the
thread takes what is queued, gives each message the next sequence number, writes the group to
the journal (fsync), then publishes it. A heartbeat on topic ``health`` carries the last
sequence number so a subscriber can see a gap even when no event follows (the ZeroMQ guide's
Clone pattern); the replay socket serves missed ranges from the journal, byte-identical.

The replay socket is a ROUTER (REQ peers see a REP): a bad request of any shape is answered with
an error and counted, a reply is at most ``max_replay`` messages and ``REPLAY_MAX_BYTES``, and a
peer that does not read its replies gets at most ``ROUTER_SNDHWM`` of them queued: the rest are
dropped and counted (``replay_replies_dropped``), never blocking this thread or piling up.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

import msgpack
import structlog
import zmq

from agent.binding import BindError, bind
from agent.guard import LoopGuard, recv_request, router_socket, send_reply
from agent.journal import Journal, JournalFull
from agent.metrics import RateLimiter
from agent.protocol import PROTOCOL_VERSION, TOPICS, pack_body, str_keys
from agent.threadnames import name_this_thread

log = structlog.get_logger(__name__)

REPLAY_MAX_BYTES = 16 << 20  # one reply's bodies at most (always at least one message)


class PublishError(RuntimeError):
    pass


class Publisher(threading.Thread):
    def __init__(self, ctx: zmq.Context, *, endpoint: str, replay_endpoint: str, journal: Journal, agent: str,
                 heartbeat_s: float, sndhwm: int, linger_ms: int, max_replay: int,
                 health: Callable[[], dict] | None = None, on_published: Callable[[str, dict], None] | None = None,
                 socket_setup: Callable[[zmq.Socket, str], Any] | None = None, queue_size: int = 10_000,
                 on_loop_error: Callable[[str, str], None] | None = None,
                 on_reply_dropped: Callable[[str], None] | None = None, layer: Any = None):
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
        self.replay_requests = 0
        self.replay_rejected = 0  # bad requests, answered with an error
        self.replay_dropped = 0  # replies a peer did not take (gone, or not reading)
        self._replay_log = RateLimiter(per_s=1.0, burst=10)
        self._served_log = RateLimiter(per_s=2.0, burst=20)  # a flood of requests must not flood the log
        self.on_reply_dropped = on_reply_dropped
        # last resort around each replay request and heartbeat: no peer can end this thread
        self.guard = LoopGuard("publisher", max_consecutive=1000, on_error=on_loop_error)
        # Messages taken from the queue that the journal could not take (JournalFull: the disk is
        # full and its in-memory bound reached): retried before anything newer, never dropped.
        self._stalled: list[tuple[str, dict, int]] = []
        # The coil layer (agent/intel.CoilIntel): tracks, periodic series and the summary's grade,
        # computed here, where each defect's seq is known; None = off (coil.stitch.enabled false).
        self.layer = layer
        self.layer_errors = 0
        self._layer_log = RateLimiter(per_s=1.0, burst=10)

    # -- producer side ----------------------------------------------------------------------
    def submit(self, topic: str, body: dict, timeout: float = 5.0) -> None:
        """Queue a durable message (defect or summary). Blocks while the queue is full: an
        event is never dropped here; the caller's own bounded queues apply back-pressure."""
        if topic not in ("defect", "summary"):
            raise ValueError(f"topic {topic!r} is not durable; use defect or summary")
        self._put(topic, body, timeout)

    def note_frames(self, frames: dict, timeout: float = 5.0) -> None:
        """Frames through the models, {(coil, camera): [index, ...]}, after their events: the coil
        layer closes tracks that got no part in their next frame. Not published, not journaled."""
        if self.layer is not None:
            self._put("_frames", {"frames": frames}, timeout)

    def _put(self, topic: str, body: dict, timeout: float) -> None:
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
        pub.setsockopt(zmq.LINGER, self.linger_ms)
        pub.setsockopt(zmq.SNDTIMEO, 1000)
        pub.setsockopt(zmq.SNDHWM, self.sndhwm)
        rep = router_socket(self.ctx, max_msg_bytes=4096)
        watches = []  # agent.auth.HandshakeWatch per socket when CURVE is on: refused peers are logged
        if self.socket_setup:
            watches = [w for w in (self.socket_setup(pub, "publish"), self.socket_setup(rep, "replay")) if w]
        try:  # a failed bind must not leave these open: the context could never terminate
            self.pub_endpoint_bound = bind(pub, self.endpoint, "publish")
            self.replay_endpoint_bound = bind(rep, self.replay_endpoint, "replay")
        except BindError:
            pub.close(linger=0)
            rep.close(linger=0)
            raise
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
            halt_seen = None
            while True:
                items = self._stalled or self._expand(self._take(wait=0.02))
                if items:
                    self._publish(pub, items)
                else:
                    self.journal.flush_held()  # a full disk freed: held records land with no new message
                if self._stalled:
                    time.sleep(0.02)
                for w in watches:
                    w.drain()
                for _ in range(8 if dict(poller.poll(0)).get(rep) else 0):  # a few requests per turn
                    try:
                        if not self._serve_replay(rep):
                            break
                        self.guard.ok()
                    except Exception as exc:  # last resort: counted, logged (bounded), the loop goes on
                        self.guard.failed(exc, socket="replay")
                now = time.monotonic()
                if now >= next_hb:
                    next_hb = now + self.heartbeat_s
                    try:
                        self._heartbeat(pub)
                    except Exception as exc:
                        self.guard.failed(exc, socket="publish")
                if self._halt.is_set() and self._q.empty() and not self._stalled:
                    self._heartbeat(pub)
                    break
                if self._halt.is_set():
                    halt_seen = halt_seen or time.monotonic()
                    if self._stalled and time.monotonic() - halt_seen > 2.0:
                        log.error("publish_stopped_with_messages_unjournaled",
                                  messages=len(self._stalled) + self._q.qsize())
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

    def _expand(self, items: list[tuple[str, dict, int]]) -> list[tuple[str, dict, int]]:
        """The durable messages of a group: frame notes go to the coil layer only, and the layer's
        `track` and `periodic` messages join the group (before the summary that closes their coil);
        each defect reaches the layer with the seq _publish will give it."""
        out: list[tuple[str, dict, int]] = []
        first = self.journal.last_seq + 1
        for topic, body, ts in items:
            if self.layer is None:
                if topic != "_frames":
                    out.append((topic, body, ts))
                continue
            try:
                if topic == "_frames":
                    out += [(t, b, ts) for t, b in self.layer.frames_done(body)]
                    continue
                if topic == "summary":
                    extra, body = self.layer.summary(body)
                    out += [(t, b, ts) for t, b in extra]
                out.append((topic, body, ts))
                if topic == "defect":
                    out += [(t, b, ts) for t, b in self.layer.defect(body, first + len(out) - 1)]
            except Exception as exc:  # the layer must never cost an event: counted, logged, published as is
                self.layer_errors += 1
                if self._layer_log.allow():
                    log.error("coil_layer_failed", topic=topic, error=str(exc)[:300], total=self.layer_errors,
                              suppressed=self._layer_log.suppressed, exc_info=exc)
                if topic != "_frames" and (not out or out[-1][1] is not body):
                    out.append((topic, body, ts))
        return out

    def _publish(self, pub: zmq.Socket, items: list[tuple[str, dict, int]]) -> None:
        first = self.journal.last_seq + 1
        now_ns = time.time_ns()
        packed = []
        for i, (topic, body, _) in enumerate(items):
            full = {"v": PROTOCOL_VERSION, "type": topic, "agent": self.agent, "seq": first + i, "ts_ns": now_ns,
                    **body}
            packed.append((TOPICS[topic], pack_body(full)))
        try:
            seqs = self.journal.append_many(packed)
        except JournalFull as exc:
            if not self._stalled:
                log.error("publish_stalled_journal_full", error=str(exc), messages=len(items))
            self._stalled = items
            return
        if self._stalled:
            log.warning("publish_resumed", messages=len(items))
            self._stalled = []
        self._taken_oldest_ns = None  # journaled (or held by the journal): a restart finds them there
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

    def _serve_replay(self, rep: zmq.Socket) -> bool:
        """One request, if one waits (False when none did)."""
        try:
            envelope, raw, error = recv_request(rep)
        except zmq.Again:
            return False
        self.replay_requests += 1
        first = last = 0
        if error is None:
            error = _parse_replay_request(raw)
        if isinstance(error, tuple):
            (first, last), error = error, None
        if error is not None:
            self.replay_rejected += 1
            if self._replay_log.allow():
                log.warning("replay_request_rejected", error=error[:200], suppressed=self._replay_log.suppressed)
            self._reply(rep, envelope, [pack_body({"v": PROTOCOL_VERSION, "type": "replay", "error": error[:200]})])
            return True
        records = self.journal.read(first, last, limit=self.max_replay)
        size, keep = 0, 0
        for _, topic, body in records:  # at most REPLAY_MAX_BYTES, at least one message
            size += len(topic) + len(body)
            if keep and size > REPLAY_MAX_BYTES:
                break
            keep += 1
        records = records[:keep]
        meta = {"v": PROTOCOL_VERSION, "type": "replay", "from": first, "to": last, "count": len(records),
                "first_seq": self.journal.first_seq, "last_seq": self.journal.last_seq}
        frames: list[Any] = [pack_body(meta)]
        for _, topic, body in records:
            frames += [topic, body]
        if self._reply(rep, envelope, frames) and self._served_log.allow():
            log.info("replay_served", first=first, last=last, count=len(records),
                     suppressed=self._served_log.suppressed)
        return True

    def _reply(self, rep: zmq.Socket, envelope: list[bytes], frames: list) -> bool:
        if send_reply(rep, envelope, frames):
            return True
        self.replay_dropped += 1
        if self.on_reply_dropped:
            self.on_reply_dropped("replay")
        if self._replay_log.allow():
            log.warning("replay_reply_dropped", reason="peer gone or not reading its replies",
                        dropped_total=self.replay_dropped, suppressed=self._replay_log.suppressed)
        return False


def _parse_replay_request(raw: bytes) -> tuple[int, int] | str:
    """(from, to) of a replay request, or why it is not one."""
    try:
        req = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_str_len=64, max_bin_len=0,
                              max_array_len=0, max_map_len=8, max_ext_len=0, object_pairs_hook=str_keys)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        return f"not MessagePack: {exc}"
    if not isinstance(req, dict) or req.get("v") != PROTOCOL_VERSION or req.get("type") != "replay":
        return "expected {v: 1, type: replay, from, to}"
    absent = [k for k in ("from", "to") if k not in req]
    if absent:
        return (f"the replay request has no {' and no '.join(repr(k) for k in absent)} key; "
                "send {v: 1, type: replay, from: FIRST, to: LAST} (both inclusive)")
    first, last = req.get("from"), req.get("to")
    if type(first) is not int or type(last) is not int or first < 1 or last < first:
        return "from and to must be integers with 1 <= from <= to"
    return first, last
