"""Offline operator tools' sub-commands: inspect (images through a pack), report (a coil from the journal).

Handlers import what they drive lazily, so `coilsight --help` stays fast.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engines.backends import BACKENDS
from engines.packs import PROFILES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="run a model pack over image files or folders: overlays, events JSON, masks CSV",
                       description="Runs the profile's shipped model pack (or --models DIR) over images exactly as "
                       "the agent would (gate, segmentation, post-processing) and writes, per image, NAME.overlay.png "
                       "and NAME.events.json, plus masks.csv (Severstal format) for steel. Bad files are listed and "
                       "skipped. Exit 0 when at least one image was inspected, 1 when none could be, 2 on a usage "
                       "or model pack error.")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files (png, jpg, bmp, tif, npy) or folders")
    p.add_argument("--profile", default="steel", choices=PROFILES, help="shipped model pack to use (default steel)")
    p.add_argument("--models", type=Path, help="a model pack folder instead of the profile's shipped one")
    p.add_argument("--out", type=Path, default=Path("inspect-out"), help="output folder (default ./inspect-out)")
    p.add_argument("--backend", default="onnxruntime", choices=tuple(sorted(BACKENDS)), help="backend to run the pack on")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: the runtime's default)")
    p.add_argument("--csv", dest="csv_masks", action=argparse.BooleanOptionalAction, default=None,
                   help="write masks.csv (default: on for steel)")
    p.add_argument("--json", action="store_true", help="print the run's report as JSON instead of the table")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("report", help="one coil from the agent's journal as an HTML page (or JSON), offline",
                       description="Reads the agent's journal read-only (a copy from a line box works) and writes "
                       "one HTML page for the coil: strip map, defects per 100 m, periodic series, worst defects, "
                       "grade and timing (PNG plots embedded and beside it). Exit 0 done, 1 when the journal or the "
                       "coil is not there, 2 on a usage error.")
    p.add_argument("coil", metavar="COIL", help="coil id, or 'latest' for the last coil with a summary")
    p.add_argument("--journal", type=Path, help="the journal directory (<state_dir>/journal/<agent name>)")
    p.add_argument("--config", type=Path, help="the agent's config: its journal is read from its state_dir")
    p.add_argument("--crops", type=Path, help="defect crops folder (default: <state_dir>/crops when present)")
    p.add_argument("--out", type=Path, help="output folder (default ./report-COIL)")
    p.add_argument("--format", choices=("html", "json"), default="html",
                   help="html: the page (default); json: the report's numbers on stdout")
    p.add_argument("--worst", type=int, default=8, help="worst defects shown as thumbnails (default 8)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from agent.tools.report import cmd_report as run

    return run(args)


def cmd_inspect(args: argparse.Namespace) -> int:
    from engines.backends import BackendError
    from engines.modelpack import ModelPackError
    from engines.packs import shipped_pack_dir
    from agent.tools.inspect_run import run_inspect

    pack_dir = args.models or shipped_pack_dir(args.profile)
    if not (pack_dir / "model.json").is_file():
        print(f"inspect: no model pack at {pack_dir} (model.json missing)", file=sys.stderr)
        return 2
    try:
        return run_inspect(args.paths, args.out, pack_dir=pack_dir, backend=args.backend, threads=args.threads,
                           csv_masks=args.csv_masks, as_json=args.json)
    except (ModelPackError, BackendError) as exc:
        print(f"inspect: cannot open the model pack: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"inspect: cannot write outputs: {exc}", file=sys.stderr)
        return 2
