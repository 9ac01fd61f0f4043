"""Subscriber with gap repair: PUB stream + replay socket, output has no gaps and no repeats.

It tracks the publisher's sequence numbers; a gap (a message or heartbeat whose seq is ahead of
what it holds) or a late join (``from_seq``) is filled from the replay socket, so messages come
out exactly once, in order.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

import msgpack
import structlog
import zmq

from agent.protocol import encode_replay_request, unpack_body

log = structlog.get_logger(__name__)


class ReplayError(RuntimeError):
    pass


class Subscriber:
    def __init__(self, endpoint: str, replay_endpoint: str, *, topics: tuple[str, ...] = ("defect", "summary"),
                 from_seq: int | None = None, ctx: zmq.Context | None = None, include_health: bool = False,
                 socket_setup: Callable[[zmq.Socket], None] | None = None, replay_timeout_ms: int = 3000):
        self.ctx = ctx or zmq.Context.instance()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 100_000)
        self.socket_setup = socket_setup
        if socket_setup:
            socket_setup(self.sub)
        # Durable topics are needed for sequence tracking even when not printed; health carries the last seq.
        for t in {"defect", "summary", "health", "track", "periodic"}:
            self.sub.setsockopt(zmq.SUBSCRIBE, t.encode())
        self.sub.connect(endpoint)
        self.replay_endpoint = replay_endpoint
        self.replay_timeout_ms = replay_timeout_ms
        self.topics = set(topics)
        self.include_health = include_health
        self.next_seq = from_seq  # next durable seq we expect; None = start from whatever comes first
        self.replayed = 0
        self.gaps = 0
        self.unrecoverable = 0  # seqs the journal could not give back (damaged records)

    def _replay(self, first: int, last: int) -> list[tuple[str, dict]]:
        out: list[tuple[str, dict]] = []
        while first <= last:
            req = self.ctx.socket(zmq.REQ)
            req.setsockopt(zmq.LINGER, 0)
            req.setsockopt(zmq.RCVTIMEO, self.replay_timeout_ms)
            if self.socket_setup:
                self.socket_setup(req)
            req.connect(self.replay_endpoint)
            try:
                req.send(encode_replay_request(first, last))
                frames = req.recv_multipart()
            except zmq.Again:
                raise ReplayError(f"replay {first}..{last}: no answer from {self.replay_endpoint}") from None
            finally:
                req.close()
            meta = msgpack.unpackb(frames[0], raw=False)
            if meta.get("error"):
                raise ReplayError(f"replay {first}..{last} refused: {meta['error']}")
            if first < meta.get("first_seq", 1):
                # Older than the replay horizon (journal.keep_segments): gone for good.
                log.error("replay_range_rotated_away", first=first, last=last, journal_first=meta.get("first_seq"))
            if meta["count"] == 0:
                # Rotated away, or inside the journal's range yet absent: records the agent found
                # damaged at start (health journal_damage). They cannot come back; _fill counts them.
                break
            for topic, body in zip(frames[1::2], frames[2::2]):
                msg = unpack_body(body)
                out.append((topic.decode(), msg))
            first = out[-1][1]["seq"] + 1
        self.replayed += len(out)
        return out

    def _fill(self, first: int, last: int) -> Iterator[tuple[str, dict]]:
        """Replay first..last, then move past the range: seqs the journal cannot give back (rotated
        away or damaged) are counted in ``unrecoverable`` and logged as an error, not asked for again
        at every message, and do not stop the stream: the rest is still delivered."""
        self.gaps += 1
        got = self._replay(first, last)
        held = {m["seq"] for _, m in got}
        lost = [s for s in range(first, last + 1) if s not in held]
        if lost:
            self.unrecoverable += len(lost)
            log.error("replay_records_unrecoverable", first=lost[0], last=lost[-1], count=len(lost))
        yield from self._emit(got)
        self.next_seq = max(self.next_seq, last + 1)

    def messages(self, timeout_s: float | None = None) -> Iterator[tuple[str, dict]]:
        """Yield (topic, body) in seq order without gaps; health messages if asked for."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        poller = zmq.Poller()
        poller.register(self.sub, zmq.POLLIN)
        while deadline is None or time.monotonic() < deadline:
            if not poller.poll(100):
                continue
            topic_b, body_b = self.sub.recv_multipart()
            topic = topic_b.decode(errors="replace")
            try:
                msg = unpack_body(body_b)
            except ValueError:
                log.warning("subscriber_bad_message", topic=topic)
                continue
            seq = int(msg.get("seq", 0))
            if topic == "health":
                if self.next_seq is not None and seq >= self.next_seq:  # heartbeat shows we missed some
                    yield from self._fill(self.next_seq, seq)
                if self.include_health:
                    yield topic, msg
                continue
            if self.next_seq is None:
                self.next_seq = seq
            if seq < self.next_seq:
                continue  # already delivered (republished after a restart, or replay overlap)
            if seq > self.next_seq:
                yield from self._fill(self.next_seq, seq - 1)
            yield from self._emit([(topic, msg)])

    def _emit(self, items: list[tuple[str, dict]]) -> Iterator[tuple[str, dict]]:
        for topic, msg in items:
            if self.next_seq is not None and msg["seq"] < self.next_seq:
                continue
            self.next_seq = msg["seq"] + 1
            if topic in self.topics:
                yield topic, msg

    def close(self) -> None:
        self.sub.close(linger=0)
