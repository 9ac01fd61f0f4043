"""The coil's grade: a configurable rule set over its tracks and periodic series.

Grades are named best first (``coil.grade.grades``, default pass, downgrade, fail). A coil no rule
breaks gets the first. A periodic series (a roll mark) gives ``coil.grade.periodic`` (fail by
default; empty: no such rule). Each ``[[coil.grade.rules]]`` names a class (``*``: every class)
and limits: ``max_per_100m`` tracks of it per 100 m of coil, ``max_length_mm`` for its longest
track (0: no limit), and the grade a coil gets when it breaks one. The worst grade any broken rule
gives decides; among rules giving the same grade, the first broken one (periodic, then the rules in
order) is named: ``{"grade", "rule", "reason"}``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    class_name: str = "*"
    max_per_100m: float = 0.0
    max_length_mm: float = 0.0
    grade: str = "downgrade"


def grade_coil(tracks: list[dict], periodic: list[dict], length_mm: float, *, grades: tuple[str, ...],
               periodic_grade: str, rules: tuple) -> dict:
    """tracks: ``{"class", "length_mm"}`` each; periodic: the coil's series (``class``, ``pitch_mm``,
    ``across_mm``, ``count``). Returns ``{"grade", "rule", "reason"}``."""
    rank = {g: i for i, g in enumerate(grades)}
    broken: list[tuple[str, str, str]] = []  # (grade, rule, reason), in rule order
    if periodic and periodic_grade:
        s = periodic[0]
        more = f" and {len(periodic) - 1} more series" if len(periodic) > 1 else ""
        broken.append((periodic_grade, "periodic",
                       f"periodic {s['class']} every {s['pitch_mm']:.0f} mm at {s['across_mm']:.0f} mm across, "
                       f"{s['count']} repeats{more}"))
    metres = length_mm / 1000.0
    for i, r in enumerate(rules):
        name = r.class_name
        mine = [t for t in tracks if name in ("*", t["class"])]
        label = f"rules[{i}] {name}"
        if r.max_per_100m > 0 and metres > 0:
            per100 = len(mine) / metres * 100.0
            if per100 > r.max_per_100m:
                broken.append((r.grade, f"{label} max_per_100m",
                               f"{len(mine)} {'defects' if name == '*' else name} tracks in {metres:.1f} m: "
                               f"{per100:.2f} per 100 m > {r.max_per_100m:g}"))
        if r.max_length_mm > 0 and mine:
            longest = max(mine, key=lambda t: t["length_mm"])
            if longest["length_mm"] > r.max_length_mm:
                broken.append((r.grade, f"{label} max_length_mm",
                               f"{longest['class']} track {longest.get('track_id', '?')} is "
                               f"{longest['length_mm']:.0f} mm long > {r.max_length_mm:g} mm"))
    if not broken:
        return {"grade": grades[0], "rule": "none", "reason": "no rule broken"}
    worst = max(rank.get(g, len(grades)) for g, _, _ in broken)
    grade, rule, reason = next(b for b in broken if rank.get(b[0], len(grades)) == worst)
    return {"grade": grade, "rule": rule, "reason": reason}
