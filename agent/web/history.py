"""Past coils from the agent's journal, and defect crops, read-only.

The journal belongs to the agent: the page never opens it with agent.journal.Journal (which
creates, truncates and appends); it reads the segment files as they are, record by record, with
the layout and CRC check of agent/journal.py, and keeps each coil's final summary. Each refresh
reads only what was appended since the last one; a segment that shrank (the agent cut a torn tail
at start-up) is read again from its start, a segment that is gone (rotated away) is forgotten.

Crops: a crop is served only for a (coil, id) pair the page saw in a message from the agent (a
track's or event's ``crop``), each part matching a strict pattern; the page asks the agent for it
over the control socket (the agent finds its own file), and reads the agent's crop file itself
(agent/crops.py ``read_crop``, the directory named by the agent's rule from the coil) only when the
agent does not answer. Nothing a request carries is ever joined into a path.
"""
from __future__ import annotations

import os
import re
import stat
import threading
import time
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Callable
from urllib.parse import quote

import structlog

from agent.crops import CropError, read_crop
from agent.journal import _HEAD, _SEQ, MAGIC, MAX_RECORD
from agent.protocol import unpack_body

log = structlog.get_logger(__name__)

SEGMENT_RE = re.compile(r"segment-(\d{16})\.log")
COIL_RE = re.compile(r"[A-Za-z0-9_:-][A-Za-z0-9_.:-]{0,63}")  # the protocol's names, not starting with '.'
CROP_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
READ_CHUNK = 8 << 20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def parse_crop(coil: object, value: object) -> tuple[str, str] | None:
    """An agent message's ``crop`` -> (coil, crop id), or None when it is not one the page serves.

    The coil layer (docs/protocol.md 2.6) names a crop ``COIL/TRACK_ID``; a bare id (int or str)
    belongs to the message's own coil. Both parts must match strict patterns."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    text = str(value)
    owner, sep, cid = text.rpartition("/")
    if not sep:
        owner, cid = coil, text
    if not isinstance(owner, str) or not COIL_RE.fullmatch(owner) or not CROP_RE.fullmatch(cid):
        return None
    return owner, cid


class CropStore:
    """Crops the page may serve: (coil, id) pairs named in the agent's messages, newest kept.

    ``fetch(coil, track_id)`` asks the agent for the PNG over its control socket (`crop`, docs/
    protocol.md 3); without it, or when the agent has none, the file ``<crops dir>/<coil>/<id>.png``
    is read, if it is a regular file inside the crops directory."""

    def __init__(self, crops_dir: Path, keep: int = 20_000,
                 fetch: Callable[[str, int], bytes | None] | None = None):
        self.dir = crops_dir
        self.keep = keep
        self.fetch = fetch
        self._cache: OrderedDict[tuple[str, str], bytes] = OrderedDict()  # crops served lately
        self.cache_bytes = 32 << 20
        self.fresh_s = 10.0  # how long after it was named a missing crop is asked for again (a busy box)
        self._known: OrderedDict[tuple[str, str], float] = OrderedDict()  # -> when named (monotonic)
        self._lock = threading.Lock()

    def note(self, coil: object, crop: object) -> str | None:
        """Remember a crop an agent message names; returns the page's URL for it, or None."""
        parsed = parse_crop(coil, crop)
        if parsed is None:
            return None
        with self._lock:
            self._known.setdefault(parsed, time.monotonic())
            self._known.move_to_end(parsed)
            while len(self._known) > self.keep:
                self._known.popitem(last=False)
        return f"/crops/{quote(parsed[0], safe='')}/{parsed[1]}.png"

    def read(self, coil: str, cid: str) -> bytes | None:
        """The PNG bytes of a known crop, or None (unknown pair, the agent has none, no such file)."""
        if not (COIL_RE.fullmatch(coil) and CROP_RE.fullmatch(cid)):
            return None
        with self._lock:
            named = self._known.get((coil, cid))
            cached = self._cache.get((coil, cid))
        if named is None:
            return None
        if cached is not None:  # a crop never changes: every open page asks for it, the agent once
            return cached
        data = self._fetch_or_read(coil, cid, named)
        if data is not None:
            with self._lock:
                self._cache[(coil, cid)] = data
                size = sum(len(v) for v in self._cache.values())
                while size > self.cache_bytes and self._cache:
                    size -= len(self._cache.popitem(last=False)[1])
        return data

    def _fetch_or_read(self, coil: str, cid: str, named: float) -> bytes | None:
        if self.fetch is not None and cid.isdigit():
            # The agent writes a crop on its crop thread just after it names it: a page asking at
            # once may be a moment early, so a crop named in the last 10 s is asked for again.
            while True:
                try:
                    data = self.fetch(coil, int(cid))
                except (TimeoutError, ValueError, OSError) as exc:
                    log.debug("web_crop_not_fetched", coil=coil, crop=cid, error=str(exc))
                    break
                if data is not None:
                    return data if data.startswith(PNG_MAGIC) else None
                if time.monotonic() - named > self.fresh_s:
                    break
                time.sleep(0.1)
        return self._read_file(coil, cid)

    def _read_file(self, coil: str, cid: str) -> bytes | None:
        """The agent's own crop file, read-only (agent/crops.py ``read_crop``: the directory name is
        derived from the coil by the agent's rule, never taken from the request)."""
        if not cid.isdigit():
            return None
        try:
            data = read_crop(self.dir, coil, int(cid))
        except (CropError, OSError, ValueError):
            return None
        return data if data.startswith(PNG_MAGIC) else None


class JournalHistory:
    """Final coil summaries found in the journal's segment files, newest ``keep`` coils."""

    def __init__(self, journal_dir: Path, keep: int = 500):
        self.dir = journal_dir
        self.keep = keep
        self._offsets: dict[str, int] = {}  # segment name -> bytes read through (a record boundary)
        self._coils: OrderedDict[str, dict] = OrderedDict()  # coil -> final summary, oldest first
        self._lock = threading.Lock()
        self.damaged = 0  # records skipped because their CRC or length did not check out

    def refresh(self) -> None:
        with self._lock:
            try:
                names = sorted(p.name for p in self.dir.iterdir() if SEGMENT_RE.fullmatch(p.name))
            except OSError:
                return  # no journal yet (the agent never ran here) or not readable: no past coils
            for gone in set(self._offsets) - set(names):
                del self._offsets[gone]
            for name in names:
                self._read_segment(self.dir / name)

    def _read_segment(self, path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return
            pos = self._offsets.get(path.name, 0)
            if st.st_size < pos:
                pos = 0  # cut back by the agent (torn tail at start-up): read it again
            f.seek(pos)
            buf = b""
            while True:
                chunk = f.read(READ_CHUNK)
                if not chunk:
                    break
                buf += chunk
                used = self._records(buf)
                pos += used
                buf = buf[used:]
            self._offsets[path.name] = pos

    def _records(self, data: bytes) -> int:
        """Parse whole records in ``data``; returns the bytes consumed (a partial tail is left)."""
        pos = 0
        while pos + _HEAD.size <= len(data):
            if data[pos:pos + 4] != MAGIC:
                nxt = data.find(MAGIC, pos + 1)
                if nxt < 0:
                    return max(pos, len(data) - 3)  # a magic may start in the last 3 bytes
                self.damaged += 1
                pos = nxt
                continue
            _, length, crc = _HEAD.unpack_from(data, pos)
            if length < _SEQ.size or length > MAX_RECORD:
                self.damaged += 1
                pos += 4
                continue
            end = pos + _HEAD.size + length
            if end > len(data):
                return pos  # not written yet: the next refresh reads it
            payload = data[pos + _HEAD.size:end]
            if zlib.crc32(payload) == crc:
                _, tlen = _SEQ.unpack_from(payload, 0)
                if payload[_SEQ.size:_SEQ.size + tlen] == b"summary":
                    self._summary(payload[_SEQ.size + tlen:])
            else:
                self.damaged += 1
            pos = end
        return pos

    def _summary(self, body: bytes) -> None:
        try:
            msg = unpack_body(body)
        except ValueError:
            return
        coil = msg.get("coil")
        if not msg.get("final") or not isinstance(coil, str):
            return
        self._coils.pop(coil, None)
        self._coils[coil] = msg
        while len(self._coils) > self.keep:
            self._coils.popitem(last=False)

    def coils(self) -> list[dict]:
        """Final summaries, newest first."""
        with self._lock:
            return list(reversed(self._coils.values()))

    def coil(self, name: str) -> dict | None:
        with self._lock:
            return self._coils.get(name)
