"""Defect crops: a small PNG of each track, kept under ``<state_dir>/crops`` with bounded retention.

Off the inference path. An inference worker hands a frame that has defect events to ``offer()``:
a put on a bounded queue that never waits (a full queue drops the frame, counted in ``dropped``).
The crop thread cuts each event's part (its box plus a margin), scales it to at most ``size_px``
and keeps it in memory, a bounded number of them. When a track closes, the coil layer asks for
``request(coil, track_id, key)``: the surest part's crop, a PNG, is appended to the coil's crop file
``crops/<coil dir>/crops.pack``. Requests go through the same queue as the frames they need, after
them, so the part is there when its request is handled.

One file per coil, not one per crop: creating a file costs about 1.5 ms of CPU on an overlay file
system (measured here), and a heavy coil has hundreds of tracks; an append is one write. Record:
``b"CSC1" | track_id u32 | length u32 | PNG bytes`` (little-endian); the file is flushed after each
record and fsynced when the coil ends. A torn last record (a crash) is ignored by ``read``.
``read_crop(root, coil, track_id)`` reads one offline (a crops folder copied from a line box).

File names never come from raw input: the coil's directory is its name with every character other
than ``A-Z a-z 0-9 _ -`` replaced by ``_`` and a hash of the name appended. Retention: at most
``max_coils`` coil directories and ``max_bytes`` in all; the oldest coils go first (and a coil over
the byte bound alone keeps no more crops). ``read(coil, track_id)`` serves a crop to the control
socket.
"""
from __future__ import annotations

import hashlib
import os
import queue
import re
import shutil
import struct
import threading
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import structlog

from agent.threadnames import name_this_thread

log = structlog.get_logger(__name__)

MAX_PARTS = 2048  # part crops held in memory waiting for their track to close
PACK = "crops.pack"
_REC = struct.Struct("<4sII")  # magic, track id, PNG length
MAGIC = b"CSC1"


class CropError(ValueError):
    """A crop request that cannot be served; the message says why."""


def coil_dir_name(coil: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", coil)[:64]
    return f"{safe}-{hashlib.sha256(coil.encode()).hexdigest()[:10]}"


def crop_id(coil: str, track_id: int) -> str:
    return f"{coil}/{int(track_id)}"


def pack_index(path: Path) -> dict[int, tuple[int, int]]:
    """track id -> (offset, length) of its PNG in a crop file; stops at a torn or foreign record."""
    out: dict[int, tuple[int, int]] = {}
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return out
    pos = 0
    while pos + _REC.size <= len(data):
        magic, track_id, length = _REC.unpack_from(data, pos)
        if magic != MAGIC or pos + _REC.size + length > len(data):
            break
        out[track_id] = (pos + _REC.size, length)
        pos += _REC.size + length
    return out


def read_crop(root: Path, coil: str, track_id: int) -> bytes:
    """One track's PNG from a crops folder (``<state_dir>/crops``), e.g. copied from a line box."""
    path = Path(root) / coil_dir_name(coil) / PACK
    where = pack_index(path).get(int(track_id))
    if where is None:
        raise CropError(f"no crop for coil {coil!r} track {track_id} (never written, not yet written, "
                        f"or deleted by retention)")
    with open(path, "rb") as f:
        f.seek(where[0])
        return f.read(where[1])


def cut(image: np.ndarray, bbox_px, size_px: int, margin_px: int) -> np.ndarray:
    """The part's box plus margin from a [C, H, W] or [H, W] frame, scaled to at most size_px (HW or HWC)."""
    img = image if image.ndim == 2 else (image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1))
    h, w = img.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in bbox_px)
    x0, y0 = max(0, x0 - margin_px), max(0, y0 - margin_px)
    x1, y1 = min(w, max(x1 + margin_px, x0 + 1)), min(h, max(y1 + margin_px, y0 + 1))
    part = np.ascontiguousarray(img[y0:y1, x0:x1])
    scale = size_px / max(part.shape[0], part.shape[1])
    if scale < 1.0:
        size = (max(1, round(part.shape[1] * scale)), max(1, round(part.shape[0] * scale)))
        part = cv2.resize(part, size, interpolation=cv2.INTER_AREA)
    return part


class CropStore(threading.Thread):
    def __init__(self, root: Path, *, size_px: int = 96, margin_px: int = 8, max_coils: int = 200,
                 max_bytes: int = 256 << 20, queue_size: int = 64):
        super().__init__(name="crops", daemon=True)
        self.root = Path(root)
        self.size_px, self.margin_px = size_px, margin_px
        self.max_coils, self.max_bytes = max_coils, max_bytes
        self._q: queue.Queue = queue.Queue(maxsize=queue_size)
        self._halt = threading.Event()
        self._lock = threading.Lock()  # the offered keys and the coil index
        self._offered: OrderedDict[tuple, None] = OrderedDict()  # part keys whose frame was queued
        self._parts: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._coils: OrderedDict[str, int] = OrderedDict()  # coil dir name -> bytes, oldest first
        self._files: OrderedDict[str, object] = OrderedDict()  # coil dir -> its crop file open for appends
        self._index: dict[str, dict[int, tuple[int, int]]] = {}  # coil dir -> track id -> (offset, length)
        self.dropped = 0  # frames not cropped: the queue was full
        self.requests_dropped = 0  # track crops not written: the queue was full or the part was gone
        self.written = 0
        self.deleted_coils = 0
        self.error: BaseException | None = None
        self.root.mkdir(parents=True, exist_ok=True)
        self._scan()

    def _scan(self) -> None:
        dirs = [d for d in self.root.iterdir() if d.is_dir() and not d.is_symlink()]
        for d in sorted(dirs, key=lambda d: d.stat().st_mtime):
            self._coils[d.name] = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
        self._enforce(keep=None)

    # -- producers (inference workers, the publisher thread) ----------------------------------
    def offer(self, image: np.ndarray, events: list[dict], keepalive=None) -> bool:
        """A frame with defect events (its parts may become track crops). Never waits."""
        from agent.tracks import part_key

        keys = [part_key(ev) for ev in events]
        try:
            self._q.put_nowait(("frame", image, [(k, ev["bbox_px"]) for k, ev in zip(keys, events)], keepalive))
        except queue.Full:
            self.dropped += 1
            return False
        with self._lock:
            for k in keys:
                self._offered[k] = None
            while len(self._offered) > 4 * MAX_PARTS:
                self._offered.popitem(last=False)
        return True

    def request(self, coil: str, track_id: int, key: tuple | None) -> str | None:
        """A track closed: write its crop (the part ``key``). Returns the crop id, or None when
        there will be none (its frame was not cropped, or the queue is full)."""
        with self._lock:
            if key is None or key not in self._offered:
                return None
        try:
            self._q.put_nowait(("track", coil, int(track_id), key))
        except queue.Full:
            self.requests_dropped += 1
            return None
        return crop_id(coil, track_id)

    def coil_done(self, coil: str) -> None:
        """Forget the coil's parts still held (its tracks are all closed)."""
        try:
            self._q.put_nowait(("coil", coil))
        except queue.Full:
            pass  # the parts age out of the bounded memory anyway

    # -- control socket -------------------------------------------------------------------------
    def read(self, coil, track_id) -> bytes:
        if not isinstance(coil, str) or not coil or type(track_id) is not int or track_id < 1:
            raise CropError("a crop request needs coil (a name) and track_id (an integer >= 1)")
        name = coil_dir_name(coil)
        with self._lock:
            where = self._index.get(name, {}).get(track_id)
        if where is None:  # a coil of an earlier run: read its file
            return read_crop(self.root, coil, track_id)
        try:
            with open(self.root / name / PACK, "rb") as f:
                f.seek(where[0])
                data = f.read(where[1])
        except FileNotFoundError:
            data = b""
        if len(data) != where[1]:
            raise CropError(f"no crop for coil {coil!r} track {track_id} (deleted by retention)")
        return data

    def stats(self) -> dict:
        with self._lock:
            return {"coils": len(self._coils), "bytes": sum(self._coils.values()), "written": self.written,
                    "dropped": self.dropped, "requests_dropped": self.requests_dropped,
                    "deleted_coils": self.deleted_coils, "queued": self._q.qsize()}

    # -- thread ---------------------------------------------------------------------------------
    def stop(self, timeout: float = 5.0) -> None:
        self._halt.set()
        self.join(timeout)
        if not self.is_alive():
            for name in list(self._files):
                self._close_file(name)

    def run(self) -> None:
        name_this_thread()
        while not (self._halt.is_set() and self._q.empty()):
            try:
                job = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._handle(job)
            except Exception as exc:  # a crop is never worth the thread: counted, logged, go on
                self.requests_dropped += job[0] == "track"
                log.warning("crop_failed", kind=job[0], error=str(exc))

    def _handle(self, job: tuple) -> None:
        kind = job[0]
        if kind == "frame":
            _, image, parts, _keepalive = job
            for key, bbox in parts:
                self._parts[key] = cut(image, bbox, self.size_px, self.margin_px)
                while len(self._parts) > MAX_PARTS:
                    self._parts.popitem(last=False)
        elif kind == "track":
            _, coil, track_id, key = job
            part = self._parts.get(key)
            if part is None:
                self.requests_dropped += 1
                return
            self._write(coil, track_id, part)
        elif kind == "coil":
            for k in [k for k in self._parts if k[0] == job[1]]:
                del self._parts[k]
            self._close_file(coil_dir_name(job[1]))

    def _close_file(self, name: str) -> None:
        f = self._files.pop(name, None)
        if f is not None:
            try:
                os.fsync(f.fileno())
            finally:
                f.close()

    def _write(self, coil: str, track_id: int, part: np.ndarray) -> None:
        ok, png = cv2.imencode(".png", part if part.ndim == 2 else part[..., ::-1])
        if not ok:
            raise RuntimeError("PNG encoding failed")
        data = png.tobytes()
        name = coil_dir_name(coil)
        with self._lock:
            if name not in self._coils:
                self._coils[name] = 0
            if self._coils[name] + len(data) + _REC.size > self.max_bytes:  # this coil alone would pass the bound
                self.requests_dropped += 1
                return
        f = self._files.get(name)
        if f is None:
            (self.root / name).mkdir(exist_ok=True)
            f = self._files[name] = open(self.root / name / PACK, "ab")
            while len(self._files) > 4:  # coils still open on several cameras: a few handles at most
                self._close_file(next(iter(self._files)))
        offset = f.tell()
        f.write(_REC.pack(MAGIC, track_id, len(data)) + data)
        f.flush()  # the control socket reads it from the file
        with self._lock:
            self._coils[name] += len(data) + _REC.size
            self._coils.move_to_end(name)
            self._index.setdefault(name, {})[track_id] = (offset + _REC.size, len(data))
            self.written += 1
        self._enforce(keep=name)

    def _enforce(self, keep: str | None) -> None:
        """Oldest coils out until at most max_coils and max_bytes remain (never the one being written)."""
        while True:
            with self._lock:
                total = sum(self._coils.values())
                if len(self._coils) <= self.max_coils and total <= self.max_bytes:
                    return
                victim = next((c for c in self._coils if c != keep), None)
                if victim is None:
                    return
                del self._coils[victim]
                self._index.pop(victim, None)
                self.deleted_coils += 1
            f = self._files.pop(victim, None)
            if f is not None:
                f.close()
            shutil.rmtree(self.root / victim, ignore_errors=True)
