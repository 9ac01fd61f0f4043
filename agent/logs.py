"""structlog set-up: one JSON event per line under systemd, readable on a terminal."""
from __future__ import annotations

import logging
import os
import sys
import threading
import time

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(fmt: str = "auto", level: str = "info", stream=None) -> None:
    stream = stream or sys.stderr
    if fmt == "auto":
        under_systemd = bool(os.environ.get("INVOCATION_ID") or os.environ.get("JOURNAL_STREAM"))
        fmt = "json" if under_systemd or not stream.isatty() else "console"
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


class RateLimiter:
    """Token bucket for warnings inside loops: ``if limiter.allow(key): log.warning(...)``.
    ``suppressed(key)`` says how many were skipped since the last allowed one."""

    def __init__(self, per_s: float = 1.0, burst: int = 5, clock=time.monotonic):
        self.per_s, self.burst, self.clock = per_s, burst, clock
        self._state: dict[str, list[float]] = {}
        self._skipped: dict[str, int] = {}
        self._lock = threading.Lock()

    def allow(self, key: str = "") -> bool:
        now = self.clock()
        with self._lock:
            tokens, last = self._state.get(key, [float(self.burst), now])
            tokens = min(float(self.burst), tokens + (now - last) * self.per_s)
            ok = tokens >= 1.0
            self._state[key] = [tokens - 1.0 if ok else tokens, now]
            if not ok:
                self._skipped[key] = self._skipped.get(key, 0) + 1
            return ok

    def suppressed(self, key: str = "") -> int:
        with self._lock:
            return self._skipped.pop(key, 0)
