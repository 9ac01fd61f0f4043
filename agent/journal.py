"""Durable event journal: append-only segment files, one CRC32 per record.

Every defect event and coil summary is written (and, per config, fsynced) before it is
published, with its sequence number. Record layout, little-endian:

    magic  b"CSJ1" | length u32 (of what follows the CRC) | crc32 u32 | seq u64 | topic_len u8 | topic | body

On open the segments are scanned; a record whose CRC does not match, or a torn tail, is
reported (``damage``) and skipped — never silently accepted — and the scan resynchronises on the
next magic. The damaged bytes of a torn tail are moved to ``<segment>.damaged`` and the segment
is truncated so appends start clean. A restart never reuses a sequence number: the next
sequence number is above every sequence number found, including a damaged record's when its
header is plausible. Segments rotate at ``segment_bytes``; the oldest beyond ``keep_segments``
are deleted (the replay horizon).

A full disk (or any write error) does not stop the agent (issue 16, item 11): records that cannot
be written are **held in memory** with the seq they were given, up to ``max_held_bytes``, and
the publisher goes on publishing them live; ``read`` (replay) serves them from memory. Every
write first writes what is held, oldest first, so the segments stay in seq order; a write that
fails part-way is cut back (ftruncate) to the last whole record. The write is retried every
``retry_s`` and at each append; when it succeeds the held records land in the segments with the
same seqs and bytes, so no seq is lost. ``alarm()`` says what is held and which file failed.
Past the bound ``append_many`` raises ``JournalFull`` and assigns no seq: the publisher keeps
the messages queued and back-pressure reaches the frame queue (frames shed, counted).
"""
from __future__ import annotations

import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

MAGIC = b"CSJ1"
_HEAD = struct.Struct("<4sII")  # magic, length, crc
_SEQ = struct.Struct("<QB")  # seq, topic_len
MAX_RECORD = 64 << 20
# A segment rotates once it passes segment_bytes (64 MiB by default); a file far larger than any
# segment, or not a regular file, is not read into memory but moved aside (issue 16, item 13).
MAX_SEGMENT_FILE = 1 << 30


class JournalError(RuntimeError):
    pass


class JournalFull(JournalError):
    """The journal cannot write and holds as much in memory as it may: no seq was assigned."""


@dataclass
class Damage:
    segment: str
    offset: int
    kind: str  # crc_mismatch | torn_tail | bad_length | bad_magic | seq_order | missing_records | moved_aside
    detail: str

    def as_dict(self) -> dict:
        return {"segment": self.segment, "offset": self.offset, "kind": self.kind, "detail": self.detail}


@dataclass
class _Segment:
    path: Path
    first_seq: int
    index: dict[int, tuple[int, int]] = field(default_factory=dict)  # seq -> (offset, total length)


def _encode(seq: int, topic: bytes, body: bytes) -> bytes:
    if len(topic) > 255:
        raise JournalError(f"topic of {len(topic)} bytes is longer than 255")
    payload = _SEQ.pack(seq, len(topic)) + topic + body
    return _HEAD.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


class Journal:
    def __init__(self, directory: str | Path, *, fsync: bool = True, segment_bytes: int = 64 << 20,
                 keep_segments: int = 16, max_held_bytes: int = 64 << 20, retry_s: float = 0.5):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.keep_segments = keep_segments
        self.max_held_bytes = max_held_bytes
        self.retry_s = retry_s
        self.damage: list[Damage] = []
        self._segments: list[_Segment] = []
        self._lock = threading.Lock()
        self._last_alarm: dict | None = None  # alarm()'s answer while a write holds the lock
        self.last_seq = 0
        # records given a seq but not yet in a segment (the disk refused them), oldest first
        self._held: list[tuple[int, bytes]] = []
        self._held_bytes = 0
        self._unwritable: dict | None = None  # {"path", "error", "since_ns"} while writes fail
        self._retry_at = 0.0
        self._closed = False
        self._scan()
        self._fh = None  # the tail segment, opened (unbuffered, append) at the first write
        self._open_tail()

    # -- open / scan ----------------------------------------------------------------------
    def _scan(self) -> None:
        paths = sorted(self.dir.glob("segment-*.log"))
        high = 0  # highest seq of a good record
        reserved = 0  # highest plausible seq of a damaged record: may have been published, never reuse
        for path in paths:
            try:
                first = int(path.stem.split("-")[1])
            except (IndexError, ValueError):
                log.warning("journal_foreign_file_ignored", path=str(path))
                continue
            if not path.is_file() or path.stat().st_size > MAX_SEGMENT_FILE:
                self._move_aside(path, "not a regular file" if not path.is_file()
                                 else f"{path.stat().st_size} bytes, more than any segment ({MAX_SEGMENT_FILE})")
                continue
            seg = _Segment(path, first)
            data = path.read_bytes()
            pos = 0
            good_end = 0
            while pos < len(data):
                if data[pos:pos + 4] != MAGIC:
                    nxt = data.find(MAGIC, pos + 1)
                    self._damaged(path, pos, "bad_magic" if nxt >= 0 else "torn_tail",
                                  f"{(nxt if nxt >= 0 else len(data)) - pos} bytes without a record")
                    if nxt < 0:
                        break
                    pos = nxt
                    continue
                if pos + _HEAD.size > len(data):
                    self._damaged(path, pos, "torn_tail", "record header cut short")
                    break
                _, length, crc = _HEAD.unpack_from(data, pos)
                end = pos + _HEAD.size + length
                if length < _SEQ.size or length > MAX_RECORD:
                    self._damaged(path, pos, "bad_length", f"length {length}")
                    nxt = data.find(MAGIC, pos + 1)
                    if nxt < 0:
                        break
                    pos = nxt
                    continue
                if end > len(data):
                    nxt = data.find(MAGIC, pos + 1)
                    if nxt >= 0:
                        # Records follow: not a torn tail but a damaged length field. Stopping here would
                        # drop (and truncate away) every good record after it, and reuse their seqs.
                        self._damaged(path, pos, "bad_length", f"length {length} runs past the end of the segment")
                        reserved = max(reserved, self._plausible_seq(data, pos, high))
                        pos = nxt
                        continue
                    self._damaged(path, pos, "torn_tail", f"record needs {length} bytes, {len(data) - pos - _HEAD.size} left")
                    reserved = max(reserved, self._plausible_seq(data, pos, high))
                    break
                payload = data[pos + _HEAD.size:end]
                if zlib.crc32(payload) != crc:
                    self._damaged(path, pos, "crc_mismatch", "record CRC does not match")
                    # Kept apart from ``high``: a flipped bit in this seq must not make the good
                    # records after it look out of order (they would be dropped from replay).
                    reserved = max(reserved, self._plausible_seq(data, pos, high))
                    nxt = data.find(MAGIC, pos + 1)
                    if nxt < 0:
                        break
                    pos = nxt
                    continue
                seq, _ = _SEQ.unpack_from(payload, 0)
                if seq <= high:
                    self._damaged(path, pos, "seq_order", f"seq {seq} after {high}")
                else:
                    seg.index[seq] = (pos, end - pos)
                    high = seq
                    reserved = 0  # seqs grow along the file: a damaged record before this one had a lower seq
                pos = end
                good_end = end
            if good_end < len(data) and path == paths[-1]:
                # Keep the torn tail for forensics, then truncate so appends start on a record boundary.
                try:
                    with open(path.with_suffix(".damaged"), "ab") as f:
                        f.write(data[good_end:])
                except OSError as exc:  # a full disk: the bytes are lost, the journal must still open
                    log.error("journal_damaged_tail_not_kept", segment=path.name, bytes=len(data) - good_end,
                              error=exc.strerror)
                with open(path, "r+b") as f:
                    f.truncate(good_end)
            self._segments.append(seg)
        self.last_seq = max(high, reserved)
        if self.damage:
            log.error("journal_damaged", records=len(self.damage), next_seq=self.last_seq + 1,
                      first=self.damage[0].as_dict())

    def _plausible_seq(self, data: bytes, pos: int, high: int) -> int:
        """A damaged record may still have been published; never reuse its seq if it looks sane."""
        try:
            (seq,) = struct.unpack_from("<Q", data, pos + _HEAD.size)  # the seq alone: the topic length may be cut off
        except struct.error:
            return high
        return seq if high < seq <= high + 10_000 else high

    def _move_aside(self, path: Path, why: str) -> None:
        target = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        try:
            os.replace(path, target)
        except OSError as exc:
            why = f"{why}; not moved: {exc.strerror}"
        self._damaged(path, 0, "moved_aside", f"{why}; now {target.name}")
        log.error("state_file_moved_aside", path=str(path), reason=why, moved_to=str(target))

    def _damaged(self, path: Path, offset: int, kind: str, detail: str) -> None:
        self.damage.append(Damage(path.name, offset, kind, detail))

    def _open_tail(self) -> None:
        if not self._segments or self._segments[-1].path.stat().st_size >= self.segment_bytes:
            self._new_segment()
        try:
            self._fh = open(self._segments[-1].path, "ab", buffering=0)
        except OSError as exc:  # a full disk at start-up: writes are held until it can be created
            log.error("journal_segment_not_opened", path=str(self._segments[-1].path), error=exc.strerror)

    def _new_segment(self) -> None:
        first = self.last_seq + 1
        path = self.dir / f"segment-{first:016d}.log"
        self._segments.append(_Segment(path, first))
        while len(self._segments) > self.keep_segments:
            old = self._segments.pop(0)
            old.path.unlink(missing_ok=True)
            log.info("journal_segment_dropped", segment=old.path.name)
        try:
            path.touch()
            if self.fsync:
                fd = os.open(self.dir, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:  # created at the next write that can
            log.error("journal_segment_not_created", path=str(path), error=exc.strerror)

    def reserve_through(self, seq: int, source: str) -> bool:
        """Never hand out ``seq`` or below again: evidence from outside the segments (the publish
        watermark, a recovery checkpoint) shows it was used. When that is above what the
        segments hold, records were lost (a journal cut at a record boundary looks clean):
        reported as damage ``missing_records``. Returns True when the floor was raised."""
        with self._lock:
            if seq <= self.last_seq:
                return False
            self._damaged(Path(source), 0, "missing_records",
                          f"{source} shows seq {seq} was used; the journal ends at {self.last_seq}")
            log.error("journal_records_missing", source=source, used_through=seq, journal_last_seq=self.last_seq)
            self.last_seq = seq
            return True

    # -- writing ---------------------------------------------------------------------------
    def append_many(self, items: list[tuple[bytes, bytes]]) -> list[int]:
        """Give (topic, body) records fresh sequence numbers and write them; durable when this
        returns and ``alarm()`` is None. When the disk refuses them they are held in memory (see the
        module docstring); past ``max_held_bytes`` raises JournalFull and assigns nothing."""
        with self._lock:
            if self._closed:
                raise JournalError("journal is closed")
            recs = []
            seq = self.last_seq
            for topic, body in items:
                seq += 1
                recs.append((seq, _encode(seq, topic, body)))
            nbytes = sum(len(r) for _, r in recs)
            if self._held:
                self._flush_held_locked()
                if self._held and self._held_bytes + nbytes > self.max_held_bytes:
                    raise JournalFull(f"journal {self._unwritable['path'] if self._unwritable else self.dir} "
                                      f"not writable ({self._unwritable['error'] if self._unwritable else '?'}) "
                                      f"and {self._held_bytes} bytes held in memory, the most allowed")
            self.last_seq = seq
            self._held += recs
            self._held_bytes += nbytes
            self._flush_held_locked()
            return [s for s, _ in recs]

    def flush_held(self) -> bool:
        """Try to write what is held (at most every ``retry_s``); True when nothing is held."""
        with self._lock:
            if self._closed:
                return not self._held
            return self._flush_held_locked()

    def alarm(self) -> dict | None:
        """None while every record is in a segment; else which file failed, why, since when, and
        what is held in memory (for health, metrics and the sd_notify STATUS line).

        The main loop asks every tick. While the publisher holds the lock through a write (a disk that
        stalls on fsync holds it for seconds), the answer is the last one computed: the loop that pings
        the watchdog and saves the crash checkpoint must never wait for the disk."""
        if not self._lock.acquire(timeout=0.05):
            return self._last_alarm
        try:
            if self._unwritable is None and not self._held:
                self._last_alarm = None
            else:
                self._last_alarm = {
                    **(self._unwritable or {"path": str(self._segments[-1].path), "error": "", "since_ns": 0}),
                    "held_records": len(self._held), "held_bytes": self._held_bytes,
                    "held_seqs": [self._held[0][0], self._held[-1][0]] if self._held else [],
                    "max_held_bytes": self.max_held_bytes}
            return self._last_alarm
        finally:
            self._lock.release()

    def _flush_held_locked(self) -> bool:
        if not self._held:
            return True
        now = time.monotonic()
        if self._unwritable is not None and now < self._retry_at:
            return False  # failed a moment ago: a write now would fail the same way
        seg = self._segments[-1]
        data = b"".join(r for _, r in self._held)
        try:
            pos = self._write_locked(seg, data)
        except OSError as exc:
            self._retry_at = now + self.retry_s
            if self._unwritable is None:
                self._unwritable = {"path": str(seg.path), "error": exc.strerror or str(exc),
                                    "since_ns": time.time_ns()}
                log.error("journal_not_writable", path=str(seg.path), error=exc.strerror, errno=exc.errno,
                          held_records=len(self._held), first_held_seq=self._held[0][0],
                          max_held_bytes=self.max_held_bytes)
            return False
        for s, rec in self._held:
            seg.index[s] = (pos, len(rec))
            pos += len(rec)
        if self._unwritable is not None:
            log.warning("journal_writable_again", path=str(seg.path), records_written=len(self._held),
                        first_seq=self._held[0][0], last_seq=self._held[-1][0],
                        held_s=round((time.time_ns() - self._unwritable["since_ns"]) / 1e9, 1))
            self._unwritable = None
        self._held = []
        self._held_bytes = 0
        if pos >= self.segment_bytes:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
            self._new_segment()
        return True

    def _write_locked(self, seg: _Segment, data: bytes) -> int:
        """Append ``data`` to the tail segment (fsync per config); returns the offset it starts at.
        On failure the segment is cut back to that offset, so it never ends in half a record."""
        if self._fh is None:
            self._fh = open(seg.path, "ab", buffering=0)
        fd = self._fh.fileno()
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.fsync:
                os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, start)
            except OSError as exc:
                log.error("journal_cut_back_failed", path=str(seg.path), offset=start, error=exc.strerror)
            raise
        return start

    # -- reading ---------------------------------------------------------------------------
    def read(self, first: int, last: int, limit: int = 1000) -> list[tuple[int, bytes, bytes]]:
        """Records with first <= seq <= last (at most ``limit``), oldest first."""
        out: list[tuple[int, bytes, bytes]] = []
        with self._lock:
            for seg in self._segments:
                # seqs grow along a segment: skip whole segments outside the range without a scan
                if not seg.index or next(reversed(seg.index)) < first or next(iter(seg.index)) > last:
                    continue
                wanted = [s for s in seg.index if first <= s <= last]
                if not wanted:
                    continue
                with open(seg.path, "rb") as f:
                    for s in sorted(wanted):
                        off, ln = seg.index[s]
                        f.seek(off)
                        rec = f.read(ln)
                        payload = rec[_HEAD.size:]
                        if zlib.crc32(payload) != _HEAD.unpack_from(rec, 0)[2]:
                            log.error("journal_record_damaged_on_read", seq=s, segment=seg.path.name)
                            continue
                        seq, tlen = _SEQ.unpack_from(payload, 0)
                        topic = payload[_SEQ.size:_SEQ.size + tlen]
                        out.append((seq, topic, payload[_SEQ.size + tlen:]))
                        if len(out) >= limit:
                            return out
            for s, rec in self._held:  # not on disk yet (a full disk): served from memory
                if first <= s <= last:
                    payload = rec[_HEAD.size:]
                    seq, tlen = _SEQ.unpack_from(payload, 0)
                    out.append((seq, payload[_SEQ.size:_SEQ.size + tlen], payload[_SEQ.size + tlen:]))
                    if len(out) >= limit:
                        return out
        return out

    def record_seqs(self) -> list[int]:
        """The seqs of the records the journal holds, oldest first (gaps where records were damaged)."""
        with self._lock:
            return [s for seg in self._segments for s in seg.index] + [s for s, _ in self._held]

    @property
    def first_seq(self) -> int:
        for seg in self._segments:
            if seg.index:
                return min(seg.index)
        if self._held:
            return self._held[0][0]
        return self.last_seq + 1

    def size_bytes(self) -> int:
        return sum(s.path.stat().st_size for s in self._segments if s.path.exists())

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._retry_at = 0.0
            if not self._flush_held_locked():
                log.error("journal_closed_with_records_unwritten", path=self._unwritable["path"],
                          error=self._unwritable["error"], records=len(self._held),
                          first_seq=self._held[0][0], last_seq=self._held[-1][0])
            self._closed = True
            if self._fh is not None:
                if self.fsync:
                    try:
                        os.fsync(self._fh.fileno())
                    except OSError as exc:
                        log.error("journal_fsync_failed_at_close", error=exc.strerror)
                self._fh.close()
                self._fh = None


def read_journal(directory: str | Path, damage: list[Damage] | None = None) -> Iterator[tuple[int, bytes, bytes]]:
    """Every good record ``(seq, topic, body)`` of a journal directory, segment by segment (oldest
    first), WITHOUT changing anything: for offline readers (``coilsight report``) of a journal a
    running agent may be writing, or one copied from a line box. What was damaged is appended to
    ``damage``: a torn tail (maybe a record being written) is reported, not truncated; a damaged
    record is skipped and the scan resynchronises on the next magic, as ``Journal`` does."""
    damage = damage if damage is not None else []
    for path in sorted(Path(directory).glob("segment-*.log")):
        try:
            if not path.is_file() or path.stat().st_size > MAX_SEGMENT_FILE:
                damage.append(Damage(path.name, 0, "moved_aside", "not a regular segment file; not read"))
                continue
            data = path.read_bytes()
        except OSError as exc:
            damage.append(Damage(path.name, 0, "unreadable", str(exc.strerror or exc)))
            continue
        pos = 0
        while pos < len(data):
            bad = None
            if data[pos:pos + 4] != MAGIC:  # no magic after it: a tail being written (as Journal's scan says)
                bad = "bad_magic" if data.find(MAGIC, pos + 1) >= 0 else "torn_tail"
            elif pos + _HEAD.size > len(data):
                bad = "torn_tail"
            else:
                _, length, crc = _HEAD.unpack_from(data, pos)
                end = pos + _HEAD.size + length
                if length < _SEQ.size or length > MAX_RECORD or end > len(data):
                    bad = "bad_length" if end <= len(data) or data.find(MAGIC, pos + 1) >= 0 else "torn_tail"
                elif zlib.crc32(data[pos + _HEAD.size:end]) != crc:
                    bad = "crc_mismatch"
            if bad is not None:
                nxt = data.find(MAGIC, pos + 1)
                damage.append(Damage(path.name, pos, bad, f"{(nxt if nxt >= 0 else len(data)) - pos} bytes skipped"))
                if nxt < 0:
                    break
                pos = nxt
                continue
            payload = data[pos + _HEAD.size:end]
            seq, tlen = _SEQ.unpack_from(payload, 0)
            yield seq, payload[_SEQ.size:_SEQ.size + tlen], payload[_SEQ.size + tlen:]
            pos = end
