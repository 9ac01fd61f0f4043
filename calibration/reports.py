"""Calibration report: what was chosen and what it costs, as PNG plots and one HTML page.

Two figures: the gate's recall of defective frames against its pass rate (the fraction of
all frames sent on to segmentation, i.e. the speed cost) with the chosen point marked, and
per class the Severstal Dice against the pixel threshold (at the chosen min area, and at
the best min area for each threshold). The PNGs are saved beside ``report.html``, which
embeds them (base64) so the page can be mailed on its own.

matplotlib is imported inside the functions (Agg backend): the agent never needs it.
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from calibration.run import CalibrationResult

DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_gate_curve(scores: np.ndarray, labels: np.ndarray, threshold: float, recall_target: float,
                    path: Path, title: str = "gate") -> Path:
    """Recall of defective frames vs pass rate over all thresholds; chosen point marked."""
    from calibration.gate import gate_curve

    plt = _pyplot()
    thresholds, recall, pass_rate = gate_curve(scores, labels)
    passed = scores >= threshold
    chosen_recall = float(passed[labels].mean())
    chosen_pass = float(passed.mean())
    clean = ~labels
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.2), dpi=DPI)
    # left: the whole curve; right: zoomed on the top, where the chosen point lives
    zoom_low = max(0.0, min(recall_target - 4 * (1 - recall_target), chosen_recall) - 0.01)
    for ax, (y_low, title_suffix) in zip(axes, ((0.0, "all thresholds"), (zoom_low, "near the target"))):
        ax.step(pass_rate, recall, where="post", color="tab:blue", lw=1.8, label="gate")
        ax.axhline(recall_target, color="tab:red", ls="--", lw=1, label=f"recall target {recall_target:g}")
        if clean.any():
            share = labels.mean()  # pass rate of a perfect gate
            ax.axvline(share, color="grey", ls=":", lw=1, label=f"defective share {share:.3f}")
        ax.plot([chosen_pass], [chosen_recall], "o", ms=9, mfc="none", mec="black", mew=2,
                label=f"chosen t={threshold:.4g}\nrecall {chosen_recall:.4f}, pass {chosen_pass:.3f}")
        ax.set_xlabel("pass rate (fraction of frames sent to segmentation)")
        ax.set_xlim(0, 1.01)
        ax.set_ylim(y_low, 1.0 + (1.0 - y_low) * 0.02)
        ax.grid(alpha=0.3)
        ax.set_title(title_suffix, fontsize=10)
    axes[0].set_ylabel("recall of defective frames")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{title}: {int(labels.sum())} defective / {int(clean.sum())} clean frames", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_class_dice(result: "CalibrationResult", path: Path) -> Path:
    """Per class, against the pixel threshold at the chosen min area: left the Severstal Dice
    over all images (what is maximised; dotted: at the best min area per threshold), right the
    Dice over the images holding the class (how well the defects themselves are drawn)."""
    plt = _pyplot()
    search = result.search
    if search is None:
        raise ValueError("plot_class_dice needs the threshold search of the calibration")
    grid = search.grid  # [K, T, A]
    ts = np.asarray(search.pixel_thresholds)
    fig, (ax, ax_pos) = plt.subplots(1, 2, figsize=(10.4, 4.4), dpi=DPI)
    colors = plt.get_cmap("tab10")
    low = 1.0
    for k, name in enumerate(search.classes):
        c = result.classes[name]
        color = colors(k % 10)
        held = search.positives[:, k]
        if not c.calibrated:
            ax.plot(ts, grid[k].max(axis=1), ls=":", color=color, lw=1, label=f"{name} (not calibrated)")
            low = min(low, float(grid[k].max(axis=1).min()))
            continue
        ai = search.min_areas.index(c.min_area_px)
        ax.plot(ts, grid[k, :, ai], color=color, lw=1.8,
                label=f"{name}: t={c.pixel_threshold:.2f}, area>={c.min_area_px}, dice {c.dice:.3f}")
        ax.plot(ts, grid[k].max(axis=1), color=color, lw=0.8, ls=":")
        ax.plot([c.pixel_threshold], [c.dice], "o", color=color, ms=7)
        low = min(low, float(grid[k, :, ai].min()))
        if held.any():
            on_pos = search.per_image[held, k, :, ai].mean(axis=0)
            ax_pos.plot(ts, on_pos, color=color, lw=1.8, label=f"{name} ({int(held.sum())} images)")
            ax_pos.plot([c.pixel_threshold], [c.dice_on_positive], "o", color=color, ms=7)
    ax.set_ylim(max(0.0, low - 0.05), 1.005)
    ax.set_title("Severstal Dice, all images (maximised)", fontsize=10)
    ax.legend(loc="lower left", fontsize=7)
    ax_pos.set_ylim(0, 1.005)
    ax_pos.set_title("Dice on images holding the class", fontsize=10)
    ax_pos.legend(loc="lower left", fontsize=7)
    for a in (ax, ax_pos):
        a.set_xlabel("pixel threshold (at the chosen min area)")
        a.grid(alpha=0.3)
    ax.set_ylabel("Dice (mean over images)")
    fig.suptitle("segmentation thresholds: dots = chosen, dotted = best min area per threshold", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def write_report(result: "CalibrationResult", directory: str | Path) -> Path:
    """gate_curve.png, class_dice.png and report.html (PNGs embedded) in `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    doc = result.document
    g = result.gate
    gate_png = plot_gate_curve(result.gate_scores, result.gate_labels, g.threshold, g.recall_target,
                               directory / "gate_curve.png", title=f"{doc.get('profile', '')} gate")
    dice_png = plot_class_dice(result, directory / "class_dice.png")
    rows = []
    for name, c in result.classes.items():
        dice = "n/a" if math.isnan(c.dice) else f"{c.dice:.4f}"
        with_gate = "" if c.dice_with_gate is None else f"{c.dice_with_gate:.4f}"
        on_pos = "" if c.dice_on_positive is None else f"{c.dice_on_positive:.4f}"
        found = "" if c.image_recall is None else f"{c.image_recall:.4f}"
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{c.pixel_threshold:.2f}</td><td>{c.min_area_px}</td>"
            f"<td>{dice}</td><td>{on_pos}</td><td>{found}</td><td>{c.empty_baseline:.4f}</td><td>{with_gate}</td>"
            f"<td>{c.n_positive_images}/{c.n_images}</td>"
            f"<td>{'yes' if c.calibrated else 'NO (default kept)'}</td></tr>"
        )
    sm = doc["gate"].get("size_matched")
    size_matched = "" if not sm else (
        f"<p>Size-matched view (defect crops of the clean crops' size vs those clean crops), at this "
        f"threshold: recall {sm['recall']:.4f} on {sm['n_defect_crops']} defect crops, pass rate "
        f"{sm['pass_rate_clean_crops']:.4f} on {sm['n_clean_crops']} clean crops; its own threshold for the target "
        f"{sm['own_threshold']:.6g}. Threshold chosen by: <b>{html.escape(doc['gate']['chosen_by'])}</b> "
        f"(images by default; the lower of the two with --gate-view both).</p>"
        + ("" if not sm.get("line_frame_pass_rate_estimate") else
           f"<p>Rough pass rate of a clean line frame at this threshold: "
           f"<b>{sm['line_frame_pass_rate_estimate']['value']:.4f}</b> "
           f"({html.escape(sm['line_frame_pass_rate_estimate']['how'])}).</p>")
    )
    models = ", ".join(f"{html.escape(role)} <code>{sha[:12]}</code>" for role, sha in doc["models"].items())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Coilsight calibration: {html.escape(str(doc.get('profile')))}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{padding:2px 8px;text-align:right}}
th{{background:#eee}}img{{max-width:100%}}code{{background:#f4f4f4}}</style></head><body>
<h1>Calibration: profile {html.escape(str(doc.get('profile')))}</h1>
<p>Models: {models}. Created {html.escape(doc['created'])} by {html.escape(doc['tool']['name'])}
{html.escape(doc['tool']['version'])} on {html.escape(doc.get('backend', ''))}.</p>
<p>Data: {html.escape(doc['data']['what'])}, split <b>{html.escape(doc['data']['split'])}</b>,
{doc['data']['n_images']} images, {doc['data']['n_defective']} defective.</p>
<h2>Gate</h2>
<p>Threshold <b>{g.threshold:.6g}</b> on max over classes: recall {g.recall:.4f} (target {g.recall_target:g};
one-sided 95% lower bound {g.recall_lower_95:.4f}; missed {g.n_defective - g.passed_defective} of {g.n_defective}),
precision {g.precision:.4f}, pass rate <b>{g.pass_rate:.4f}</b> of {g.n} frames
({g.passed_clean} of {g.n_clean} clean frames passed).</p>
{size_matched}
{_img_tag(gate_png, "gate recall vs pass rate")}
<h2>Segmentation thresholds</h2>
<p>Dice is the Severstal Dice over all images (an image without the class and without a
prediction scores 1), so it is compared with what never predicting the class would score; Dice on
positive images is the mean over the images that hold the class; "found in" is the share of those
images where a kept component overlaps the truth (a defect the segmenter reports at all).</p>
<table><tr><th>class</th><th>pixel threshold</th><th>min area px</th><th>Dice</th><th>Dice on positive images</th>
<th>found in (share of positive images)</th><th>Dice if never predicted</th><th>Dice with gate</th><th>positive images</th><th>calibrated</th></tr>
{''.join(rows)}</table>
{_img_tag(dice_png, "Dice vs pixel threshold")}
<h2>calibration.json</h2>
<pre>{html.escape(json.dumps(doc, indent=2))}</pre>
</body></html>
"""
    out = directory / "report.html"
    out.write_text(page)
    return out
