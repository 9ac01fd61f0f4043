"""What C libraries write straight to file descriptor 2 goes through the log and its rate limit.

libpng ("libpng error: IDAT: incorrect data check") and libjpeg ("Corrupt JPEG data: ...") print
one line per bad image a camera sends, bypassing the logger: a camera sending broken PNGs would
fill the journal with unstructured lines. ``capture_native_stderr`` points fd 2 at a pipe, moves
Python's own stderr (the log, tracebacks, faulthandler) to a copy of the original fd 2, and a
reader thread turns each pipe line into a ``native_library_message`` warning, rate limited like
every warning of the hot path (with the count of lines it left out).
"""
from __future__ import annotations

import os
import sys
import threading

import structlog

from agent.metrics import RateLimiter

log = structlog.get_logger(__name__)


class NativeStderr(threading.Thread):
    def __init__(self, read_fd: int, limiter: RateLimiter):
        super().__init__(name="native-stderr", daemon=True)
        self.read_fd, self.limiter = read_fd, limiter
        self.lines = 0

    def run(self) -> None:
        with os.fdopen(self.read_fd, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(4096):  # blocks until a C library writes; EOF when fd 2 closes
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    self._emit(raw)
                if len(pending) > 4096:  # a writer without newlines: cut it, never grow without bound
                    self._emit(pending)
                    pending = b""
            if pending:
                self._emit(pending)

    def _emit(self, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace").strip()
        if not text:
            return
        self.lines += 1
        if self.limiter.allow():
            log.warning("native_library_message", text=text[:300], suppressed=self.limiter.suppressed)


def capture_native_stderr(per_s: float = 1.0, burst: int = 10) -> NativeStderr | None:
    """Route fd 2 through the log (POSIX only; None elsewhere). Call once, in the agent's process,
    after logging is configured; then enable faulthandler on ``sys.stderr``."""
    if os.name != "posix":
        return None
    sys.stderr.flush()
    original = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    sys.stderr = open(original, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=True)  # noqa: SIM115
    reader = NativeStderr(read_fd, RateLimiter(per_s=per_s, burst=burst))
    reader.start()
    return reader
