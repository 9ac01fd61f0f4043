"""The state directory at start-up: one agent per directory, and no state file trusted blindly.

Two promises (issue 16, items 13 and 15):

* **One agent per state directory.** ``StateLock`` takes an exclusive ``flock`` on
  ``<state_dir>/coilsight.lock`` before anything in the directory is read or written. A second
  agent (another process, or a second ``Agent`` in the same process) is refused at once with the
  pid of the holder. The kernel drops the lock when the holder dies, SIGKILL included, so a
  restart after a crash never finds a stale lock.
* **Every state file is validated before it is used.** ``published.seq`` (the publish
  watermark) and ``coils.checkpoint.json`` (the crash checkpoint) are read with bounds on size
  and on every value. One that fails is moved aside, renamed ``<name>.bad-<UTC time>``, logged as
  ``state_file_moved_aside`` with the reason, listed in the health document
  (``state_files_moved_aside``), and the agent starts as if it were absent: never fatal, never a
  hang. (Journal segments check themselves: agent/journal.py.)
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import structlog

from engines.atomic import write_atomic

from agent.metrics import RateLimitedLog

log = structlog.get_logger(__name__)
_watermark_log = RateLimitedLog(log, per_s=0.2, burst=2)

LOCK_NAME = "coilsight.lock"
MAX_SEQ = 2**63 - 1  # the journal stores seqs as u64; above 2**63 is never legitimate
# Evidence from outside the segments (watermark, checkpoint) may show seqs above the journal's
# last record (a journal cut short); by more than this it is not evidence but a damaged file.
MAX_SEQ_AHEAD = 1_000_000
MAX_WATERMARK_BYTES = 64
MAX_CHECKPOINT_BYTES = 512 << 20
MAX_FRAMES_PER_CAMERA = 10_000_000  # frame indices a checkpoint may hold for one camera of one coil


class StateDirLocked(RuntimeError):
    """Another agent holds the state directory."""


class StateFileInvalid(ValueError):
    """A state file that must not be used; the message says where and why."""


# -- one agent per state directory ------------------------------------------------------------------
class LockFailed(Exception):
    """``flock_exclusive`` could not take the lock (``strerror``: why)."""

    def __init__(self, path: Path, strerror: str | None):
        super().__init__(f"cannot lock {path}: {strerror}")
        self.path, self.strerror = path, strerror


class LockHeld(LockFailed):
    """``flock_exclusive``: another open file holds the lock (``holder``: the pid it recorded, if any)."""

    def __init__(self, path: Path, holder: int | None):
        super().__init__(path, "held by " + (f"pid {holder}" if holder else "another process"))
        self.holder = holder


def flock_exclusive(path: Path, *, record_pid: bool = False) -> int:
    """Open ``path`` (creating it and its directory) and take an exclusive, non-blocking flock on it;
    returns the descriptor, which holds the lock until it is closed (the file itself stays).

    Used for one agent per state directory (``StateLock``) and one bridge per state file
    (agent/bridge/state.py). LockHeld when another open file holds it (with the pid it recorded, when
    its holder passed ``record_pid``); LockFailed when flock fails otherwise; creating or opening the
    file raises its OSError as it is. ``record_pid``: write this process's pid into the file once
    locked, for the message a second process prints (a failed write is logged, never fatal: the lock
    itself is held)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _read_pid(fd)
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            raise LockHeld(path, holder) from None
        raise LockFailed(path, exc.strerror) from None
    if record_pid:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:  # a full disk must not stop the agent: the lock itself is held
            log.warning("state_lock_pid_not_written", path=str(path), error=exc.strerror)
    return fd


class StateLock:
    """An exclusive flock on ``<state_dir>/coilsight.lock``, held for the agent's lifetime.

    flock (not fcntl/lockf record locks) on purpose: it belongs to the open file, so a second
    agent in the same process is refused too, and it goes away with the process."""

    def __init__(self, state_dir: str | Path):
        self.path = Path(state_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> StateLock:
        try:
            self._fd = flock_exclusive(self.path, record_pid=True)
        except LockHeld as held:
            who = f"pid {held.holder}" if held.holder else "another process"
            raise StateDirLocked(
                f"state directory {self.path.parent} is in use by another agent ({who} holds {self.path}); "
                "two agents must not share one state directory: give each its own agent.state_dir") from None
        except LockFailed as exc:
            raise StateDirLocked(f"cannot lock state directory {self.path.parent} ({self.path}): "
                                 f"{exc.strerror}") from None
        return self

    def release(self) -> None:
        # The file stays: unlinking it would let a third agent lock a new inode while a second one
        # still waits on the old. Closing the descriptor drops the lock.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _read_pid(fd: int) -> int | None:
    try:
        raw = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(raw) if raw.isdigit() and len(raw) < 12 else None


# -- moved aside, reported ----------------------------------------------------------------------------
class StateReport:
    """What start-up found wrong in the state directory; shown in the health document."""

    def __init__(self) -> None:
        self.moved_aside: list[dict[str, str]] = []

    def move_aside(self, path: Path, reason: str) -> Path | None:
        """Rename ``path`` to ``<name>.bad-<UTC time>`` and report it. Returns the new path (None when
        even the rename failed: then the file is left where it is, and still reported)."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = path.with_name(f"{path.name}.bad-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.bad-{stamp}-{n}")
        try:
            os.replace(path, target)
            moved: Path | None = target
        except OSError as exc:
            log.error("state_file_not_moved", path=str(path), error=exc.strerror)
            moved = None
        entry = {"path": str(path), "reason": reason[:300], "moved_to": str(moved) if moved else ""}
        self.moved_aside.append(entry)
        log.error("state_file_moved_aside", **entry)
        return moved


def _read_bounded(path: Path, limit: int) -> bytes | None:
    """The file's bytes, or None when there is no file; StateFileInvalid when it is too large or
    not a regular file (a FIFO would block a plain read forever)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if not path.is_file():
        raise StateFileInvalid(f"{path.name} is not a regular file")
    if st.st_size > limit:
        raise StateFileInvalid(f"{path.name} is {st.st_size} bytes; at most {limit} expected")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise StateFileInvalid(f"{path.name} grew past {limit} bytes while read")
    return data


def check_seq(value: Any, what: str, journal_last_seq: int) -> int:
    """A seq from outside the journal: an integer in 0..MAX_SEQ, at most MAX_SEQ_AHEAD above the
    journal's last seq."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise StateFileInvalid(f"{what} must be an integer, got {type(value).__name__}")
    if not 0 <= value <= MAX_SEQ:
        raise StateFileInvalid(f"{what} {value} is outside 0..{MAX_SEQ}")
    if value > journal_last_seq + MAX_SEQ_AHEAD:
        raise StateFileInvalid(f"{what} {value} is implausible: more than {MAX_SEQ_AHEAD} above the journal's "
                               f"last seq {journal_last_seq}")
    return value


def read_watermark(path: Path, journal_last_seq: int, report: StateReport) -> int:
    """The publish watermark (``published.seq``): the last seq surely handed to the PUB socket.
    0 when absent; a bad file is moved aside and counts as absent."""
    try:
        raw = _read_bounded(path, MAX_WATERMARK_BYTES)
        if raw is None:
            return 0
        text = raw.decode("ascii", "strict").strip() if raw.isascii() else None
        if text is None or not text.isdigit() or len(text) > 19:
            raise StateFileInvalid(f"{path.name} must hold one decimal seq, got {raw[:32]!r}")
        return check_seq(int(text), f"{path.name} seq", journal_last_seq)
    except StateFileInvalid as exc:
        report.move_aside(path, str(exc))
    except OSError as exc:
        report.move_aside(path, f"{path.name} unreadable: {exc.strerror}")
    return 0


def write_watermark(path: Path, seq: int) -> bool:
    """Write the publish watermark atomically (engines.atomic: temp + rename; no fsync, see durable=False there). When the disk is full the temp file
    cannot be written; the watermark is then overwritten in place: a few bytes inside the block the
    file already has, which needs no new space. It must get through: events published live from
    memory while the journal cannot write are only known to have used their seqs through it, so a
    crash before the disk frees cannot make a restart reuse them. False when neither worked (logged
    at a bounded rate; the caller tries again at its next tick)."""
    text = f"{seq}\n".encode()
    try:
        write_atomic(path, text, durable=False)  # main loop: never blocks on a stalled fsync
        return True
    except OSError as first:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.pwrite(fd, text, 0)
                os.ftruncate(fd, len(text))
            finally:
                os.close(fd)
            return True
        except OSError as exc:
            _watermark_log.error("watermark_not_written", path=str(path), seq=seq, error=exc.strerror,
                                 first_error=first.strerror)
            return False


def load_checkpoint(path: Path, journal_last_seq: int, report: StateReport, *, fmt: int) -> dict | None:
    """The crash checkpoint, checked field by field (validate_checkpoint); None when absent or bad
    (a bad one is moved aside)."""
    try:
        raw = _read_bounded(path, MAX_CHECKPOINT_BYTES)
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise StateFileInvalid(f"{path.name} is not JSON: {str(exc)[:120]}") from None
        validate_checkpoint(doc, fmt=fmt)
        check_seq(doc["last_seq"], f"{path.name} last_seq", journal_last_seq)
        return doc
    except StateFileInvalid as exc:
        report.move_aside(path, str(exc))
    except OSError as exc:
        report.move_aside(path, f"{path.name} unreadable: {exc.strerror}")
    return None


# -- the checkpoint's shape ---------------------------------------------------------------------------
_FRAME_STATES = ("pending", "inspected", "gated_out", "rejected", "shed", "lost")


def _fail(where: str, what: str) -> None:
    raise StateFileInvalid(f"checkpoint {where}: {what}")


def _int(v: Any, where: str, lo: int = 0, hi: int = MAX_SEQ) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        _fail(where, f"expected an integer in {lo}..{hi}, got {str(v)[:40]}")
    return v


def _num(v: Any, where: str, *, optional: bool = False) -> None:
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        _fail(where, f"expected a finite number, got {str(v)[:40]}")


def _str(v: Any, where: str, *, optional: bool = False, choices: tuple[str, ...] = ()) -> None:
    if v is None and optional:
        return
    if not isinstance(v, str) or len(v) > 256 or (choices and v not in choices):
        _fail(where, f"expected {'one of ' + ', '.join(choices) if choices else 'a string'}, got {str(v)[:40]}")


def _dict(v: Any, where: str) -> dict:
    if not isinstance(v, dict):
        _fail(where, f"expected an object, got {type(v).__name__}")
    return v


def _list(v: Any, where: str) -> list:
    if not isinstance(v, list):
        _fail(where, f"expected an array, got {type(v).__name__}")
    return v


def _counts(v: Any, where: str) -> None:
    for k, n in _dict(v, where).items():
        _int(n, f"{where}.{k}")


def _camera(d: Any, where: str) -> None:
    d = _dict(d, where)
    frames = 0
    for st, ranges in _dict(d.get("states"), f"{where}.states").items():
        _str(st, f"{where}.states key", choices=_FRAME_STATES)
        for i, r in enumerate(_list(ranges, f"{where}.states.{st}")):
            if not isinstance(r, list) or len(r) != 2:
                _fail(f"{where}.states.{st}[{i}]", "expected [first, last]")
            a, b = _int(r[0], f"{where}.states.{st}[{i}]"), _int(r[1], f"{where}.states.{st}[{i}]")
            if b < a:
                _fail(f"{where}.states.{st}[{i}]", f"range [{a}, {b}] runs backwards")
            frames += b - a + 1
            if frames > MAX_FRAMES_PER_CAMERA:
                _fail(f"{where}.states", f"more than {MAX_FRAMES_PER_CAMERA} frames")
    if not isinstance(d.get("ended"), bool):
        _fail(f"{where}.ended", "expected true or false")
    if d.get("sent") is not None:
        _int(d["sent"], f"{where}.sent", hi=MAX_FRAMES_PER_CAMERA)
    _str(d.get("end_reason"), f"{where}.end_reason", optional=True)
    _num(d.get("max_pos_mm"), f"{where}.max_pos_mm")
    _int(d.get("duplicates"), f"{where}.duplicates")
    _counts(d.get("rejected_by_reason"), f"{where}.rejected_by_reason")


def _coil(c: Any, where: str) -> None:
    c = _dict(c, where)
    _int(c.get("started_wall_ns"), f"{where}.started_wall_ns")
    for cam, d in _dict(c.get("cameras"), f"{where}.cameras").items():
        _camera(d, f"{where}.cameras.{cam}")
    _counts(c.get("defects_by_class"), f"{where}.defects_by_class")
    _int(c.get("n_defects"), f"{where}.n_defects")
    for i, w in enumerate(_list(c.get("worst"), f"{where}.worst")):
        if not isinstance(w, list) or len(w) != 3:
            _fail(f"{where}.worst[{i}]", "expected [severity, n, event]")
        _num(w[0], f"{where}.worst[{i}][0]")
        _int(w[1], f"{where}.worst[{i}][1]")
        _dict(w[2], f"{where}.worst[{i}][2]")
    if not isinstance(c.get("provisional_sent"), bool):
        _fail(f"{where}.provisional_sent", "expected true or false")
    _str(c.get("end_reason"), f"{where}.end_reason", optional=True)
    _num(c.get("length_mm"), f"{where}.length_mm", optional=True)


def _defect(ev: Any, where: str) -> None:
    ev = _dict(ev, where)
    _str(ev.get("coil"), f"{where}.coil")
    _str(ev.get("camera"), f"{where}.camera")
    _int(ev.get("index"), f"{where}.index")
    _str(ev.get("class"), f"{where}.class")


def _summary(s: Any, where: str) -> None:
    """What publishing a summary reads from it (agent/service.py _on_published)."""
    s = _dict(s, where)
    _str(s.get("coil"), f"{where}.coil")
    for k in ("final", "complete"):
        if not isinstance(s.get(k), bool):
            _fail(f"{where}.{k}", "expected true or false")
    _str(s.get("end_reason"), f"{where}.end_reason")
    f = _dict(s.get("frames"), f"{where}.frames")
    for k in ("received", "inspected", "gated_out", "missing"):
        _int(f.get(k), f"{where}.frames.{k}")
    _int(s.get("defect_count"), f"{where}.defect_count")
    t = _dict(s.get("timing"), f"{where}.timing")
    _num(t.get("slack_s"), f"{where}.timing.slack_s")
    _num(t.get("wall_s"), f"{where}.timing.wall_s")
    for cam, c in _dict(s.get("cameras"), f"{where}.cameras").items():
        _counts({k: v for k, v in _dict(c, f"{where}.cameras.{cam}").items()
                 if k in ("inspected", "gated_out", "rejected", "shed", "missing", "lost")}, f"{where}.cameras.{cam}")


def validate_checkpoint(doc: Any, *, fmt: int) -> None:
    """Raise StateFileInvalid naming the first field that is not what agent/recovery.py writes."""
    doc = _dict(doc, "document")
    if doc.get("format") != fmt:
        _fail("format", f"expected {fmt}, got {str(doc.get('format'))[:20]}")
    _int(doc.get("wall_ns"), "wall_ns")
    _int(doc.get("last_seq"), "last_seq")
    for name, c in _dict(doc.get("coils"), "coils").items():
        _coil(c, f"coils.{name}")
    for cam, coil in _dict(doc.get("current"), "current").items():
        _str(coil, f"current.{cam}")
    for i, name in enumerate(_list(doc.get("closed"), "closed")):
        _str(name, f"closed[{i}]")
    for i, item in enumerate(_list(doc.get("recent"), "recent")):
        if not isinstance(item, list) or len(item) != 3:
            _fail(f"recent[{i}]", "expected [wall_ns, topic, body]")
        _int(item[0], f"recent[{i}][0]")
        _str(item[1], f"recent[{i}][1]", choices=("defect", "summary"))
        (_defect if item[1] == "defect" else _summary)(item[2], f"recent[{i}][2]")
