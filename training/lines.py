"""The generated-data product lines (wafer, chip, parts): what `coilsight train / export / calibrate
thresholds / evaluate` do for them, and what they share.

Their labelled data sets are not reachable from here, so each line trains, calibrates and is
evaluated on maps or images from its own generator (training/gen_wafer.py, gen_chip.py,
gen_parts.py), with three fixed seeds per line: ``train`` (training), ``val`` (best checkpoint,
thresholds) and ``test`` (the reported figures; never used to choose anything). The seeds are
written into model.json and the model card. Parts are also evaluated on the 6 real photos here
(karpovaknn_scratches), which are never trained or calibrated on.

Each line module exposes ``train(out, *, seed, minutes, threads, command)``, ``export(run, out)``,
``calibrate(pack_dir, *, n, threads)`` and ``evaluate(pack_dir, *, split, n, threads, data_root)``
(a report dict as training/evaluate.py writes it: ``models``, ``split``, markdown via ``render``).
"""
from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from engines.atomic import write_atomic
from engines.modelpack import sha256_file

LINE_MODULES = {"wafer": "training.line_wafer", "chip": "training.line_chip", "parts": "training.line_parts"}


class LineError(RuntimeError):
    """A line's training, export, calibration or evaluation cannot go on; the message says why."""


def line(profile: str):
    """The module of a generated-data line (import only when used: torch lives there)."""
    if profile not in LINE_MODULES:
        raise LineError(f"{profile!r} is not a generated-data line ({', '.join(LINE_MODULES)})")
    return importlib.import_module(LINE_MODULES[profile])


def is_line(profile: str) -> bool:
    return profile in LINE_MODULES


def write_json(path: Path, doc: dict[str, Any]) -> None:
    write_atomic(Path(path), (json.dumps(doc, indent=1) + "\n").encode())


def model_entry(path: Path, output: str, **extra: Any) -> dict[str, Any]:
    return {"file": path.name, "sha256": sha256_file(path), "output": output, **extra}


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def f1_scores(truth: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """Per-column precision, recall, F1 of bool [N, K] predictions (0/0 counts as 1)."""
    tp = (truth & pred).sum(0).astype(float)
    fp = (~truth & pred).sum(0).astype(float)
    fn = (truth & ~pred).sum(0).astype(float)
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 1.0)
    recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 1.0)
    f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 1.0)
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def best_f1_threshold(truth: np.ndarray, scores: np.ndarray, grid: np.ndarray | None = None) -> tuple[float, float]:
    """The threshold (from ``grid``) with the best F1 for one class; ties go to the middle of the tied run."""
    grid = np.round(np.arange(0.05, 0.951, 0.01), 2) if grid is None else grid
    f1 = np.array([f1_scores(truth[:, None], (scores >= t)[:, None])["f1"][0] for t in grid])
    best = np.flatnonzero(f1 >= f1.max() - 1e-12)
    return float(grid[best[len(best) // 2]]), float(f1.max())


def gate_figures(defective: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, Any]:
    """Frame-level recall, precision and pass rate of a gate threshold (calibration.json's gate block)."""
    passed = score >= threshold
    n_def = int(defective.sum())
    tp = int((passed & defective).sum())
    return {"recall": round(tp / n_def, 6) if n_def else None,
            "precision": round(tp / int(passed.sum()), 6) if passed.any() else None,
            "pass_rate": round(float(passed.mean()), 6), "n": int(len(score)), "n_defective": n_def,
            "n_clean": int(len(score) - n_def), "missed_defective": n_def - tp,
            "passed_clean": int((passed & ~defective).sum())}


def gate_threshold_for_recall(defective: np.ndarray, score: np.ndarray, target: float) -> float:
    """The highest threshold whose frame recall on these frames reaches ``target``."""
    pos = np.sort(score[defective])
    if not len(pos):
        raise LineError("no defective frames to calibrate the gate on")
    k = int(np.floor((1.0 - target) * len(pos)))  # frames allowed below the threshold
    return float(pos[k])


def learning_rate(peak: float, step: int, steps: int, elapsed_min: float, minutes: float, warmup: float = 0.05) -> float:
    """Warm-up then cosine, driven by the larger of steps done and minutes spent: a run the clock cuts
    short still anneals (training/train.py does the same for steel)."""
    progress = min(1.0, max(step / max(steps, 1), elapsed_min / max(minutes, 1e-9)))
    if progress < warmup:
        return peak * max(progress / warmup, 0.05)
    return peak * 0.5 * (1.0 + np.cos(np.pi * (progress - warmup) / (1.0 - warmup)))


def cached(path: Path, make):
    """A generated training pool, kept in the run folder so a restarted run does not draw it again."""
    path = Path(path)
    if path.is_file():
        with np.load(path) as z:
            return [z[k] for k in sorted(z.files)]
    arrays = make()
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{f"a{i}": a for i, a in enumerate(arrays)})
    tmp.replace(path)
    return arrays


def write_report(report: dict[str, Any], out_dir: Path, render) -> tuple[Path, Path]:
    """evaluation_<split>.json and .md (the line's own markdown) in out_dir, as `coilsight card` reads them."""
    from training.evaluation_report import _json_safe

    out_dir = Path(out_dir)
    split = report["split"]
    json_path, md_path = out_dir / f"evaluation_{split}.json", out_dir / f"evaluation_{split}.md"
    write_atomic(json_path, json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")
    write_atomic(md_path, render(report))
    return json_path, md_path


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)
