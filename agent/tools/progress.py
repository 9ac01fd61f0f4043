"""One progress line on a terminal (frames, rate, rejections), nothing when stderr is piped.

stdout carries a command's result only; progress goes to stderr, and only when a person is
watching it (a TTY), so `coilsight camera-sim ... | jq` and CI logs stay clean.
"""
from __future__ import annotations

import sys
import time


class ProgressLine:
    def __init__(self, label: str, total: int | None = None, *, stream=None, every_s: float = 0.5,
                 enabled: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label, self.total, self.every_s = label, total, every_s
        self.t0 = time.monotonic()
        self._last = 0.0
        self._width = 0

    def update(self, done: int, rejected: int | None = None, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        rate = done / max(now - self.t0, 1e-6)
        text = f"{self.label}: {done}" + (f"/{self.total}" if self.total else "") + f" frames, {rate:.1f}/s"
        if rejected is not None:
            text += f", {rejected} rejected"
        self.stream.write("\r" + text.ljust(self._width))
        self._width = len(text)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
        self._width = 0
