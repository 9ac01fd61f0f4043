"""The coil layer: tracks, periodic series, grade and crops, above the per-frame events.

The publisher thread owns it (agent/publish.py): it sees every `defect` with the seq it is given,
the notes of frames that are through the models (the inference workers send one per batch, after
that batch's events), and each coil's summary before it goes out. It answers with the `track` and
`periodic` messages to publish (journaled, with seqs, like defects) and the summary with its
optional keys (docs/protocol.md 2.6):

- a `defect` is stitched into a track (agent/tracks.py); a track closes when its next frame came
  without a part, or at the coil's summary, and is published then, its crop requested;
- at the final summary every open track of the coil closes, the coil's tracks are searched for
  periodic series (agent/periodic.py), each published as `periodic`, and the summary gains
  `tracks`, `track_count`, `periodic` and `grade` (agent/grade.py).

No input can end the publisher through here: the publisher counts and logs a failure of this
layer and publishes the message as it came.
"""
from __future__ import annotations

import structlog

from agent.grade import grade_coil
from agent.periodic import MAX_LOOKUPS, Mark, PeriodicParams, find_series
from agent.tracks import Stitcher, Track

log = structlog.get_logger(__name__)


class CoilIntel:
    def __init__(self, cfg, classes: tuple[str, ...], crops=None):
        c = cfg.coil
        self.cfg = c
        self.classes = classes
        self.crops = crops
        self.stitcher = Stitcher(c.stitch.gap_mm, c.stitch.max_open)
        p = c.periodic
        self.params = PeriodicParams(min_repeats=p.min_repeats, across_tol_mm=p.across_tol_mm, pitch_tol=p.pitch_tol,
                                     max_missed=p.max_missed, min_pitch_mm=p.min_pitch_mm, max_pitch_mm=p.max_pitch_mm,
                                     min_fill=p.min_fill)
        self._closed: dict[str, list[dict]] = {}  # coil -> its closed tracks (compact) for periodic and grade
        self._next_id: dict[str, int] = {}
        self.tracks_published = 0
        self.tracks_not_kept = 0  # closed tracks past max_tracks_per_coil: published, not searched/graded
        self.periodic_published = 0
        self.periodic_cut_short = 0  # coils whose periodic search spent its budget (periodic.MAX_LOOKUPS)

    # -- what the publisher feeds --------------------------------------------------------------
    def defect(self, body: dict, seq: int) -> list[tuple[str, dict]]:
        return [self._track(t) for t in self.stitcher.add(body, seq)]

    def frames_done(self, note: dict) -> list[tuple[str, dict]]:
        out = []
        for (coil, camera), indices in note["frames"].items():
            out += [self._track(t) for t in self.stitcher.frames_done(coil, camera, indices)]
        return out

    def summary(self, body: dict) -> tuple[list[tuple[str, dict]], dict]:
        """Messages to publish before the summary, and the summary with the layer's keys."""
        coil = body["coil"]
        if not body.get("final"):
            kept = self._closed.get(coil, [])
            return [], {**body, **self._counts(kept)}
        out = [self._track(t) for t in self.stitcher.close_coil(coil)]
        kept = self._closed.pop(coil, [])
        self._next_id.pop(coil, None)
        series = []
        if self.cfg.periodic.enabled and kept:
            marks = [Mark(t["track_id"], t["class_id"], t["class"], t["across_mm"], t["along_mm"], t["confidence"])
                     for t in kept]
            budget = [MAX_LOOKUPS]
            series = [{"coil": coil, **s} for s in find_series(marks, self.params, budget=budget)]
            if budget[0] <= 0:  # a coil of very many tracks: what was found in the budget is published
                self.periodic_cut_short += 1
                log.warning("periodic_search_cut_short", coil=coil, tracks=len(kept), series=len(series))
            for s in series:
                out.append(("periodic", s))
                self.periodic_published += 1
        if self.crops is not None:
            self.crops.coil_done(coil)
        g = self.cfg.grade
        grade = grade_coil(kept, series, float(body.get("length_mm") or 0.0), grades=g.grades,
                           periodic_grade=g.periodic, rules=g.rules)
        return out, {**body, **self._counts(kept), "periodic": series, "grade": grade}

    # -- helpers -------------------------------------------------------------------------------------
    def _counts(self, kept: list[dict]) -> dict:
        per = dict.fromkeys(self.classes, 0)
        for t in kept:
            per[t["class"]] = per.get(t["class"], 0) + 1
        return {"tracks": per, "track_count": len(kept)}

    def _track(self, t: Track) -> tuple[str, dict]:
        n = self._next_id.get(t.coil, 0) + 1
        self._next_id[t.coil] = n
        t.track_id = n
        body = t.body()
        if self.crops is not None:
            cid = self.crops.request(t.coil, n, t.best)
            if cid is not None:
                body["crop"] = cid
        kept = self._closed.setdefault(t.coil, [])
        if len(kept) < self.cfg.stitch.max_tracks_per_coil:
            kept.append({k: body[k] for k in ("track_id", "class", "class_id", "across_mm", "along_mm", "length_mm",
                                              "confidence")})
        else:
            self.tracks_not_kept += 1
        if len(self._closed) > 1024:  # coils whose summary never came here: forget the oldest
            del self._closed[next(iter(self._closed))]
        self.tracks_published += 1
        return "track", body

    def stats(self) -> dict:
        return {"open_tracks": self.stitcher.open_count, "overflow": self.stitcher.overflow,
                "tracks_published": self.tracks_published, "periodic_published": self.periodic_published,
                "tracks_not_kept": self.tracks_not_kept, "periodic_cut_short": self.periodic_cut_short}
