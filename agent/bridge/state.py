"""The bridge's durable state: the last seq the broker acknowledged, and one bridge per state file.

``acked_seq`` is the highest seq N such that every message 1..N (of those the bridge was asked to
forward) got its PUBACK. It is written atomically (engines/atomic.py: temp file, fsync, rename) at
most every ``bridge.state_interval_s`` and at a clean stop, so after a crash, a SIGKILL or a power
cut the bridge resumes at ``acked_seq + 1`` and resends at most that interval's messages (duplicates
with their original seq), never fewer. A state file that fails validation is moved aside
(``<name>.bad-<UTC time>``), logged, and the bridge starts as if it were absent.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import structlog

from engines.atomic import write_atomic

from agent.statefiles import LockFailed, LockHeld, flock_exclusive

log = structlog.get_logger(__name__)

MAX_SEQ = 2**63 - 1
MAX_STATE_BYTES = 4096


class StateBusy(RuntimeError):
    """Another bridge holds this state file."""


class AckState:
    def __init__(self, directory: Path, name: str, *, endpoint: str):
        self.path = Path(directory) / f"{name}.json"
        self.lock_path = Path(directory) / f"{name}.lock"
        self.endpoint = endpoint
        self._fd: int | None = None
        self.saved: int | None = None
        self.moved_aside: Path | None = None

    # -- one bridge per state file ------------------------------------------------------------
    def lock(self) -> AckState:
        try:
            self._fd = flock_exclusive(self.lock_path)
        except LockHeld:
            raise StateBusy(f"{self.lock_path} is held by another bridge; two bridges must not share one "
                            f"state file (give each its own bridge.state_dir or bridge.line)") from None
        except LockFailed as exc:
            raise StateBusy(f"cannot lock {self.lock_path}: {exc.strerror}") from None
        return self

    def unlock(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- the acknowledged seq ---------------------------------------------------------------------
    def load(self) -> int | None:
        """The saved acked seq, or None (no file, or a bad one moved aside)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            return self._bad(f"cannot read: {exc.strerror}")
        if len(raw) > MAX_STATE_BYTES:
            return self._bad(f"{len(raw)} bytes, more than {MAX_STATE_BYTES}")
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            return self._bad(f"not JSON: {exc}")
        if not isinstance(doc, dict) or doc.get("v") != 1:
            return self._bad("not a v1 bridge state document")
        seq = doc.get("acked_seq")
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
            return self._bad(f"acked_seq {seq!r} is not an integer 0..2^63-1")
        if doc.get("endpoint") != self.endpoint:
            log.warning("bridge_state_other_endpoint", path=str(self.path), saved=doc.get("endpoint"),
                        now=self.endpoint, note="the agent's address changed; the seq is kept (same journal?)")
        self.saved = seq
        return seq

    def _bad(self, reason: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.bad-{stamp}")
        try:
            os.replace(self.path, target)
            self.moved_aside = target
        except OSError:
            target = None
        log.error("state_file_moved_aside", path=str(self.path), moved_to=str(target), reason=reason)
        return None

    def save(self, acked_seq: int) -> None:
        if acked_seq == self.saved:
            return
        doc = {"v": 1, "acked_seq": int(acked_seq), "endpoint": self.endpoint, "saved_ns": time.time_ns()}
        write_atomic(self.path, json.dumps(doc) + "\n")
        self.saved = acked_seq
