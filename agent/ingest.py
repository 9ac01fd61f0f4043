"""Ingest thread: receive, validate, account, decode, enqueue. Never blocks on inference."""
from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any, Callable

import numpy as np
import structlog
import zmq

from agent.batcher import Frame, FrameQueue
from agent.binding import BindError, bind
from agent.coil import CoilRegistry
from agent.guard import LoopGuard, recv_bounded
from agent.metrics import RateLimiter
from agent.protocol import MAX_PARTS, Control, Rejected, decode_message, max_message_bytes, pixels_to_array
from agent.threadnames import name_this_thread

log = structlog.get_logger(__name__)


def frame_multiple(pack) -> int:
    """What a frame's height and width must be multiples of for this model pack to take it: every
    model's input_pool, and 8 where a segmentation model is present (its strides: a 250x1600 or 4x4
    frame fails its skip connections). A classification-only gate takes any size its pool divides."""
    return int(np.lcm.reduce([8 if pack.seg is not None else 1, *(m.input_pool for m in pack.models.values())]))


def wire_to_chw(image: np.ndarray) -> np.ndarray:
    """A frame as it comes off the wire (HxW grey or HxWxC) as the model's CxHxW: a view, no copy."""
    return image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)


class Ingest(threading.Thread):
    def __init__(self, ctx: zmq.Context, *, endpoint: str, rcvhwm: int, frames: FrameQueue, coils: CoilRegistry,
                 channels: int, max_width: int, max_height: int, allowed_encodings: tuple[str, ...],
                 emit_summary: Callable[[dict], None], socket_setup: Callable[[zmq.Socket, str], Any] | None = None,
                 on_reject: Callable[[str, str | None], None] | None = None,
                 on_frame: Callable[[str, float], None] | None = None, backpressure: bool = False,
                 shape_multiple: int = 1, on_loop_error: Callable[[str, str], None] | None = None):
        super().__init__(name="ingest", daemon=True)
        self.ctx = ctx
        self.endpoint = endpoint
        self.rcvhwm = rcvhwm
        self.frames = frames
        self.coils = coils
        self.channels = channels
        self.max_width, self.max_height = max_width, max_height
        self.allowed_encodings = allowed_encodings
        self.emit_summary = emit_summary
        self.socket_setup = socket_setup
        self.on_reject = on_reject
        self.on_frame = on_frame
        # "backpressure": stop reading while the frame queue is full (ZeroMQ's high-water marks then
        # bound memory and the camera's PUSH blocks); "shed": keep reading and shed, counted.
        self.backpressure = backpressure
        # frame height and width must be multiples of this (frame_multiple: the models' pooling and
        # strides); any other shape is rejected here, before it can reach a model
        self.shape_multiple = max(1, shape_multiple)
        # last resort per message (never ends the thread) and per socket read (ends it when the socket
        # fails every time: the agent then exits non-zero and systemd restarts it)
        self.message_guard = LoopGuard("ingest", max_consecutive=None, on_error=on_loop_error)
        self.socket_guard = LoopGuard("ingest-socket", max_consecutive=100, on_error=on_loop_error)
        self._halt = threading.Event()
        self.accepting = threading.Event()
        self.accepting.set()
        self.bound = threading.Event()
        self.bound_endpoint: str | None = None
        self.error: BaseException | None = None
        self.received_messages = 0
        self.rejected = Counter()  # reason -> count (all rejections, attributed or not)
        self.seq_gaps = Counter()  # camera -> messages missing by sequence number
        self._last_seq: dict[str, int] = {}
        self._seq_lock = threading.Lock()  # _last_seq and seq_gaps: written here, read by the heartbeat
        # one token bucket per kind of warning, so a flood of one kind cannot hide another
        self._limiters: dict[str, RateLimiter] = {}

    def _limit(self, key: str) -> RateLimiter:
        lim = self._limiters.get(key)
        if lim is None:
            lim = self._limiters[key] = RateLimiter(per_s=1.0, burst=10)
        return lim

    def stop(self, timeout: float = 2.0) -> None:
        self._halt.set()
        self.join(timeout)

    def run(self) -> None:
        name_this_thread()
        try:
            self._run()
        except BaseException as exc:
            self.error = exc
            log.exception("ingest_failed")

    def _run(self) -> None:
        sock = self.ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
        # The largest part this agent can accept (a max-size uint8 frame of the models' channels, or its
        # PNG/JPEG up to 64 KiB larger): anything bigger is cut by libzmq before it costs memory.
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes(self.max_width, self.max_height, self.channels, 1))
        # socket_setup may return a watch (agent.auth.HandshakeWatch) that logs refused peers
        watches = [w for w in [self.socket_setup(sock, "ingest") if self.socket_setup else None] if w is not None]
        try:
            self.bound_endpoint = bind(sock, self.endpoint, "ingest")
        except BindError:
            sock.close(linger=0)
            raise
        self.bound.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._halt.is_set():
                if not self.accepting.is_set():
                    time.sleep(0.05)  # draining: leave messages in the socket, take no new frames
                    continue
                if self.backpressure and not self.frames.wait_for_space(0.1):
                    continue  # full: leave frames in ZeroMQ's bounded queues; the cameras' sends block
                try:
                    self._read_burst(sock, poller, watches)
                    self.socket_guard.ok()
                except Exception as exc:  # last resort: counted, logged (bounded), the loop goes on
                    self.socket_guard.failed(exc)
                    time.sleep(0.01)
        finally:
            for w in watches:
                w.close()
            sock.close(linger=0)

    def _read_burst(self, sock: zmq.Socket, poller: zmq.Poller, watches: list) -> None:
        for w in watches:
            w.drain()
        if not poller.poll(200):
            return
        for _ in range(256):  # a burst per wake-up, then re-check the stop flag
            if self.backpressure and len(self.frames) >= self.frames.max_frames:
                break
            t0 = time.perf_counter()
            try:
                # at most MAX_PARTS parts kept: the count is checked before anything is copied
                parts, n_parts = recv_bounded(sock, MAX_PARTS)
            except zmq.Again:
                break
            self.received_messages += 1
            self.handle(parts, recv_s=time.perf_counter() - t0, n_parts=n_parts)

    # -- one message ------------------------------------------------------------------------
    def handle(self, parts: list, recv_s: float | None = None, n_parts: int | None = None) -> None:
        """One message; never raises. recv_s: how long taking it from the socket took ("receive"
        stage); the time from here until the frame is queued is the "decode" stage (parse, validate,
        admit). n_parts: the message's part count when ``parts`` holds only its first parts."""
        admitted: list = []
        try:
            self._handle(parts, recv_s, n_parts, admitted)
            self.message_guard.ok()
        except Exception as exc:  # last resort: not foreseen, so "internal"; the thread goes on
            camera, coil, index = admitted[0] if admitted else (None, None, None)
            self._rejected(Rejected("internal", f"{type(exc).__name__}: {exc}", camera, coil), index,
                           admitted=bool(admitted))
            self.message_guard.failed(exc, camera=camera, coil=coil, index=index)

    def _handle(self, parts: list, recv_s: float | None, n_parts: int | None, admitted: list) -> None:
        recv_mono, recv_ns = time.monotonic(), time.time_ns()
        index = None
        try:
            if n_parts is not None and n_parts > len(parts):
                raise Rejected("malformed", f"expected 1 or 2 ZeroMQ frames, got {n_parts}")
            header, buf = decode_message(parts, max_width=self.max_width, max_height=self.max_height,
                                         allowed_encodings=self.allowed_encodings,
                                         max_channels=max(4, self.channels))
            self._check_seq(header.camera, header.seq)
            if isinstance(header, Control):
                self._control(header)
                return
            status, summaries = self.coils.admit(header.camera, header.coil, header.index, header.pos_mm)
            for s in summaries:
                self.emit_summary(s)
            if status != "ok":
                raise Rejected(status, f"frame {header.index} of coil {header.coil}", header.camera, header.coil)
            index = header.index
            admitted.append((header.camera, header.coil, header.index))
            self._check_shape(header)
            image = self._to_chw(header, pixels_to_array(header, buf))
            frame = Frame(header, image, recv_mono, recv_ns, keepalive=parts[1])
        except Rejected as rej:
            self._rejected(rej, index if index is not None else rej.index, admitted=index is not None)
            return
        if self.on_frame:
            if recv_s is not None:
                self.on_frame("receive", recv_s)
            self.on_frame("decode", time.monotonic() - recv_mono)
        shed_frames = self.frames.put(frame)
        admitted.clear()  # queued: inference (or the shedding below) accounts for it from here
        for shed in shed_frames:
            h = shed.header
            for s in self.coils.finish(h.camera, h.coil, h.index, "shed"):
                self.emit_summary(s)
            if self._limit("shed").allow():
                log.warning("frame_shed", camera=h.camera, coil=h.coil, index=h.index,
                            queued=len(self.frames), suppressed=self._limit("shed").suppressed)

    def _check_shape(self, header) -> None:
        m = self.shape_multiple
        h, w = header.shape[:2]
        if h % m or w % m:
            raise Rejected("bad_shape", f"frame {h}x{w} (HxW): the models take heights and widths that are "
                           f"multiples of {m}", header.camera, header.coil)

    def _to_chw(self, header, image: np.ndarray) -> np.ndarray:
        if image.dtype != np.uint8:
            raise Rejected("bad_dtype", f"the model takes uint8 pixels, frame is {image.dtype}", header.camera, header.coil)
        image = wire_to_chw(image)
        if image.shape[0] != self.channels:
            raise Rejected("bad_shape", f"the model takes {self.channels} channel(s), frame has {image.shape[0]}",
                           header.camera, header.coil)
        return image

    def _control(self, msg: Control) -> None:
        if msg.type == "coil_start":
            summaries = self.coils.coil_start(msg.camera, msg.coil)
            log.info("coil_start_received", camera=msg.camera, coil=msg.coil)
        else:
            summaries = self.coils.coil_end(msg.camera, msg.coil, msg.frames or 0, msg.length_mm)
            log.info("coil_end_received", camera=msg.camera, coil=msg.coil, frames=msg.frames)
        for s in summaries:
            self.emit_summary(s)

    def camera_seqs(self) -> tuple[dict[str, int], dict[str, int]]:
        """Copies of (camera -> the last ``seq`` taken from it, camera -> messages missing by ``seq``
        since start), consistent with each other: the heartbeat's ``cameras`` map (docs/protocol.md 2.3)."""
        with self._seq_lock:
            return dict(self._last_seq), dict(self.seq_gaps)

    def _check_seq(self, camera: str, seq: int) -> None:
        with self._seq_lock:
            last = self._last_seq.get(camera)
            if last is None and len(self._last_seq) >= 10_000:  # bounded: a peer can invent camera names
                self._last_seq.pop(next(iter(self._last_seq)))
            self._last_seq[camera] = seq
            if last is not None and seq > last + 1:
                self.seq_gaps[camera] += seq - last - 1
        if last is None:
            return
        if seq > last + 1:
            if self._limit("gap").allow():
                log.warning("camera_sequence_gap", camera=camera, expected=last + 1, got=seq,
                            missing=seq - last - 1)
        elif seq <= last and self._limit("seq_restart").allow():
            # Rate-limited like every warning in this loop: a camera replaying old seqs (or a fuzzer)
            # must not write one log line per message.
            log.warning("camera_sequence_restarted", camera=camera, last=last, got=seq,
                        suppressed=self._limit("seq_restart").suppressed)

    def _rejected(self, rej: Rejected, index: int | None, admitted: bool = False) -> None:
        reason = rej.reason
        # Counted in a coil only as the frame it rejects: camera, coil and index all readable. A
        # message without a readable index opens no coil (fuzzed names must not publish summaries).
        if rej.camera and rej.coil and index is not None and reason not in ("duplicate", "stale_coil"):
            attribute = True
            if not admitted:
                # Rejected before admission but its index is known: it was received, and is rejected,
                # not missing. A bad copy of a frame we already hold is only a duplicate.
                status, summaries = self.coils.admit(rej.camera, rej.coil, index, 0.0)
                for s in summaries:
                    self.emit_summary(s)
                if status == "duplicate":
                    reason, attribute = "duplicate", False
                elif status == "stale_coil":
                    attribute = False
            if attribute:
                for s in self.coils.reject(rej.camera, rej.coil, index, reason):
                    self.emit_summary(s)
        # Counted once, under one reason, in health and in the metrics alike (the early returns
        # for duplicates and stale coils used to skip the metrics and the log).
        self.rejected[reason] += 1
        if self.on_reject:
            self.on_reject(reason, rej.camera)
        if self._limit(reason).allow():
            log.warning("message_rejected", reason=reason, detail=rej.detail[:200], camera=rej.camera,
                        coil=rej.coil, suppressed=self._limit(reason).suppressed)
