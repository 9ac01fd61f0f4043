"""`coilsight report COIL`: one coil from the agent's journal as an HTML page people read, offline.

The page (``index.html``, self-contained: its PNG plots are embedded, and also written beside it):
the strip map (length x width, defects coloured by class, periodic series linked by a line), a
class histogram per 100 m, the worst defects as thumbnails (the agent's crops where the crops
folder holds them, else a placeholder), the grade and its reason, and the coil's timing against
its budget. ``--format json`` prints the same numbers (agent/tools/coil_records.py) instead.

matplotlib is imported here only (tests/test_layering.py), lazily: a box without the report extra
still runs every other command, and ``--format json`` needs no matplotlib.
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
import sys
from pathlib import Path

from agent.tools.coil_records import ReportError, coil_report, journal_dir_for_config, load_coil

EXTRA_HINT = "install the report extra: pip install -e '.[report]'"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ReportError(f"matplotlib is not installed; {EXTRA_HINT}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colours(classes: list[str]) -> dict[str, str]:
    palette = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
               "#bcf60c", "#008080", "#9a6324", "#800000"]
    return {c: palette[i % len(palette)] for i, c in enumerate(classes)}


def _png(fig, plt) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def strip_map(rep: dict, items: list[dict], plt) -> bytes:
    """Length (m, along) x width (mm, across); each defect its box, coloured by class; periodic series
    linked by a dashed line through their repeats."""
    from matplotlib.patches import Rectangle

    colours = _colours(rep["classes"])
    fig, ax = plt.subplots(figsize=(12, 3.6))
    ax.set_facecolor("#f4f4f4")
    seen = set()
    for i in items:
        c = i.get("class", "?")
        x, y = float(i.get("along_mm", 0.0)) / 1000.0, float(i.get("across_mm", 0.0))
        w, h = float(i.get("length_mm", 0.0)) / 1000.0, float(i.get("width_mm", 0.0))
        ax.add_patch(Rectangle((x - w / 2, y - h / 2), w, h, facecolor=colours.get(c, "#777"), alpha=0.35,
                               edgecolor=colours.get(c, "#777")))
        ax.scatter([x], [y], s=14, color=colours.get(c, "#777"), label=None if c in seen else c, zorder=3)
        seen.add(c)
    by_track = {t.get("track_id"): t for t in items if "track_id" in t}
    for p in rep["periodic"]:
        pts = sorted((float(by_track[t]["along_mm"]), float(by_track[t]["across_mm"]))
                     for t in p.get("track_ids", []) if t in by_track)
        if len(pts) < 2:  # the series without its tracks: its stated first, pitch and last
            first, last, pitch = (float(p.get(k, 0.0)) for k in ("first_along_mm", "last_along_mm", "pitch_mm"))
            n = int(round((last - first) / pitch)) + 1 if pitch > 0 else 2
            pts = [(first + k * pitch, float(p.get("across_mm", 0.0))) for k in range(max(2, n))]
        xs, ys = [a / 1000.0 for a, _ in pts], [b for _, b in pts]
        ax.plot(xs, ys, "--", color="black", linewidth=1.2, zorder=4)
        ax.annotate(f"{p.get('class', '?')} every {float(p.get('pitch_mm', 0.0)):.0f} mm "
                    f"(roll \u2300 {float(p.get('roll_diameter_mm', 0.0)):.0f} mm, {p.get('count', len(pts))}x)",
                    (xs[0], ys[0]), textcoords="offset points", xytext=(4, 8), fontsize=8)
    length_m = max(rep["length_m"], 0.001)
    ax.set_xlim(0, length_m)
    top = max([float(i.get("across_mm", 0)) + float(i.get("width_mm", 0)) / 2 for i in items] or [100.0])
    ax.set_ylim(0, top * 1.08)
    ax.set_xlabel("along the coil (m, from the head)")
    ax.set_ylabel("across (mm)")
    ax.set_title(f"coil {rep['coil']}: {len(items)} {rep['items']} over {rep['length_m']:.1f} m")
    if seen:
        ax.legend(loc="upper right", fontsize=8, ncol=min(6, len(seen)))
    fig.tight_layout()
    return _png(fig, plt)


def histogram(rep: dict, plt) -> bytes:
    """Defects per class in each 100 m of the coil, stacked."""
    colours = _colours(rep["classes"])
    bins = rep["per_100m"]
    fig, ax = plt.subplots(figsize=(12, 3.2))
    xs = [b["from_m"] for b in bins]
    bottom = [0] * len(bins)
    for c in rep["classes"]:
        ys = [b["counts"].get(c, 0) for b in bins]
        if any(ys):
            ax.bar(xs, ys, width=90, bottom=bottom, align="edge", color=colours[c], label=c)
            bottom = [a + b for a, b in zip(bottom, ys)]
    ax.set_xlabel("along the coil (m): bins of 100 m")
    ax.set_ylabel(f"{rep['items']} per 100 m")
    ax.set_xlim(0, max(100.0, xs[-1] + 100.0))
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if any(bottom):
        ax.legend(loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no defects", transform=ax.transAxes, ha="center", va="center")
    fig.tight_layout()
    return _png(fig, plt)


def timing_plot(rep: dict, plt) -> bytes:
    """The coil's wall time against its budget."""
    t = rep["timing"]
    fig, ax = plt.subplots(figsize=(8, 1.6))
    wall, budget = t.get("wall_s"), t.get("budget_s")
    if wall is not None and budget is not None:
        ax.barh(["coil"], [wall], color="#3cb44b" if wall <= budget else "#e6194b", label="wall time")
        ax.axvline(budget, color="black", linestyle="--", label=f"budget {budget:.0f} s")
        ax.set_xlim(0, max(wall, budget) * 1.1)
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no timing in the journal (no summary)", transform=ax.transAxes, ha="center")
    ax.set_xlabel("seconds from coil start to its summary")
    fig.tight_layout()
    return _png(fig, plt)


def _img(name: str, data: bytes, alt: str) -> str:
    return (f'<img src="data:image/png;base64,{base64.b64encode(data).decode()}" alt="{html.escape(alt)}" '
            f'data-file="{html.escape(name)}">')


def render_html(rep: dict, plots: dict[str, bytes], crop_pngs: dict[int, bytes] | None = None) -> str:
    crop_pngs = crop_pngs or {}
    e = html.escape
    g = rep["grade"]
    grade = (f'<p class="grade g-{e(str(g.get("grade", "")))}"><b>Grade {e(str(g.get("grade", "?")))}</b>: '
             f'{e(str(g.get("reason", "")))} <small>(rule: {e(str(g.get("rule", "?")))})</small></p>') if g else \
        '<p class="grade">Not graded: the agent that wrote this journal does not grade coils.</p>'
    state = "final" if rep["final"] else "provisional" if rep["summary"] else "no summary"
    rows = "".join(f"<tr><td>{e(c)}</td><td>{n}</td></tr>" for c, n in rep["counts"].items())
    frames = rep["frames"] or {}
    fr = ", ".join(f"{e(k)} {v}" for k, v in frames.items())
    periodic = "".join(
        f"<tr><td>{e(str(p.get('class')))}</td><td>{float(p.get('across_mm', 0)):.0f}</td>"
        f"<td>{float(p.get('pitch_mm', 0)):.1f}</td><td>{float(p.get('roll_diameter_mm', 0)):.1f}</td>"
        f"<td>{p.get('count')}</td><td>{float(p.get('first_along_mm', 0)) / 1000:.2f}-"
        f"{float(p.get('last_along_mm', 0)) / 1000:.2f}</td><td>{p.get('confidence')}</td></tr>" for p in rep["periodic"])
    thumbs = []
    for n, w in enumerate(rep["worst"]):
        where = f"{float(w.get('along_mm', 0)) / 1000:.2f} m, {float(w.get('across_mm', 0)):.0f} mm across"
        label = (f"{e(str(w.get('class')))} {float(w.get('confidence', 0)):.2f}<br>{e(where)}<br>"
                 f"{float(w.get('width_mm', 0)):.0f} x {float(w.get('length_mm', 0)):.0f} mm")
        if n in crop_pngs:
            pic = _img(f"crop-{n}.png", crop_pngs[n], f"crop of {w.get('track_id')}")
        else:
            pic = '<div class="ph">no crop</div>'
        thumbs.append(f'<figure class="thumb">{pic}<figcaption>{label}</figcaption></figure>')
    notes = "".join(f"<li>{e(n)}</li>" for n in rep["notes"])
    t = rep["timing"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Coil {e(rep['coil'])}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }} table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: left; }} img {{ max-width: 100%; }}
.grade {{ font-size: 1.2em; padding: .4em; background: #eef; }} .thumbs {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.thumb img, .ph {{ width: 128px; height: 128px; object-fit: contain; background: #ddd; }}
.ph {{ display: flex; align-items: center; justify-content: center; color: #666; }} .thumb {{ margin: 0; }}
</style></head><body>
<h1>Coil {e(rep['coil'])}</h1>
<p>profile {e(str(rep['profile']))} &middot; summary {e(state)} &middot; complete {str(rep['complete']).lower()}
 &middot; end {e(str(rep['end_reason']))} &middot; {rep['length_m']:.1f} m &middot; journal {e(rep['journal'])}</p>
{grade}
{'<ul class="notes">' + notes + '</ul>' if notes else ''}
<h2>Strip map</h2>{_img('strip_map.png', plots['strip_map.png'], 'strip map')}
<h2>Defects per 100 m</h2>{_img('histogram.png', plots['histogram.png'], 'class histogram per 100 m')}
<table><tr><th>class</th><th>{e(rep['items'])}</th></tr>{rows}</table>
<p>defect events {rep['defect_events']}, tracks {rep['track_count']}; frames: {fr or 'n/a'}</p>
<h2>Periodic defects (roll marks)</h2>
{'<table><tr><th>class</th><th>across mm</th><th>pitch mm</th><th>roll diameter mm</th><th>count</th>'
 '<th>from-to m</th><th>confidence</th></tr>' + periodic + '</table>' if periodic else '<p>none found</p>'}
<h2>Worst defects</h2><div class="thumbs">{''.join(thumbs) or '<p>none</p>'}</div>
<h2>Timing</h2><p>{e(str(t.get('verdict', 'no timing recorded')))}</p>
{_img('timing.png', plots['timing.png'], 'timing against the budget')}
</body></html>
"""


def make_report(journal: Path, coil: str, out: Path | None, *, crops: Path | None = None, fmt: str = "html",
                worst_n: int = 8) -> tuple[dict, Path | None]:
    """Load the coil and write its report; returns (the JSON numbers, the HTML page or None)."""
    rec = load_coil(journal, coil)
    crop_pngs: dict[int, bytes] = {}
    rep = coil_report(rec, crops=crops, worst_n=worst_n, crop_pngs=crop_pngs)
    if fmt == "json":
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "report.json").write_text(json.dumps(rep, indent=1) + "\n")
        return rep, None
    plt = _pyplot()
    items = rec.tracks or rec.defects
    plots = {"strip_map.png": strip_map(rep, items, plt), "histogram.png": histogram(rep, plt),
             "timing.png": timing_plot(rep, plt)}
    out = out if out is not None else Path("report-" + re.sub(r"[^A-Za-z0-9._-]", "_", rec.coil).lstrip("."))
    out.mkdir(parents=True, exist_ok=True)
    for name, data in plots.items():
        (out / name).write_bytes(data)
    page = out / "index.html"
    page.write_text(render_html(rep, plots, crop_pngs))
    (out / "report.json").write_text(json.dumps(rep, indent=1) + "\n")
    return rep, page


def cmd_report(args) -> int:
    if args.journal is not None and args.config is not None:
        print("report: give --journal or --config, not both", file=sys.stderr)
        return 2
    if args.journal is None and args.config is None:
        print("report: say where the journal is: --journal DIR (copied from a line box) or --config FILE",
              file=sys.stderr)
        return 2
    from agent.config import ConfigError

    crops = args.crops
    try:
        if args.config is not None:
            try:
                journal, state = journal_dir_for_config(args.config)
            except ConfigError as exc:
                for err in exc.errors:
                    print(f"config error: {err}", file=sys.stderr)
                return 2
        else:
            journal = args.journal
            state = journal.parent.parent  # <state_dir>/journal/<agent name>
        if crops is None and (state / "crops").is_dir():
            crops = state / "crops"
        rep, page = make_report(journal, args.coil, args.out, crops=crops, fmt=args.format, worst_n=args.worst)
    except ReportError as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"report: cannot write the report: {exc}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps(rep))
    else:
        g = rep["grade"]
        print(f"coil {rep['coil']}: {sum(rep['counts'].values())} {rep['items']}, {len(rep['periodic'])} periodic, "
              f"grade {g.get('grade') if g else 'none'}; report: {page}")
    return 0
