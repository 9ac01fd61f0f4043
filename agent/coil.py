"""Per-coil state: frame accounting, defects and deadline (agent/summary.py writes the summary).

Every distinct frame a camera sent for a coil ends in exactly one state:
inspected, gated_out, rejected (by reason), shed, missing (never received), or lost (the agent
died while it was in flight). Until then it is pending. Invariants, checked by the tests:

    received = inspected + gated_out + rejected + shed + pending + lost
    sent     = received + missing        (sent from the cameras' coil_end messages)

Duplicates (a frame index received again) are counted apart and never inspected twice. Frames
that arrive after their camera ended the coil (coil_end, or a move to the next coil) are counted in
that coil like any other, and also as ``after_end``; a coil whose camera still sends after its end
stays open until ``late_hold_s`` passes without a frame for it, so interleaved and reordered frames
are in its summary. Frames of a coil whose final summary is out are rejected (``stale_coil``) and
counted per closed coil in ``late_frames()``. A rejection counts in the summary only as the frame
it rejects: ``rejected`` = the sum of ``rejected_by_reason``.
A coil closes when every camera that took part has ended it and nothing is pending, when no
frame arrived for ``coil_idle_timeout_s`` (end reason ``idle_timeout``), when a camera starts
another coil first (``next_coil``), or at shutdown (``shutdown``). An unfinished coil gets a
provisional summary at ``provisional_at`` x budget; the final one follows.
"""
from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import structlog

from agent.summary import TERMINAL, build_summary

log = structlog.get_logger(__name__)


@dataclass
class CameraCoil:
    camera: str
    seen: dict[int, str] = field(default_factory=dict)  # frame index -> state ("pending" until terminal)
    ended: bool = False
    sent: int | None = None  # from coil_end
    end_reason: str | None = None
    max_pos_mm: float = 0.0
    duplicates: int = 0
    after_end: int = 0  # frames received after this camera ended the coil (counted in received too)
    rejected_by_reason: dict[str, int] = field(default_factory=dict)

    def count(self, state: str) -> int:
        return sum(1 for s in self.seen.values() if s == state)


@dataclass
class Coil:
    coil: str
    started_wall_ns: int
    started_mono: float
    last_frame_mono: float
    cameras: dict[str, CameraCoil] = field(default_factory=dict)
    defects_by_class: dict[str, int] = field(default_factory=dict)
    worst: list[tuple[float, int, dict]] = field(default_factory=list)  # min-heap of (severity, n, event)
    n_defects: int = 0
    pending: int = 0
    provisional_sent: bool = False
    end_reason: str | None = None
    length_mm: float | None = None
    restored: bool = False  # rebuilt from a checkpoint after a crash, and no frame since
    lot: dict = field(default_factory=dict)  # wafer profile: dies and patterns summed over the lot (engines/wafer.py)
    # The summary's `models`, `profile` and `backend`: those of the models that took this coil's
    # latest frame, so that a hot swap after (or during) the coil does not relabel it. None until
    # a frame has been through the models; the summary then names the models running at the time.
    models: dict | None = None

    def camera(self, camera: str) -> CameraCoil:
        cam = self.cameras.get(camera)
        if cam is None:
            cam = self.cameras[camera] = CameraCoil(camera)
        return cam

    @property
    def all_ended(self) -> bool:
        return bool(self.cameras) and all(c.ended for c in self.cameras.values())


def _ranges(indices: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for i in sorted(indices):
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


class CoilRegistry:
    """Thread-safe: ingest, inference and the main loop all report here."""

    def __init__(self, *, budget_s: float, provisional_at: float, idle_timeout_s: float, worst_n: int,
                 classes: tuple[str, ...], frame_height_mm: float = 0.0, clock=time.monotonic,
                 late_hold_s: float = 2.0):
        self.budget_s = budget_s
        self.provisional_at = provisional_at
        self.idle_timeout_s = idle_timeout_s
        self.worst_n = worst_n
        self.classes = classes
        self.clock = clock
        self._lock = threading.Lock()
        self._coils: dict[str, Coil] = {}
        self._closed: dict[str, float] = {}  # coil id -> close time (to reject stale frames)
        self._late: dict[str, int] = {}  # closed coil id -> frames that came after its final summary
        self.late_hold_s = late_hold_s
        self._current: dict[str, str] = {}  # camera -> coil it is sending
        # What the registry produced lately (defect events, final summaries), with wall time:
        # a crash checkpoint keeps them so a restart can re-send what never reached the journal.
        self._recent: deque[tuple[int, str, dict]] = deque(maxlen=20_000)

    # -- ingest side -------------------------------------------------------------------

    @classmethod
    def for_config(cls, cfg, classes: tuple[str, ...]) -> "CoilRegistry":
        """The registry an agent config asks for (agent.config.Config: coil budget, provisional
        point, idle timeout, worst defects kept), for a model pack's classes."""
        return cls(budget_s=cfg.coil.budget_s, provisional_at=cfg.coil.provisional_at,
                   idle_timeout_s=cfg.ingest.coil_idle_timeout_s, worst_n=cfg.coil.worst_defects, classes=classes)
    def _open(self, coil: str, now: float) -> Coil:
        c = self._coils.get(coil)
        if c is None:
            c = self._coils[coil] = Coil(coil, time.time_ns(), now, now)
            log.info("coil_started", coil=coil)
        return c

    def _switch(self, camera: str, coil: str, now: float) -> list[dict]:
        """A camera moved to another coil without ending the last one: end it there."""
        out: list[dict] = []
        prev = self._current.get(camera)
        target = self._coils.get(coil)
        if target is not None and camera in target.cameras and target.cameras[camera].ended:
            # A late (reordered) frame of a coil this camera already ended: it is counted there,
            # and must not end the coil the camera is sending now.
            return out
        if prev is not None and prev != coil and prev in self._coils:
            cc = self._coils[prev].camera(camera)
            if not cc.ended:
                cc.ended, cc.end_reason = True, "next_coil"
                log.warning("coil_not_ended", coil=prev, camera=camera, next_coil=coil)
                out += self._maybe_close(self._coils[prev], now)
        self._current[camera] = coil
        return out

    def is_closed(self, coil: str) -> bool:
        with self._lock:
            return coil in self._closed

    def coil_start(self, camera: str, coil: str) -> list[dict]:
        now = self.clock()
        with self._lock:
            if coil in self._closed:
                return []
            out = self._switch(camera, coil, now)
            self._open(coil, now).camera(camera)
            return out

    def coil_end(self, camera: str, coil: str, frames: int, length_mm: float | None) -> list[dict]:
        now = self.clock()
        with self._lock:
            if coil in self._closed:
                log.warning("coil_end_for_closed_coil", coil=coil, camera=camera)
                return []
            c = self._open(coil, now)
            cc = c.camera(camera)
            cc.ended, cc.sent, cc.end_reason = True, frames, "coil_end"
            if length_mm is not None:
                c.length_mm = max(c.length_mm or 0.0, length_mm)
            if self._current.get(camera) == coil:
                del self._current[camera]
            return self._maybe_close(c, now)

    def admit(self, camera: str, coil: str, index: int, pos_mm: float) -> tuple[str, list[dict]]:
        """Register a frame's arrival. Returns ("ok" | "duplicate" | "stale_coil", summaries to publish)."""
        now = self.clock()
        with self._lock:
            if coil in self._closed:
                if coil in self._late or len(self._late) < 1000:
                    self._late[coil] = self._late.get(coil, 0) + 1
                return "stale_coil", []
            out = self._switch(camera, coil, now)
            c = self._open(coil, now)
            cc = c.camera(camera)
            if index in cc.seen:
                cc.duplicates += 1
                return "duplicate", out
            if cc.ended:
                cc.after_end += 1
            cc.seen[index] = "pending"
            cc.max_pos_mm = max(cc.max_pos_mm, pos_mm)
            c.pending += 1
            c.last_frame_mono = now
            c.restored = False
            return "ok", out

    def reject(self, camera: str, coil: str, index: int | None, reason: str) -> list[dict]:
        """A frame was rejected after (or instead of) admission: it ends ``rejected``, counted under
        ``reason``. Returns summaries that became due. Only a frame counts: without an index (the
        message could not say which frame it was) nothing is counted here and no coil is opened, and
        a frame already in a terminal state is not counted twice (the caller counts it globally)."""
        if index is None:
            return []
        now = self.clock()
        with self._lock:
            c = self._coils.get(coil)
            if c is None:
                if coil in self._closed:
                    return []
                c = self._open(coil, now)
            cc = c.camera(camera)
            state = cc.seen.get(index)
            if state == "pending":
                c.pending -= 1
            elif state is not None:
                return []  # already terminal
            cc.rejected_by_reason[reason] = cc.rejected_by_reason.get(reason, 0) + 1
            cc.seen[index] = "rejected"
            c.last_frame_mono = now
            return self._maybe_close(c, now)

    def state_of(self, camera: str, coil: str, index: int) -> str | None:
        """The frame's state ("pending", a terminal state), or None for a frame of no open coil."""
        with self._lock:
            c = self._coils.get(coil)
            cc = c.cameras.get(camera) if c is not None else None
            return cc.seen.get(index) if cc is not None else None

    def late_frames(self) -> dict[str, int]:
        """Closed coil -> frames that came after its final summary (rejected as stale_coil)."""
        with self._lock:
            return dict(self._late)

    # -- inference side ------------------------------------------------------------------
    def finish(self, camera: str, coil: str, index: int, state: str, events: list[dict] = (),
               models: dict | None = None, lot_update=None) -> list[dict]:
        """A pending frame reached a terminal state; returns summaries that became due. ``models``:
        the summary fields of the models that took the frame (Models.summary_fields). ``lot_update``:
        called with the coil's ``lot`` dict under the registry's lock (the wafer profile's yield)."""
        if state not in TERMINAL:
            raise ValueError(f"unknown terminal state {state!r}")
        now = self.clock()
        with self._lock:
            c = self._coils.get(coil)
            if c is None:
                log.error("finish_for_unknown_coil", coil=coil, camera=camera, index=index)
                return []
            cc = c.camera(camera)
            if cc.seen.get(index) != "pending":
                log.error("finish_for_non_pending_frame", coil=coil, camera=camera, index=index,
                          state=cc.seen.get(index))
                return []
            cc.seen[index] = state
            c.pending -= 1
            if models is not None:
                c.models = models
            if lot_update is not None:
                lot_update(c.lot)
            wall = time.time_ns()
            for ev in events:
                self._add_defect(c, ev)
                self._recent.append((wall, "defect", ev))
            return self._maybe_close(c, now)

    def _add_defect(self, c: Coil, ev: dict) -> None:
        c.n_defects += 1
        c.defects_by_class[ev["class"]] = c.defects_by_class.get(ev["class"], 0) + 1
        if self.worst_n:
            severity = float(ev.get("area_mm2", 0.0)) * float(ev.get("confidence", 0.0))
            item = (severity, c.n_defects, ev)
            if len(c.worst) < self.worst_n:
                heapq.heappush(c.worst, item)
            else:
                heapq.heappushpop(c.worst, item)

    # -- main loop -------------------------------------------------------------------------
    def poll(self) -> list[dict]:
        """Deadlines and idle timeouts; returns provisional and final summaries that are due."""
        now = self.clock()
        out: list[dict] = []
        with self._lock:
            for c in list(self._coils.values()):
                if not c.provisional_sent and now - c.started_mono >= self.budget_s * self.provisional_at:
                    c.provisional_sent = True
                    out.append(self._summary(c, now, final=False, reason="deadline"))
                    log.warning("coil_deadline_provisional_summary", coil=c.coil, pending=c.pending)
                if now - c.last_frame_mono >= self.idle_timeout_s and not c.all_ended:
                    # Interrupted by a crash and no camera went on with it after the restart.
                    reason = "agent_restart" if c.restored else "idle_timeout"
                    for cc in c.cameras.values():
                        if not cc.ended:
                            cc.ended, cc.end_reason = True, reason
                    log.warning("coil_idle_timeout", coil=c.coil, idle_s=round(now - c.last_frame_mono, 1))
                    out += self._maybe_close(c, now)
                elif c.all_ended and c.pending == 0:
                    out += self._maybe_close(c, now)  # held for late frames (_maybe_close) until quiet
        return out

    def close_all(self, reason: str, *, pending_state: str | None = None) -> list[dict]:
        """Shutdown or crash accounting: end every open coil now.

        pending_state: what frames still pending become (``lost`` after a crash); None keeps
        them pending, which a partial summary then reports.
        """
        now = self.clock()
        out = []
        with self._lock:
            for c in list(self._coils.values()):
                for cc in c.cameras.values():
                    if not cc.ended:
                        cc.ended, cc.end_reason = True, reason
                    if pending_state:
                        for i, s in cc.seen.items():
                            if s == "pending":
                                cc.seen[i] = pending_state
                                c.pending -= 1
                c.end_reason = reason
                out.append(self._close(c, now))
        return out

    def _maybe_close(self, c: Coil, now: float) -> list[dict]:
        if c.all_ended and c.pending == 0:
            # A camera that moved on without coil_end, or that sends after its coil_end, may still
            # have frames of this coil in flight: hold the summary until none came for late_hold_s
            # (poll() closes it then), so that they are counted in it, not after it.
            hold = any(cc.end_reason == "next_coil" or cc.after_end for cc in c.cameras.values())
            if hold and now - c.last_frame_mono < self.late_hold_s:
                return []
            return [self._close(c, now)]
        return []

    def _close(self, c: Coil, now: float) -> dict:
        if c.end_reason is None:  # the first camera's reason that is not a clean coil_end, else coil_end
            reasons = [cc.end_reason for cc in c.cameras.values() if cc.end_reason != "coil_end"]
            c.end_reason = reasons[0] if reasons else "coil_end"
        summary = self._summary(c, now, final=True, reason=c.end_reason)
        self._recent.append((time.time_ns(), "summary", summary))
        del self._coils[c.coil]
        self._closed[c.coil] = now
        for cam, coil in list(self._current.items()):
            if coil == c.coil:
                del self._current[cam]
        if len(self._closed) > 10_000:  # bounded memory of closed coil ids
            for k in sorted(self._closed, key=self._closed.get)[:1000]:
                del self._closed[k]
                self._late.pop(k, None)
        return summary

    # -- summary ---------------------------------------------------------------------------
    def _summary(self, c: Coil, now: float, *, final: bool, reason: str | None) -> dict:
        return build_summary(c, now, final=final, reason=reason, classes=self.classes, budget_s=self.budget_s)

    def open_coils(self) -> list[str]:
        with self._lock:
            return list(self._coils)

    def snapshot(self) -> dict[str, dict]:
        """Per open coil: counts so far (for crash checkpoints and `coilsight status`)."""
        now = self.clock()
        with self._lock:
            return {k: self._summary(c, now, final=False, reason=None) for k, c in self._coils.items()}

    # -- crash recovery (agent/recovery.py) --------------------------------------------------
    def export_state(self, recent_s: float = 30.0, owed_since_ns: int | None = None) -> dict:
        """Everything a restart needs, as plain JSON-able data: open coils (frame states as index
        ranges), which coil each camera is on, recently closed coil ids, and what was produced in
        the last ``recent_s`` seconds (to re-send what the journal may not have got), reaching
        further back to ``owed_since_ns`` (the publisher's oldest message not yet journaled, less 2 s
        for messages produced just before they were submitted) when the journal lags further."""
        now, wall = self.clock(), time.time_ns()
        horizon = wall - int(recent_s * 1e9)
        if owed_since_ns is not None:
            horizon = min(horizon, owed_since_ns - 2_000_000_000)
        with self._lock:
            coils = {}
            for name, c in self._coils.items():
                cams = {}
                for cam, cc in c.cameras.items():
                    by_state: dict[str, list[int]] = {}
                    for i, st in cc.seen.items():
                        by_state.setdefault(st, []).append(i)
                    cams[cam] = {"states": {st: _ranges(ix) for st, ix in by_state.items()}, "ended": cc.ended,
                                 "sent": cc.sent, "end_reason": cc.end_reason, "max_pos_mm": cc.max_pos_mm,
                                 "duplicates": cc.duplicates, "after_end": cc.after_end,
                                 "rejected_by_reason": dict(cc.rejected_by_reason)}
                coils[name] = {"started_wall_ns": c.started_wall_ns, "age_s": now - c.started_mono,
                               "cameras": cams, "defects_by_class": dict(c.defects_by_class),
                               "n_defects": c.n_defects, "worst": [[sev, n, ev] for sev, n, ev in c.worst],
                               "provisional_sent": c.provisional_sent, "end_reason": c.end_reason,
                               "length_mm": c.length_mm}
            closed = sorted(self._closed, key=self._closed.get)[-1000:]
            recent = [[w, topic, body] for w, topic, body in self._recent if w >= horizon]
            return {"coils": coils, "current": dict(self._current), "closed": closed, "recent": recent}

    def import_state(self, state: dict, *, in_flight: str = "lost") -> list[str]:
        """Rebuild open coils from ``export_state()`` output after a crash. Frames that were pending
        (received, not yet through the models) become ``in_flight`` (``lost``): the agent cannot
        vouch for them. The coils stay open, so a camera that goes on sending continues the same
        coil; one that does not closes at the idle timeout as ``agent_restart``. Returns the coils."""
        if in_flight not in TERMINAL:
            raise ValueError(f"unknown terminal state {in_flight!r}")
        now, wall = self.clock(), time.time_ns()
        with self._lock:
            for name in state.get("closed", []):
                self._closed.setdefault(name, now)
            for name, cs in state.get("coils", {}).items():
                if name in self._closed:
                    continue
                age = max(0.0, (wall - cs["started_wall_ns"]) / 1e9)
                c = Coil(name, cs["started_wall_ns"], now - age, now, restored=True,
                         provisional_sent=cs["provisional_sent"], end_reason=cs["end_reason"],
                         length_mm=cs["length_mm"], n_defects=cs["n_defects"],
                         defects_by_class=dict(cs["defects_by_class"]))
                c.worst = [(sev, n, ev) for sev, n, ev in cs["worst"]]
                heapq.heapify(c.worst)
                for cam, d in cs["cameras"].items():
                    cc = c.camera(cam)
                    cc.ended, cc.sent, cc.end_reason = d["ended"], d["sent"], d["end_reason"]
                    cc.max_pos_mm, cc.duplicates = d["max_pos_mm"], d["duplicates"]
                    cc.after_end = int(d.get("after_end", 0))
                    cc.rejected_by_reason = dict(d["rejected_by_reason"])
                    for st, ranges in d["states"].items():
                        st = in_flight if st == "pending" else st
                        for a, b in ranges:
                            for i in range(a, b + 1):
                                cc.seen[i] = st
                self._coils[name] = c
            for cam, name in state.get("current", {}).items():
                if name in self._coils:
                    self._current[cam] = name
            return list(self._coils)

    def recover_frame(self, coil: str, camera: str, index: int, events: list[dict]) -> bool:
        """A frame whose defect events are in the journal although the checkpoint had it pending
        (or had not seen it): it was inspected. Returns True when applied."""
        with self._lock:
            c = self._coils.get(coil)
            if c is None:
                return False
            cc = c.camera(camera)
            if cc.seen.get(index) not in (None, "lost"):
                return False
            cc.seen[index] = "inspected"
            for ev in events:
                self._add_defect(c, ev)
            return True

    def recover_closed(self, coil: str) -> bool:
        """The journal holds this coil's final summary: it closed after the checkpoint was taken."""
        with self._lock:
            self._closed[coil] = self.clock()
            if self._coils.pop(coil, None) is None:
                return False
            for cam, name in list(self._current.items()):
                if name == coil:
                    del self._current[cam]
            return True

    def close_settled(self) -> list[dict]:
        """After a restore: coils every camera had ended, whose pending frames are now ``lost``,
        close at once."""
        now = self.clock()
        with self._lock:
            out = []
            for c in list(self._coils.values()):
                out += self._maybe_close(c, now)
            return out
