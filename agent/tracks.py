"""Stitching: per-frame `defect` events -> one `track` per physical defect (docs/protocol.md 2.6).

A scratch that crosses a frame boundary, or a defect two cameras both see where their views overlap
across the width, arrives as several `defect` events. Events of the same coil and class whose
strip boxes (mm) touch or lie within ``gap_mm`` of each other are parts of one track; a part that
touches two open tracks joins them. Geometry only: a box is ``[across0, along0, across1, along1]``,
from the event's centre and size.

A track closes when no new part came in the next frame: once frame ``last + 1`` of each of its
cameras is through the models (``frames_done``; a frame's events always come before its note), and
frame ``first - 1`` too (two workers finish frames out of order: a defect over frames 7 and 8 whose
frame 8 is through first must wait for frame 7's part), and
every other camera of the line got that far too (the cameras that sent frames in the last
``ACTIVE_S``: a camera whose frames of the coil come late must not find the track closed); or at
the coil's summary. Memory is bounded: only
open tracks are kept, at most ``max_open`` of them (the oldest is closed early past that, counted in
``overflow``), and per coil and camera the indices of recently finished frames.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

MAX_EVENT_SEQS = 1000  # a track lists at most this many of its events' seqs (event_count has them all)
DONE_WINDOW = 4096  # finished frame indices remembered per coil and camera, below its highest
ACTIVE_S = 60.0  # a camera with frames through the models this recently is one of the line's


def event_box(ev: dict) -> tuple[float, float, float, float]:
    """[across0, along0, across1, along1] in mm: the event's centre +- half its width and length."""
    x, y, w, h = float(ev["across_mm"]), float(ev["along_mm"]), float(ev["width_mm"]), float(ev["length_mm"])
    return x - w / 2.0, y - h / 2.0, x + w / 2.0, y + h / 2.0


def boxes_touch(a, b, gap_mm: float) -> bool:
    """Boxes overlap, touch, or are at most gap_mm apart, across and along."""
    return a[0] - gap_mm <= b[2] and b[0] - gap_mm <= a[2] and a[1] - gap_mm <= b[3] and b[1] - gap_mm <= a[3]


def stitchable(ev: dict) -> bool:
    """An event with a strip position and size (classification-only events cover a whole frame)."""
    return all(isinstance(ev.get(k), (int, float)) for k in ("across_mm", "along_mm", "width_mm", "length_mm"))


@dataclass
class Track:
    coil: str
    class_name: str
    class_id: int
    box: list[float]
    frames: dict[str, list[int]]
    order: int  # opening order: the oldest is closed first past max_open
    event_seqs: list[int] = field(default_factory=list)
    event_count: int = 0
    area_mm2: float = 0.0
    confidence: float = 0.0
    best: tuple | None = None  # the surest part's key (coil, camera, index, bbox_px, class_id): its crop
    track_id: int = 0  # given when it closes, per coil from 1

    def add(self, ev: dict, seq: int | None, box) -> None:
        self.box = [min(self.box[0], box[0]), min(self.box[1], box[1]), max(self.box[2], box[2]),
                    max(self.box[3], box[3])]
        cam, idx = str(ev["camera"]), int(ev["index"])
        r = self.frames.get(cam)
        self.frames[cam] = [min(r[0], idx), max(r[1], idx)] if r else [idx, idx]
        if seq is not None and len(self.event_seqs) < MAX_EVENT_SEQS:
            self.event_seqs.append(seq)
        self.event_count += 1
        self.area_mm2 += float(ev.get("area_mm2", 0.0))
        conf = float(ev.get("confidence", 0.0))
        if self.best is None or conf > self.confidence:
            self.best = part_key(ev)
        self.confidence = max(self.confidence, conf)

    def absorb(self, other: "Track") -> None:
        self.box = [min(self.box[0], other.box[0]), min(self.box[1], other.box[1]),
                    max(self.box[2], other.box[2]), max(self.box[3], other.box[3])]
        for cam, (a, b) in other.frames.items():
            r = self.frames.get(cam)
            self.frames[cam] = [min(r[0], a), max(r[1], b)] if r else [a, b]
        self.event_seqs = sorted(self.event_seqs + other.event_seqs)[:MAX_EVENT_SEQS]
        self.event_count += other.event_count
        self.area_mm2 += other.area_mm2
        if other.confidence > self.confidence:
            self.best, self.confidence = other.best, other.confidence
        self.order = min(self.order, other.order)

    def body(self) -> dict:
        """The `track` message body (docs/protocol.md 2.6), without the common keys."""
        x0, y0, x1, y1 = self.box
        return {"coil": self.coil, "track_id": self.track_id, "class": self.class_name, "class_id": self.class_id,
                "cameras": sorted(self.frames), "frames": {c: list(r) for c, r in sorted(self.frames.items())},
                "event_seqs": list(self.event_seqs), "event_count": self.event_count,
                "bbox_mm": [round(x0, 2), round(y0, 2), round(x1, 2), round(y1, 2)],
                "across_mm": round((x0 + x1) / 2.0, 2), "along_mm": round((y0 + y1) / 2.0, 2),
                "width_mm": round(x1 - x0, 2), "length_mm": round(y1 - y0, 2),
                "area_mm2": round(self.area_mm2, 2), "confidence": round(self.confidence, 4)}


def part_key(ev: dict) -> tuple:
    """Identifies one event's part both where it is inferred and where it is published."""
    return (str(ev["coil"]), str(ev["camera"]), int(ev["index"]), tuple(int(v) for v in ev.get("bbox_px", ())),
            int(ev["class_id"]))


class Stitcher:
    """Not thread-safe: the publisher thread owns it (agent/intel.py)."""

    def __init__(self, gap_mm: float = 5.0, max_open: int = 4096, clock=time.monotonic):
        self.gap_mm = gap_mm
        self.max_open = max_open
        self._open: dict[str, list[Track]] = {}  # coil -> open tracks
        self._n_open = 0
        self._order = 0
        self._done: OrderedDict[str, dict[str, tuple[set[int], list[int]]]] = OrderedDict()  # coil -> cam -> (set, [hi])
        self.overflow = 0  # tracks closed early because max_open were open
        self.clock = clock
        self._active: dict[str, float] = {}  # camera -> when its frames were last through the models

    @property
    def open_count(self) -> int:
        return self._n_open

    def add(self, ev: dict, seq: int | None = None) -> list[Track]:
        """One defect event (with its published seq). Returns tracks closed early (overflow)."""
        if not stitchable(ev):
            return []
        coil, cid = str(ev["coil"]), int(ev["class_id"])
        box = event_box(ev)
        tracks = self._open.setdefault(coil, [])
        hits = [t for t in tracks if t.class_id == cid and boxes_touch(t.box, box, self.gap_mm)]
        if hits:
            keep = min(hits, key=lambda t: t.order)
            for t in hits:
                if t is not keep:
                    keep.absorb(t)
                    tracks.remove(t)
                    self._n_open -= 1
            keep.add(ev, seq, box)
        else:
            self._order += 1
            keep = Track(coil, str(ev["class"]), cid, list(box), {}, self._order)
            keep.add(ev, seq, box)
            tracks.append(keep)
            self._n_open += 1
        out = []
        while self._n_open > self.max_open:
            c, oldest = min(((c, t) for c, ts in self._open.items() for t in ts), key=lambda ct: ct[1].order)
            self._open[c].remove(oldest)
            self._n_open -= 1
            self.overflow += 1
            out.append(oldest)
        return out

    def frames_done(self, coil: str, camera: str, indices) -> list[Track]:
        """These frames of the camera are through the models (their events already added): closes
        the coil's tracks that got no part in their next frame."""
        cams = self._done.get(coil)
        if cams is None:
            cams = self._done[coil] = {}
            while len(self._done) > 256:  # coils whose summary never came here: forget the oldest
                self._done.popitem(last=False)
        self._active[camera] = self.clock()
        if len(self._active) > 256:
            horizon = self.clock() - ACTIVE_S
            self._active = {c: t for c, t in self._active.items() if t >= horizon}
        done, hi = cams.setdefault(camera, (set(), [-1]))
        for i in indices:
            done.add(int(i))
            hi[0] = max(hi[0], int(i))
        if len(done) > 2 * DONE_WINDOW:
            floor = hi[0] - DONE_WINDOW
            done.difference_update([i for i in done if i < floor])
        return self._close_due(coil)

    def _close_due(self, coil: str) -> list[Track]:
        tracks = self._open.get(coil)
        if not tracks:
            return []
        cams = self._done.get(coil, {})
        horizon = self.clock() - ACTIVE_S
        line = {c for c, t in self._active.items() if t >= horizon} | set(cams)
        closed = []
        for t in list(tracks):
            top = max(r[1] for r in t.frames.values())
            ok = all(c in cams and r[1] + 1 in cams[c][0] and self._before_done(cams[c], r[0])
                     for c, r in t.frames.items())
            # cameras of the coil without a part here: each must have got past the track too, or a
            # lagging camera's part of the same defect would open a second track
            ok = ok and all(c in cams and cams[c][1][0] > top for c in line if c not in t.frames)
            if ok:
                closed.append(t)
                tracks.remove(t)
                self._n_open -= 1
        return closed

    @staticmethod
    def _before_done(cam: tuple[set[int], list[int]], first: int) -> bool:
        """Frame first - 1 is through (or is none, or older than the frames remembered)."""
        done, hi = cam
        return first == 0 or first - 1 in done or hi[0] - (first - 1) > DONE_WINDOW

    def close_coil(self, coil: str) -> list[Track]:
        """The coil's summary: every open track of it closes; its frame notes are forgotten."""
        tracks = self._open.pop(coil, [])
        self._n_open -= len(tracks)
        self._done.pop(coil, None)
        return sorted(tracks, key=lambda t: (t.box[1], t.box[0]))
