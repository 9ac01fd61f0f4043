"""Generated wafer maps with the published WM-811K / MixedWM38 defect patterns and exact labels.

A wafer map is the die grid of one wafer, resampled to 52x52 as in MixedWM38: ``0`` outside the
wafer, ``1`` a good die, ``2`` a failing die (uint8). The eight basic patterns, as the two data
sets define them (Wu et al. 2015, WM-811K; Wang et al. 2020, MixedWM38):

- Center: a dense cluster of failing dies around the wafer centre.
- Donut: a ring of failing dies around the centre, the centre itself good.
- Edge-Loc: failing dies along part of the rim (an arc), not all around.
- Edge-Ring: a band of failing dies all around the rim.
- Loc: a local cluster between centre and rim, touching neither.
- Near-full: almost every die fails.
- Scratch: a thin, long, slightly curved line of failing dies.
- Random: failing dies scattered over the whole wafer well above the background rate.

MixedWM38's 38 classes are the label sets drawn here, each with equal probability: normal, the 8
single patterns, and the 29 mixtures of 2 to 4 patterns (Center, Donut, Edge-Loc, Edge-Ring, Loc,
Scratch; never Center with Donut nor Edge-Loc with Edge-Ring; Near-full and Random only alone).
A mixture is the union of its patterns' failing dies. Every pattern's parameters (radius, width,
angle, arc, density, position, curvature) and the background fail rate are drawn at random.

Deterministic: ``WaferGenerator(seed).sample(i)`` depends only on (seed, i). numpy only (the
camera simulator imports this module at run time; torch never).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

WAFER_PATTERNS: tuple[str, ...] = ("Center", "Donut", "Edge-Loc", "Edge-Ring", "Loc", "Near-full", "Scratch",
                                   "Random")
SIZE = 52
OUTSIDE, GOOD, FAIL = 0, 1, 2

# Seeds of the three splits of generated maps (the model card names them). Training draws from
# TRAIN, the best checkpoint and the thresholds come from VAL, the reported figures from TEST.
SEEDS = {"train": 1811, "val": 2811, "test": 3811}


def _label_sets() -> tuple[tuple[str, ...], ...]:
    """The 38 MixedWM38 label sets: normal, 8 single patterns, 29 mixtures."""
    mixable = ("Center", "Donut", "Edge-Loc", "Edge-Ring", "Loc", "Scratch")
    exclusive = ({"Center", "Donut"}, {"Edge-Loc", "Edge-Ring"})
    sets: list[tuple[str, ...]] = [()]
    sets += [(p,) for p in WAFER_PATTERNS]
    for n in (2, 3, 4):
        for combo in itertools.combinations(mixable, n):
            if not any(pair <= set(combo) for pair in exclusive):
                sets.append(combo)
    return tuple(sets)


LABEL_SETS = _label_sets()  # 38 sets, tests/training/test_gen_wafer.py checks the count


@dataclass(frozen=True)
class WaferSample:
    wafer: np.ndarray  # uint8 [52, 52]: 0 outside, 1 good die, 2 failing die
    labels: np.ndarray  # bool [8], in WAFER_PATTERNS order
    label_set: int  # index into LABEL_SETS (the MixedWM38 class)
    masks: np.ndarray  # bool [8, 52, 52]: the dies each pattern made fail (background failures in none)

    @property
    def patterns(self) -> tuple[str, ...]:
        return tuple(p for p, on in zip(WAFER_PATTERNS, self.labels) if on)

    def yield_(self) -> float:
        dies = int((self.wafer != OUTSIDE).sum())
        return float((self.wafer == GOOD).sum()) / dies if dies else 0.0


class WaferGenerator:
    """``sample(i)``: one generated wafer map; the same (seed, i) always gives the same map."""

    def __init__(self, seed: int = 0, size: int = SIZE):
        if size < 24:
            raise ValueError(f"WaferGenerator: size must be >= 24 dies, got {size}")
        self.seed = int(seed)
        self.size = size

    def sample(self, i: int, label_set: int | None = None) -> WaferSample:
        rng = np.random.default_rng([self.seed, int(i), 0xAF])
        k = int(rng.integers(len(LABEL_SETS))) if label_set is None else int(label_set)
        if not 0 <= k < len(LABEL_SETS):
            raise ValueError(f"label_set {k} outside 0..{len(LABEL_SETS) - 1}")
        n = self.size
        c = (n - 1) / 2.0
        radius = rng.uniform(0.44, 0.49) * n
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
        dy, dx = yy - c, xx - c
        r = np.hypot(dy, dx) / radius  # 1.0 at the rim
        theta = np.arctan2(dy, dx)
        inside = r <= 1.0
        masks = np.zeros((len(WAFER_PATTERNS), n, n), bool)
        for name in LABEL_SETS[k]:
            j = WAFER_PATTERNS.index(name)
            masks[j] = _PATTERNS[name](rng, r, theta, xx, yy, c, radius) & inside
        background = rng.uniform(0.0, 0.03)
        fail = masks.any(axis=0) | ((rng.random((n, n)) < background) & inside)
        wafer = np.where(inside, np.where(fail, FAIL, GOOD), OUTSIDE).astype(np.uint8)
        labels = np.array([name in LABEL_SETS[k] for name in WAFER_PATTERNS])
        return WaferSample(wafer, labels, k, masks)

    def batch(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Maps ``start .. start+n-1``: uint8 [n, 52, 52] and bool labels [n, 8]."""
        samples = [self.sample(start + i) for i in range(n)]
        return np.stack([s.wafer for s in samples]), np.stack([s.labels for s in samples])


def _dense(rng, region: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return region & (rng.random(region.shape) < rng.uniform(lo, hi))


def _center(rng, r, theta, xx, yy, c, radius):
    oy, ox = rng.normal(0, 0.04 * radius, 2)
    rr = np.hypot(yy - c - oy, xx - c - ox) / radius
    size = rng.uniform(0.16, 0.34)
    return _dense(rng, rr <= size * (1 + 0.12 * np.sin(3 * theta + rng.uniform(0, 6.3))), 0.65, 0.95)


def _donut(rng, r, theta, xx, yy, c, radius):
    inner = rng.uniform(0.24, 0.42)
    width = rng.uniform(0.14, 0.26)
    return _dense(rng, (r >= inner) & (r <= inner + width), 0.6, 0.92)


def _edge_ring(rng, r, theta, xx, yy, c, radius):
    width = rng.uniform(1.5, 4.0) / radius
    ring = r >= 1.0 - width
    gap = np.zeros_like(ring)
    if rng.random() < 0.5:  # a short break in the ring, as real edge rings often have
        a = rng.uniform(-np.pi, np.pi)
        gap = np.abs(np.angle(np.exp(1j * (theta - a)))) < rng.uniform(0.1, 0.35)
    return _dense(rng, ring & ~gap, 0.7, 0.97)


def _edge_loc(rng, r, theta, xx, yy, c, radius):
    a = rng.uniform(-np.pi, np.pi)
    half = np.deg2rad(rng.uniform(18, 50))
    depth = rng.uniform(2.5, 7.0) / radius
    arc = np.abs(np.angle(np.exp(1j * (theta - a)))) <= half
    return _dense(rng, arc & (r >= 1.0 - depth), 0.65, 0.95)


def _loc(rng, r, theta, xx, yy, c, radius):
    # between centre and rim: never reaching the centre's cluster nor the rim's band
    ry, rx = rng.uniform(2.5, 5.5, 2)
    size = max(ry, rx)
    d = rng.uniform(max(0.3 * radius + size, 0.45 * radius), 0.82 * radius - size)
    a = rng.uniform(-np.pi, np.pi)
    cy, cx = c + d * np.sin(a), c + d * np.cos(a)
    rot = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(rot) + (yy - cy) * np.sin(rot)
    v = -(xx - cx) * np.sin(rot) + (yy - cy) * np.cos(rot)
    return _dense(rng, (u / rx) ** 2 + (v / ry) ** 2 <= 1.0, 0.65, 0.95)


def _near_full(rng, r, theta, xx, yy, c, radius):
    return _dense(rng, r <= 1.0, 0.75, 0.95)


def _scratch(rng, r, theta, xx, yy, c, radius):
    n = xx.shape[0]
    length = rng.uniform(0.7, 1.5) * radius
    a0 = rng.uniform(0, np.pi)
    bend = rng.uniform(-1.2, 1.2) / length  # radians per die
    start = rng.uniform(-0.45, 0.45, 2) * radius + c
    width = rng.uniform(0.5, 1.0)
    steps = int(length * 2)
    angles = a0 + 0.5 * bend * np.arange(steps)
    path = start + np.cumsum(0.5 * np.stack([np.sin(angles), np.cos(angles)], axis=1), axis=0)  # [steps, 2] (y, x)
    d2 = (yy.reshape(-1, 1) - path[:, 0]) ** 2 + (xx.reshape(-1, 1) - path[:, 1]) ** 2
    out = (d2.min(axis=1) <= width * width).reshape(n, n)
    return out & (rng.random((n, n)) < rng.uniform(0.85, 1.0))


def _random(rng, r, theta, xx, yy, c, radius):
    return _dense(rng, r <= 1.0, 0.14, 0.4)


_PATTERNS = {"Center": _center, "Donut": _donut, "Edge-Loc": _edge_loc, "Edge-Ring": _edge_ring, "Loc": _loc,
             "Near-full": _near_full, "Scratch": _scratch, "Random": _random}
