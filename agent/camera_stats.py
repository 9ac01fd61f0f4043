"""What the agent knows about each camera, for the health heartbeat's optional ``cameras`` key.

A camera (or `coilsight camera-sim`) reads its own entry to learn what became of what it sent:
the last ``seq`` the agent took from it, how many of its messages were missing by ``seq``
(transport gaps, which no coil summary can show), and its rejections by reason since the agent
started. At most ``MAX_CAMERAS`` names are tracked, so hostile names cannot grow the heartbeat.
"""
from __future__ import annotations

import threading
from collections import Counter

MAX_CAMERAS = 64


class CameraStats:
    def __init__(self, max_cameras: int = MAX_CAMERAS):
        self.max_cameras = max_cameras
        self._rejected: dict[str, Counter] = {}
        self._lock = threading.Lock()

    def count_reject(self, camera: str | None, reason: str) -> None:
        if not camera:
            return
        with self._lock:
            counts = self._rejected.get(camera)
            if counts is None:
                if len(self._rejected) >= self.max_cameras:
                    return
                counts = self._rejected[camera] = Counter()
            counts[reason] += 1

    def snapshot(self, last_seq: dict[str, int], seq_gaps: dict[str, int]) -> dict[str, dict]:
        """``{camera: {last_seq, seq_gaps, rejected}}`` for cameras the ingest has heard from."""
        out: dict[str, dict] = {}
        for camera, seq in list(last_seq.items())[: self.max_cameras]:
            with self._lock:
                rejected = dict(self._rejected.get(camera, {}))
            out[camera] = {"last_seq": int(seq), "seq_gaps": int(seq_gaps.get(camera, 0)), "rejected": rejected}
        return out
