"""Last-resort handling for the agent's thread loops, and bounded reads from ZeroMQ sockets.

The rule (../shared/ARCHITECTURE.md): no input from a socket can end a thread. Each loop handles
the failures it foresees (a bad message is rejected and counted by reason); what it did not
foresee is caught here: counted by thread and kind, logged at a bounded rate with its traceback,
and the loop goes on with the next message. A loop that fails on everything it is given is no
longer serving: after ``max_consecutive`` failures in a row without one success (when set) the error is
re-raised, the thread ends, and the main loop exits the agent non-zero so that systemd restarts it
(a wedged socket or a broken backend must not leave the agent running headless).

``recv_bounded`` reads a multipart message one part at a time, keeping at most ``max_parts``: ZeroMQ
has no limit on the number of parts (ZMQ_MAXMSGSIZE bounds each part), so the count is checked
before anything is copied, and every part past the limit is released as soon as it is read.
"""
from __future__ import annotations

import threading
from collections import Counter
from typing import Callable

import structlog
import zmq

from agent.metrics import RateLimiter

log = structlog.get_logger(__name__)


class LoopGuard:
    """Counts and logs what a thread's loop could not handle. Thread-safe (inference workers share one)."""

    def __init__(self, thread: str, *, max_consecutive: int | None = 1000,
                 on_error: Callable[[str, str], None] | None = None, per_s: float = 1.0, burst: int = 5):
        self.thread = thread
        self.max_consecutive = max_consecutive
        self.on_error = on_error
        self.errors: Counter[str] = Counter()  # kind (exception class) -> count
        self._consecutive = 0
        self._lock = threading.Lock()
        self._limiter = RateLimiter(per_s=per_s, burst=burst)

    def ok(self) -> None:
        """The loop handled something: the run of failures is over."""
        self._consecutive = 0

    def failed(self, exc: BaseException, **context) -> None:
        """Count and log ``exc`` (call from inside ``except``); re-raises it once the loop has failed
        ``max_consecutive`` times in a row. Never swallows KeyboardInterrupt or SystemExit."""
        if not isinstance(exc, Exception):
            raise exc
        kind = type(exc).__name__
        with self._lock:
            self.errors[kind] += 1
            self._consecutive += 1
            consecutive = self._consecutive
        if self.on_error is not None:
            self.on_error(self.thread, kind)
        if self._limiter.allow():
            log.error("loop_error_survived", thread=self.thread, kind=kind, error=str(exc)[:300],
                      consecutive=consecutive, total=self.errors[kind], suppressed=self._limiter.suppressed,
                      exc_info=exc, **context)
        if self.max_consecutive is not None and consecutive >= self.max_consecutive:
            log.error("loop_failing_every_time", thread=self.thread, kind=kind, consecutive=consecutive)
            raise exc

    def total(self) -> int:
        return sum(self.errors.values())


def recv_bounded(sock: zmq.Socket, max_parts: int) -> tuple[list[zmq.Frame], int]:
    """One whole multipart message without blocking: (its first ``max_parts`` parts, its part count).
    Raises zmq.Again when nothing is waiting. Parts past ``max_parts`` are read and dropped at once,
    uncopied; the caller rejects the message by its count."""
    first = sock.recv(flags=zmq.NOBLOCK, copy=False)
    parts = [first]
    n = 1
    more = first.more
    while more:
        # The rest of a message is always there once its first part is (ZeroMQ delivers whole
        # messages), so NOBLOCK never raises Again here.
        part = sock.recv(flags=zmq.NOBLOCK, copy=False)
        n += 1
        more = part.more
        if len(parts) < max_parts:
            parts.append(part)
        # else: dropped here; its buffer goes back to libzmq now
    return parts, n


def isolate_failed_batch(inference, batch: list, models, buf: list, exc: Exception) -> int:
    """A batch the models failed on: run its frames one by one, so that one frame the models cannot
    take (a shape the ingest checks did not foresee) costs only itself. Each frame that fails alone
    ends ``rejected`` under ``inference_failed``, counted in its coil's summary; frames already
    accounted for before the failure are left alone. Returns how many frames went through.

    When no frame of the batch goes through, it counts as a failure of the loop (``inference.guard``):
    a backend that fails on everything ends the worker after ``max_consecutive`` such batches, and the
    agent exits non-zero, rather than rejecting every frame of the line."""
    from agent.publish import PublishError

    coils = inference.coils
    ok = 0
    for f in batch:
        h = f.header
        if coils.state_of(h.camera, h.coil, h.index) != "pending":
            continue
        try:
            inference.process([f], models, buf)
            ok += 1
        except PublishError:
            raise  # the publisher is gone: not this frame's fault; the main loop stops the agent
        except Exception as frame_exc:
            inference.count_rejected("inference_failed", h.camera)
            for s in coils.reject(h.camera, h.coil, h.index, "inference_failed"):
                inference.submit("summary", s)
            if inference.reject_log.allow():
                log.warning("frame_inference_failed", camera=h.camera, coil=h.coil, index=h.index,
                            shape=list(f.image.shape), error=str(frame_exc)[:300],
                            suppressed=inference.reject_log.suppressed)
    if ok:
        inference.guard.ok()
    inference.guard.failed(exc, frames=len(batch), through=ok)
    return ok


# -- request/reply over ROUTER: REQ and DEALER peers alike, never blocked by a slow one ----------
ROUTER_MAX_PARTS = 3  # [peer id, empty delimiter (REQ), request]; any more is a bad request
ROUTER_SNDHWM = 4  # replies queued per peer; a peer that does not read loses the ones past this
ROUTER_RCVHWM = 16  # requests queued per peer before its sends block


def router_socket(ctx: zmq.Context, *, max_msg_bytes: int = 4096) -> zmq.Socket:
    """A ROUTER for a request/reply service: each part at most ``max_msg_bytes``, small queues, and
    ROUTER_MANDATORY so that a reply which cannot be queued is reported (and dropped, counted)
    instead of vanishing or blocking the thread that serves it."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)
    sock.setsockopt(zmq.RCVHWM, ROUTER_RCVHWM)
    sock.setsockopt(zmq.SNDHWM, ROUTER_SNDHWM)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDTIMEO, 0)
    return sock


def recv_request(sock: zmq.Socket) -> tuple[list[bytes], bytes | None, str | None]:
    """One request from a ROUTER without blocking: (reply envelope, request body or None, error or None).

    A REQ peer's request arrives as [id, b"", body], a DEALER's as [id, body] or [id, b"", body];
    the reply goes back with the same envelope. Anything else (no body, several body parts) is a bad
    request: the error says why and the caller answers it. Raises zmq.Again when nothing waits."""
    parts, n = recv_bounded(sock, ROUTER_MAX_PARTS)
    envelope = [parts[0].bytes]
    rest = parts[1:]
    if rest and len(rest[0]) == 0:
        envelope.append(b"")
        rest = rest[1:]
    n_body = n - len(envelope)
    if n_body != 1:
        return envelope, None, f"a request is one ZeroMQ frame (after the envelope), got {n_body}"
    return envelope, rest[0].bytes, None


def send_reply(sock: zmq.Socket, envelope: list[bytes], frames: list) -> bool:
    """Send without blocking; False when the peer is gone or its queue is full (the reply is dropped)."""
    try:
        sock.send_multipart([*envelope, *frames], flags=zmq.NOBLOCK, copy=False)
        return True
    except zmq.Again:
        return False
    except zmq.ZMQError as exc:
        if exc.errno == zmq.EHOSTUNREACH:
            return False
        raise
