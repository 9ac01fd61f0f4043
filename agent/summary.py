"""The coil summary: the document a coil ends with (and its provisional and partial versions).

``build_summary`` turns one coil's accounting (agent/coil.py) into the ``summary`` message of
docs/protocol.md: totals, per camera counts, missing ranges, defects per class, density, the
worst defects and the timing against the budget. Invariants the tests check:

    received = inspected + gated_out + rejected + shed + pending + lost
    sent     = received + missing

A final summary also lists, per camera, the frame indices counted ``inspected`` (the gate passed
them to segmentation) as inclusive ranges, ``inspected_ranges``, at most ``MAX_INSPECTED_RANGES``
a camera (the lowest indices first): a subscriber that knows which frames carried defects can
then tell how many of them the gate passed (docs/protocol.md 2.2, "Gate decisions per frame").
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engines.wafer import lot_summary

if TYPE_CHECKING:
    from agent.coil import Coil

TERMINAL = ("inspected", "gated_out", "rejected", "shed", "lost")
MAX_INSPECTED_RANGES = 4096  # per camera: a bound on the summary's size (about 7 bytes a range)


def _gaps(seen: list[int], end: int) -> list[list[int]]:
    """Inclusive ranges of indices below ``end`` not in ``seen`` (sorted). Walks the indices
    received, never range(end): one frame with index 10^7 must not cost ten million steps and a
    list that size."""
    out: list[list[int]] = []
    nxt = 0
    for i in seen:
        if i >= end:
            break
        if i > nxt:
            out.append([nxt, i - 1])
        nxt = i + 1
    if end > nxt:
        out.append([nxt, end - 1])
    return out


def _state_ranges(order: list[int], seen: dict[int, str], state: str, limit: int) -> list[list[int]]:
    """Inclusive ranges of the indices in ``order`` (sorted) whose state is ``state``, the first
    ``limit`` of them."""
    out: list[list[int]] = []
    for i in order:
        if seen[i] != state:
            continue
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        elif len(out) == limit:
            break
        else:
            out.append([i, i])
    return out


def build_summary(c: Coil, now: float, *, final: bool, reason: str | None, classes: tuple[str, ...],
                  budget_s: float) -> dict:
    totals = dict.fromkeys(("sent", "received", "inspected", "gated_out", "rejected", "shed", "missing",
                            "pending", "lost", "duplicates", "after_end"), 0)
    rejected_by_reason: dict[str, int] = {}
    cameras: dict[str, Any] = {}
    missing_ranges: dict[str, list[list[int]]] = {}
    inspected_ranges: dict[str, list[list[int]]] = {}
    end_reasons = set()
    complete = True
    max_pos = 0.0
    for cc in c.cameras.values():
        counts = {s: 0 for s in ("pending", *TERMINAL)}
        for s in cc.seen.values():
            counts[s] += 1
        received = len(cc.seen)
        order = sorted(cc.seen)
        if cc.sent is not None:
            # Frames above the coil_end count were sent all the same: count them, so that
            # sent = received + missing holds, and the coil is not complete.
            top = order[-1] + 1 if order else 0
            expected = max(cc.sent, top)
            missing = _gaps(order, expected)
            if top > cc.sent:
                complete = False
        else:  # no coil_end: what we can tell is the gaps below the highest index seen
            expected = None
            top = order[-1] + 1 if order else 0
            missing = _gaps(order, top)
        if (cc.end_reason != "coil_end" or missing or counts["shed"] or counts["lost"] or counts["pending"]
                or counts["rejected"]):
            complete = False
        end_reasons.add(cc.end_reason or "open")
        n_missing = sum(b - a + 1 for a, b in missing)
        if missing:
            missing_ranges[cc.camera] = missing
        if final and counts["inspected"]:
            inspected_ranges[cc.camera] = _state_ranges(order, cc.seen, "inspected", MAX_INSPECTED_RANGES)
        cam_summary = {"sent": expected, "received": received, "missing": n_missing,
                       "duplicates": cc.duplicates, "after_end": cc.after_end, **counts,
                       "rejected_by_reason": dict(cc.rejected_by_reason), "end_reason": cc.end_reason}
        cameras[cc.camera] = cam_summary
        for k in ("received", "inspected", "gated_out", "rejected", "shed", "pending", "lost", "duplicates",
                  "after_end"):
            totals[k] += cam_summary[k]
        totals["missing"] += n_missing
        totals["sent"] += expected if expected is not None else received + n_missing
        for r, n in cc.rejected_by_reason.items():
            rejected_by_reason[r] = rejected_by_reason.get(r, 0) + n
        max_pos = max(max_pos, cc.max_pos_mm)
    if not final:
        complete = False
    length_mm = c.length_mm if c.length_mm else max_pos
    metres = length_mm / 1000.0
    wall_s = now - c.started_mono
    density = {k: round(n / metres, 3) for k, n in c.defects_by_class.items()} if metres > 0 else {}
    worst = [ev for _, _, ev in sorted(c.worst, key=lambda t: (-t[0], t[1]))]
    lot = {"lot": lot_summary(c.lot, classes)} if c.lot else {}  # wafer lots only (docs/protocol.md 2.2)
    # final summaries only (docs/protocol.md 2.2): the gate's decision per frame, once they are all made
    per_frame = {"inspected_ranges": inspected_ranges} if final else {}
    return {
        **(c.models or {}),
        **lot,
        "type": "summary",
        "coil": c.coil,
        "final": final,
        "complete": complete,
        "end_reason": reason if final else "deadline",
        "end_reasons": sorted(end_reasons),
        "frames": totals,
        "rejected_by_reason": rejected_by_reason,
        "missing_ranges": missing_ranges,
        **per_frame,
        "cameras": cameras,
        "defects": {k: c.defects_by_class.get(k, 0) for k in classes},
        "defect_count": c.n_defects,
        "length_mm": round(length_mm, 1),
        "density_per_m": density,
        "worst": worst,
        "timing": {
            "started_ns": c.started_wall_ns,
            "wall_s": round(wall_s, 3),
            "budget_s": budget_s,
            "slack_s": round(budget_s - wall_s, 3),
        },
    }

