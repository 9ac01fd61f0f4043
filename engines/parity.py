"""The FP16 parity gate: a candidate (FP16 ONNX on ONNX Runtime, or a TensorRT engine) must
agree with the FP32 ONNX on a set of frames before it may be used.

Measured per model, over every batch of frames:
- max and mean absolute difference of each output, and NaN/Inf counts (any non-finite value
  in the candidate fails the gate);
- gate models: agreement of the gate decision ``max_k score >= threshold`` at the calibrated
  threshold (fraction of frames with the same decision);
- segmentation models: Dice agreement of the thresholded masks per (frame, class), Severstal
  style (two empty masks agree perfectly; metrics.dice_pairs, the table behind
  dice_severstal), at each class's calibrated pixel threshold;
- instance heads (model.json format 3): the instances decoded from both (engines.instances, at
  each class's instance threshold) must match one-to-one, same class, at IoU >= ``min_box_iou``
  (0.9): every box of either side in a pair (``min_box_agreement`` 1.0), except a box left
  without a partner whose own score is within ``box_score_margin`` (0.02) of its class's
  threshold: FP16 moves a peak by ~1e-3, so one sitting on the threshold falls either way (the
  shipped steel pack lost 1 of 158 such boxes on synthetic frames and failed). The ``size`` and
  ``offset`` outputs are in px and cells, not probabilities: the abs-diff bar does not apply to
  them (an FP16 size of 300 px is off by ~0.1 px); their boxes are what is judged.

``ParityBar`` holds the limits; ``ParityReport.check(bar)`` raises ``ParityError`` carrying the
report (``.report.to_dict()`` for the manifest, ``.report.text()`` for people).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import structlog

from metrics import dice_pairs
from metrics.instances import box_iou, greedy_match
from engines.backends.base import Backend
from engines.instances import DEFAULT_INSTANCE_THRESHOLD, InstanceSpec, decode_instances

log = structlog.get_logger(__name__)


class ParityError(RuntimeError):
    """The candidate does not match the FP32 reference; ``report`` says by how much."""

    def __init__(self, report: "ParityReport", failures: list[str]):
        self.report = report
        self.failures = failures
        super().__init__(f"FP16 parity failed for {report.model} ({report.candidate}): " + "; ".join(failures))


@dataclass(frozen=True)
class ParityBar:
    """Limits a candidate must meet. Probabilities are in [0, 1], so abs diffs are absolute."""

    max_abs_diff: float = 0.05
    min_decision_agreement: float = 0.98  # gate: fraction of frames with the same decision
    min_mean_dice: float = 0.97  # seg: mean Dice of thresholded masks over (frame, class)
    min_box_iou: float = 0.9  # instance heads: a pair of boxes matches at this IoU or more, same class
    min_box_agreement: float = 1.0  # pairs / the larger of the two box counts, over all frames
    box_score_margin: float = 0.02  # an unpaired box scored under threshold + this is not counted

    def __post_init__(self) -> None:
        if not self.max_abs_diff > 0:
            raise ValueError(f"parity bar: max_abs_diff must be > 0, got {self.max_abs_diff}")
        for name in ("min_decision_agreement", "min_mean_dice", "min_box_iou", "min_box_agreement",
                     "box_score_margin"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"parity bar: {name} must be in [0, 1], got {value}")


@dataclass
class OutputStats:
    max_abs_diff: float = 0.0
    sum_abs_diff: float = 0.0
    count: int = 0
    candidate_nonfinite: int = 0
    reference_nonfinite: int = 0

    @property
    def mean_abs_diff(self) -> float:
        return self.sum_abs_diff / self.count if self.count else 0.0


@dataclass
class ParityReport:
    model: str
    role: str
    candidate: str
    reference: str
    frames: int = 0
    outputs: dict[str, OutputStats] = field(default_factory=dict)
    gate_threshold: float | None = None
    decisions_agree: int = 0
    decision_flips: list[int] = field(default_factory=list)  # frame indices, first 20
    pixel_thresholds: list[float] | None = None
    dice_sum: float = 0.0
    dice_count: int = 0
    dice_min: float = 1.0
    geometric_outputs: list[str] = field(default_factory=list)  # instance size/offset: no abs-diff bar
    cam_output: str | None = None  # a gate's class activation maps: compared where the class passes
    cam_pairs: int = 0  # (frame, class) pairs whose map was compared
    instance_thresholds: list[float] | None = None
    # per frame with instances on either side: (frame, reference boxes, candidate boxes, IoUs of the
    # same-class one-to-one pairs, highest first, and the scores over their class threshold of the
    # reference and of the candidate boxes left without a partner)
    box_frames: list[tuple[int, int, int, list[float], list[float], list[float]]] = field(default_factory=list)

    def box_agreement(self, min_iou: float) -> tuple[int, int, int]:
        """(pairs at IoU >= min_iou, reference boxes, candidate boxes) over all frames."""
        pairs = sum(sum(1 for v in f[3] if v >= min_iou) for f in self.box_frames)
        return pairs, sum(f[1] for f in self.box_frames), sum(f[2] for f in self.box_frames)

    def unpaired_near_threshold(self, margin: float) -> tuple[int, int]:
        """(reference, candidate) boxes without a partner whose score is under threshold + margin."""
        return (sum(1 for f in self.box_frames for v in f[4] if v < margin),
                sum(1 for f in self.box_frames for v in f[5] if v < margin))

    @property
    def decision_agreement(self) -> float | None:
        return self.decisions_agree / self.frames if self.gate_threshold is not None and self.frames else None

    @property
    def mean_dice(self) -> float | None:
        return self.dice_sum / self.dice_count if self.dice_count else None

    def failures(self, bar: ParityBar) -> list[str]:
        out = []
        if self.frames == 0:
            out.append("no frames were compared")
        for name, s in self.outputs.items():
            if s.candidate_nonfinite:
                out.append(f"{name}: {s.candidate_nonfinite} NaN/Inf values in the candidate")
            if s.reference_nonfinite:
                out.append(f"{name}: {s.reference_nonfinite} NaN/Inf values in the FP32 reference")
            if name not in self.geometric_outputs and not s.max_abs_diff <= bar.max_abs_diff:
                out.append(f"{name}: max abs diff {s.max_abs_diff:.4g} > {bar.max_abs_diff:.4g}")
        agreement = self.decision_agreement
        if agreement is not None and agreement < bar.min_decision_agreement:
            out.append(f"gate decisions agree on {agreement:.2%} of frames < {bar.min_decision_agreement:.2%} "
                       f"(flipped frames {self.decision_flips})")
        dice = self.mean_dice
        if dice is not None and dice < bar.min_mean_dice:
            out.append(f"mask Dice {dice:.4f} < {bar.min_mean_dice:.4f} (worst {self.dice_min:.4f})")
        if self.instance_thresholds is not None:
            pairs, n_ref, n_cand = self.box_agreement(bar.min_box_iou)
            near_ref, near_cand = self.unpaired_near_threshold(bar.box_score_margin)
            most = max(n_ref - near_ref, n_cand - near_cand)
            if most > 0 and pairs / most < bar.min_box_agreement:
                bad = [f[0] for f in self.box_frames
                       if f[1] != f[2] or sum(1 for v in f[3] if v >= bar.min_box_iou) < f[1]][:20]
                out.append(f"instance boxes: {pairs} same-class pairs at IoU >= {bar.min_box_iou:g} for {n_ref} "
                           f"reference and {n_cand} candidate boxes, {near_ref} and {near_cand} of them unpaired "
                           f"within {bar.box_score_margin:g} of the threshold ({pairs / most:.2%} < "
                           f"{bar.min_box_agreement:.2%}; frames {bad})")
        return out

    def check(self, bar: ParityBar) -> "ParityReport":
        failures = self.failures(bar)
        if failures:
            log.error("parity_failed", model=self.model, candidate=self.candidate, failures=failures)
            raise ParityError(self, failures)
        log.info("parity_passed", model=self.model, candidate=self.candidate, frames=self.frames,
                 max_abs_diff=max((s.max_abs_diff for s in self.outputs.values()), default=0.0),
                 decision_agreement=self.decision_agreement, mean_dice=self.mean_dice)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "role": self.role, "candidate": self.candidate, "reference": self.reference,
            "frames": self.frames,
            "outputs": {k: {**asdict(v), "mean_abs_diff": v.mean_abs_diff} for k, v in self.outputs.items()},
            "gate_threshold": self.gate_threshold, "decision_agreement": self.decision_agreement,
            "decision_flips": self.decision_flips, "pixel_thresholds": self.pixel_thresholds,
            **({"cam_output": self.cam_output, "cam_pairs": self.cam_pairs} if self.cam_output else {}),
            "mean_dice": self.mean_dice, "min_dice": self.dice_min if self.dice_count else None,
            **({"instance_thresholds": self.instance_thresholds, "geometric_outputs": self.geometric_outputs,
                "boxes": {"reference": self.box_agreement(0.0)[1], "candidate": self.box_agreement(0.0)[2],
                          "pair_ious": sorted(v for f in self.box_frames for v in f[3])[:20],
                          "unpaired_over_threshold": {
                              "reference": sorted(v for f in self.box_frames for v in f[4])[:20],
                              "candidate": sorted(v for f in self.box_frames for v in f[5])[:20]}}}
               if self.instance_thresholds is not None else {}),
        }

    def text(self) -> str:
        lines = [f"parity {self.model} [{self.role}]: {self.candidate} vs {self.reference} on {self.frames} frames"]
        for name, s in self.outputs.items():
            lines.append(f"  {name}: max |diff| {s.max_abs_diff:.3g}, mean |diff| {s.mean_abs_diff:.3g}, "
                         f"NaN/Inf candidate {s.candidate_nonfinite} reference {s.reference_nonfinite}"
                         + (f" (the maps of the {self.cam_pairs} (frame, class) pairs over their threshold)"
                            if name == self.cam_output else ""))
        if self.decision_agreement is not None:
            lines.append(f"  gate decisions at {self.gate_threshold:g}: {self.decisions_agree}/{self.frames} agree"
                         + (f", flipped {self.decision_flips}" if self.decision_flips else ""))
        if self.mean_dice is not None:
            lines.append(f"  masks: mean Dice {self.mean_dice:.4f}, worst {self.dice_min:.4f} "
                         f"over {self.dice_count} (frame, class) pairs")
        if self.instance_thresholds is not None:
            _, n_ref, n_cand = self.box_agreement(0.0)
            ious = [v for f in self.box_frames for v in f[3]]
            unpaired = [v for f in self.box_frames for v in (*f[4], *f[5])]
            lines.append(f"  instances: {n_ref} reference boxes, {n_cand} candidate, {len(ious)} same-class pairs, "
                         f"lowest pair IoU {min(ious) if ious else float('nan'):.3f}"
                         + (f"; {len(unpaired)} unpaired, scored {', '.join(f'{v:.4f}' for v in sorted(unpaired)[:5])}"
                            " over their threshold" if unpaired else ""))
        return "\n".join(lines)


def _thresholds(pixel_thresholds: float | Sequence[float], k: int) -> np.ndarray:
    t = np.asarray(pixel_thresholds, dtype=np.float64).reshape(-1)
    if t.size == 1:
        return np.full(k, t[0])
    if t.size != k:
        raise ValueError(f"parity: {t.size} pixel thresholds given for {k} classes")
    return t


def compare(reference: Backend, candidate: Backend, batches: Iterable[np.ndarray], *, role: str,
            gate_threshold: float | None = None, pixel_thresholds: float | Sequence[float] | None = None,
            model: str | None = None, instances: InstanceSpec | None = None,
            instance_thresholds: float | Sequence[float] | None = None,
            cam: tuple[str, str, Sequence[float]] | None = None) -> ParityReport:
    """Run both active backends on every batch and measure how far the candidate is from the reference.

    Gate decisions are compared on the ``role == "gate"`` model's output (``max_k score >= t``);
    masks on a ``role == "seg"`` model's 4-D output (``prob >= t_k`` per class); with ``instances``
    (the seg model's instance head), the boxes both decode at ``instance_thresholds`` (default 0.3).
    ``cam`` = (CAM output, score output, per-class thresholds): a classification gate's class
    activation maps are compared only for the (frame, class) pairs whose score passes its threshold on
    either side, the maps the agent reads (engines.wafer.patterns); an inactive class's map is its
    ReLU over a near-zero maximum, noise in any precision.
    """
    report = ParityReport(model=model or reference.model_path.name, role=role,
                          candidate=f"{candidate.name}:{candidate.model_path.name}",
                          reference=f"{reference.name}:{reference.model_path.name}",
                          gate_threshold=gate_threshold if role == "gate" else None)
    if instances is not None:
        report.geometric_outputs = [instances.size, instances.offset]
    if cam is not None:
        report.cam_output = cam[0]
    for batch in batches:
        ref = reference.infer(batch)
        cand = candidate.infer(batch)
        if set(ref) != set(cand):
            raise ParityError(report, [f"outputs differ: reference {sorted(ref)}, candidate {sorted(cand)}"])
        used = None
        if cam is not None:
            cam_name, score_name, cam_t = cam
            if cam_name not in ref or score_name not in ref:
                raise ParityError(report, [f"CAM output {cam_name!r} or score output {score_name!r} missing "
                                           f"(has {sorted(ref)})"])
            used = cam_pairs_read(ref[score_name], cand[score_name], cam_t)
            report.cam_pairs += int(used.sum())
        for name, r in ref.items():
            c = cand[name]
            if r.shape != c.shape:
                raise ParityError(report, [f"{name}: shape {c.shape} != reference {r.shape}"])
            s = report.outputs.setdefault(name, OutputStats())
            c_bad, r_bad = ~np.isfinite(c), ~np.isfinite(r)
            s.candidate_nonfinite += int(c_bad.sum())
            s.reference_nonfinite += int(r_bad.sum())
            ok = ~(c_bad | r_bad)
            if used is not None and name == cam[0]:  # only the maps the agent reads
                ok &= used.reshape(used.shape + (1,) * (r.ndim - 2))
            diff = np.abs(c[ok].astype(np.float64) - r[ok])
            if diff.size:
                s.max_abs_diff = max(s.max_abs_diff, float(diff.max()))
                s.sum_abs_diff += float(diff.sum())
                s.count += int(diff.size)
            if role == "gate" and gate_threshold is not None and r.ndim == 2:
                same = (r.max(axis=1) >= gate_threshold) == (np.nan_to_num(c, nan=-1.0).max(axis=1) >= gate_threshold)
                for i in np.flatnonzero(~same):
                    if len(report.decision_flips) < 20:
                        report.decision_flips.append(report.frames + int(i))
                report.decisions_agree += int(same.sum())
            # masks: the class probabilities only; an instance head's outputs are judged by their boxes
            if role == "seg" and pixel_thresholds is not None and r.ndim == 4 and \
                    (instances is None or name not in instances.outputs):
                t = _thresholds(pixel_thresholds, r.shape[1])[None, :, None, None]
                report.pixel_thresholds = [float(x) for x in t.reshape(-1)]
                dice = dice_pairs(np.nan_to_num(c, nan=-1.0) >= t, r >= t)
                report.dice_sum += float(dice.sum())
                report.dice_count += int(dice.size)
                report.dice_min = min(report.dice_min, float(dice.min()))
        if instances is not None:
            missing = [n for n in instances.outputs if n not in ref]
            if missing:
                raise ParityError(report, [f"instance outputs {missing} missing (has {sorted(ref)})"])
            _compare_boxes(report, ref, cand, instances, instance_thresholds)
        report.frames += int(batch.shape[0])
    log.debug("parity_measured", model=report.model, frames=report.frames)
    return report


def cam_pairs_read(ref_scores: np.ndarray, cand_scores: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """bool [N, K]: the (frame, class) pairs whose class activation map the agent reads, the classes
    whose score passes its threshold in the reference or in the candidate (engines.wafer.patterns)."""
    t = np.asarray(thresholds, np.float64).reshape(1, -1)
    return (ref_scores >= t) | (np.nan_to_num(cand_scores, nan=-1.0) >= t)


def _compare_boxes(report: ParityReport, ref: dict, cand: dict, spec: InstanceSpec,
                   thresholds: float | Sequence[float] | None) -> None:
    heat = ref[spec.heatmap]
    k = heat.shape[1]
    t = _thresholds(DEFAULT_INSTANCE_THRESHOLD if thresholds is None else thresholds, k)
    report.instance_thresholds = [float(x) for x in t]
    frame_hw = (heat.shape[2] * spec.stride, heat.shape[3] * spec.stride)

    def decode(out: dict, i: int):
        h, s, o = (np.nan_to_num(out[n][i], nan=-1.0) for n in spec.outputs)
        return decode_instances(h, s, o, stride=spec.stride, thresholds=t, frame_hw=frame_hw, max_instances=10_000)

    for i in range(heat.shape[0]):
        a, b = decode(ref, i), decode(cand, i)
        if not a and not b:
            continue
        iou = box_iou([x.box for x in a], [x.box for x in b])
        same = np.array([[x.class_id == y.class_id for y in b] for x in a], bool).reshape(len(a), len(b))
        pairs = greedy_match(iou, 1e-9, allowed=same)
        paired_a, paired_b = {r for r, _ in pairs}, {c for _, c in pairs}
        # how far over its class threshold each box left without a partner scored: near 0, FP16 noise
        over_a = [float(x.score - t[x.class_id]) for j, x in enumerate(a) if j not in paired_a]
        over_b = [float(y.score - t[y.class_id]) for j, y in enumerate(b) if j not in paired_b]
        report.box_frames.append((report.frames + i, len(a), len(b), [float(iou[r, c]) for r, c in pairs],
                                  over_a, over_b))


def synthetic_frames(n: int, channels: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Deterministic uint8 frames [n, C, H, W]: smooth texture, noise and bright/dark blobs.

    Used when no real frames are given; they exercise the numbers (overflow, NaN, drift) but say
    little about gate decisions on real defects, so pass real frames (--frames) where you have them.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((n, channels, height, width), dtype=np.uint8)
    for i in range(n):
        for ch in range(channels):
            img = 100 + 40 * np.sin(xx / (4.0 + i % 7) + ch) * np.cos(yy / (6.0 + i % 3))
            img += rng.normal(0, 10, (height, width))
            for _ in range(1 + i % 4):
                cy, cx = rng.integers(0, height), rng.integers(0, width)
                r = rng.integers(2, max(3, min(height, width) // 6))
                img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += rng.choice([-80.0, 90.0])
            out[i, ch] = np.clip(img, 0, 255).astype(np.uint8)
    return out
