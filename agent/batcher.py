"""Bounded, fair frame queue between ingest and inference.

Frames wait in one deque per camera; batches are taken round-robin across cameras, so one
flooding camera cannot starve another. The total is bounded: when it is full, the oldest frame
of the camera with the most frames waiting is shed (counted by the caller), never the quiet
camera's. Nothing here blocks the ingest thread.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.protocol import FrameHeader


@dataclass
class Frame:
    header: FrameHeader
    image: np.ndarray  # C, H, W uint8 (a view on the ZeroMQ buffer for raw frames)
    recv_mono: float
    recv_ns: int
    keepalive: Any = field(default=None, repr=False)  # the zmq.Frame the view points into


class FrameQueue:
    def __init__(self, max_frames: int):
        self.max_frames = max_frames
        self._queues: dict[str, deque[Frame]] = {}
        self._order: deque[str] = deque()  # round-robin order of cameras
        self._n = 0
        self._cond = threading.Condition()
        self.shed_total = 0

    def __len__(self) -> int:
        return self._n

    def put(self, frame: Frame) -> list[Frame]:
        """Enqueue without blocking; returns the frames shed to make room (maybe this one)."""
        shed: list[Frame] = []
        with self._cond:
            cam = frame.header.camera
            if self._n >= self.max_frames:
                lens = {c: len(q) for c, q in self._queues.items()}
                lens[cam] = lens.get(cam, 0) + 1  # the newcomer counts for its camera
                victim_cam = max(lens, key=lens.get)
                if not self._queues.get(victim_cam):
                    self.shed_total += 1
                    return [frame]
                # Oldest first: it is the nearest to its coil's deadline anyway.
                shed.append(self._queues[victim_cam].popleft())
                self._n -= 1
                self.shed_total += 1
            q = self._queues.get(cam)
            if q is None:
                q = self._queues[cam] = deque()
                self._order.append(cam)
            q.append(frame)
            self._n += 1
            self._cond.notify()
        return shed

    def wait_for_space(self, timeout_s: float) -> bool:
        """True when a frame can be put without shedding; waits up to timeout_s for room."""
        with self._cond:
            if self._n < self.max_frames:
                return True
            self._cond.wait(timeout_s)
            return self._n < self.max_frames

    def get_batch(self, max_batch: int, max_wait_s: float, idle_timeout_s: float = 0.2) -> list[Frame]:
        """Up to max_batch frames of one shape, round-robin over cameras. Waits up to
        idle_timeout_s for the first frame, then up to max_wait_s for the batch to fill."""
        deadline_first = time.monotonic() + idle_timeout_s
        with self._cond:
            while self._n == 0:
                left = deadline_first - time.monotonic()
                if left <= 0:
                    return []
                self._cond.wait(left)
            fill_deadline = time.monotonic() + max_wait_s
            while self._n < max_batch:
                left = fill_deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch: list[Frame] = []
            shape = None
            idle_rounds = 0
            while len(batch) < max_batch and self._n and idle_rounds < len(self._order):
                cam = self._order[0]
                self._order.rotate(-1)
                q = self._queues[cam]
                if q and (shape is None or q[0].image.shape == shape):
                    f = q.popleft()
                    shape = f.image.shape
                    batch.append(f)
                    self._n -= 1
                    idle_rounds = 0
                else:
                    idle_rounds += 1
            if batch:
                self._cond.notify_all()  # room again: wake an ingest thread waiting for space
            return batch

    def drain(self) -> list[Frame]:
        with self._cond:
            out = [f for q in self._queues.values() for f in q]
            for q in self._queues.values():
                q.clear()
            self._n = 0
            return out
