"""One coil's records from the agent's journal, offline, and what a coil report says of them.

The journal (agent/journal.py) holds every published message of the agent: ``defect`` and
``summary`` (docs/protocol.md 2.1, 2.2) and, from agents with the coil-intelligence layer,
``track`` (stitched defects), ``periodic`` (roll marks) and summaries with ``grade``. This module
reads a journal directory read-only (``read_journal``: a journal copied from a line box, or one the
agent is writing), gathers one coil's records, and turns them into the report's numbers
(``coil_report``): the JSON of ``coilsight report --format json`` and what agent/tools/report.py plots.
Records of kinds it does not know are ignored; the optional ones are used when present.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from agent.crops import CropError, crop_id, read_crop
from agent.journal import Damage, read_journal
from agent.protocol import unpack_body

TOPICS = (b"defect", b"summary", b"track", b"periodic")
BIN_M = 100.0  # the histogram's bin along the coil


class ReportError(RuntimeError):
    """The report cannot be made (no journal there, unknown coil); the message says why."""


@dataclass
class CoilRecords:
    coil: str
    journal: Path
    defects: list[dict] = field(default_factory=list)
    summaries: list[dict] = field(default_factory=list)  # seq order: provisional ones, then the final one
    tracks: list[dict] = field(default_factory=list)
    periodic: list[dict] = field(default_factory=list)
    damage: list[Damage] = field(default_factory=list)
    unreadable: int = 0  # records whose body did not decode

    @property
    def summary(self) -> dict | None:
        finals = [s for s in self.summaries if s.get("final")]
        return finals[-1] if finals else (self.summaries[-1] if self.summaries else None)


def journal_dir_for_config(config: Path) -> tuple[Path, Path]:
    """(journal directory, state directory) of the agent a config describes."""
    from agent.config import load_config

    cfg = load_config(config)
    state = cfg.state_path()
    return state / "journal" / cfg.agent.name, state


def load_coil(journal: Path, coil: str) -> CoilRecords:
    """The coil's records; ``coil`` ``latest`` means the last coil with a summary. Raises ReportError."""
    journal = Path(journal)
    if not journal.is_dir():
        raise ReportError(f"no journal directory at {journal}")
    if not any(journal.glob("segment-*.log")):
        raise ReportError(f"{journal} holds no journal segments (segment-*.log)")
    damage: list[Damage] = []
    by_coil: dict[str, CoilRecords] = {}
    last_summarised: str | None = None
    unreadable = 0
    for _, topic, body in read_journal(journal, damage):
        if topic not in TOPICS:
            continue
        try:
            msg = unpack_body(body)
        except (ValueError, TypeError, msgpack.UnpackException):  # a body that does not decode is counted
            unreadable += 1
            continue
        name = msg.get("coil")
        if not isinstance(name, str):
            continue
        rec = by_coil.setdefault(name, CoilRecords(name, journal))
        kind = topic.decode()
        {"defect": rec.defects, "summary": rec.summaries, "track": rec.tracks, "periodic": rec.periodic}[kind].append(msg)
        if kind == "summary":
            last_summarised = name
    wanted = last_summarised if coil == "latest" else coil
    if wanted is None or wanted not in by_coil:
        known = list(by_coil)[-8:]
        raise ReportError(f"coil {coil!r} is not in the journal at {journal}"
                          + (f"; its latest coils: {', '.join(known)}" if known else "; it holds no coil records"))
    rec = by_coil[wanted]
    rec.damage, rec.unreadable = damage, unreadable
    return rec


def _score(item: dict) -> float:
    """The summary's own order of badness (docs/protocol.md 2.2 `worst`): area x confidence."""
    return float(item.get("area_mm2") or 0.0) * float(item.get("confidence") or 0.0)


def find_crop(crops: Path | None, coil: str, item: dict) -> bytes | None:
    """A track's crop PNG from a crops folder (``<state_dir>/crops``, e.g. copied from a line box): the
    agent's crop file (agent/crops.py ``read_crop``), else a plain ``<crops>/<coil>/<track_id>.png``
    (only plain names); None when there is none."""
    if crops is None or "track_id" not in item:
        return None
    try:
        return read_crop(crops, coil, int(item["track_id"]))
    except (CropError, OSError, ValueError, TypeError):
        pass
    if "/" in coil or coil.startswith("."):
        return None
    name = f"{item['track_id']}.png"
    if not name.startswith(".") and "/" not in name and (crops / coil / name).is_file():
        return (crops / coil / name).read_bytes()
    return None


def coil_report(rec: CoilRecords, *, crops: Path | None = None, worst_n: int = 8,
                crop_pngs: dict[int, bytes] | None = None) -> dict:
    """The report's numbers for one coil (the JSON of `coilsight report --format json`); the worst
    defects' crop PNGs go into ``crop_pngs`` (position in ``worst`` -> bytes) when given."""
    s = rec.summary
    notes: list[str] = []
    if s is None:
        notes.append("no summary in the journal for this coil (it may still be running, or its summary was "
                     "dropped with an old segment): counts are from the journal's defect events")
    elif not s.get("final"):
        notes.append("only a provisional summary (final: false): the coil had not closed when the journal was copied")
    if s is not None:  # a journal without the track / periodic messages: the summary's own lists, if any
        if not rec.tracks and isinstance(s.get("tracks"), list):
            rec.tracks = [t for t in s["tracks"] if isinstance(t, dict)]
        if not rec.periodic and isinstance(s.get("periodic"), list):
            rec.periodic = [p for p in s["periodic"] if isinstance(p, dict)]
    items_kind = "tracks" if rec.tracks else "defects"
    items = rec.tracks if rec.tracks else rec.defects
    classes = list((s or {}).get("defects", {})) or sorted({i.get("class", "?") for i in items})
    for i in items:
        if i.get("class") not in classes:
            classes.append(i.get("class", "?"))
    counts = {c: 0 for c in classes}
    for i in items:
        counts[i.get("class", "?")] += 1
    if s is not None and s.get("defect_count") is not None and len(rec.defects) < s["defect_count"]:
        notes.append(f"the journal holds {len(rec.defects)} of the summary's {s['defect_count']} defect events "
                     "(older segments rotated away): the map shows those it holds")
    length_mm = float((s or {}).get("length_mm") or 0.0)
    far = max((float(i.get("along_mm", 0.0)) + float(i.get("length_mm", 0.0)) / 2 for i in items), default=0.0)
    length_mm = max(length_mm, far)
    n_bins = max(1, int(-(-length_mm // (BIN_M * 1000.0))))
    bins = [{"from_m": b * BIN_M, "to_m": (b + 1) * BIN_M, "counts": {c: 0 for c in classes}} for b in range(n_bins)]
    for i in items:
        b = min(n_bins - 1, max(0, int(float(i.get("along_mm", 0.0)) // (BIN_M * 1000.0))))
        bins[b]["counts"][i.get("class", "?")] += 1
    worst = []
    crop_pngs = {} if crop_pngs is None else crop_pngs
    for i in sorted(items, key=_score, reverse=True)[:worst_n]:
        png = find_crop(crops, rec.coil, i)
        if png is not None:
            crop_pngs[len(worst)] = png
        keep = ("track_id", "index", "camera", "class", "class_id", "confidence", "across_mm", "along_mm", "width_mm",
                "length_mm", "area_mm2", "event_count", "frames")
        worst.append({**{k: i[k] for k in keep if k in i}, "score": round(_score(i), 3),
                      "crop": crop_id(rec.coil, i["track_id"]) if png is not None else None})
    timing = dict((s or {}).get("timing") or {})
    if timing.get("budget_s") is not None and timing.get("wall_s") is not None:
        slack = float(timing["budget_s"]) - float(timing["wall_s"])
        timing["verdict"] = (f"within budget: {timing['wall_s']:.1f} s of {timing['budget_s']:.1f} s "
                             f"({slack:.1f} s to spare)" if slack >= 0 else
                             f"over budget by {-slack:.1f} s ({timing['wall_s']:.1f} s of {timing['budget_s']:.1f} s)")
    grade = (s or {}).get("grade")
    if rec.damage:
        notes.append(f"{len(rec.damage)} damaged journal record(s) skipped")
    if rec.unreadable:
        notes.append(f"{rec.unreadable} journal record(s) whose body did not decode skipped")
    return {
        "coil": rec.coil, "journal": str(rec.journal), "profile": (s or {}).get("profile"),
        "final": bool(s and s.get("final")), "complete": bool(s and s.get("complete")),
        "end_reason": (s or {}).get("end_reason"),
        "grade": grade if isinstance(grade, dict) else None,
        "length_m": round(length_mm / 1000.0, 3), "classes": classes, "counts": counts, "items": items_kind,
        "defect_events": len(rec.defects), "track_count": len(rec.tracks), "periodic": rec.periodic,
        "per_100m": bins, "worst": worst, "timing": timing, "frames": (s or {}).get("frames"),
        "summary": s, "provisional_summaries": sum(1 for x in rec.summaries if not x.get("final")),
        "damage": [d.as_dict() for d in rec.damage[:20]], "notes": notes,
    }
