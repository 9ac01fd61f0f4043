"""The `coilsight inspect` command: files and folders through a pack (agent/tools/inspect.py), outputs
written, bad files listed, a summary table.

Per image NAME (its file stem; a repeated name gets ``-2``, ``-3``...): ``NAME.overlay.png`` and
``NAME.events.json`` in the output folder. For the steel profile (and any pack with a segmentation
model when ``--csv`` is given) one ``masks.csv`` in Severstal's train.csv format
(``ImageId,ClassId,EncodedPixels``; ClassId = the pack's class index + 1; run-length column-major,
1-based) that training.datasets.severstal reads back. ``inspect.json`` lists every image and every
bad file. Exit status: 0 when at least one image was inspected (bad files listed), 1 when none was.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from agent.tools.inspect import IMAGE_SUFFIXES, BadImage, Inspector, inspect_image, read_image_file
from agent.tools.progress import ProgressLine

CSV_PROFILES = ("steel",)


def collect(paths: list[Path], skip: Path | None = None) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files to inspect (folders walked recursively for image suffixes, sorted) and paths that are not there."""
    files: list[Path] = []
    missing: list[tuple[str, str]] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                           and not (skip is not None and skip in f.resolve().parents))
            if not found:
                missing.append((str(p), f"no images ({', '.join(IMAGE_SUFFIXES)}) in this folder"))
            files += found
        elif p.is_file():
            files.append(p)
        else:
            missing.append((str(p), "no such file or folder"))
    return files, missing


def _unique(stem: str, taken: set[str]) -> str:
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}"
    taken.add(name)
    return name


def run_inspect(paths: list[Path], out: Path, *, pack_dir: Path, backend: str = "onnxruntime", threads: int = 0,
                csv_masks: bool | None = None, stream=None, err=None, progress: bool | None = None,
                as_json: bool = False) -> int:
    stream = stream if stream is not None else sys.stdout
    err = err if err is not None else sys.stderr
    out.mkdir(parents=True, exist_ok=True)
    files, bad = collect(paths, skip=out.resolve())
    rows: list[dict] = []
    taken: set[str] = set()
    with Inspector(pack_dir, backend=backend, threads=threads) as insp:
        write_csv = (insp.pack.profile in CSV_PROFILES) if csv_masks is None else csv_masks
        if write_csv and "seg" not in insp.pack.models:
            print(f"inspect: the {insp.pack.profile} pack has no segmentation model: no masks.csv", file=err)
            write_csv = False
        csv_file = open(out / "masks.csv", "w", newline="") if write_csv else None
        writer = csv.writer(csv_file) if csv_file else None
        if writer:
            writer.writerow(["ImageId", "ClassId", "EncodedPixels"])
        bar = ProgressLine("inspect", len(files), stream=err, enabled=progress)
        try:
            for i, path in enumerate(files):
                try:
                    image = read_image_file(path)
                    name = _unique(path.stem, taken)
                    res = inspect_image(insp, image, path.name)
                except BadImage as exc:
                    bad.append((str(path), str(exc).removeprefix(f"{path}: ").removeprefix(f"{path.name}: ")))
                    bar.update(i + 1, len(bad))
                    continue
                (out / f"{name}.overlay.png").write_bytes(res.overlay_png)
                doc = {**res.summary(), "file": str(path), "profile": insp.pack.profile,
                       "models": insp.pack.versions(), "events": res.events}
                (out / f"{name}.events.json").write_text(json.dumps(doc, indent=1) + "\n")
                row = {**res.summary(), "file": str(path), "outputs": name}
                if writer and res.masks is not None:
                    from training.datasets.severstal import rle_encode

                    image_id = path.name if name == path.stem else f"{name}{path.suffix}"
                    row["image_id"] = image_id
                    for k in range(res.masks.shape[0]):
                        if res.masks[k].any():
                            writer.writerow([image_id, k + 1, rle_encode(res.masks[k])])
                rows.append(row)
                bar.update(i + 1, len(bad))
        finally:
            bar.close()
            if csv_file:
                csv_file.close()
        profile = insp.pack.profile
    report = {"profile": profile, "out": str(out), "inspected": len(rows), "bad": len(bad),
              "images": rows, "bad_files": [{"file": f, "reason": r} for f, r in bad],
              "masks_csv": str(out / "masks.csv") if write_csv else None}
    (out / "inspect.json").write_text(json.dumps(report, indent=1) + "\n")
    if as_json:
        print(json.dumps(report), file=stream)
    else:
        print_table(report, stream)
    if not rows:
        print(f"inspect: nothing could be inspected ({len(bad)} bad file(s))", file=err)
        return 1
    return 0


def print_table(report: dict, stream) -> None:
    rows = report["images"]
    if rows:
        w = max(12, *(len(r["image"]) for r in rows))
        print(f"{'image':<{w}}  {'size':>11}  {'gate':>5}  {'events':>6}  classes", file=stream)
        for r in rows:
            size = "x".join(str(v) for v in (r["shape"][1], r["shape"][0]))
            classes = ", ".join(f"{c} {n}" for c, n in sorted(r["classes"].items())) or "-"
            note = f"  [{'; '.join(r['handling'])}]" if r["handling"] else ""
            print(f"{r['image']:<{w}}  {size:>11}  {r['gate_score']:>5.2f}  {r['events']:>6}  {classes}{note}",
                  file=stream)
    for b in report["bad_files"]:
        print(f"BAD  {b['file']}: {b['reason']}", file=stream)
    events = sum(r["events"] for r in rows)
    print(f"{report['inspected']} image(s) inspected with the {report['profile']} pack, {events} defect(s), "
          f"{report['bad']} bad file(s) skipped; outputs in {report['out']}"
          + (f" (masks: {report['masks_csv']})" if report["masks_csv"] else ""), file=stream)
