"""Periodic defects (roll marks): series of tracks repeating at a fixed pitch along the strip.

A damaged work roll prints the same mark once per turn: a series of tracks of one class at the
same across position (within ``across_tol_mm``), at positions ``first + k * pitch`` along the strip
(each within ``pitch_tol`` x pitch), some repeats possibly missed (at most ``max_missed`` in a row).
``find_series`` takes a coil's tracks and returns the series with at least ``min_repeats`` marks.

Chance must not make a series. Random defects of one class in one across band fall into the
windows a lattice expects with a probability q that their density there gives; a series is kept
only when seeing ``count`` hits out of the lattice's ``expected`` positions by chance (binomial
tail), times the number of candidate lattices tried, is below ``alpha``. ``confidence`` is 1 less
that figure, times the share of expected positions hit. The pitch is the least-squares slope of
the marks' positions against their repeat numbers; the implied roll diameter is pitch / pi.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

EXTEND_REACH = 12  # repeats a found series looks ahead across missed marks
MAX_LOOKUPS = 2_000_000  # a coil's search stops after this many look-ups (about a second or two)


@dataclass(frozen=True)
class Mark:
    """One closed track, as the detector needs it."""

    track_id: int
    class_id: int
    class_name: str
    across_mm: float
    along_mm: float
    confidence: float = 1.0


@dataclass(frozen=True)
class PeriodicParams:
    min_repeats: int = 5
    across_tol_mm: float = 25.0
    pitch_tol: float = 0.02
    max_missed: int = 2
    min_pitch_mm: float = 500.0
    max_pitch_mm: float = 10_000.0
    min_fill: float = 0.6
    alpha: float = 1e-6


def _binom_tail(k: int, n: int, q: float) -> float:
    """P(X >= k) for X ~ Binomial(n, q)."""
    if k <= 0:
        return 1.0
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lq, lr = math.log(q), math.log1p(-q)
    lc = math.lgamma(n + 1)
    terms = [lc - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lq + (n - i) * lr for i in range(k, n + 1)]
    top = max(terms)  # in logs: a 1,000-repeat series must not overflow a float
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def _fit(idx: list[int], pos: list[float]) -> tuple[float, float]:
    """Least squares pos = a + pitch * idx: (a, pitch)."""
    n = len(idx)
    mi, mp = sum(idx) / n, sum(pos) / n
    sxx = sum((i - mi) ** 2 for i in idx)
    pitch = sum((i - mi) * (p - mp) for i, p in zip(idx, pos)) / sxx if sxx else 0.0
    return mp - pitch * mi, pitch


def _walk(ys: list[float], xs: list[float], used: set[int], start: int, pitch: float, p: PeriodicParams,
          reach: int | None = None, budget: list[int] | None = None) -> list[tuple[int, int]]:
    """From mark ``start``, the chain of (repeat number, mark) a lattice of this pitch finds, forward,
    looking up to ``reach`` repeats ahead (max_missed + 1 by default)."""
    chain = [(0, start)]
    k, last_y, x0 = 0, ys[start], xs[start]
    while True:
        found = None
        for m in range(1, (reach or p.max_missed + 1) + 1):
            want = last_y + m * pitch
            tol = p.pitch_tol * pitch
            lo, hi = bisect.bisect_left(ys, want - tol), bisect.bisect_right(ys, want + tol)
            if budget is not None:
                budget[0] -= 1
            best = None
            for j in range(lo, hi):
                if j in used or abs(xs[j] - x0) > p.across_tol_mm:
                    continue
                if best is None or abs(ys[j] - want) < abs(ys[best] - want):
                    best = j
            if best is not None:
                found = (m, best)
                break
        if found is None:
            return chain
        k += found[0]
        chain.append((k, found[1]))
        last_y = ys[found[1]]


def find_series(marks: list[Mark], params: PeriodicParams | None = None, *, budget: list[int] | None = None
                ) -> list[dict]:
    """Periodic series among one coil's marks, best first: dicts with ``class``, ``class_id``,
    ``across_mm``, ``pitch_mm``, ``roll_diameter_mm``, ``count``, ``first_along_mm``,
    ``last_along_mm``, ``confidence``, ``track_ids`` (the `periodic` body without coil and common keys).
    ``budget``: ``[look-ups left]``, shared by the classes (MAX_LOOKUPS by default); a search that
    spends it stops with what it found (``budget[0]`` is then 0)."""
    p = params or PeriodicParams()
    budget = budget if budget is not None else [MAX_LOOKUPS]
    by_class: dict[int, list[Mark]] = {}
    for m in marks:
        by_class.setdefault(m.class_id, []).append(m)
    out = []
    for cid, ms in sorted(by_class.items()):
        if len(ms) < p.min_repeats:
            continue
        ms = sorted(ms, key=lambda m: m.along_mm)
        ys, xs = [m.along_mm for m in ms], [m.across_mm for m in ms]
        for chain, pitch, pval in _series(ys, xs, p, budget):
            expected = chain[-1][0] + 1
            members = [ms[j] for _, j in chain]
            across = sorted(m.across_mm for m in members)[len(members) // 2]
            out.append({"class": ms[0].class_name, "class_id": cid, "across_mm": round(across, 1),
                        "pitch_mm": round(pitch, 1), "roll_diameter_mm": round(pitch / math.pi, 1),
                        "count": len(chain), "first_along_mm": round(members[0].along_mm, 1),
                        "last_along_mm": round(members[-1].along_mm, 1),
                        "confidence": round(max(0.0, 1.0 - pval) * len(chain) / expected, 3),
                        "track_ids": [m.track_id for m in members]})
    return sorted(out, key=lambda s: -s["confidence"])


def _series(ys, xs, p: PeriodicParams, budget: list[int]) -> list[tuple[list, float, float]]:
    """Every series a lattice explains among these marks (one class, sorted along) that passes the
    fill and chance tests; longest first, no mark in two series.

    One pass: each pair of marks close across proposes pitches (their distance / 1 .. max_missed + 1);
    a proposal is walked forward from its first mark, fitted, walked again over longer gaps. A mark
    already walked through at about the same pitch proposes nothing new (it is inside a chain already
    found), so the work grows with the marks, not with marks x series length."""
    n = len(ys)
    candidates = []
    trials = 0
    walked: set[tuple[int, int]] = set()  # (mark, pitch bucket) some chain went through
    width = math.log1p(p.pitch_tol)

    def bucket(pitch: float) -> int:
        return int(math.log(pitch) / width)

    for i in range(n):
        partners = 0
        j = i + 1
        far = ys[i] + (p.max_missed + 1) * p.max_pitch_mm * (1 + p.pitch_tol)
        while j < n and ys[j] <= far and partners < 8 and budget[0] > 0:
            if abs(xs[j] - xs[i]) > p.across_tol_mm:
                j += 1
                continue
            partners += 1
            d = ys[j] - ys[i]
            for k in range(1, p.max_missed + 2):
                pitch = d / k
                if not p.min_pitch_mm <= pitch <= p.max_pitch_mm:
                    continue
                trials += 1
                b = bucket(pitch)
                if any((i, b + e) in walked for e in (-1, 0, 1)):
                    continue
                chain = _walk(ys, xs, set(), i, pitch, p, budget=budget)
                if len(chain) < p.min_repeats:
                    continue
                _, pitch = _fit([c[0] for c in chain], [ys[c[1]] for c in chain])
                # again with the fitted pitch, across longer runs of missed marks: a long series
                # must not fall apart into pieces where a few marks in a row went unseen
                chain = _walk(ys, xs, set(), i, pitch, p, reach=EXTEND_REACH, budget=budget)
                if len(chain) < p.min_repeats:
                    continue
                _, pitch = _fit([c[0] for c in chain], [ys[c[1]] for c in chain])
                walked.update((m, bucket(pitch)) for _, m in chain)
                candidates.append((len(chain), i, pitch))
            j += 1
    out = []
    used: set[int] = set()
    for _, i, pitch in sorted(candidates, key=lambda c: -c[0]):  # longest first
        if i in used:
            continue
        chain = _walk(ys, xs, used, i, pitch, p, reach=EXTEND_REACH, budget=[MAX_LOOKUPS])
        if len(chain) < p.min_repeats:
            continue
        _, pitch = _fit([c[0] for c in chain], [ys[c[1]] for c in chain])
        expected = chain[-1][0] + 1
        if len(chain) / expected < p.min_fill:
            continue
        # the chance that marks of this class in this band hit `count` of `expected` windows at random
        # (the density of the band's other marks around the series: a local burst counts as dense)
        x0 = sorted(xs[j] for _, j in chain)[len(chain) // 2]
        lo, hi = ys[chain[0][1]] - pitch, ys[chain[-1][1]] + pitch
        a, b = bisect.bisect_left(ys, lo), bisect.bisect_right(ys, hi)
        band = sum(1 for j in range(a, b) if abs(xs[j] - x0) <= p.across_tol_mm) - len(chain)
        density = max(band, 1) / (hi - lo)  # marks per mm along, off the series (at least one)
        q = 1.0 - math.exp(-density * 2.0 * p.pitch_tol * pitch)
        pval = _binom_tail(len(chain), expected, q) * max(trials, 1)
        if pval <= p.alpha:
            used.update(j for _, j in chain)
            out.append((chain, pitch, min(1.0, pval)))
    return out
