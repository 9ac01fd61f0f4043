"""`coilsight aggregate`: one coil seen by several line boxes, merged into one coil summary.

A wide strip is covered by more cameras than one box serves: each box (an agent with its camera
group) publishes its own final ``summary`` of the coil. The aggregator subscribes to every box in
``[[boxes]]`` (a plain gap-repairing subscriber of each, like the bridge), waits for each box's final
summary of a coil, and publishes one ``coil_summary`` on ``<prefix>/<line>/all/summary`` (QoS 1,
retained).

Deadline policy: the first box's final summary of a coil starts a clock; when every box has
reported, or ``aggregate.deadline_s`` later, the coil is merged, each box that has not reported
shown as ``missing``. A summary that comes after the merge is merged again and republished with
``revision`` + 1 (``aggregate.late = "republish"``) or only logged (``"ignore"``).

Accounting: every count of ``frames`` (and ``rejected_by_reason``, ``defects``) is the sum over the
boxes that reported, so the invariants of docs/protocol.md 2.2 hold for the coil as they hold for
each box (``sent = received + missing``, ``received = inspected + gated_out + rejected + shed +
pending + lost``); a missing box adds nothing and makes the coil not ``complete``.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Any

import structlog

from agent.bridge.config import BridgeConfig
from agent.bridge.forward import StreamSubscriber
from agent.bridge.mqtt import MqttLink, client_id, encode_payload
from agent.metrics import RateLimitedLog

log = structlog.get_logger(__name__)
_err_log = RateLimitedLog(log, per_s=0.5, burst=5)

FRAME_KEYS = ("sent", "received", "inspected", "gated_out", "rejected", "shed", "missing", "pending", "lost",
              "duplicates", "after_end")


def _add(total: dict[str, int], part: Any) -> None:
    if isinstance(part, dict):
        for k, v in part.items():
            if isinstance(v, int) and not isinstance(v, bool):
                total[k] = total.get(k, 0) + v


def merge_coil(coil: str, boxes: dict[str, dict | None], *, line: str, deadline_s: float, merged_by: str,
               revision: int = 1, now_ns: int | None = None) -> dict:
    """One coil summary from each box's final summary (None: the box did not report)."""
    frames = dict.fromkeys(FRAME_KEYS, 0)
    rejected: dict[str, int] = {}
    defects: dict[str, int] = {}
    cameras: dict[str, dict] = {}
    missing_ranges: dict[str, list] = {}
    per_box: dict[str, dict] = {}
    end_reasons: set[str] = set()
    length_mm = 0.0
    defect_count = 0
    complete = True
    for name, s in sorted(boxes.items()):
        if s is None:
            per_box[name] = {"status": "missing"}
            complete = False
            continue
        f = s.get("frames") or {}
        for k in FRAME_KEYS:
            v = f.get(k)
            frames[k] += v if isinstance(v, int) and not isinstance(v, bool) else 0
        _add(rejected, s.get("rejected_by_reason"))
        _add(defects, s.get("defects"))
        for cam, c in (s.get("cameras") or {}).items():
            key = cam if cam not in cameras else f"{name}:{cam}"  # two boxes with one camera id: keep both
            cameras[key] = {**c, "box": name} if isinstance(c, dict) else {"box": name}
            if cam in (s.get("missing_ranges") or {}):
                missing_ranges[key] = s["missing_ranges"][cam]
        for r in s.get("end_reasons") or [s.get("end_reason")]:
            if isinstance(r, str):
                end_reasons.add(r)
        length = s.get("length_mm")
        if isinstance(length, (int, float)):
            length_mm = max(length_mm, float(length))
        n = s.get("defect_count")
        defect_count += n if isinstance(n, int) else 0
        box_complete = s.get("complete") is True
        complete = complete and box_complete
        per_box[name] = {"status": "reported", "agent": s.get("agent"), "seq": s.get("seq"),
                         "complete": box_complete, "end_reason": s.get("end_reason"),
                         "cameras": sorted((s.get("cameras") or {}).keys()), "frames": dict(f),
                         "defect_count": n}
    metres = length_mm / 1000.0
    return {
        "v": 1, "type": "coil_summary", "line": line, "coil": coil, "ts_ns": now_ns or time.time_ns(),
        "final": True, "complete": complete, "revision": revision,
        "boxes": per_box, "boxes_missing": sorted(n for n, s in boxes.items() if s is None),
        "frames": frames, "rejected_by_reason": rejected, "missing_ranges": missing_ranges,
        "cameras": cameras, "end_reasons": sorted(end_reasons), "defects": defects,
        "defect_count": defect_count, "length_mm": round(length_mm, 1),
        "density_per_m": {k: round(v / metres, 3) for k, v in defects.items() if v} if metres > 0 else {},
        "deadline": {"deadline_s": deadline_s, "merged_by": merged_by},
    }


class _Coil:
    def __init__(self, names: list[str], now: float):
        self.reports: dict[str, dict | None] = dict.fromkeys(names)
        self.first = now
        self.revision = 0


class Aggregator:
    def __init__(self, cfg: BridgeConfig, *, stop: threading.Event | None = None):
        if not cfg.boxes:
            raise ValueError("aggregate: the config lists no [[boxes]] to aggregate")
        self.cfg = cfg
        self.stop = stop or threading.Event()
        self.names = [b.name for b in cfg.boxes]
        self.open: collections.OrderedDict[str, _Coil] = collections.OrderedDict()
        self.merged: collections.OrderedDict[str, _Coil] = collections.OrderedDict()  # for late summaries
        self.published: list[dict] = []  # the last few, for tests and logs
        self.link: MqttLink | None = None

    def topic(self) -> str:
        m = self.cfg.mqtt
        return f"{m.topic_prefix}/{self.cfg.bridge.line}/all/summary"

    def on_summary(self, box: str, msg: dict, now: float) -> None:
        coil = msg.get("coil")
        if not isinstance(coil, str) or msg.get("final") is not True:
            return  # provisional summaries wait for the final one
        if coil in self.merged:
            c = self.merged[coil]
            if self.cfg.aggregate.late == "ignore":
                log.warning("aggregate_late_summary_ignored", coil=coil, box=box)
                return
            c.reports[box] = msg
            self._publish(coil, c, "late_summary")
            return
        c = self.open.get(coil)
        if c is None:
            c = self.open[coil] = _Coil(self.names, now)
            while len(self.open) > self.cfg.aggregate.max_open_coils:
                old, oc = next(iter(self.open.items()))
                self._close(old, oc, "max_open_coils")
        c.reports[box] = msg
        if all(r is not None for r in c.reports.values()):
            self._close(coil, c, "all_reported")

    def tick(self, now: float) -> None:
        for coil, c in list(self.open.items()):
            if now - c.first >= self.cfg.aggregate.deadline_s:
                self._close(coil, c, "deadline")

    def _close(self, coil: str, c: _Coil, why: str) -> None:
        self.open.pop(coil, None)
        self.merged[coil] = c
        while len(self.merged) > 1000:
            self.merged.popitem(last=False)
        self._publish(coil, c, why)

    def _publish(self, coil: str, c: _Coil, why: str) -> None:
        c.revision += 1
        doc = merge_coil(coil, c.reports, line=self.cfg.bridge.line, deadline_s=self.cfg.aggregate.deadline_s,
                         merged_by=why, revision=c.revision)
        self.published = [*self.published[-99:], doc]
        log.info("coil_summary_merged", coil=coil, merged_by=why, revision=c.revision,
                 missing=doc["boxes_missing"], complete=doc["complete"])
        if self.link is not None:
            try:
                self.link.publish(self.topic(), encode_payload(doc, self.cfg.mqtt.payload), retain=True)
            except ValueError as exc:
                _err_log.error("aggregate_publish_failed", coil=coil, error=str(exc))

    def run(self) -> int:
        cfg = self.cfg
        m = cfg.mqtt
        status = m.status_topic or f"{m.topic_prefix}/{cfg.bridge.line}/all/status"
        self.link = MqttLink(m, client_id=client_id(cfg, "aggregate"), status_topic=status)
        self.link.start()
        subs = {b.name: StreamSubscriber(b, from_seq=None, clamp_to_journal=False) for b in cfg.boxes}
        its = {name: s.polled(poll_ms=20) for name, s in subs.items()}
        log.info("aggregate_starting", line=cfg.bridge.line, boxes=self.names, deadline_s=cfg.aggregate.deadline_s)
        try:
            while not self.stop.is_set():
                for name, sub in subs.items():
                    for _ in range(500):  # then the next box's turn: one busy box starves none
                        try:
                            item = next(its[name])
                        except Exception as exc:  # noqa: BLE001 - a box away or garbled: retry, never end
                            _err_log.warning("aggregate_read_failed", box=name, error=str(exc)[:300])
                            its[name] = sub.polled(poll_ms=20)
                            break
                        if item is None or self.stop.is_set():
                            break
                        if item[0] == "summary":
                            self.on_summary(name, item[1], time.monotonic())
                self.tick(time.monotonic())
                while not self.link.acks.empty():
                    self.link.acks.get_nowait()
        finally:
            for coil, c in list(self.open.items()):
                self._close(coil, c, "shutdown")
            time.sleep(0.2)
            self.link.stop()
            for s in subs.values():
                s.close()
        return 0
