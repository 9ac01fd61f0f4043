"""structlog set-up: one JSON event per line under systemd, readable on a terminal."""
from __future__ import annotations

import logging
import os
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _CurrentStderr:
    """Whatever sys.stderr is at the time of each write (a test's capture, a redirected stream),
    never a handle that was closed since logging was configured."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def _plain_values(_, __, event_dict: dict) -> dict:
    """Console lines show maps and lists as compact JSON (``{"gate":"onnxruntime-cpu"}``), never a
    Python repr; the JSON renderer writes them natively."""
    import json

    for key, value in event_dict.items():
        if isinstance(value, (dict, list, tuple, set)) and key != "event":
            event_dict[key] = json.dumps(sorted(value) if isinstance(value, set) else value,
                                         separators=(",", ":"), default=str)
    return event_dict


def configure_logging(fmt: str = "auto", level: str = "info", stream=None) -> None:
    stream = _CurrentStderr() if stream is None or stream is sys.stderr else stream
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
    if fmt == "json":
        tail = [structlog.processors.JSONRenderer()]
    else:
        tail = [_plain_values, structlog.dev.ConsoleRenderer(colors=False)]
    structlog.configure(
        processors=[*processors, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
