"""The live view: the agent's event stream -> the current coil -> every open page (Server-Sent Events).

One ``LiveFeed`` per web process runs two threads:
- ``web-events``: a Subscriber (agent/subscriber.py) on the PUB socket, gaps filled from the replay
  socket, so the page sees every defect exactly once and in order; at its first heartbeat it
  reaches back (replay) through the last ``backfill`` events, so a page opened mid-coil shows the
  coil from its start;
- ``web-progress``: once a second, the control socket's `status` (as `coilsight status` asks):
  frames so far, length and time of the open coil, which the event stream carries only at the end.

Each browser gets its own bounded queue; a page that cannot keep up is cut off and reconnects
(EventSource does so by itself) to a fresh snapshot, so a slow page never slows the feed.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from typing import Any, Callable

import structlog

from agent.metrics import RateLimiter
from agent.subscriber import ReplayError, Subscriber
from agent.web.history import CropStore

log = structlog.get_logger(__name__)

MAP_EVENTS = 5000  # defects of the current coil kept for the strip map
LATEST = 50  # latest events listed
CLIENT_QUEUE = 2000
DEFECT_KEYS = ("seq", "coil", "camera", "index", "class", "class_id", "confidence", "across_mm", "along_mm",
               "width_mm", "length_mm", "area_mm2", "bbox_px", "instance")
SUMMARY_KEYS = ("seq", "coil", "final", "complete", "end_reason", "frames", "defects", "defect_count", "length_mm",
                "timing", "profile", "missing_ranges", "rejected_by_reason", "grade", "track_count")


def page_defect(msg: dict, crops: CropStore | None = None) -> dict:
    """What the page needs of a defect: positions and sizes, no 64-bit times (JSON numbers are doubles)."""
    out = {k: msg[k] for k in DEFECT_KEYS if k in msg}
    out["time_ms"] = int(msg.get("ts_ns", 0)) // 1_000_000
    if "crop" in msg and crops is not None:
        url = crops.note(msg.get("coil"), msg["crop"])
        if url is not None:
            out["crop_url"] = url
    return out


TRACK_KEYS = ("seq", "coil", "track_id", "class", "class_id", "cameras", "event_count", "across_mm", "along_mm",
              "width_mm", "length_mm", "confidence")
PERIODIC_KEYS = ("seq", "coil", "class", "class_id", "across_mm", "pitch_mm", "roll_diameter_mm", "count",
                 "first_along_mm", "last_along_mm", "confidence")


def page_summary(msg: dict) -> dict:
    out = {k: msg[k] for k in SUMMARY_KEYS if k in msg}
    timing = dict(out.get("timing") or {})
    if "started_ns" in timing:
        timing["started_ms"] = int(timing.pop("started_ns")) // 1_000_000
    out["timing"] = timing
    return out


class LiveState:
    """The current coil as the page shows it. Thread-safe; every change returns the page event."""

    def __init__(self, budget_s: float, crops: CropStore | None = None):
        self.budget_s = budget_s
        self.crops = crops
        self._lock = threading.Lock()
        self.coil: str | None = None
        self.defects: deque[dict] = deque(maxlen=MAP_EVENTS)
        self.counts: dict[str, int] = {}
        self.summary: dict | None = None  # the current coil's latest summary (final or provisional)
        self.progress: dict | None = None  # the open coil's counts from the control socket
        self.periodic: list[dict] = []  # the current coil's periodic series (coil layer, protocol 2.6)
        self.health: dict | None = None
        self.last_heartbeat = 0.0  # monotonic

    def _switch(self, coil: str) -> None:
        if coil != self.coil:
            self.coil = coil
            self.defects.clear()
            self.counts = {}
            self.summary = None
            self.progress = None
            self.periodic = []

    def on_defect(self, msg: dict) -> dict:
        d = page_defect(msg, self.crops)
        with self._lock:
            if d.get("coil") != self.coil:
                self._switch(str(d.get("coil")))
            self.defects.append(d)
            self.counts[d.get("class", "?")] = self.counts.get(d.get("class", "?"), 0) + 1
        return {"type": "defect", "defect": d}

    def on_track(self, msg: dict) -> dict:
        """A track (protocol 2.6): its crop goes to the defects it is made of, by their seqs."""
        t = {k: msg[k] for k in TRACK_KEYS if k in msg}
        if "crop" in msg and self.crops is not None:
            url = self.crops.note(msg.get("coil"), msg["crop"])
            if url is not None:
                t["crop_url"] = url
        seqs = msg.get("event_seqs")
        t["event_seqs"] = [s for s in seqs if isinstance(s, int)] if isinstance(seqs, list) else []
        wanted = set(t["event_seqs"])
        with self._lock:
            if t.get("coil") == self.coil and wanted:
                for d in self.defects:
                    if d.get("seq") in wanted:
                        d["track_id"] = t.get("track_id")
                        if "crop_url" in t:
                            d["crop_url"] = t["crop_url"]
        return {"type": "track", "track": t}

    def on_periodic(self, msg: dict) -> dict:
        p = {k: msg[k] for k in PERIODIC_KEYS if k in msg}
        with self._lock:
            if p.get("coil") == self.coil:
                self.periodic.append(p)
        return {"type": "periodic", "periodic": p}

    def on_summary(self, msg: dict) -> dict:
        s = page_summary(msg)
        for w in msg.get("worst") or []:
            if isinstance(w, dict) and "crop" in w and self.crops is not None:
                self.crops.note(msg.get("coil"), w["crop"])
        with self._lock:
            current_done = self.coil is None or (self.summary is not None and bool(self.summary.get("final")))
            if s.get("coil") != self.coil and (not s.get("final") or current_done):
                self._switch(str(s.get("coil")))
            if s.get("coil") == self.coil:
                self.summary = s
        return {"type": "summary", "summary": s}

    def on_health(self, msg: dict) -> dict:
        h = {k: msg.get(k) for k in ("state", "profile", "queue_depth", "inferred", "coils_open", "uptime_s",
                                     "rejected", "journal_damage", "agent")}
        with self._lock:
            self.health = h
            self.last_heartbeat = time.monotonic()
        return {"type": "health", "health": h}

    def on_progress(self, coils: dict[str, dict]) -> dict | None:
        """Open coils from the control socket's status: the current one's counts so far."""
        with self._lock:
            if self.coil in coils:
                name = self.coil
            elif coils and (self.coil is None or (self.summary is not None and self.summary.get("final"))):
                # the current coil is done (or none yet): show the newest open one
                name = max(coils, key=lambda c: (coils[c].get("timing") or {}).get("started_ns", 0))
                self._switch(name)
            else:
                return None  # nothing open, or the current coil's final summary is still on its way
            s = coils[name]
            p = {"coil": name, "frames": s.get("frames"), "length_mm": s.get("length_mm"),
                 "wall_s": (s.get("timing") or {}).get("wall_s"), "defects": s.get("defects"),
                 "defect_count": s.get("defect_count")}
            self.progress = p
        return {"type": "progress", "progress": p}

    def snapshot(self) -> dict:
        with self._lock:
            return {"type": "snapshot", "coil": self.coil, "defects": list(self.defects),
                    "latest": list(self.defects)[-LATEST:], "counts": dict(self.counts), "summary": self.summary,
                    "progress": self.progress, "periodic": list(self.periodic), "health": self.health,
                    "budget_s": self.budget_s,
                    "heartbeat_age_s": round(time.monotonic() - self.last_heartbeat, 1) if self.last_heartbeat
                    else None}


class Hub:
    """Fan-out of page events to the open pages; called from the feed's threads."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._clients: set[asyncio.Queue] = set()
        self._cut: set[asyncio.Queue] = set()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def add(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=CLIENT_QUEUE)
        self._clients.add(q)
        return q

    def remove(self, q: asyncio.Queue) -> None:
        self._clients.discard(q)
        self._cut.discard(q)

    def is_cut(self, q: asyncio.Queue) -> bool:
        return q in self._cut

    @property
    def clients(self) -> int:
        return len(self._clients)

    def publish(self, event: dict) -> None:
        if self.loop is None or self.loop.is_closed():
            return
        data = f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'), default=str)}\n\n"
        try:
            self.loop.call_soon_threadsafe(self._deliver, data)
        except RuntimeError:  # the loop closed meanwhile (shutdown)
            pass

    def _deliver(self, data: str) -> None:
        for q in list(self._clients):
            try:
                q.put_nowait(data)
            except asyncio.QueueFull:  # a page that cannot keep up: cut off, it reconnects to a snapshot
                self._clients.discard(q)
                self._cut.add(q)


class LiveFeed:
    """The subscriber and progress threads feeding a LiveState and a Hub."""

    def __init__(self, *, events_endpoint: str, replay_endpoint: str, state: LiveState, hub: Hub,
                 status: Callable[[], dict] | None, socket_setup: Callable[[Any], None] | None = None,
                 backfill: int = 2000, progress_s: float = 1.0):
        self.events_endpoint = events_endpoint
        self.replay_endpoint = replay_endpoint
        self.state = state
        self.hub = hub
        self.status = status
        self.socket_setup = socket_setup
        self.backfill = backfill
        self.progress_s = progress_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.errors = 0
        self.gaps = 0
        self._log_limit = RateLimiter(per_s=1 / 60, burst=5)  # a feed that keeps failing: 5 lines, then 1 a minute

    def start(self) -> None:
        targets = [("web-events", self._run_events)]
        if self.status is not None:
            targets.append(("web-progress", self._run_progress))
        for name, target in targets:
            t = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)

    def _run_events(self) -> None:
        while not self._stop.is_set():
            sub = Subscriber(self.events_endpoint, self.replay_endpoint, include_health=True,
                             topics=("defect", "summary", "track", "periodic"),
                             socket_setup=self.socket_setup, replay_timeout_ms=2000)
            try:
                self._pump(sub)
            except ReplayError as exc:  # the agent went away mid-replay: start over
                self.errors += 1
                if self._log_limit.allow():
                    log.warning("web_replay_failed", error=str(exc), suppressed=self._log_limit.suppressed)
                self._stop.wait(1.0)
            except Exception:  # a bug must not end the page's feed silently: logged, counted, retried
                self.errors += 1
                if self._log_limit.allow():
                    log.exception("web_feed_failed", suppressed=self._log_limit.suppressed)
                self._stop.wait(1.0)
            finally:
                self.gaps += sub.gaps
                sub.close()

    def _pump(self, sub: Subscriber) -> None:
        reached_back = False
        while not self._stop.is_set():
            for topic, msg in sub.messages(timeout_s=0.5):
                if topic == "health":
                    if not reached_back and sub.next_seq is None:
                        # late join: replay the last `backfill` events at the next heartbeat
                        last, first = int(msg.get("seq", 0)), int(msg.get("first_seq", 1))
                        if last > 0:
                            sub.next_seq = max(first, last - self.backfill + 1, 1)
                    reached_back = True
                    self.hub.publish(self.state.on_health(msg))
                elif topic == "defect":
                    self.hub.publish(self.state.on_defect(msg))
                elif topic == "summary":
                    self.hub.publish(self.state.on_summary(msg))
                elif topic == "track":
                    self.hub.publish(self.state.on_track(msg))
                elif topic == "periodic":
                    self.hub.publish(self.state.on_periodic(msg))
                if self._stop.is_set():
                    return

    def _run_progress(self) -> None:
        while not self._stop.wait(self.progress_s):
            try:
                reply = self.status()
            except Exception as exc:  # agent down, or no operator key: the page shows events only
                log.debug("web_progress_unavailable", error=str(exc))
                continue
            event = self.state.on_progress(reply.get("coils") or {}) if reply.get("ok") else None
            if event is not None:
                self.hub.publish(event)
